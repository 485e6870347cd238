"""Experiment tracking (``--report-to wandb|tensorboard``): the scalars of metrics.jsonl and the run's settings.

Each tracker is a callback placed right after ``MetricsWriter``, so it sees every record exactly
as written. On rank 0 it starts at train begin (inside ``output_dir``), records the settings
(``TrainingConfig.to_dict()``), logs each record's numeric values (every finite int or float but
``step``, which is the x axis; flags such as ``no_targets`` and lists such as ``samples`` are not
scalars) at the record's step, and finishes at the end of the run or on a halt.

The libraries are optional extras, imported when the tracker is built (at ``Trainer`` init, before
any step), so a missing one fails at once with the extra to install.

* wandb: ``wandb.init(dir=output_dir)``; project ``bit-axon`` unless ``WANDB_PROJECT`` is set;
  ``WANDB_MODE=offline`` works without a network or a login. The run id is checkpoint state, so a
  resumed run continues the same wandb run (steps the interrupted run logged after its last
  checkpoint are logged again; wandb keeps the first value of a step).
* TensorBoard: event files in ``output_dir/tensorboard``, written with TensorBoard's own
  ``EventFileWriter`` (``tensorboard.summary.writer``, which needs neither TensorFlow nor torch;
  ``tensorboard.summary.Writer`` is marked experimental and writes scalars only). The settings go
  in as hparams and as a text summary. A resumed run writes a session-start event at its first
  step, so TensorBoard drops the steps the interrupted run logged after its last checkpoint.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any

from bit_axon.training.callbacks import Callback, TrainingError

if TYPE_CHECKING:
    from types import ModuleType

    from bit_axon.training.trainer import Trainer

TENSORBOARD_DIR = "tensorboard"  # inside output_dir
WANDB_PROJECT = "bit-axon"  # unless WANDB_PROJECT is set
WANDB_RUN_ID = "wandb_run_id"  # the checkpoint-state key


class TrackingError(TrainingError):
    """A tracker that cannot run: its library is missing or it could not start."""


def _import(report_to: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(
            f"--report-to {report_to} needs the {report_to} package: pip install 'bit-axon[{report_to}]'"
        ) from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The values of a metrics record that a tracker logs: finite numbers (not bools), ``step`` aside."""
    return {
        key: value for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class Tracker(Callback):
    """Start, log and finish on rank 0; subclasses say how (``start``, ``log``, ``finish``)."""

    active = False

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.is_main:
            self.start(trainer)
            self.active = True

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.active:
            self.log(record["step"], scalars(record), record)

    def on_halt(self, trainer: Trainer, error: BaseException) -> None:
        self._close()

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._close()

    def _close(self) -> None:
        if self.active:
            self.active = False
            self.finish()

    def start(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float], record: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    def __init__(self) -> None:
        self.wandb = _import("wandb", "wandb")
        self.run_id: str | None = None
        self.run = None

    def start(self, trainer: Trainer) -> None:
        wandb = self.wandb
        try:
            self.run = wandb.init(
                project=None if "WANDB_PROJECT" in os.environ else WANDB_PROJECT,
                name=trainer.output_dir.resolve().name, id=self.run_id, resume="allow",
                dir=str(trainer.output_dir), config=trainer.config.to_dict(),
                # Our console keeps the progress bar; wandb's capture of stdout would wrap it.
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as err:
            raise TrackingError(
                f"--report-to wandb could not start a run ({err}); run `wandb login`, or set WANDB_MODE=offline"
            ) from None
        self.run_id = self.run.id  # a fresh run's new id, kept in checkpoints

    def log(self, step: int, values: dict[str, float], record: dict[str, Any]) -> None:
        row: dict[str, Any] = dict(values)
        if record.get("samples"):
            row["samples"] = self.wandb.Table(
                columns=["prompt", "completion"],
                data=[[s.get("prompt"), s.get("completion")] for s in record["samples"]],
            )
        self.run.log(row, step=step)

    def finish(self) -> None:
        self.run.finish()
        self.run = None

    def checkpoint_state(self) -> dict[str, Any]:
        return {WANDB_RUN_ID: self.run_id} if self.run_id else {}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.run_id = state.get(WANDB_RUN_ID, self.run_id)


def _hparam(value: Any) -> bool | int | float | str:
    """A setting as an hparams value: TensorBoard takes bools, numbers and strings only."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class TensorBoardTracker(Tracker):
    def __init__(self) -> None:
        self.writer_module = _import("tensorboard", "tensorboard.summary.writer.event_file_writer")
        self.writer = None

    def start(self, trainer: Trainer) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.plugins.text.summary_v2 import text_pb

        self.writer = self.writer_module.EventFileWriter(str(trainer.output_dir / TENSORBOARD_DIR))
        first = trainer.step + 1
        if trainer.step:
            # TensorBoard drops this directory's events at steps >= first: what the interrupted run
            # logged after the checkpoint this run resumed from.
            self._add(Event(step=first, session_log=SessionLog(status=SessionLog.START)))
        settings = trainer.config.to_dict()
        self._add(Event(step=first, summary=hparams_pb({k: _hparam(v) for k, v in settings.items()})))
        text = "\n".join("    " + line for line in json.dumps(settings, indent=2).splitlines())  # markdown code
        self._add(Event(step=first, summary=text_pb("settings", text)))
        self.writer.flush()

    def _add(self, event) -> None:
        event.wall_time = time.time()
        self.writer.add_event(event)

    def log(self, step: int, values: dict[str, float], record: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._add(Event(step=step, summary=summary))
        self.writer.flush()  # a crash loses no step; a flush is cheap next to a training step

    def finish(self) -> None:
        self.writer.close()
        self.writer = None


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


def tracking_callbacks(report_to: str) -> list[Callback]:
    """The callbacks of ``TrainingConfig.report_to`` ("none": none); raises ``TrackingError`` when
    its library is not installed."""
    return [] if report_to == "none" else [TRACKERS[report_to]()]

