"""Adapters and their base: the record in the adapter file, the check on loading, and merging
adapters into pretrained (mlx-lm / GGUF) bases."""

from __future__ import annotations

import json
import logging

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig
from bit_axon.inference.loader import open_model
from bit_axon.io import atomic_save_safetensors
from bit_axon.loading import load_model
from bit_axon.quantization import base_quantization, quantize_model
from bit_axon.training.base_record import FINGERPRINT_KEY, QUANTIZATION_KEY, SOURCE_KEY, fingerprint
from bit_axon.training.checkpoint import load_adapter, save_adapter_only
from bit_axon.training.config import TrainingConfig
from bit_axon.training.lora import AdapterConfig, adapter_layers, apply_adapters
from bit_axon.training.merging import load_and_merge, merge_adapters
from sources.tiny_lm import MIXED, hf_directory, tiny_config, write_gguf
from toy import small_model

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

TOKENS = mx.array([[3, 17, 42, 5, 9, 61, 2, 33, 14, 70]])


def logits(model) -> mx.array:
    return model(TOKENS)[0]


def train_randomly(model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.array(rng.normal(0, 0.02, layer.lora_b.shape).astype(np.float32))
        if "m" in layer:
            layer.m = layer.m * mx.array(rng.uniform(0.9, 1.1, layer.m.shape).astype(np.float32))
    mx.eval(model.parameters())


def adapt(model, kind: str = "dora"):
    apply_adapters(model, AdapterConfig(kind, rank=4, scale=2.0))
    train_randomly(model)
    return model


# --- the record and the check ----------------------------------------------------------------------


def test_adapter_file_records_its_base(tmp_path):
    hf, _ = hf_directory(tmp_path / "base", quantized=True)
    model = load_model(hf)
    untouched = fingerprint(model)
    path = save_adapter_only(adapt(model), tmp_path / "a.safetensors")
    _, metadata = mx.load(str(path), return_metadata=True)
    assert metadata[SOURCE_KEY] == str(hf)
    assert json.loads(metadata[QUANTIZATION_KEY]) == MIXED
    assert metadata[FINGERPRINT_KEY] == untouched  # the base's, adapters left out
    assert fingerprint(load_model(hf, dtype=mx.float32)) == untouched  # float16 scales cast up: same base


def test_an_adapter_for_another_base_is_refused(tmp_path):
    base_a, _ = hf_directory(tmp_path / "a", quantized=False)
    path = save_adapter_only(adapt(load_model(base_a)), tmp_path / "adapter.safetensors")
    other = small_model()  # a Bit-Axon model: other layers altogether
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(other, path)
    b = load_model(base_a)
    b.model.layers[1].mlp.up_proj.weight = b.model.layers[1].mlp.up_proj.weight * 1.01  # same shapes, other weights
    b.source = "other-base"
    with pytest.raises(ValueError) as err:
        load_adapter(b, path)
    message = str(err.value)
    assert str(path) in message and f"trained on {base_a} (float)" in message and "given is other-base (float)" in message
    assert not adapter_layers(b)


def test_files_without_a_base_record_load_as_before(tmp_path, caplog):
    model = adapt(small_model())
    path = save_adapter_only(model, tmp_path / "a.safetensors")
    tensors, metadata = mx.load(str(path), return_metadata=True)
    for key in (SOURCE_KEY, QUANTIZATION_KEY, FINGERPRINT_KEY):
        metadata.pop(key, None)
    atomic_save_safetensors(path, tensors, metadata=metadata)
    fresh = small_model()
    fresh.embed_tokens.weight = fresh.embed_tokens.weight + 1.0  # another base: not checked
    with caplog.at_level(logging.INFO):
        load_adapter(fresh, path)
    assert "records no base model fingerprint" in caplog.text
    assert len(adapter_layers(fresh)) == len(adapter_layers(model))


def small_config_factory(monkeypatch):
    """``BitAxonConfig.small()`` made tiny, for ``--config-small`` runs in tests."""
    small = BitAxonConfig.small.__func__
    tiny = dict(vocab_size=512, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128, num_heads=4)
    monkeypatch.setattr(BitAxonConfig, "small", classmethod(lambda cls, **o: small(cls, **{**tiny, **o})))


def test_config_small_run_output_runs_and_merges_on_its_quantized_base(tmp_path, monkeypatch):
    """The float OUTPUT_DIR/base_model + the adapter trained on its NF4 copy: run and merge use NF4."""
    from bit_axon.cli.train import BASE_MODEL_DIR, build_model

    small_config_factory(monkeypatch)
    config = TrainingConfig(output_dir=str(tmp_path), lora_rank=4)
    trained = build_model(None, True, config, 0, Console(quiet=True))
    train_randomly(trained)
    assert base_quantization(trained) == {"mode": "nf4", "bits": 4, "group_size": 64}
    adapter = save_adapter_only(trained, tmp_path / "adapter.safetensors")
    base_dir = tmp_path / BASE_MODEL_DIR
    assert load_model(base_dir).config.quantization is None  # saved in float

    ids = mx.array([[11, 22, 33, 44, 55, 66]])
    expected = trained(ids)[0]
    run = open_model(base_dir, adapter)  # what `bit-axon run --model base_model --adapter` does
    assert run.config.quantization == {"mode": "nf4", "bits": 4, "group_size": 64}
    assert mx.allclose(run(ids)[0], expected, rtol=1e-5, atol=1e-5).item()

    out = load_and_merge(base_dir, adapter, tmp_path / "merged", lora_rank=4)
    merge_adapters(trained)
    assert mx.array_equal(load_model(out)(ids)[0], trained(ids)[0]).item()


# --- merging into pretrained bases -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_into_a_mixed_quantized_base_keeps_its_formats(tmp_path, kind):
    hf, _ = hf_directory(tmp_path / "base", quantized=True)
    model = adapt(load_model(hf), kind)
    unfused = logits(model)
    adapter = save_adapter_only(model, tmp_path / "adapter.safetensors")

    full = load_model(load_and_merge(hf, adapter, tmp_path / "float", quantize_after_merge=False, lora_rank=4))
    assert base_quantization(full) is None
    assert mx.allclose(logits(full), unfused, rtol=1e-4, atol=1e-4).item()  # fused == unfused

    merged = load_model(load_and_merge(hf, adapter, tmp_path / "merged", lora_rank=4))
    assert base_quantization(merged) == MIXED  # each fused layer back in its own format
    by_hand = load_model(hf)
    load_adapter(by_hand, adapter)
    merge_adapters(by_hand)
    assert mx.array_equal(logits(merged), logits(by_hand)).item()
    assert (mx.linalg.norm(logits(merged) - unfused) / mx.linalg.norm(unfused)).item() < 0.2


def test_merge_into_a_gguf_base_trained_quantized(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", tiny_config("llama"))
    model = load_model(gguf)
    quantize_model(model, bits=4, group_size=32, mode="affine")  # as `bit-axon train` does for a float base
    adapt(model)
    unfused = logits(model)
    adapter = save_adapter_only(model, tmp_path / "adapter.safetensors")
    out = load_and_merge(gguf, adapter, tmp_path / "merged", group_size=32, lora_rank=4)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"mode": "affine", "bits": 4, "group_size": 32}
    assert config["rope_traditional"] is True  # the GGUF's row order is kept
    merged = load_model(out)
    assert (mx.linalg.norm(logits(merged) - unfused) / mx.linalg.norm(unfused)).item() < 0.2
    assert mx.allclose(logits(open_model(gguf, adapter)), unfused, rtol=1e-4, atol=1e-4).item()


def test_train_quantizes_a_float_pretrained_base_and_keeps_a_quantized_one(tmp_path):
    from bit_axon.cli.train import build_model

    config = TrainingConfig(output_dir=str(tmp_path / "run"), quantize_mode="affine", quantize_group_size=32, lora_rank=4)
    float_dir, _ = hf_directory(tmp_path / "f", quantized=False)
    model = build_model(float_dir, False, config, 0, Console(quiet=True))
    assert base_quantization(model) == {"mode": "affine", "bits": 4, "group_size": 32}
    assert len(adapter_layers(model)) == 2 * 7  # q/k/v/o and gate/up/down of both layers
    mixed_dir, _ = hf_directory(tmp_path / "q", quantized=True)
    assert base_quantization(build_model(mixed_dir, False, config, 0, Console(quiet=True))) == MIXED
