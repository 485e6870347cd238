"""What happens around the training loop's steps: the callbacks ``Trainer.train`` calls.

The loop itself (``Trainer.train``) only runs steps; cooling, evaluation, the metrics file, the
loss plot, checkpoints, early stopping and the non-finite-loss stop are callbacks, called in list
order at these points:

* ``on_train_begin(trainer)``: after a resume (``trainer.step`` is the step the run starts from).
* ``on_step_begin(trainer, step)``: before step ``step`` (1-based) runs. May sleep (a thermal
  pause). Raising ``ThermalShutdownError`` stops the run on every rank after ``on_halt``.
* ``on_step_end(trainer, record)``: after an update; ``record`` is the step's metrics row, which
  callbacks may extend (cooling status, validation results) before later ones write it out.
* ``on_halt(trainer, error)``: the run is about to raise ``error`` (a thermal stop).
* ``on_train_end(trainer, result)``: the loop ended (all steps done, Ctrl-C, or a stop request);
  callbacks may add to the ``result`` that ``train`` returns.
* ``checkpoint_state()`` / ``restore_state(state)``: what the callback adds to a checkpoint's
  ``training_state.json``, and takes back from it when a run resumes.

The built-in callbacks run in the order above (the non-finite stop first, so a diverged step is
neither written nor saved); extra ones (``Trainer(..., callbacks=[...])``) run after them, so they
see each record complete, already written, and the step's checkpoint saved.

A callback asks for a graceful stop (finish this step, save, return) with
``trainer.request_stop(reason)``, or aborts by raising.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bit_axon.io import atomic_write_text
from bit_axon.training.checkpoint import get_latest_checkpoint, save_trainable
from bit_axon.training.plotting import RESUMED_FROM, plot_losses

if TYPE_CHECKING:
    from bit_axon.training.cooling import CoolingScheduler
    from bit_axon.training.trainer import Trainer

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FINAL_ADAPTER = "final_adapter.safetensors"
BEST_ADAPTER = "best_adapter.safetensors"  # the adapters of the evaluation with the lowest val_loss
NO_TARGETS = "no_targets"  # a metrics record's flag: the step's batches had no target tokens

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do (one line)."""


class NonFiniteLossError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class NoTargetTokensError(TrainingError):
    """Every step of a run had batches without target tokens."""


class CheckpointWriteError(TrainingError):
    """A checkpoint or the final adapter could not be written (a full disk, a read-only folder)."""


def step_was_skipped(record: dict[str, Any]) -> bool:
    """Whether the step behind a metrics record made no update (non-finite loss or gradients, or no targets)."""
    return not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]))


def step_was_empty(record: dict[str, Any]) -> bool:
    """Whether the step behind a metrics record was skipped because its batches had no target tokens."""
    return bool(record.get(NO_TARGETS))


def write_failure(err: OSError, what: str, output_dir: Path) -> CheckpointWriteError:
    """The one-line error for an OS error while writing ``what``, naming the last good checkpoint."""
    cause = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    latest = get_latest_checkpoint(output_dir)
    last_good = f"the last good checkpoint is {latest}" if latest else f"there is no checkpoint in {output_dir} yet"
    return CheckpointWriteError(
        f"Could not write {what} ({cause}); {last_good}. Free some space (or fix the folder), then rerun "
        "with --resume."
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file. A torn final line (a kill mid-append) is dropped with
    a warning; a bad line elsewhere is a ``ValueError`` naming ``file:line``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s:%d: dropping a torn last record (%s)", path, number, err.msg)
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg}); fix or delete that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


class Callback:
    """Base class: every hook does nothing."""

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        pass

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_halt(self, trainer: Trainer, error: BaseException) -> None:
        pass

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        pass

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        pass


class NonFiniteStop(Callback):
    """Raise ``NonFiniteLossError`` after ``limit`` consecutive skipped steps, and ``NoTargetTokensError``
    at the end of a run whose every step had no target tokens.

    The trainer skips (does not apply) a step whose loss or gradient norm is not finite; one such
    step is noise, several in a row mean the run has diverged. A step without target tokens is
    skipped too, but says nothing about divergence: it is counted apart.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.steps = self.empty = 0  # of this run (since the resume)

    def on_train_begin(self, trainer: Trainer) -> None:
        self.consecutive = self.steps = self.empty = 0

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if self.steps and self.empty == self.steps:
            raise NoTargetTokensError(
                f"None of the {self.steps} steps had a target token: at max_seq_len={trainer.config.max_seq_len} "
                "every answer is cut off. Raise --max-seq-len or shorten the prompts."
            )

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.steps += 1
        if step_was_empty(record):
            self.empty += 1
            if self.empty == 1:
                logger.warning(
                    "step %d: its batches hold no target tokens, so its update is skipped (counted in "
                    "empty_steps, not as a non-finite step): examples whose answer is cut off by "
                    "max_seq_len=%d have none. Further such steps are not reported.",
                    record["step"], trainer.config.max_seq_len,
                )
            return
        if not step_was_skipped(record):
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps had non-finite loss or gradients "
                f"(last at step {trainer.step}); stopping. Try a lower --learning-rate; the last good "
                f"checkpoint in {trainer.output_dir} is intact."
            )


class Cooling(Callback):
    """The thermal policy around each step: pause or stop before it, a cool-down gap after it.

    In the warm tier the action is the cool-down gap (``CoolingScheduler.after_step``); the batch
    size never changes, although ``should_reduce_batch()`` is True there: a smaller batch would
    change the packed batches and the data position, so a resumed run would no longer repeat the
    uninterrupted one.
    """

    def __init__(self, scheduler: CoolingScheduler):
        self.scheduler = scheduler

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        self.scheduler.check_before_step(step)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.scheduler.after_step(record["step_time"])
        record.update(self.scheduler.status())

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        result.update(self.scheduler.status())

    def checkpoint_state(self) -> dict[str, Any]:
        return dict(self.scheduler.status())

    def restore_state(self, state: dict[str, Any]) -> None:
        if "total_pause_time" in state:
            self.scheduler.restore_totals(state)


class Evaluation(Callback):
    """``trainer.evaluate()`` every ``every`` steps when there is a validation set; the results join the record."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.val_dataset is not None:
            record.update(trainer.evaluate())


def write_adapter(trainer: Trainer, name: str, what: str) -> Path:
    """``trainer.output_dir / name``: the trainable parameters, written by rank 0 (atomically); a
    failed write is a ``write_failure`` naming ``what``."""
    path = trainer.output_dir / name
    if trainer.is_main:
        try:
            save_trainable(trainer.model, path)
        except OSError as err:
            raise write_failure(err, f"{what} {path}", trainer.output_dir) from err
    return path


class BestAdapter(Callback):
    """``best_adapter.safetensors``: the adapters of the evaluation with the lowest ``val_loss`` so far.

    Rewritten (atomically, rank 0) at every evaluation that beats the best; the best step and loss
    are checkpoint state, so they survive a resume, and ``Trainer.save_checkpoint`` keeps that step's
    checkpoint folder (when ``save_every`` made one) through rotation. A run that starts with no best
    recorded (a fresh run, or a resume from before the first evaluation) removes an older file first,
    so the file on disk is always this run's best. The result gets ``best_val_loss``, ``best_step``
    and ``best_adapter_path`` when an evaluation ran.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.val_loss = math.inf

    def on_train_begin(self, trainer: Trainer) -> None:
        path = trainer.output_dir / BEST_ADAPTER
        if self.step is None and trainer.is_main and path.exists():
            path.unlink()

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        value = record.get("val_loss")
        if value is None or not value < self.val_loss:  # NaN never counts as better
            return
        self.step, self.val_loss = trainer.step, value
        write_adapter(trainer, BEST_ADAPTER, "the best adapter")

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if self.step is not None:
            result.update(best_val_loss=self.val_loss, best_step=self.step,
                          best_adapter_path=str(trainer.output_dir / BEST_ADAPTER))

    def checkpoint_state(self) -> dict[str, Any]:
        best = None if self.step is None else {"step": self.step, "val_loss": self.val_loss}
        return {"best_adapter": best}

    def restore_state(self, state: dict[str, Any]) -> None:
        best = state.get("best_adapter")
        self.step, self.val_loss = (None, math.inf) if best is None else (best["step"], best["val_loss"])


class MetricsWriter(Callback):
    """``metrics.jsonl``: one JSON record per step, appended by rank 0; ``history`` holds the run's records.

    A fresh run starts the file anew; a resumed run keeps the records up to the step it resumes
    from, so every step appears once however often the run was interrupted. The first record a
    resumed run writes carries ``"resumed_from": <step>`` (loss.png marks it).
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None  # set until the first record after a resume is written

    def on_train_begin(self, trainer: Trainer) -> None:
        path = trainer.output_dir / METRICS_FILE
        self.history.clear()
        self.resumed_from = trainer.step or None
        if not trainer.is_main or not path.exists():
            return
        if trainer.step == 0:
            path.unlink()
            return
        self.history.extend(rec for rec in read_metrics(path) if rec.get("step", 0) <= trainer.step)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.resumed_from is not None:
            record[RESUMED_FROM] = self.resumed_from
            self.resumed_from = None
        self.history.append(record)
        if trainer.is_main:
            with open(trainer.output_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")


class LossPlot(Callback):
    """``loss.png`` from the writer's records: after every evaluation and at the end (rank 0)."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer

    def plot(self, trainer: Trainer) -> Path | None:
        return plot_losses(self.writer.history, trainer.output_dir / LOSS_PLOT) if trainer.is_main else None

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            self.plot(trainer)

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self.plot(trainer)


class Checkpointing(Callback):
    """Checkpoints every ``every`` steps, on a halt and at the end; then ``final_adapter.safetensors``.

    A halt or the end saves only when a step ran since the last save, so a stop right after a
    save (or before the first step of a resumed run) writes nothing new.

    Only a finished run has a final adapter: all its steps done, or stopped by a callback (early
    stopping). A run stopped by a signal (Ctrl-C, SIGTERM) is unfinished: it saves its checkpoint
    and writes no final adapter (``result["adapter_path"]`` is None). And a run that has steps to do
    removes the final adapter an earlier run left in ``output_dir`` when it begins (a resume to more
    steps, or a fresh run over an old one): until this run finishes there is no final adapter, so
    an interrupted continuation never leaves one that looks like its result. The finished run's
    weights are still in its last checkpoint (``step_*/adapters.safetensors``), until rotated.
    ``result["checkpoint"]`` is the newest checkpoint folder either way.
    """

    def __init__(self, every: int):
        self.every = every
        self.last_saved = 0

    def on_train_begin(self, trainer: Trainer) -> None:
        self.last_saved = trainer.step
        final = trainer.output_dir / FINAL_ADAPTER
        if trainer.is_main and trainer.step < trainer.config.max_steps and final.exists():
            final.unlink()
            trainer.console.print(f"Removed {final} of an earlier run; this run writes its own when it finishes.",
                                  highlight=False, soft_wrap=True)

    def _save_if_new(self, trainer: Trainer) -> Path | None:
        if trainer.step <= self.last_saved:
            return None
        self.last_saved = trainer.step
        return trainer.save_checkpoint()

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.step % self.every == 0:
            self._save_if_new(trainer)

    def on_halt(self, trainer: Trainer, error: BaseException) -> None:
        if (path := self._save_if_new(trainer)) is not None:
            trainer.console.print(f"[red]Stopping: checkpoint of step {trainer.step} saved to {path}[/red]", soft_wrap=True)

    def on_train_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._save_if_new(trainer)
        latest = get_latest_checkpoint(trainer.output_dir) if trainer.is_main else None
        result["checkpoint"] = None if latest is None else str(latest)
        if trainer.signals.requested:
            result["adapter_path"] = None
            return
        path = write_adapter(trainer, FINAL_ADAPTER, "the final adapter")
        result["adapter_path"] = str(path)


class EarlyStopping(Callback):
    """Stop when ``metric`` (default the validation loss) has not improved by more than
    ``min_delta`` for ``patience`` evaluations in a row.

    The best value and the count survive a resume (they are checkpoint state). The trainer adds
    one for ``TrainingConfig.early_stopping_patience``; ``Trainer(..., callbacks=[EarlyStopping(...)])``
    sets the other knobs. It needs a validation set and ``eval_every``. The stop is graceful: the
    step finishes, ``Checkpointing`` saves it and writes the final adapter, and the result's
    ``stop_reason`` says why.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "val_loss"):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best = math.inf
        self.evaluations_without_improvement = 0

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.metric not in record:
            return
        value = record[self.metric]
        if value < self.best - self.min_delta:
            self.best, self.evaluations_without_improvement = value, 0
            return
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= self.patience:
            trainer.request_stop(
                f"early stopping: {self.metric} has not improved on {self.best:.4f} "
                f"in {self.patience} evaluations"
            )

    def checkpoint_state(self) -> dict[str, Any]:
        best = self.best if math.isfinite(self.best) else None
        return {"early_stopping": {"best": best, "evaluations_without_improvement": self.evaluations_without_improvement}}

    def restore_state(self, state: dict[str, Any]) -> None:
        saved = state.get("early_stopping")
        if saved:
            self.best = math.inf if saved["best"] is None else saved["best"]
            self.evaluations_without_improvement = saved["evaluations_without_improvement"]
