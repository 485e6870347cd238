"""Interrupted and damaged runs (issue 18): atomic temp names, resuming past damaged checkpoints,
unfinished saves, a torn metrics file, batches without targets, a full disk, Ctrl-C, the schedule."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import threading
import time

from bit_axon import io
from bit_axon.training import recovery
from bit_axon.training.callbacks import (
    METRICS_FILE,
    Callback,
    CheckpointWriteError,
    NoTargetTokensError,
    read_metrics,
)
from bit_axon.training.checkpoint import ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE, list_checkpoints
from bit_axon.training.scheduler import cosine_with_warmup
from bit_axon.training.trainer import Trainer
from toy import config, copy_task, tiny_model, trainer_kwargs

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

STEPS = 3


def step_dir(run, step: int):
    return run / f"step_{step:08d}"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of STEPS steps with a checkpoint after every one (built once, copied per test)."""
    base = tmp_path_factory.mktemp("finished")
    Trainer(tiny_model(), config(base, max_steps=STEPS, save_every=1), copy_task(30), **trainer_kwargs()).train()
    return base / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


class _StartStep(Callback):
    def on_train_begin(self, trainer):
        trainer.started_at = trainer.step


def resume(tmp_path, **kw):
    values = dict(max_steps=STEPS, save_every=1) | kw
    trainer = Trainer(tiny_model(), config(tmp_path, **values), copy_task(30), callbacks=[_StartStep()],
                      **trainer_kwargs())
    return trainer, trainer.train(resume=True)


def resumed_from(trainer) -> int:
    return trainer.started_at


# ---- point 1: temp names, unfinished saves ------------------------------------------------------


def test_atomic_temp_files_are_hidden_and_never_match_a_loader(tmp_path, monkeypatch):
    names = []
    real_replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda src, dst: (names.append(os.path.basename(src)), real_replace(src, dst)))
    io.atomic_save_safetensors(tmp_path / "model.safetensors", {"w": mx.ones(3)}, {"k": "v"})
    io.atomic_write_text(tmp_path / "config.json", "{}")
    assert len(names) == 2
    for name in names:
        assert name.startswith(".") and name.endswith(".tmp"), name
        assert not name.endswith((".safetensors", ".json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    weights, metadata = mx.load(str(tmp_path / "model.safetensors"), return_metadata=True)
    assert mx.array_equal(weights["w"], mx.ones(3)) and metadata == {"k": "v"}


def test_a_kill_mid_write_leaves_nothing_a_loader_globs(tmp_path, monkeypatch):
    def killed(*args):
        raise SystemExit(137)  # the process dies between writing the temp file and renaming it

    monkeypatch.setattr(io.os, "replace", killed)
    monkeypatch.setattr(io.Path, "unlink", lambda self, missing_ok=False: None)  # and cleans nothing up
    with pytest.raises(SystemExit):
        io.atomic_save_safetensors(tmp_path / "model.safetensors", {"w": mx.ones(3)})
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.safetensors.")
    assert list(tmp_path.glob("*.safetensors")) == []


def test_an_incomplete_unfinished_save_is_removed(run, caplog):
    partial = run / ".step_00000004.abcd.tmp"
    partial.mkdir()
    shutil.copy(step_dir(run, 3) / ADAPTERS_FILE, partial / ADAPTERS_FILE)
    with caplog.at_level(logging.INFO, logger=recovery.__name__):
        recovery.recover_unfinished(run)
    assert not partial.exists() and "left unfinished by an interrupted save" in caplog.text


def test_a_complete_unfinished_save_is_renamed_into_place(run, caplog):
    tmp = run / ".step_00000003.wxyz.tmp"
    step_dir(run, 3).rename(tmp)  # killed after writing everything, before the rename
    with caplog.at_level(logging.WARNING, logger=recovery.__name__):
        recovery.recover_unfinished(run)
    assert step_dir(run, 3).is_dir() and not tmp.exists()
    assert f"Recovered the complete checkpoint {tmp}" in caplog.text


def test_a_complete_unfinished_save_beside_its_step_is_kept_with_a_warning(run, caplog, tmp_path):
    stale = run / ".step_00000003.stale"
    shutil.copytree(step_dir(run, 3), stale)  # killed while swapping a re-saved step
    with caplog.at_level(logging.WARNING, logger=recovery.__name__):
        trainer, result = resume(tmp_path, max_steps=STEPS + 1)
    assert stale.is_dir() and recovery.checkpoint_problem(stale) is None
    assert f"{stale} holds a complete checkpoint" in caplog.text and result["step"] == STEPS + 1


# ---- point 2: resume verifies what it trusts ----------------------------------------------------


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapters": (lambda d: truncate(d / ADAPTERS_FILE), f"{ADAPTERS_FILE} is unreadable"),
    "missing optimizer state": (lambda d: (d / OPTIMIZER_FILE).unlink(), f"{OPTIMIZER_FILE} is missing"),
    "truncated optimizer state": (lambda d: truncate(d / OPTIMIZER_FILE), f"{OPTIMIZER_FILE} is unreadable"),
    "garbage state": (lambda d: (d / STATE_FILE).write_text("{'step': 3,"), "Unreadable checkpoint state"),
    "deleted state": (lambda d: (d / STATE_FILE).unlink(), f"{STATE_FILE} is missing"),
    "state without a step": (lambda d: (d / STATE_FILE).write_text('{"loss": 1.0}'), f"{STATE_FILE} has no step"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it(run, tmp_path, caplog, damage):
    harm, problem = DAMAGE[damage]
    harm(step_dir(run, 3))
    before = {p.name: p.read_bytes() for p in step_dir(run, 3).iterdir()}
    with caplog.at_level(logging.WARNING, logger=recovery.__name__):
        trainer, result = resume(tmp_path)
    assert resumed_from(trainer) == 2 and result["step"] == STEPS
    damaged = run / "step_00000003.damaged"
    assert f"Checkpoint {step_dir(run, 3)} is damaged ({problem}" in caplog.text
    assert f"moved it aside to {damaged}" in caplog.text
    # The re-saved step 3 is new and intact; the damaged folder is still there, byte for byte.
    assert recovery.checkpoint_problem(step_dir(run, 3)) is None
    assert {p.name: p.read_bytes() for p in damaged.iterdir()} == before


def test_resume_with_no_intact_checkpoint_refuses_and_touches_nothing(run, tmp_path):
    for step in range(1, STEPS + 1):
        truncate(step_dir(run, step) / ADAPTERS_FILE)
    with pytest.raises(recovery.DamagedCheckpointError, match=r"No intact checkpoint .* \(step_00000003: adapters"):
        resume(tmp_path)
    assert [p.name for p in list_checkpoints(run)] == [f"step_{s:08d}" for s in range(1, STEPS + 1)]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run, tmp_path, caplog):
    metrics = run / METRICS_FILE
    with open(metrics, "a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-append
    with caplog.at_level(logging.WARNING):
        trainer, result = resume(tmp_path, max_steps=STEPS + 1)
    assert f"{metrics}:{STEPS + 1}: dropping a torn last record" in caplog.text
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, STEPS + 2))


def test_a_bad_metrics_line_elsewhere_is_an_error_naming_it(run, tmp_path):
    metrics = run / METRICS_FILE
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}:2: not a JSON record"):
        resume(tmp_path, max_steps=STEPS + 1)


# ---- point 5: batches without target tokens ----------------------------------------------------


def test_batches_without_targets_are_skipped_and_counted_apart(tmp_path, caplog):
    # Most examples have no target token (as when the prompt fills max_seq_len).
    data = [(ids, mask if i % 4 == 0 else [0] * len(mask)) for i, (ids, mask) in enumerate(copy_task(40))]
    cfg = config(tmp_path, max_steps=8, batch_size=1, grad_accum_steps=1, max_nonfinite_steps=1, save_every=4)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_model(), cfg, data, **trainer_kwargs())
        result = trainer.train()
    assert result["step"] == 8 and result["nonfinite_steps"] == 0 and result["empty_steps"] > 0
    empty = [r for r in trainer.history if r.get("no_targets")]
    assert len(empty) == result["empty_steps"] and all(np.isnan(r["loss"]) for r in empty)
    warnings = [r.getMessage() for r in caplog.records if "no target tokens" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"step {empty[0]['step']}: ")
    assert "cut off by max_seq_len=24" in warnings[0] and "non-finite" not in caplog.text.replace("not as a non-finite", "")
    state = json.loads((step_dir(tmp_path / "run", 8) / STATE_FILE).read_text())
    assert state["empty_steps"] == result["empty_steps"]


def test_a_run_where_every_batch_has_no_targets_ends_with_a_clear_error(tmp_path):
    data = [(ids, [0] * len(ids)) for ids, _ in copy_task(20)]
    trainer = Trainer(tiny_model(), config(tmp_path, max_steps=3), data, **trainer_kwargs())
    with pytest.raises(NoTargetTokensError, match="None of the 3 steps had a target token: at max_seq_len=24"):
        trainer.train()
    assert not (tmp_path / "run" / "final_adapter.safetensors").exists()


# ---- point 6: a full disk -----------------------------------------------------------------------


def test_a_full_disk_during_a_save_names_the_path_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_save = mx.save_safetensors
    calls = []

    def save(file, *args, **kwargs):
        calls.append(file)
        if len(calls) > 4:  # two checkpoints (adapters + optimizer state) fit, the third does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)
    trainer = Trainer(tiny_model(), config(tmp_path, max_steps=4, save_every=1), copy_task(30), **trainer_kwargs())
    with pytest.raises(CheckpointWriteError) as caught:
        trainer.train()
    run = tmp_path / "run"
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"Could not write the checkpoint of step 3 in {run} (the disk is full); the last good checkpoint is "
        f"{step_dir(run, 2)}. Free some space (or fix the folder), then rerun with --resume."
    )
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # the partial save is gone


def test_the_train_command_prints_a_write_failure_as_one_line(tmp_path, monkeypatch):
    from bit_axon.cli import train as train_cli
    from bit_axon.cli.main import app

    from typer.testing import CliRunner

    def full_disk(*args, **kwargs):
        raise CheckpointWriteError("Could not write the checkpoint of step 3 in run (the disk is full); ...")

    monkeypatch.setattr(train_cli, "run_training", full_disk)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    result = CliRunner().invoke(app, ["train", str(data), "--config-small", "--no-thermal"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == "Error: Could not write the checkpoint of step 3 in run (the disk is full); ..."


# ---- point 9: Ctrl-C ----------------------------------------------------------------------------


class _SlowStep(Trainer):
    """Step 2 ends with one long MLX computation (a C call Python cannot interrupt), during which
    ``signals`` SIGINTs arrive, 0.2 s apart."""

    def __init__(self, *a, signals: int, **k):
        super().__init__(*a, **k)
        self.signals_to_send, self.sent, self.messages, self.step_ends = signals, [], [], []
        self.signals.announce = lambda text: self.messages.append((time.perf_counter(), text))

    def _send(self) -> None:
        for _ in range(self.signals_to_send):
            time.sleep(0.2)
            self.sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

    def _accumulate(self, grad_step, data):
        out = super()._accumulate(grad_step, data)
        if self.step == 1:
            sender = threading.Thread(target=self._send)
            sender.start()
            a = mx.random.normal((512, 512), key=mx.random.key(0)) / 22.6
            x, start = a, time.perf_counter()
            while time.perf_counter() - start < 0.2 * self.signals_to_send + 0.8:
                for _ in range(60):  # one graph, evaluated by one C call of about a second
                    x = x @ a
                mx.eval(x)
            sender.join()
        self.step_ends.append(time.perf_counter())
        return out


def test_the_first_ctrl_c_is_announced_at_once_and_the_run_stops_after_the_step(tmp_path):
    trainer = _SlowStep(tiny_model(), config(tmp_path, max_steps=5), copy_task(30), signals=1, **trainer_kwargs())
    result = trainer.train()
    assert result["interrupted"] and result["step"] == 2
    (at, text), = trainer.messages
    assert text.startswith("SIGINT: stopping after this step, then saving a checkpoint")
    assert at - trainer.sent[0] < 0.5 and at < trainer.step_ends[1]  # printed during the step, not after it
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_00000002"


def test_a_second_ctrl_c_warns_and_a_third_aborts_without_saving(tmp_path):
    trainer = _SlowStep(tiny_model(), config(tmp_path, max_steps=5), copy_task(30), signals=3, **trainer_kwargs())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    texts = [text for _, text in trainer.messages]
    assert texts[1] == "SIGINT again: one more aborts at once, without saving a checkpoint."
    assert len(texts) == 3 and all(at - sent < 0.5 for (at, _), sent in zip(trainer.messages, trainer.sent, strict=True))
    assert list_checkpoints(tmp_path / "run") == []


# ---- point 11: the learning rate of each update ------------------------------------------------


def test_each_step_logs_the_rate_its_update_used_and_the_first_is_not_zero(tmp_path):
    trainer = Trainer(tiny_model(), config(tmp_path, max_steps=6, warmup_steps=3), copy_task(30), **trainer_kwargs())
    used = []
    apply = trainer._apply

    def spy(grads, loss_sum, w):
        out = apply(grads, loss_sum, w)
        used.append(float(trainer.optimizer.learning_rate.item()))  # the rate the update just used
        return out

    trainer._apply = spy
    trainer.train()
    logged = [r["learning_rate"] for r in trainer.history]
    assert logged == pytest.approx(used)
    assert logged[:3] == pytest.approx([1e-3, 2e-3, 3e-3])  # peak 3e-3 * (k + 1) / 3
    schedule = cosine_with_warmup(3e-3, 3, 6)
    assert logged == pytest.approx([schedule(mx.array(k)).item() for k in range(6)])


def test_the_first_update_moves_the_adapters(tmp_path):
    model = tiny_model()
    before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    Trainer(model, config(tmp_path, max_steps=1, warmup_steps=1), copy_task(30), **trainer_kwargs()).train()
    after = dict(tree_flatten(model.trainable_parameters()))
    assert any(not np.array_equal(before[k], np.array(after[k])) for k in before)


def test_loaders_skip_hidden_safetensors_files(tmp_path):
    from bit_axon.loading import load_weights

    io.atomic_save_safetensors(tmp_path / "model.safetensors", {"w": mx.ones(3)})
    (tmp_path / ".model.safetensors.x1y2.tmp.safetensors").write_bytes(b"half a file")  # an older temp name
    assert set(load_weights(tmp_path)) == {"w"}


def test_an_interrupted_rotation_is_finished(run):
    doomed = run / ".step_00000001.deleting"
    step_dir(run, 1).rename(doomed)
    (doomed / OPTIMIZER_FILE).unlink()  # the kill came mid-delete
    recovery.recover_unfinished(run)
    assert not doomed.exists() and step_dir(run, 2).is_dir()
