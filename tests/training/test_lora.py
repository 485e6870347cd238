"""LoRALinear over float, affine and NF4 bases, fusing, and apply_lora_to_model's target rules."""

from __future__ import annotations

import math

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig
from bit_axon.quantization import NF4Linear, dense_weight, quantize_model
from bit_axon.training import DoRALinear, LoRALinear, apply_lora_to_model
from bit_axon.training.lora import (
    ADAPTER_KINDS,
    LORA_EXCLUDED_NAMES,
    LORA_EXCLUDED_PATHS,
    AdapterConfig,
    adapter_config,
    adapter_layers,
    apply_adapters,
    register_adapter_kind,
)
from toy import LINEAR_IN as IN
from toy import LINEAR_OUT as OUT
from toy import small_model

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten


def train_randomly(layer: LoRALinear, seed: int = 0) -> None:
    """Stand-in for training: non-zero B (and A changed) so the adapter contributes."""
    rng = np.random.default_rng(seed)
    layer.lora_a = layer.lora_a + mx.array(rng.normal(0, 0.05, layer.lora_a.shape).astype(np.float32))
    layer.lora_b = mx.array(rng.normal(0, 0.01, layer.lora_b.shape).astype(np.float32))


KINDS = ["float", "affine", "nf4"]


@pytest.mark.parametrize("kind", KINDS)
def test_init_shapes_and_exact_base_output(kind, make_base, inputs):
    base = make_base(kind)
    x = inputs()
    y = base(x)
    layer = LoRALinear.from_base(base, r=8)
    assert layer.lora_a.shape == (IN, 8)  # input dims recovered from the packed quantized weight
    assert layer.lora_b.shape == (8, OUT)
    assert layer.scale == 20.0
    bound = 1 / math.sqrt(IN)
    assert mx.all(mx.abs(layer.lora_a) <= bound).item() and mx.abs(layer.lora_a).max().item() > bound / 2
    assert mx.array_equal(layer.lora_b, mx.zeros((8, OUT)))
    assert mx.array_equal(layer(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_base_plus_scaled_low_rank_path(kind, make_base, inputs):
    layer = LoRALinear.from_base(make_base(kind), r=4, scale=3.0)
    train_randomly(layer)
    x = inputs(1)
    expected = layer.linear(x) + 3.0 * (x @ layer.lora_a) @ layer.lora_b
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fuse_matches_unfused_forward(kind, make_base, inputs):
    layer = LoRALinear.from_base(make_base(kind), r=8)
    train_randomly(layer)
    x = inputs(2)
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    np.testing.assert_allclose(
        fused.weight, dense_weight(layer.linear) + 20.0 * layer.lora_b.T @ layer.lora_a.T, rtol=1e-6, atol=1e-6
    )
    y = layer(x)
    assert mx.abs(fused(x) - y).max().item() <= 1e-5 * mx.abs(y).max().item()


@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_fuse_requantize_keeps_the_format_within_quantization_error(kind, make_base, inputs):
    layer = LoRALinear.from_base(make_base(kind), r=8)
    train_randomly(layer)
    x = inputs(3)
    fused = layer.fuse(requantize=True)
    assert type(fused) is type(layer.linear)
    assert fused.group_size == 64 and fused.bits == 4
    # Re-quantizing the fused weight is a second 4-bit rounding: allow its error (rel. MSE ~1%)
    # on the output, but no more.
    y = layer(x)
    rel = (mx.linalg.norm(fused(x) - y) / mx.linalg.norm(y)).item()
    assert rel < 0.15


def test_fuse_keeps_bias_and_float_base_stays_float_on_requantize(make_base, inputs):
    layer = LoRALinear.from_base(make_base("float", bias=True), r=4)
    train_randomly(layer)
    x = inputs(4)
    for fused in (layer.fuse(), layer.fuse(requantize=True)):
        assert type(fused) is nn.Linear and mx.array_equal(fused.bias, layer.linear.bias)
        np.testing.assert_allclose(fused(x), layer(x), rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_adapter_path_only(make_base, inputs):
    base = make_base("float")
    x = inputs(5)
    layer = LoRALinear.from_base(base, r=4, dropout=0.5)
    layer.train()
    assert mx.array_equal(layer(x), base(x))  # B = 0: dropout on x never reaches the output
    train_randomly(layer)
    layer.eval()
    evaluated = layer(x)
    layer.train()
    assert not mx.allclose(layer(x), evaluated).item()


def test_base_is_frozen_and_only_adapter_is_trainable(make_base):
    layer = LoRALinear.from_base(make_base("float"), r=4)
    assert sorted(k for k, _ in tree_flatten(layer.trainable_parameters())) == ["lora_a", "lora_b"]


def test_rejects_non_linear_bases_and_bad_rank(make_base):
    with pytest.raises(TypeError):
        LoRALinear.from_base(nn.Embedding(10, 64))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear.from_base(make_base("float"), r=0)


# --- apply_lora_to_model -------------------------------------------------------------------------


def expected_targets(config: BitAxonConfig) -> list[str]:
    """The guide's targets for this architecture, written out by zone (not by the code's matcher)."""
    zone2, zone3 = config.zone_boundaries
    paths = ["input_proj", "output_proj"]
    shared = [f"moe.shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    for i in range(config.num_layers):
        if i < zone2:
            names = ["ssm.in_proj", "ssm.out_proj"]
        elif i < zone3:
            names = [f"attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + shared
        else:
            names = ["ssm.in_proj", "ssm.out_proj"] + shared
        paths += [f"layer_{i}.{n}" for n in names]
    return sorted(paths)


def test_guide_exclusion_constants():
    assert LORA_EXCLUDED_PATHS == ("switch_mlp", "lm_head")
    assert LORA_EXCLUDED_NAMES == ("x_proj", "dt_proj", "gate", "shared_expert_gate")


@pytest.mark.parametrize("use_dora", [True, False])
def test_apply_wraps_exactly_the_target_layers(use_dora):
    model = small_model()
    ids = mx.array([[5, 6, 7, 8]])
    ref, _ = model(ids)
    wrapped = apply_lora_to_model(model, rank=4, use_dora=use_dora)
    assert sorted(wrapped) == expected_targets(model.config)
    assert len(wrapped) == 21
    cls = DoRALinear if use_dora else LoRALinear
    adapters = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapters == set(wrapped)
    assert all(type(m) is cls for p, m in model.named_modules() if p in adapters)
    # Excluded layers are untouched.
    for path in ("layer_0.ssm.x_proj", "layer_0.ssm.dt_proj", "layer_1.moe.gate", "layer_1.moe.shared_expert_gate"):
        assert type(dict(model.named_modules())[path]) is nn.Linear
    assert not any("switch_mlp" in p for p in wrapped)
    out, _ = model(ids)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # fresh adapters keep the model's function


@pytest.mark.parametrize("use_dora", [True, False])
def test_only_adapter_parameters_are_trainable(use_dora):
    model = small_model()
    wrapped = apply_lora_to_model(model, rank=4, use_dora=use_dora)
    names = ("lora_a", "lora_b", "m") if use_dora else ("lora_a", "lora_b")
    expected = {f"{p}.{n}" for p in wrapped for n in names}
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == expected

    def loss(model, ids):
        logits, _ = model(ids)
        return logits.astype(mx.float32).square().mean()

    _, grads = nn.value_and_grad(model, loss)(model, mx.array([[1, 2, 3]]))
    assert {k for k, _ in tree_flatten(grads)} == expected


def test_apply_over_a_quantized_model_and_refuses_twice():
    model = quantize_model(small_model(), mode="nf4")
    wrapped = apply_lora_to_model(model, rank=4)
    assert sorted(wrapped) == expected_targets(model.config)
    assert isinstance(model.layer_0.ssm.in_proj.linear, NF4Linear)
    with pytest.raises(ValueError, match="already"):
        apply_lora_to_model(model)


# --- adapter settings and kinds ------------------------------------------------------------------


def test_adapter_config_defaults_are_the_guides_and_round_trip_through_metadata():
    config = AdapterConfig()
    assert (config.kind, config.rank, config.scale, config.dropout, config.use_dora) == ("dora", 8, 20.0, 0.0, True)
    assert config.metadata() == {
        "adapter_kind": "dora", "lora_rank": "8", "lora_scale": "20.0", "lora_dropout": "0.0", "use_dora": "true",
    }
    lora = AdapterConfig("lora", rank=4, scale=2.5, dropout=0.1)
    assert not lora.use_dora and lora.metadata()["use_dora"] == "false"
    assert AdapterConfig.from_metadata(lora.metadata()) == lora
    assert AdapterConfig.from_metadata({}) == config
    assert AdapterConfig.kind_for(True) == "dora" and AdapterConfig.kind_for(False) == "lora"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(kind="ia3"), "Unknown adapter kind 'ia3'; known kinds: dora, lora"),
        (dict(rank=0), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(rank=True), "rank"),
        (dict(scale=float("inf")), "scale"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_adapter_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**settings)


def test_the_registry_maps_each_kind_to_its_class():
    assert {"lora": LoRALinear, "dora": DoRALinear} == ADAPTER_KINDS
    assert LoRALinear.kind == "lora" and DoRALinear.kind == "dora"
    assert DoRALinear.parameter_names == ("lora_a", "lora_b", "m")
    with pytest.raises(ValueError, match="already registered to DoRALinear"):
        register_adapter_kind("dora")(LoRALinear)


def test_from_base_returns_the_class_it_is_called_on(make_base):
    for cls in (LoRALinear, DoRALinear):
        layer = cls.from_base(make_base("nf4"), r=2, scale=3.0, dropout=0.25)
        assert type(layer) is cls
        assert layer.config == AdapterConfig(cls.kind, rank=2, scale=3.0, dropout=0.25)


def test_adapter_config_of_a_model_reads_back_what_was_applied():
    model = small_model()
    apply_lora_to_model(model, rank=4, dropout=0.1, scale=3.0, use_dora=False)
    assert adapter_config(model) == AdapterConfig("lora", rank=4, scale=3.0, dropout=0.1)
    model = small_model()
    apply_adapters(model, AdapterConfig())
    assert adapter_config(model) == AdapterConfig()
    assert all(type(layer) is DoRALinear and layer.rank == 8 for _, layer in adapter_layers(model))
