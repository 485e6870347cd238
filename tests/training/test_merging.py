"""Adapter files (save_adapter_only / load_adapter), merge_adapters, save_merged_model, load_and_merge."""

from __future__ import annotations

import json
import logging

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.io import atomic_save_safetensors
from bit_axon.loading import load_model, save_model
from bit_axon.quantization import NF4Linear, quantize_model
from bit_axon.training.checkpoint import load_adapter, save_adapter_only
from bit_axon.training.dora import DoRALinear
from bit_axon.training.lora import (
    ADAPTER_KINDS,
    AdapterConfig,
    LoRALinear,
    adapter_config,
    adapter_layers,
    apply_adapters,
    apply_lora_to_model,
    register_adapter_kind,
)
from bit_axon.training.merging import load_and_merge, merge_adapters, save_merged_model
from toy import small_config, small_model

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

IDS = mx.array([[11, 22, 33, 44, 55, 66]])


def train_randomly(model, seed: int = 0) -> None:
    """Stand-in for training: perturb every adapter so that merging has something to fold in."""
    rng = np.random.default_rng(seed)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.array(rng.normal(0, 0.02, layer.lora_b.shape).astype(np.float32))
        if isinstance(layer, DoRALinear):
            layer.m = layer.m * mx.array(rng.uniform(0.9, 1.1, layer.m.shape).astype(np.float32))
    mx.eval(model.parameters())


def logits(model) -> mx.array:
    out, _ = model(IDS)
    return out


@pytest.fixture(params=["float", "nf4", "affine"])
def base_dir(request, tmp_path):
    model = small_model()
    if request.param != "float":
        quantize_model(model, mode=request.param)
    return save_model(model, tmp_path / f"base-{request.param}")


def adapted(base_dir, use_dora=True, rank=4, seed=0):
    model = load_model(base_dir)
    apply_lora_to_model(model, rank=rank, use_dora=use_dora, scale=10.0)
    train_randomly(model, seed)
    return model


# --- adapter files -------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [True, False])
def test_adapter_file_round_trip(base_dir, tmp_path, use_dora):
    model = adapted(base_dir, use_dora=use_dora)
    path = save_adapter_only(model, tmp_path / "adapter.safetensors")
    tensors, metadata = mx.load(str(path), return_metadata=True)
    suffixes = ("lora_a", "lora_b", "m") if use_dora else ("lora_a", "lora_b")
    assert {k.rsplit(".", 1)[1] for k in tensors} == set(suffixes)  # adapter weights only
    assert metadata["lora_rank"] == "4" and float(metadata["lora_scale"]) == 10.0
    assert metadata["use_dora"] == ("true" if use_dora else "false")

    fresh = load_model(base_dir)
    wrapped = load_adapter(fresh, path)
    assert sorted(wrapped) == sorted(p for p, _ in adapter_layers(model))
    cls = DoRALinear if use_dora else LoRALinear
    assert all(type(layer) is cls and layer.rank == 4 and layer.scale == 10.0 for _, layer in adapter_layers(fresh))
    assert mx.array_equal(logits(fresh), logits(model))


def test_load_adapter_rejects_an_adapter_for_another_model(tmp_path):
    model = small_model()
    apply_lora_to_model(model, rank=4)
    path = save_adapter_only(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(small_model(hidden_dim=128), path)  # same layers, other shapes
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(small_model(num_layers=6), path)  # other layers


def test_load_adapter_rejects_files_without_adapters(tmp_path):
    path = tmp_path / "weights.safetensors"
    atomic_save_safetensors(path, {"input_proj.weight": mx.zeros((64, 64))})
    with pytest.raises(ValueError, match="no adapter weights"):
        load_adapter(small_model(), path)
    with pytest.raises(FileNotFoundError):
        load_adapter(small_model(), tmp_path / "missing.safetensors")


def test_load_adapter_infers_kind_and_rank_from_keys_without_metadata(tmp_path, caplog):
    model = small_model()
    apply_lora_to_model(model, rank=2, use_dora=True)
    train_randomly(model)
    # A full checkpoint-style file: all parameters, no adapter metadata.
    path = tmp_path / "adapters.safetensors"
    atomic_save_safetensors(path, dict(tree_flatten(model.parameters())))
    fresh = small_model()
    with caplog.at_level(logging.WARNING):
        load_adapter(fresh, path)
    assert "lora_scale" in caplog.text  # the default scale is assumed, loudly
    assert all(isinstance(layer, DoRALinear) and layer.rank == 2 for _, layer in adapter_layers(fresh))
    assert mx.array_equal(logits(fresh), logits(model))


def test_save_adapter_only_requires_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRA/DoRA adapters"):
        save_adapter_only(small_model(), tmp_path / "a.safetensors")


def rewrite_metadata(path, **changes) -> None:
    """Rewrite an adapter file's metadata: a value of None drops the key."""
    tensors, metadata = mx.load(str(path), return_metadata=True)
    metadata = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    atomic_save_safetensors(path, tensors, metadata=metadata)


@pytest.mark.parametrize("use_dora", [True, False])
def test_adapter_file_records_the_kind(tmp_path, use_dora):
    model = small_model()
    apply_lora_to_model(model, rank=4, use_dora=use_dora)
    path = save_adapter_only(model, tmp_path / "a.safetensors")
    _, metadata = mx.load(str(path), return_metadata=True)
    assert metadata["adapter_kind"] == ("dora" if use_dora else "lora")


@pytest.mark.parametrize("use_dora", [True, False])
def test_files_without_a_recorded_kind_still_load(tmp_path, caplog, use_dora):
    """Files written before ``adapter_kind`` existed: the kind is inferred from the tensors, once, loudly."""
    model = small_model()
    apply_lora_to_model(model, rank=4, use_dora=use_dora, scale=10.0)
    train_randomly(model)
    path = save_adapter_only(model, tmp_path / "old.safetensors")
    rewrite_metadata(path, adapter_kind=None)
    fresh = small_model()
    with caplog.at_level(logging.WARNING):
        load_adapter(fresh, path)
    inferred = [r for r in caplog.records if "adapter_kind" in r.getMessage()]
    assert len(inferred) == 1 and str(path) in inferred[0].getMessage()
    cls = DoRALinear if use_dora else LoRALinear
    assert all(type(layer) is cls and layer.scale == 10.0 for _, layer in adapter_layers(fresh))
    assert mx.array_equal(logits(fresh), logits(model))


def test_a_recorded_kind_is_not_guessed_from_the_tensors(tmp_path):
    model = small_model()
    apply_lora_to_model(model, rank=4, use_dora=True)
    path = save_adapter_only(model, tmp_path / "a.safetensors")
    rewrite_metadata(path, adapter_kind="lora", use_dora="false")  # DoRA tensors, LoRA recorded
    with pytest.raises(ValueError, match="incomplete adapter tensors"):
        load_adapter(small_model(), path)


def test_an_unregistered_kind_is_a_clear_error(tmp_path):
    model = small_model()
    apply_lora_to_model(model, rank=4)
    path = save_adapter_only(model, tmp_path / "a.safetensors")
    rewrite_metadata(path, adapter_kind="ia3")
    with pytest.raises(ValueError, match="Unknown adapter kind 'ia3'; known kinds: dora, lora") as err:
        load_adapter(small_model(), path)
    assert str(path) in str(err.value)


@pytest.fixture
def gated_kind():
    """A third adapter kind, defined and registered the way a new kind's module would do it."""

    @register_adapter_kind("gated")
    class GatedLoRA(LoRALinear):
        parameter_names = (*LoRALinear.parameter_names, "gate")

        def __init__(self, linear, config):
            super().__init__(linear, config)
            self.gate = mx.ones((self.lora_b.shape[1],))

        def __call__(self, x):
            y = self.linear(x)
            return y + self.gate * (super().__call__(x) - y)

    yield GatedLoRA
    del ADAPTER_KINDS["gated"]


def test_a_new_kind_round_trips_through_an_adapter_file(tmp_path, gated_kind):
    model = small_model()
    config = AdapterConfig("gated", rank=2, scale=5.0)
    apply_adapters(model, config)
    assert {k.rsplit(".", 1)[1] for k, _ in tree_flatten(model.trainable_parameters())} == {
        "lora_a", "lora_b", "gate"
    }
    train_randomly(model)
    for _, layer in adapter_layers(model):
        layer.gate = mx.full(layer.gate.shape, 0.5)
    path = save_adapter_only(model, tmp_path / "gated.safetensors")
    fresh = small_model()
    load_adapter(fresh, path)
    assert adapter_config(fresh) == config
    assert all(type(layer) is gated_kind for _, layer in adapter_layers(fresh))
    assert mx.array_equal(logits(fresh), logits(model))


# --- merging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_adapters_float_base_keeps_logits(tmp_path, use_dora):
    model = small_model()
    apply_lora_to_model(model, rank=4, use_dora=use_dora)
    train_randomly(model)
    ref = logits(model)
    merged = merge_adapters(model)
    assert len(merged) == 21 and not adapter_layers(model)
    np.testing.assert_allclose(logits(model), ref, rtol=1e-4, atol=1e-4)


def test_merge_adapters_requantizes_quantized_bases():
    model = quantize_model(small_model(), mode="nf4")
    apply_lora_to_model(model, rank=4)
    train_randomly(model)
    merge_adapters(model)
    assert isinstance(model.layer_0.ssm.in_proj, NF4Linear)
    assert model.config.quantization == {"mode": "nf4", "bits": 4, "group_size": 64}


def test_save_merged_model_checks_its_input(tmp_path):
    model = small_model()
    apply_lora_to_model(model, rank=4)
    with pytest.raises(ValueError, match="merge_adapters"):
        save_merged_model(model, tmp_path / "out")
    merge_adapters(model)
    with pytest.raises(ValueError, match="config"):
        save_merged_model(model, tmp_path / "out", config=small_config(hidden_dim=128))
    out = save_merged_model(model, tmp_path / "out", config=model.config)
    np.testing.assert_allclose(logits(load_model(out)), logits(model), rtol=1e-6, atol=1e-6)


def test_load_and_merge_full_precision_reproduces_the_adapted_model(base_dir, tmp_path):
    model = adapted(base_dir)
    ref = logits(model)
    adapter = save_adapter_only(model, tmp_path / "adapter.safetensors")
    out = load_and_merge(base_dir, adapter, tmp_path / "merged", quantize_after_merge=False, lora_rank=4)
    merged = load_model(out)
    assert merged.config.quantization is None
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert not adapter_layers(merged)
    np.testing.assert_allclose(logits(merged), ref, rtol=1e-4, atol=1e-4)


def test_load_and_merge_requantized_equals_the_in_memory_fused_model(base_dir, tmp_path):
    model = adapted(base_dir)
    adapter = save_adapter_only(model, tmp_path / "adapter.safetensors")
    out = load_and_merge(base_dir, adapter, tmp_path / "merged", lora_rank=4)
    merged = load_model(out)
    base_spec = load_model(base_dir).config.quantization
    expected_mode = base_spec["mode"] if base_spec else "nf4"
    assert merged.config.quantization == {"mode": expected_mode, "bits": 4, "group_size": 64}

    # The same merge done by hand in memory gives the same logits, bit for bit.
    by_hand = load_model(base_dir)
    load_adapter(by_hand, adapter)
    merge_adapters(by_hand)
    quantize_model(by_hand, mode=expected_mode)
    assert mx.array_equal(logits(merged), logits(by_hand))
    # ...and stays close to the adapted model it came from (one extra 4-bit rounding).
    ref = logits(model)
    assert (mx.linalg.norm(logits(merged) - ref) / mx.linalg.norm(ref)).item() < 0.5


def test_load_and_merge_to_other_bits_goes_through_full_precision(tmp_path):
    base = save_model(quantize_model(small_model(), mode="affine"), tmp_path / "base")
    model = adapted(base)
    adapter = save_adapter_only(model, tmp_path / "adapter.safetensors")
    out = load_and_merge(base, adapter, tmp_path / "merged", bits=8, group_size=32, lora_rank=None)
    merged = load_model(out)
    assert merged.config.quantization == {"mode": "affine", "bits": 8, "group_size": 32}
    ref = logits(model)
    assert (mx.linalg.norm(logits(merged) - ref) / mx.linalg.norm(ref)).item() < 0.05


def test_load_and_merge_errors(tmp_path):
    base = save_model(small_model(), tmp_path / "base")
    model = adapted(base, rank=4)
    adapter = save_adapter_only(model, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="rank 4"):
        load_and_merge(base, adapter, tmp_path / "out", lora_rank=8)
    with pytest.raises(FileNotFoundError):
        load_and_merge(base, tmp_path / "nope.safetensors", tmp_path / "out")
    other = save_model(small_model(num_layers=6), tmp_path / "other")
    with pytest.raises(ValueError, match="does not match"):
        load_and_merge(other, adapter, tmp_path / "out", lora_rank=4)
    assert not (tmp_path / "out").exists()


def test_an_adapter_directory_is_named_as_such(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory: pass the adapter file"):
        load_and_merge(tmp_path / "base", folder, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is a directory: pass the adapter file"):
        load_adapter(small_model(), folder)
