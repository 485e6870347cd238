"""--report-to: the trackers' own files, read back with the trackers' own readers, hold the
scalars of metrics.jsonl and the settings; a missing library is a clear error before training."""

import json
import re
import sys
from pathlib import Path

from bit_axon.training.callbacks import read_metrics
from bit_axon.training.tracking import WANDB_RUN_ID, TrackingError, scalars
from bit_axon.training.trainer import Trainer
from toy import config, copy_task, tiny_model, trainer_kwargs

import pytest


def _train(tmp_path, resume=False, **kw):
    cfg = config(tmp_path, save_every=2, eval_every=2, **kw)
    trainer = Trainer(tiny_model(), cfg, copy_task(20), copy_task(4, seed=3), **trainer_kwargs())
    trainer.train(resume=resume)
    return cfg


def _expected(run: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar metrics.jsonl holds."""
    return {(k, r["step"]): v for r in read_metrics(run / "metrics.jsonl") for k, v in scalars(r).items()}


def test_scalars_are_finite_numbers_but_step():
    record = {"step": 3, "loss": 2.5, "tokens": 40, "grad_norm": float("nan"), "no_targets": True,
              "samples": [{"prompt": "a", "completion": "b"}], "epoch": 0.5}
    assert scalars(record) == {"loss": 2.5, "tokens": 40, "epoch": 0.5}


def test_tensorboard_events_hold_the_metrics_and_settings_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, max_steps=2, report_to="tensorboard")
    cfg = _train(tmp_path, resume=True, max_steps=4, report_to="tensorboard")
    run = tmp_path / "run"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    expected = _expected(run)
    assert set(logged) == set(expected)  # each step once: the resume left no duplicate
    assert {tag for tag, _ in logged} >= {"loss", "learning_rate", "val_loss", "resumed_from"}
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key  # float32 in the event file
    text = acc.Tensors("settings")[-1].tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in text.splitlines())) == cfg.to_dict()
    assert "_hparams_/session_start_info" in acc.Tags()["tensors"]


def _wandb_records(path: Path) -> list:
    """The protobuf records of a wandb ``.wandb`` file (LevelDB's log format: 32 KiB blocks of chunks
    with a 7-byte header; wandb 0.31 no longer ships its reader, ``wandb.sdk.internal.datastore``)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if (room := block - pos % block) < 7:
            pos += room  # a block's tail too short for a header is padding
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(path: Path) -> tuple[str, dict, dict[tuple[str, int], float]]:
    """(run id, config, (key, step) -> value) of an offline run file."""
    run_id, settings, history = None, {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            settings.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            settings.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.update({(k, row["_step"]): v for k, v in row.items() if not k.startswith("_")})
    settings.pop("_wandb", None)
    return run_id, settings, history


def test_wandb_offline_run_holds_the_metrics_and_settings_and_a_resume_continues_it(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _train(tmp_path, max_steps=2, report_to="wandb")
    cfg = _train(tmp_path, resume=True, max_steps=4, report_to="wandb")
    run = tmp_path / "run"
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    (first_id, _, first), (second_id, settings, second) = (_wandb_run(f) for f in files)
    state = json.loads((run / "step_00000004" / "training_state.json").read_text())
    assert first_id == second_id == state[WANDB_RUN_ID]
    assert settings == cfg.to_dict()
    expected = _expected(run)
    assert {**first, **second} == pytest.approx(expected)
    assert {step for _, step in first} == {1, 2} and {step for _, step in second} == {3, 4}


@pytest.mark.parametrize("report_to, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_library_fails_at_trainer_init_naming_the_extra(tmp_path, monkeypatch, report_to, module):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    message = f"--report-to {report_to} needs the {report_to} package: pip install 'bit-axon[{report_to}]'"
    with pytest.raises(TrackingError, match=re.escape(message)):
        Trainer(tiny_model(), config(tmp_path, report_to=report_to), copy_task(4), **trainer_kwargs())
    assert not (tmp_path / "run").exists()  # nothing started
