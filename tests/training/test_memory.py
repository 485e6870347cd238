"""The training-memory estimate follows the shapes and settings it is given; the warning appears
exactly when the estimate does not fit. (Its agreement with measured peaks is bench/memory.py's.)"""

from __future__ import annotations

import dataclasses

from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.quantization import quantize_model
from bit_axon.sources.pretrained import pretrained_class
from bit_axon.training.config import TrainingConfig
from bit_axon.training.lora import apply_adapters
from bit_axon.training.memory import describe_memory, estimate_training_memory
from sources.tiny_lm import tiny_config, tiny_mlx_lm_model

import mlx.core as mx
import pytest
from mlx_lm.models import llama


def small_config(**kw) -> TrainingConfig:
    values = dict(batch_size=2, max_seq_len=256, warmup_steps=0, max_steps=10, grad_accum_steps=1)
    values.update(kw)
    return TrainingConfig(**values)


def bit_axon_model(quantize: bool = True, config: TrainingConfig | None = None) -> BitAxonModel:
    config = config or small_config()
    mx.random.seed(0)
    model = BitAxonModel(BitAxonConfig.small(vocab_size=4096))
    if quantize:
        quantize_model(model, **config.quantization_spec())
    apply_adapters(model, config.adapter_config())
    return model


@pytest.fixture(scope="module")
def model() -> BitAxonModel:
    return bit_axon_model()


def test_parts_add_up_and_name_what_they_are(model):
    estimate = estimate_training_memory(model, small_config())
    assert sum(estimate.parts.values()) == estimate.total_bytes
    assert {"base weights", "adapters", "gradients + optimizer state", "activations", "logits/head"} <= set(
        estimate.parts
    )


def test_activations_grow_with_the_batch(model):
    one = estimate_training_memory(model, small_config(batch_size=2)).parts["activations"]
    two = estimate_training_memory(model, small_config(batch_size=4)).parts["activations"]
    # Linear in the tokens except the windowed attention scores (also linear past the window).
    assert two == pytest.approx(2 * one, rel=0.01)


def test_recomputation_lowers_the_peak_of_a_long_batch(model):
    config = small_config(batch_size=8, max_seq_len=1024)
    stored = estimate_training_memory(model, config)
    recomputed = estimate_training_memory(model, dataclasses.replace(config, grad_checkpoint=True))
    assert "activations" not in recomputed.parts
    assert recomputed.parts["layer inputs"] < stored.parts["activations"] / 4
    assert recomputed.total_bytes < stored.total_bytes / 2


def test_optimizer_state_is_three_copies_of_the_adapters_four_with_accumulation(model):
    parts = estimate_training_memory(model, small_config()).parts
    assert parts["gradients + optimizer state"] == 3 * parts["adapters"]
    parts = estimate_training_memory(model, small_config(grad_accum_steps=4)).parts
    assert parts["gradients + optimizer state"] == 4 * parts["adapters"]


def test_a_4bit_base_counts_its_packed_bytes():
    float_base = estimate_training_memory(bit_axon_model(quantize=False), small_config()).parts["base weights"]
    packed = estimate_training_memory(bit_axon_model(quantize=True), small_config()).parts["base weights"]
    # 4-bit codes plus a scale per group of 64 against float32: about 1/7; the norms stay float.
    assert 5 < float_base / packed < 8


def test_an_mlx_lm_model_is_estimated_too():
    config = tiny_config("llama")
    model = pretrained_class(llama)(llama.ModelArgs.from_dict(config))
    model.update(tiny_mlx_lm_model(config).parameters())
    train = small_config(max_seq_len=64)
    apply_adapters(model, train.adapter_config())
    estimate = estimate_training_memory(model, train)
    assert estimate.parts["activations"] > 0 and estimate.parts["logits/head"] > 0
    longer = estimate_training_memory(model, dataclasses.replace(train, max_seq_len=128))
    assert longer.parts["activations"] > 2 * estimate.parts["activations"]  # full attention: quadratic scores


def test_the_warning_appears_exactly_when_the_estimate_does_not_fit(model):
    estimate = estimate_training_memory(model, small_config())
    fits = describe_memory(estimate, estimate.total_bytes)
    assert len(fits) == 1 and fits[0].startswith("Estimated training peak:") and "available" in fits[0]
    short = describe_memory(estimate, estimate.total_bytes - 1)
    assert len(short) == 2
    assert "--batch-size" in short[1] and "--max-seq-len" in short[1] and "--grad-checkpoint" in short[1]
    assert "available memory unknown" in describe_memory(estimate, None)[0]
