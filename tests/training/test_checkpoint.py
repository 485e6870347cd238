import json

from bit_axon.training import checkpoint
from bit_axon.training.checkpoint import (
    get_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from bit_axon.training.lora import AdapterConfig
from toy import tiny_model

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten


def _model_and_optimizer():
    model = tiny_model()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    grads = {k: v for k, v in model.trainable_parameters().items()}
    optimizer.update(model, grads)  # non-trivial moments
    mx.eval(model.parameters(), optimizer.state)
    return model, optimizer


def test_checkpoint_files_and_keys(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(model, optimizer, step=1500, loss=1.23, output_dir=tmp_path, extra_state={"batches_consumed": 7})
    assert path == tmp_path / "step_00001500"
    assert sorted(p.name for p in path.iterdir()) == [
        "adapters.safetensors", "optimizer_state.safetensors", "training_state.json"
    ]
    state = json.loads((path / "training_state.json").read_text())
    assert state["step"] == 1500 and state["loss"] == pytest.approx(1.23) and state["batches_consumed"] == 7
    adapters = mx.load(str(path / "adapters.safetensors"))
    assert adapters and all(k.endswith((".lora_a", ".lora_b", ".m")) for k in adapters)
    assert set(adapters) == {k for k, _ in tree_flatten(model.trainable_parameters())}
    opt = mx.load(str(path / "optimizer_state.safetensors"))
    assert {"step", "learning_rate"} <= set(opt) and any(k.endswith(".v") for k in opt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_load_restores_weights_and_optimizer(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(model, optimizer, step=3, loss=0.5, output_dir=tmp_path)
    fresh = tiny_model(seed=1)
    fresh_opt = optim.AdamW(learning_rate=1e-3)
    fresh_opt.init(fresh.trainable_parameters())
    assert load_checkpoint(fresh, fresh_opt, path) == (3, 0.5)
    for (k, a), (_, b) in zip(tree_flatten(model.trainable_parameters()), tree_flatten(fresh.trainable_parameters()),
                              strict=True):
        assert mx.array_equal(a, b).item(), k
    saved, restored = dict(tree_flatten(optimizer.state)), dict(tree_flatten(fresh_opt.state))
    assert set(saved) == set(restored)
    for k in saved:
        assert mx.array_equal(saved[k], restored[k]).item(), k


def test_rotation_keeps_the_three_newest(tmp_path):
    model, optimizer = _model_and_optimizer()
    for step in (500, 1000, 1500, 2000, 2500):
        save_checkpoint(model, optimizer, step=step, loss=1.0, output_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00001500", "step_00002000", "step_00002500"]
    assert get_latest_checkpoint(tmp_path).name == "step_00002500"
    assert get_latest_checkpoint(tmp_path / "missing") is None


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    save_checkpoint(model, optimizer, step=10, loss=1.0, output_dir=tmp_path)

    def exploding_save(file, arrays, metadata=None):  # a path, or the file object of an atomic write
        with open(file, "wb") if isinstance(file, str) else file as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the optimizer state

    monkeypatch.setattr(checkpoint.mx, "save_safetensors", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, optimizer, step=20, loss=0.9, output_dir=tmp_path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]
    assert get_latest_checkpoint(tmp_path).name == "step_00000010"
    # A leftover half-written folder (e.g. after a power cut) is never picked either.
    (tmp_path / "step_00000030").mkdir()
    (tmp_path / "step_00000030" / "adapters.safetensors").write_bytes(b"partial")
    assert get_latest_checkpoint(tmp_path).name == "step_00000010"


def test_refuses_to_save_non_finite_weights(tmp_path):
    model, optimizer = _model_and_optimizer()
    name, value = tree_flatten(model.trainable_parameters())[0]
    model.update(tree_unflatten([(name, value * np.nan)]))
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(model, optimizer, step=1, loss=1.0, output_dir=tmp_path)
    assert list_checkpoints(tmp_path) == []


def test_load_rejects_a_checkpoint_from_other_adapter_settings(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(model, optimizer, step=1, loss=1.0, output_dir=tmp_path)
    lora = tiny_model(use_dora=False)
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(lora.trainable_parameters())
    with pytest.raises(ValueError, match="LoRA/DoRA settings"):
        load_checkpoint(lora, opt, path)


def test_checkpoint_adapters_record_their_settings(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(model, optimizer, step=1, loss=1.0, output_dir=tmp_path)
    _, metadata = mx.load(str(path / "adapters.safetensors"), return_metadata=True)
    assert AdapterConfig.from_metadata(metadata) == AdapterConfig("dora", rank=4, scale=2.0)  # toy's adapters
