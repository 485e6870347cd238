"""NF4 and affine quantization: codebook, rounding, error bounds, layers and quantize_model."""

from __future__ import annotations

from statistics import NormalDist

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.layers.moe import SwitchLinear
from bit_axon.quantization import (
    NF4_CODEBOOK,
    NF4Embedding,
    NF4Linear,
    NF4SwitchLinear,
    QuantizedSwitchLinear,
    dequantize_model,
    nf4_dequantize,
    nf4_quantize,
    quantize_model,
)
from bit_axon.quantization.nf4 import nf4_unpack
from bit_axon.training.lora import apply_lora_to_model
from toy import peak_memory

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest


def tiny_model(seed: int = 0) -> BitAxonModel:
    mx.random.seed(seed)
    config = BitAxonConfig.small(
        vocab_size=512, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128, num_heads=4
    )
    model = BitAxonModel(config)
    mx.eval(model.parameters())
    return model


def gaussian(shape, seed=0, std=0.02) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, std, shape).astype(np.float32))


def test_codebook_is_qlora_nf4():
    # Rebuild NF4 as the QLoRA paper defines it: quantiles of N(0, 1) for 8 positive and 7 negative
    # levels (offset 0.9677083), an exact zero, normalized to [-1, 1].
    offset, nd = 0.9677083, NormalDist()
    positive = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = sorted(positive + [0.0] + negative)
    values = [v / max(abs(v) for v in values) for v in values]
    assert len(NF4_CODEBOOK) == 16
    np.testing.assert_allclose(NF4_CODEBOOK, values, atol=1e-6)
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[15] == 1.0


def test_codes_are_nearest_codebook_entries():
    w = gaussian((32, 256), seed=1)
    packed, scales = nf4_quantize(w, 64)
    codes = nf4_unpack(packed)
    groups = w.reshape(32, 4, 64)
    normed = groups / mx.abs(groups).max(axis=-1, keepdims=True)
    brute = mx.argmin(mx.abs(normed[..., None] - mx.array(NF4_CODEBOOK)), axis=-1).reshape(32, 256)
    assert mx.array_equal(codes, brute.astype(mx.uint32))


def test_quantizing_holds_a_few_copies_of_the_weight_at_most():
    # One fused pass per weight: the full model's embedding (1.2 GB in float32) must not need ~16
    # copies of itself, as the earlier gather-based search did (21 GB).
    w = gaussian((1024, 4096), seed=3)
    mx.eval(w)
    _, peak = peak_memory(lambda: nf4_quantize(w, 64))
    assert peak < 6 * w.nbytes


def test_dequantized_values_are_exactly_the_16_codebook_values():
    # Each row is one group holding every codebook value times a per-row scale.
    scales = mx.array([0.5, 2.0, 3.0, 0.125])[:, None]
    row = mx.array(NF4_CODEBOOK * 4)  # 64 values
    w = row[None] * scales
    packed, s = nf4_quantize(w, 64)
    codes = nf4_unpack(packed)
    assert sorted(set(np.array(codes).ravel().tolist())) == list(range(16))
    normalized = nf4_dequantize(packed, mx.ones_like(s))
    assert set(np.array(normalized).ravel().tolist()) == set(np.float32(NF4_CODEBOOK).tolist())
    assert mx.array_equal(nf4_dequantize(packed, s), w)  # codebook values scale back exactly


def test_packing_layout_eight_codes_per_uint32_lowest_bits_first():
    w = mx.array(NF4_CODEBOOK[8:] * 8)[None]  # codes 8..15 repeated, one group of 64
    packed, _ = nf4_quantize(w, 64)
    expected = sum((8 + j) << (4 * j) for j in range(8))
    assert packed.dtype == mx.uint32 and packed.shape == (1, 8)
    assert np.array(packed).ravel().tolist() == [expected] * 8


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_shapes_and_dtypes(dtype):
    w = gaussian((3, 16, 128)).astype(dtype)
    packed, scales = nf4_quantize(w, 32)
    assert packed.shape == (3, 16, 16) and packed.dtype == mx.uint32
    assert scales.shape == (3, 16, 4) and scales.dtype == dtype
    out = nf4_dequantize(packed, scales)
    assert out.shape == w.shape and out.dtype == dtype


def test_zero_groups_stay_zero():
    w = mx.concatenate([mx.zeros((2, 64)), gaussian((2, 64))], axis=1)
    packed, scales = nf4_quantize(w, 64)
    out = nf4_dequantize(packed, scales)
    assert not mx.any(mx.isnan(out)).item()
    assert mx.array_equal(out[:, :64], mx.zeros((2, 64)))


def test_rejects_widths_not_divisible_by_group():
    with pytest.raises(ValueError, match="divisible"):
        nf4_quantize(mx.zeros((2, 96)), 64)


def test_nf4_error_bound_per_element_and_mse():
    w = gaussian((256, 512), seed=2)
    out = nf4_dequantize(*nf4_quantize(w, 64))
    # Rounding to the nearest code: error <= absmax * (largest gap between neighbouring codes) / 2.
    absmax = mx.abs(w.reshape(256, 8, 64)).max(axis=-1, keepdims=True)
    half_gap = float(np.max(np.diff(NF4_CODEBOOK))) / 2
    err = mx.abs((out - w).reshape(256, 8, 64))
    assert mx.all(err <= absmax * half_gap * (1 + 1e-6)).item()
    rel_mse = (mx.mean((out - w) ** 2) / mx.mean(w * w)).item()
    assert rel_mse < 0.0095  # measured 0.0085 (bench/quant_error.py)


def test_affine_error_bound_and_mse():
    w = gaussian((256, 512), seed=3)
    q, scales, biases = mx.quantize(w, 64, 4)
    out = mx.dequantize(q, scales, biases, 64, 4)
    err = mx.abs((out - w).reshape(256, 8, 64))
    # A grid of step `scale` covering the group; MLX shifts it so that 0 is exactly representable,
    # which can leave the group's extremes up to one step (not half a step) from the grid.
    assert mx.all(err <= mx.abs(scales)[..., None] * (1 + 1e-4)).item()
    rel_mse = (mx.mean((out - w) ** 2) / mx.mean(w * w)).item()
    assert rel_mse < 0.0095  # measured 0.0083


def test_nf4_linear_forward_and_gradient():
    linear = nn.Linear(128, 48)
    q = NF4Linear.from_linear(linear, group_size=64)
    assert (q.input_dims, q.output_dims) == (128, 48)
    assert q.weight.shape == (48, 16) and q.scales.shape == (48, 2)
    x = gaussian((2, 5, 128), seed=4, std=1.0)
    w = q.dequantize()
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == mx.float32
    np.testing.assert_allclose(y, x @ w.T + linear.bias, atol=1e-5)
    # The custom backward (re-dequantizing W) must give the ordinary gradient.
    g = mx.grad(lambda x: (q(x) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: ((x @ w.T + linear.bias) ** 2).sum())(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    assert q.trainable_parameters() == {}


@pytest.mark.parametrize("sorted_indices", [False, True])
def test_nf4_switch_linear_matches_gather_mm(sorted_indices):
    base = SwitchLinear(64, 32, 4)
    q = NF4SwitchLinear.from_switch_linear(base, group_size=64)
    assert (q.input_dims, q.output_dims, q.num_experts) == (64, 32, 4)
    x = gaussian((10, 1, 64), seed=5, std=1.0)
    idx = mx.array([0, 0, 1, 1, 1, 2, 3, 3, 3, 3]) if sorted_indices else mx.array([3, 1, 0, 2, 1, 0, 3, 2, 2, 1])
    w = q.dequantize().swapaxes(-1, -2)
    ref = mx.gather_mm(x, w, rhs_indices=idx)
    np.testing.assert_allclose(q(x, idx, sorted_indices), ref, atol=1e-5)
    g = mx.grad(lambda x: (q(x, idx, sorted_indices) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: (mx.gather_mm(x, w, rhs_indices=idx) ** 2).sum())(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_nf4_switch_linear_gradient_with_broadcast_input():
    # One input row shared by k experts: the backward must sum over the broadcast axis.
    q = NF4SwitchLinear(64, 16, 4)
    x = gaussian((3, 1, 1, 64), seed=6, std=1.0)
    idx = mx.array([[0, 2], [1, 3], [2, 2]])
    w = q.dequantize().swapaxes(-1, -2)
    g = mx.grad(lambda x: (q(x, idx) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: (mx.gather_mm(x, w, rhs_indices=idx) ** 2).sum())(x)
    assert g.shape == x.shape
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_affine_switch_linear_matches_gather_mm():
    base = SwitchLinear(64, 32, 4)
    q = QuantizedSwitchLinear.from_switch_linear(base, group_size=64, bits=4)
    x = gaussian((6, 1, 64), seed=7, std=1.0)
    idx = mx.array([2, 0, 1, 3, 3, 0])
    w = q.dequantize().swapaxes(-1, -2)
    np.testing.assert_allclose(q(x, idx), mx.gather_mm(x, w, rhs_indices=idx), rtol=1e-4, atol=1e-4)
    g = mx.grad(lambda x: (q(x, idx) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: (mx.gather_mm(x, w, rhs_indices=idx) ** 2).sum())(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    assert q.input_dims == 64 and q.trainable_parameters() == {}


def test_nf4_embedding_lookup_and_tied_head():
    emb = nn.Embedding(100, 64)
    q = NF4Embedding.from_embedding(emb, group_size=32)
    table = q.dequantize()
    ids = mx.array([[3, 99, 0]])
    assert mx.array_equal(q(ids), table[ids])
    h = gaussian((1, 3, 64), seed=8, std=1.0)
    np.testing.assert_allclose(q.as_linear(h), h @ table.T, atol=1e-5)
    assert (q.num_embeddings, q.dims) == (100, 64)


def _layer_types(model) -> dict[str, str]:
    return {path: type(m).__name__ for path, m in model.named_modules()}


@pytest.mark.parametrize(
    ("mode", "linear", "switch", "embedding"),
    [
        ("nf4", "NF4Linear", "NF4SwitchLinear", "NF4Embedding"),
        ("affine", "QuantizedLinear", "QuantizedSwitchLinear", "QuantizedEmbedding"),
    ],
)
def test_quantize_model_replaces_eligible_layers(mode, linear, switch, embedding):
    model = tiny_model()
    ids = mx.array([[1, 2, 3, 4, 5]])
    ref, _ = model(ids)
    quantize_model(model, bits=4, group_size=64, mode=mode)
    assert model.config.quantization == {"mode": mode, "bits": 4, "group_size": 64}
    types = _layer_types(model)
    assert types["embed_tokens"] == embedding
    assert types["input_proj"] == types["output_proj"] == linear
    assert types["layer_0.ssm.in_proj"] == types["layer_0.ssm.x_proj"] == types["layer_1.attention.q_proj"] == linear
    assert types["layer_1.moe.shared_expert.down_proj"] == linear
    assert types["layer_2.moe.switch_mlp.gate_proj"] == types["layer_2.moe.switch_mlp.down_proj"] == switch
    # Routers stay float by design; dt_proj (input width 1) cannot be grouped.
    assert types["layer_1.moe.gate"] == types["layer_1.moe.shared_expert_gate"] == "Linear"
    assert types["layer_0.ssm.dt_proj"] == "Linear"
    out, _ = model(ids)
    assert out.shape == ref.shape and out.dtype == mx.float32
    assert mx.abs(out - ref).max().item() < 0.5 * mx.abs(ref).max().item()


def test_quantize_model_skips_layers_narrower_than_the_group():
    model = tiny_model()
    quantize_model(model, group_size=128, mode="nf4")
    types = _layer_types(model)
    assert types["input_proj"] == "Linear"  # input width 64 < 128
    assert types["layer_0.ssm.x_proj"] == "NF4Linear"  # input width 128
    assert types["layer_1.moe.switch_mlp.down_proj"] == "NF4SwitchLinear"  # input width 128


def test_quantize_model_settings_are_validated():
    with pytest.raises(ValueError, match="4-bit"):
        quantize_model(tiny_model(), bits=3, mode="nf4")
    with pytest.raises(ValueError, match="bits"):
        quantize_model(tiny_model(), bits=7, mode="affine")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(tiny_model(), group_size=48, mode="affine")
    with pytest.raises(ValueError, match="mode"):
        quantize_model(tiny_model(), mode="fp4")
    model = quantize_model(tiny_model(), mode="nf4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, bits=8, mode="affine")


def test_quantize_model_refuses_models_with_adapters():
    model = tiny_model()
    apply_lora_to_model(model, rank=4)
    with pytest.raises(ValueError, match="before applying"):
        quantize_model(model)


def test_quantize_model_again_with_same_settings_only_touches_float_layers():
    model = quantize_model(tiny_model(), mode="affine")
    untouched = model.layer_0.ssm.in_proj
    model.input_proj = nn.Linear(64, 64, bias=False)  # e.g. a freshly fused adapter
    quantize_model(model, mode="affine")
    assert isinstance(model.input_proj, nn.QuantizedLinear)
    assert model.layer_0.ssm.in_proj is untouched  # already quantized: not quantized a second time


@pytest.mark.parametrize("mode", ["nf4", "affine"])
def test_dequantize_model_keeps_the_quantized_function(mode):
    model = quantize_model(tiny_model(), mode=mode)
    ids = mx.array([[7, 8, 9]])
    ref, _ = model(ids)
    dequantize_model(model)
    assert model.config.quantization is None
    assert not any("Quantized" in t or "NF4" in t for t in _layer_types(model).values())
    out, _ = model(ids)
    np.testing.assert_allclose(out, ref, atol=1e-5)
