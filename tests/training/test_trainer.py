import json

from bit_axon.training.callbacks import Callback, EarlyStopping
from bit_axon.training.checkpoint import get_latest_checkpoint, list_checkpoints
from bit_axon.training.collate import iterate_batches
from bit_axon.training.config import TrainingConfig
from bit_axon.training.cooling import ThermalShutdownError
from bit_axon.training.data import CacheDataset
from bit_axon.training.lora import LoRALinear
from bit_axon.training.losses import gather_targets, sft_loss, target_loss
from bit_axon.training.scheduler import cosine_with_warmup
from bit_axon.training.trainer import NonFiniteLossError, Trainer
from toy import EOS, PAD, VOCAB, HotAt, SignalAt, config, copy_task, tiny_model, trainer_kwargs

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map


def test_schedule_warmup_then_cosine_to_zero():
    schedule = cosine_with_warmup(1e-3, warmup_steps=10, max_steps=110)
    lr = {s: schedule(mx.array(s)).item() for s in (0, 4, 9, 10, 35, 60, 85, 110)}
    # Update k of the warmup runs at peak * (k + 1) / warmup: the first one is not wasted at lr 0.
    assert lr[0] == pytest.approx(1e-4)
    assert lr[4] == pytest.approx(5e-4)
    assert lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    assert lr[35] == pytest.approx(1e-3 * (1 + np.cos(np.pi * 0.25)) / 2, rel=1e-5)
    assert lr[60] == pytest.approx(5e-4, rel=1e-5)
    assert lr[110] == pytest.approx(0.0, abs=1e-9)


def test_training_config_validates():
    assert TrainingConfig().grad_accum_steps == 4 and TrainingConfig().use_dora
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainingConfig(warmup_steps=20, max_steps=10)
    with pytest.raises(ValueError, match="training_mode"):
        TrainingConfig(training_mode="dpo")
    with pytest.raises(ValueError, match="temp_max_speed < temp_pause < temp_stop"):
        TrainingConfig(temp_pause=99.0)
    with pytest.raises(ValueError, match="nf4 quantization is 4-bit only"):
        TrainingConfig(quantize_bits=8)
    with pytest.raises(ValueError, match="memory_limit_gb must be > 0"):
        TrainingConfig(memory_limit_gb=0)


def test_memory_limit_holds_during_the_run_and_is_restored(tmp_path):
    seen = []

    class Probe:  # a cooling-scheduler stand-in that reads MLX's limit before each step
        def check_before_step(self, step):
            seen.append(mx.get_memory_limit())

        def after_step(self, seconds):
            return 0.0

        def status(self):
            return {}

    before = mx.get_memory_limit()
    trainer = Trainer(tiny_model(), config(tmp_path, max_steps=2, memory_limit_gb=0.25), copy_task(20), None,
                      cooling_scheduler=Probe(), **trainer_kwargs())
    assert trainer.train()["step"] == 2
    assert seen == [250_000_000, 250_000_000]
    assert mx.get_memory_limit() == before


def _normalised_grads(trainer):
    trainer.optimizer.init(trainer.model.trainable_parameters())
    data = trainer.batches(trainer.dataset, loop=True)
    grads, loss_sum, weight, _, _ = trainer._accumulate(trainer._build_step(), data)
    return loss_sum.item() / weight.item(), tree_map(lambda g: g / weight, grads)


def test_accumulating_four_batches_of_one_equals_one_batch_of_four(tmp_path):
    data = copy_task(40)
    small = Trainer(tiny_model(), config(tmp_path, batch_size=1, grad_accum_steps=4), data, **trainer_kwargs())
    big = Trainer(tiny_model(), config(tmp_path, batch_size=4, grad_accum_steps=1), data, **trainer_kwargs())
    loss_a, grads_a = _normalised_grads(small)
    loss_b, grads_b = _normalised_grads(big)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(grads_a), tree_flatten(grads_b), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-7, err_msg=k)


def _packed(examples, length=64):
    return next(iterate_batches(examples, 1, length, shuffle=False, eos_token_id=EOS, pad_token_id=PAD))


def test_masked_tokens_do_not_affect_the_loss():
    model = tiny_model()
    batch = _packed(copy_task(3))
    loss_sum, n = sft_loss(model, *batch)
    logits, _ = model(batch.token_ids[:, :-1], segment_ids=batch.segment_ids[:, :-1])
    logp = np.array(nn.log_softmax(logits, axis=-1))[0]
    tokens = np.array(batch.token_ids)[0]
    mask, seg = np.array(batch.loss_mask)[0], np.array(batch.segment_ids)[0]
    manual = [-logp[t, tokens[t + 1]] for t in range(len(tokens) - 1) if mask[t + 1] and seg[t + 1] == seg[t]]
    assert n.item() == len(manual) == sum(sum(mask) for _, mask in copy_task(3))
    assert loss_sum.item() == pytest.approx(sum(manual), rel=1e-5)
    # Gathering only the target positions before the head gives the same sums.
    gathered_sum, gathered_n = target_loss(model, gather_targets(*batch))
    assert gathered_n.item() == n.item() and gathered_sum.item() == pytest.approx(loss_sum.item(), rel=1e-5)


def test_packed_batch_loss_and_gradients_equal_examples_alone():
    model = tiny_model()
    examples = copy_task(3, seed=1)

    def loss_and_grad(batch):
        return nn.value_and_grad(model, lambda m: target_loss(m, gather_targets(*batch))[0])(model)

    packed_loss, packed_grads = loss_and_grad(_packed(examples))
    alone = [loss_and_grad(_packed([ex])) for ex in examples]
    assert packed_loss.item() == pytest.approx(sum(loss.item() for loss, _ in alone), rel=1e-4)
    summed = alone[0][1]
    for _, g in alone[1:]:
        summed = tree_map(mx.add, summed, g)
    for (k, a), (_, b) in zip(tree_flatten(packed_grads), tree_flatten(summed), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-6, err_msg=k)


def test_loss_decreases_on_a_learnable_toy_set(tmp_path):
    train, val = copy_task(200, seed=0), copy_task(30, seed=1)
    trainer = Trainer(tiny_model(), config(tmp_path, max_steps=40, warmup_steps=4, learning_rate=1e-2), train, val,
                      **trainer_kwargs())
    before = trainer.evaluate()["val_loss"]
    result = trainer.train()
    after = trainer.evaluate()["val_loss"]
    assert result["step"] == 40
    assert after < before - 0.3, (before, after)
    assert result["tokens_per_sec"] > 0 and result["peak_memory_gb"] > 0


def test_outputs_metrics_plot_and_final_adapter(tmp_path):
    cfg = config(tmp_path, max_steps=4, save_every=2, eval_every=2)
    result = Trainer(tiny_model(), cfg, copy_task(30), copy_task(6, seed=3), **trainer_kwargs()).train()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "peak_memory_gb"} <= set(records[0])
    assert "val_loss" in records[1] and "val_perplexity" in records[1] and "val_loss" not in records[0]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "final_adapter.safetensors").exists() and result["adapter_path"].endswith("final_adapter.safetensors")
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert {"step", "loss", "grad_norm", "val_loss", "tokens_per_sec", "peak_memory_gb"} <= set(result)


def _adapters(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


DROPOUT = 0.1


def test_ctrl_c_then_resume_reaches_the_uninterrupted_weights(tmp_path):
    data = copy_task(60)
    # Dropout makes the run depend on the RNG state, which resume must restore too.
    full = tiny_model(dropout=DROPOUT)
    Trainer(full, config(tmp_path / "a", max_steps=6), data, **trainer_kwargs()).train()

    first = tiny_model(dropout=DROPOUT)
    result = Trainer(first, config(tmp_path / "b", max_steps=6), data, cooling_scheduler=SignalAt(4),
                     **trainer_kwargs()).train()
    assert result["interrupted"] and result["step"] == 4  # the step in flight finished
    assert get_latest_checkpoint(tmp_path / "b" / "run").name == "step_00000004"

    resumed = tiny_model(dropout=DROPOUT)  # the same base weights (they come from the model directory) ...
    resumed.update(tree_map(lambda p: p + 1.0, resumed.trainable_parameters()))  # ... but not the same adapters
    result = Trainer(resumed, config(tmp_path / "b", max_steps=6), data, **trainer_kwargs()).train(resume=True)
    assert result["step"] == 6
    expected, got = _adapters(full), _adapters(resumed)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_other_batching_warns(tmp_path, capsys):
    data = copy_task(40)
    Trainer(tiny_model(), config(tmp_path, max_steps=2, save_every=2), data, **trainer_kwargs()).train()
    state = json.loads((get_latest_checkpoint(tmp_path / "run") / "training_state.json").read_text())
    assert (state["batch_size"], state["max_seq_len"], state["seed"]) == (2, 24, TrainingConfig().seed)
    capsys.readouterr()

    Trainer(tiny_model(), config(tmp_path, max_steps=3), data, **trainer_kwargs()).train(resume=True)
    assert "different" not in capsys.readouterr().out  # same batching: no warning

    Trainer(tiny_model(), config(tmp_path, max_steps=4, batch_size=3), data, **trainer_kwargs()).train(resume=True)
    out = " ".join(capsys.readouterr().out.split())
    assert "different batch size 2 -> 3" in out and "repeats some examples" in out


class _NaNAfter(Trainer):
    def __init__(self, *a, bad_steps, **k):
        super().__init__(*a, **k)
        self.bad_steps = bad_steps

    def loss_terms(self, model, batch):
        loss_sum, weight, metrics = super().loss_terms(model, batch)
        return loss_sum * self.poison, weight, metrics

    def _accumulate(self, grad_step, data):
        self.poison = float("nan") if self.step + 1 in self.bad_steps else 1.0
        return super()._accumulate(self._build_step(), data)


def test_non_finite_loss_is_skipped_counted_and_then_stops(tmp_path, caplog):
    model = tiny_model()
    trainer = _NaNAfter(model, config(tmp_path, max_steps=4, save_every=1), copy_task(30), bad_steps={2},
                        **trainer_kwargs())
    result = trainer.train()
    assert result["nonfinite_steps"] == 1 and result["step"] == 4
    assert "non-finite" in caplog.text
    assert all(np.isfinite(v).all() for v in _adapters(model).values())

    trainer = _NaNAfter(tiny_model(), config(tmp_path / "x", max_steps=10, max_nonfinite_steps=3), copy_task(30),
                        bad_steps={3, 4, 5, 6}, **trainer_kwargs())
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.train()


def test_thermal_stop_saves_a_checkpoint_that_resumes(tmp_path):
    data = copy_task(30)
    cfg = config(tmp_path, max_steps=5, save_every=100)
    with pytest.raises(ThermalShutdownError):
        Trainer(tiny_model(), cfg, data, cooling_scheduler=HotAt(4), **trainer_kwargs()).train()
    latest = get_latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step_00000003"
    result = Trainer(tiny_model(), cfg, data, **trainer_kwargs()).train(resume=True)
    assert result["step"] == 5


# ---- callbacks, settings recorded, the model interface ------------------------------------------


def test_checkpoints_record_the_settings_and_resume_names_what_changed(tmp_path, capsys):
    data = copy_task(30)
    cfg = config(tmp_path, max_steps=2, save_every=2)
    Trainer(tiny_model(), cfg, data, **trainer_kwargs()).train()
    state = json.loads((get_latest_checkpoint(tmp_path / "run") / "training_state.json").read_text())
    assert state["config"] == cfg.to_dict()
    capsys.readouterr()
    Trainer(tiny_model(), config(tmp_path, max_steps=3, save_every=2, learning_rate=2e-3), data,
            **trainer_kwargs()).train(resume=True)
    out = " ".join(capsys.readouterr().out.split())
    assert "Settings changed since step_00000002: learning_rate 0.003 -> 0.002, max_steps 2 -> 3." in out


class _Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append(("begin", trainer.step))

    def on_step_begin(self, trainer, step):
        self.events.append(("step_begin", step))

    def on_step_end(self, trainer, record):
        record["seen_by_recorder"] = record["step"] * 10
        self.events.append(("step_end", record["step"], "val_loss" in record))

    def on_train_end(self, trainer, result):
        self.events.append(("end", trainer.step))
        result["recorder"] = True


def test_callbacks_see_every_step_in_order_and_may_extend_the_record_and_result(tmp_path):
    recorder = _Recorder()
    cfg = config(tmp_path, max_steps=3, eval_every=2)
    trainer = Trainer(tiny_model(), cfg, copy_task(30), copy_task(6, seed=3), callbacks=[recorder], **trainer_kwargs())
    result = trainer.train()
    assert recorder.events == [
        ("begin", 0), ("step_begin", 1), ("step_end", 1, False), ("step_begin", 2), ("step_end", 2, True),
        ("step_begin", 3), ("step_end", 3, False), ("end", 3),
    ]
    # Extra callbacks run last: the record they see is complete (validation included) and written.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in records[1] and all("seen_by_recorder" not in r for r in records)
    assert [r["seen_by_recorder"] for r in trainer.history] == [10, 20, 30]
    assert result["recorder"] and result["seen_by_recorder"] == 30


def test_early_stopping_stops_saves_and_returns(tmp_path):
    # min_delta 100: the first evaluation sets the best, the second cannot beat it by that much.
    stopper = EarlyStopping(patience=1, min_delta=100.0)
    cfg = config(tmp_path, max_steps=10, eval_every=1)
    result = Trainer(tiny_model(), cfg, copy_task(30), copy_task(6, seed=3), callbacks=[stopper],
                     **trainer_kwargs()).train()
    assert result["step"] == 2 and not result["interrupted"]
    assert result["stop_reason"].startswith("early stopping: val_loss has not improved")
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert (run / "final_adapter.safetensors").exists()
    state = json.loads((run / "step_00000002" / "training_state.json").read_text())
    assert state["early_stopping"] == {"best": stopper.best, "evaluations_without_improvement": 1}


def test_special_token_ids_come_from_the_dataset_unless_given():
    class Tokenized(list):
        eos_token_id, pad_token_id = 7, 5

    cfg = TrainingConfig(max_steps=2, warmup_steps=0)
    trainer = Trainer(tiny_model(), cfg, Tokenized(copy_task(4)), show_progress=False)
    assert (trainer.eos_token_id, trainer.pad_token_id) == (7, 5)
    trainer = Trainer(tiny_model(), cfg, CacheDataset(Tokenized(copy_task(4))), show_progress=False)  # the guide's wrapper
    assert (trainer.eos_token_id, trainer.pad_token_id) == (7, 5)
    trainer = Trainer(tiny_model(), cfg, Tokenized(copy_task(4)), show_progress=False, eos_token_id=EOS)
    assert (trainer.eos_token_id, trainer.pad_token_id) == (EOS, 5)
    with pytest.raises(ValueError, match="Trainer needs eos_token_id"):
        Trainer(tiny_model(), cfg, copy_task(4), show_progress=False)


def test_the_trainer_module_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, bit_axon.training.trainer; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


class _TinyLM(nn.Module):
    """Not a Bit-Axon model: an embedding, one adapted projection and an untied head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = LoRALinear.from_base(nn.Linear(16, 16), r=2, scale=1.0)
        self.lm_head = nn.Linear(16, VOCAB, bias=False)

    @property
    def output_head(self):
        return self.lm_head

    def features(self, input_ids, cache=None, segment_ids=None):
        return nn.gelu(self.proj(self.embed(input_ids)))

    def head(self, h):
        return self.lm_head(h)


def test_any_module_with_features_and_an_output_head_trains(tmp_path):
    mx.random.seed(0)
    model = _TinyLM()
    model.freeze()
    model.proj.unfreeze(keys=["lora_a", "lora_b"])
    train, val = copy_task(100), copy_task(20, seed=1)
    trainer = Trainer(model, config(tmp_path, max_steps=30, learning_rate=1e-2), train, val, **trainer_kwargs())
    before = trainer.evaluate()["val_loss"]
    assert trainer.train()["step"] == 30
    assert trainer.evaluate()["val_loss"] < before
    assert (tmp_path / "run" / "final_adapter.safetensors").exists()
