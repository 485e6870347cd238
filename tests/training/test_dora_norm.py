"""DoRA's adapted row norm where a row of W + delta is much smaller than ||W||: no cancellation."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.quantization import dense_weight
from bit_axon.training.dora import DoRALinear

import mlx.core as mx
import numpy as np
import pytest

ROW = 5


def nearly_cancelled(make_base, kind: str, ratio: float) -> DoRALinear:
    """A DoRA layer whose adapter turns row ROW of W into ``ratio * W[ROW]``."""
    layer = DoRALinear.from_base(make_base(kind), r=4)
    w = dense_weight(layer.linear).astype(mx.float32)
    a = mx.zeros_like(layer.lora_a)
    a[:, 0] = w[ROW]
    b = mx.zeros_like(layer.lora_b)
    b[0, ROW] = -(1 - ratio) / layer.scale
    layer.lora_a, layer.lora_b = a, b
    return layer


@pytest.mark.parametrize("ratio", [1e-3, 1e-4])
@pytest.mark.parametrize("kind", ["float", "nf4"])
def test_fused_equals_unfused_when_a_row_nearly_cancels(kind, ratio, make_base, inputs):
    layer = nearly_cancelled(make_base, kind, ratio)
    adapted = dense_weight(layer.linear).astype(mx.float32) + layer.delta()
    direct = np.linalg.norm(np.array(adapted, dtype=np.float64), axis=1)
    np.testing.assert_allclose(np.array(layer.adapted_norm()), direct, rtol=1e-5)
    x = inputs(4)
    y, fused = layer(x), layer.fuse()(x)
    assert mx.all(mx.isfinite(y)).item()
    # The unfused output W x + s (x A) B itself loses ~eps / ratio to cancellation; the norm must not add more.
    np.testing.assert_allclose(np.array(y), np.array(fused), rtol=2e-2, atol=1e-4)
