"""The best evaluation's adapters, early stopping from the config, and what an interrupted run leaves."""

import json

from bit_axon.training.callbacks import BEST_ADAPTER, FINAL_ADAPTER
from bit_axon.training.checkpoint import ADAPTERS_FILE, STATE_FILE, list_checkpoints, save_checkpoint
from bit_axon.training.trainer import Trainer
from toy import SignalAt, config, copy_task, tiny_model, trainer_kwargs

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest


def _tensors(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _scripted_val_losses(trainer, losses):
    """The trainer's evaluations return ``losses`` in turn (a val loss that improves, then worsens)."""
    values = iter(losses)
    trainer.evaluate = lambda dataset=None: {"val_loss": next(values)}
    return trainer


def test_rotation_never_deletes_the_protected_step(tmp_path):
    model = tiny_model()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    for step in (1, 2, 3, 4):
        save_checkpoint(model, optimizer, step, 1.0, tmp_path, keep=1, protect=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]


def test_the_best_checkpoint_survives_rotation_and_resume(tmp_path):
    cfg = config(tmp_path, max_steps=4, eval_every=1, save_every=1, keep_checkpoints=1)
    trainer = _scripted_val_losses(Trainer(tiny_model(), cfg, copy_task(30), copy_task(6, seed=3), **trainer_kwargs()),
                                   [3.0, 2.0, 2.5, 2.7])
    result = trainer.train()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert (result["best_step"], result["best_val_loss"]) == (2, 2.0)
    assert result["best_adapter_path"] == str(run / BEST_ADAPTER)
    best, at_step_2 = _tensors(run / BEST_ADAPTER), _tensors(run / "step_00000002" / ADAPTERS_FILE)
    assert best.keys() == at_step_2.keys()
    for k in best:
        np.testing.assert_array_equal(best[k], at_step_2[k], err_msg=k)
    assert not np.array_equal(best[k], _tensors(run / FINAL_ADAPTER)[k])  # the run went on past it
    state = json.loads((run / "step_00000004" / STATE_FILE).read_text())
    assert state["best_adapter"] == {"step": 2, "val_loss": 2.0}

    # A resume keeps the best (and its folder): a worse evaluation changes nothing.
    resumed = _scripted_val_losses(
        Trainer(tiny_model(), config(tmp_path, max_steps=5, eval_every=1, save_every=1, keep_checkpoints=1),
                copy_task(30), copy_task(6, seed=3), **trainer_kwargs()), [2.2])
    result = resumed.train(resume=True)
    assert (result["best_step"], result["best_val_loss"]) == (2, 2.0)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000005"]
    np.testing.assert_array_equal(_tensors(run / BEST_ADAPTER)[k], at_step_2[k])


def test_a_fresh_run_removes_an_older_best_adapter(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / BEST_ADAPTER).write_bytes(b"old")
    result = Trainer(tiny_model(), config(tmp_path, max_steps=2), copy_task(30), **trainer_kwargs()).train()
    assert not (tmp_path / "run" / BEST_ADAPTER).exists() and "best_step" not in result


def test_early_stopping_from_the_config_stops_on_a_plateau(tmp_path):
    # A learning rate too small to move the weights: val_loss stays where it starts.
    cfg = config(tmp_path, max_steps=20, eval_every=1, learning_rate=1e-30, early_stopping_patience=2)
    trainer = Trainer(tiny_model(), cfg, copy_task(30), copy_task(6, seed=3), **trainer_kwargs())
    result = trainer.train()
    losses = [r["val_loss"] for r in trainer.history]
    assert losses == [losses[0]] * 3  # the first evaluation sets the best, two more do not beat it
    assert result["step"] == 3 and not result["interrupted"]
    assert result["stop_reason"].startswith("early stopping: val_loss has not improved")
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert result["adapter_path"] == str(run / FINAL_ADAPTER) and (run / FINAL_ADAPTER).exists()


def test_early_stopping_without_a_validation_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--early-stopping-patience needs a validation set: pass --val-data"):
        Trainer(tiny_model(), config(tmp_path, early_stopping_patience=2), copy_task(30), **trainer_kwargs())


def test_an_interrupted_run_writes_no_final_adapter(tmp_path):
    run = tmp_path / "run"
    # A finished run, then a resume to more steps that Ctrl-C stops: no final adapter is left that
    # could pass for the result of the longer run.
    finished = Trainer(tiny_model(), config(tmp_path, max_steps=2), copy_task(30), **trainer_kwargs()).train()
    assert finished["adapter_path"] == str(run / FINAL_ADAPTER) and (run / FINAL_ADAPTER).exists()
    result = Trainer(tiny_model(), config(tmp_path, max_steps=5), copy_task(30), cooling_scheduler=SignalAt(4),
                     **trainer_kwargs()).train(resume=True)
    assert result["interrupted"] and result["step"] == 4
    assert result["adapter_path"] is None and result["checkpoint"] == str(run / "step_00000004")
    assert not (run / FINAL_ADAPTER).exists()
    # Resuming to the end writes it again.
    result = Trainer(tiny_model(), config(tmp_path, max_steps=5), copy_task(30), **trainer_kwargs()).train(resume=True)
    assert result["step"] == 5 and (run / FINAL_ADAPTER).exists() and not result["interrupted"]
