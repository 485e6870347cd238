"""The one interface of base layers: every registered type gives the same dimensions, float weight,
matmul and row dequantizer as its float reference, and unknown types fail clearly."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.layers.moe import SwitchLinear
from bit_axon.quantization import (
    AFFINE_BITS,
    QUANT_MODES,
    NF4Embedding,
    NF4Linear,
    NF4SwitchLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedSwitchLinear,
    base_layer,
    is_linear_base,
    is_quantized,
    quantization_spec,
    quantize_like,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

IN, OUT = 128, 48


def _linear(kind: str) -> nn.Module:
    mx.random.seed(0)
    float_layer = nn.Linear(IN, OUT, bias=False)
    return {
        "float": lambda: float_layer,
        "mlx": lambda: nn.QuantizedLinear.from_linear(float_layer, 64, 4),  # MLX's / mlx-lm's own
        "mlx-mxfp4": lambda: nn.QuantizedLinear.from_linear(float_layer, 32, 4, mode="mxfp4"),
        "affine": lambda: QuantizedLinear.from_linear(float_layer, 64, 4),
        "nf4": lambda: NF4Linear.from_linear(float_layer, 64),
    }[kind]()


def _embedding(kind: str) -> nn.Module:
    mx.random.seed(1)
    table = nn.Embedding(OUT, IN)
    return {
        "float": lambda: table,
        "mlx": lambda: nn.QuantizedEmbedding.from_embedding(table, 64, 4),
        "affine": lambda: QuantizedEmbedding.from_embedding(table, 64, 4),
        "nf4": lambda: NF4Embedding.from_embedding(table, 64),
    }[kind]()


def _x() -> mx.array:
    return mx.array(np.random.default_rng(2).normal(size=(2, 5, IN)).astype(np.float32))


@pytest.mark.parametrize("kind", ["float", "mlx", "mlx-mxfp4", "affine", "nf4"])
def test_linear_bases_meet_the_interface(kind):
    layer = _linear(kind)
    base = base_layer(layer)
    assert is_linear_base(layer) and base.kind == "linear" and is_quantized(layer) == (kind != "float")
    assert base.dims() == (IN, OUT)
    w = base.dequantize().astype(mx.float32)  # (mxfp4 dequantizes to bfloat16)
    assert w.shape == (OUT, IN)
    x = _x()
    np.testing.assert_allclose(np.array(base.matmul(x)), np.array(layer(x)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(base.matmul(x)), np.array(x @ w.T), rtol=1e-4, atol=1e-4)
    y, w2 = base.matmul_and_weight(x)
    np.testing.assert_allclose(np.array(y), np.array(base.matmul(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(w2.astype(mx.float32)), np.array(w))
    restored = base.to_float()
    assert type(restored) is nn.Linear
    np.testing.assert_array_equal(np.array(restored.weight.astype(mx.float32)), np.array(w))
    again = quantize_like(restored, layer)  # the same format and settings (its codes may round anew)
    assert type(again) is type(layer) and base_layer(again).dims() == (IN, OUT)
    assert getattr(again, "mode", None) == getattr(layer, "mode", None)


@pytest.mark.parametrize("kind", ["float", "mlx", "affine", "nf4"])
def test_embeddings_as_heads_meet_the_interface(kind):
    table = _embedding(kind)
    table.freeze()
    base = base_layer(table)
    assert base.kind == "embedding" and not is_linear_base(table)
    assert base.dims() == (IN, OUT)
    w = base.dequantize()
    x = _x()
    np.testing.assert_allclose(np.array(base.matmul(x)), np.array(table.as_linear(x)), rtol=1e-6, atol=1e-6)
    dequantize, params = base.row_dequantizer()
    assert all(p.shape[0] == OUT for p in params)
    np.testing.assert_array_equal(np.array(dequantize(*(p[5:17] for p in params))), np.array(w[5:17]))


def test_a_trainable_float_head_has_no_row_dequantizer():
    assert base_layer(nn.Embedding(OUT, IN)).row_dequantizer() is None


@pytest.mark.parametrize("kind", ["float", "affine", "nf4"])
def test_switch_bases_round_trip_to_float(kind):
    mx.random.seed(3)
    layer = SwitchLinear(IN, OUT, 4)
    if kind == "affine":
        layer = QuantizedSwitchLinear.from_switch_linear(layer, 64, 4)
    elif kind == "nf4":
        layer = NF4SwitchLinear.from_switch_linear(layer, 64)
    base = base_layer(layer)
    assert base.kind == "switch" and base.dims() == (IN, OUT) and not is_linear_base(layer)
    restored = base.to_float()
    assert type(restored) is SwitchLinear
    np.testing.assert_array_equal(np.array(restored.weight), np.array(base.dequantize()))


def test_unknown_types_are_refused_clearly():
    assert not is_linear_base(nn.RMSNorm(8)) and not is_quantized(nn.RMSNorm(8))
    with pytest.raises(TypeError, match="RMSNorm is not a known base layer type"):
        base_layer(nn.RMSNorm(8))
    with pytest.raises(TypeError, match="Expected nn.Linear, nn.QuantizedLinear or NF4Linear, got Embedding"):
        quantize_like(nn.Linear(IN, OUT), nn.Embedding(OUT, IN))


def test_modes_and_bits_are_validated_in_one_place():
    assert QUANT_MODES == ("nf4", "affine")
    for bits in AFFINE_BITS:
        assert quantization_spec({"mode": "affine", "bits": bits, "group_size": 64})["bits"] == bits
    with pytest.raises(ValueError, match="nf4 quantization is 4-bit only; got bits=8"):
        quantization_spec({"mode": "nf4", "bits": 8, "group_size": 64})
    with pytest.raises(ValueError, match=r"Affine quantization supports bits in \(2, 3, 4, 5, 6, 8\), got 7"):
        quantization_spec({"mode": "affine", "bits": 7, "group_size": 64})
    with pytest.raises(ValueError, match="Unknown quantization mode 'gptq'; expected one of nf4, affine"):
        quantization_spec({"mode": "gptq", "bits": 4, "group_size": 64})
