"""NF4 codes of bfloat16 weights are the codes of the same values quantized in float32."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.quantization.codes import nf4_quantize, nf4_unpack

import mlx.core as mx


def test_bfloat16_weights_get_the_float32_codes():
    w = mx.random.normal((256, 1024), key=mx.random.key(3)).astype(mx.bfloat16)
    packed, scales = nf4_quantize(w, 64)
    packed32, scales32 = nf4_quantize(w.astype(mx.float32), 64)  # the same values, exactly
    assert scales.dtype == mx.bfloat16 and mx.array_equal(scales.astype(mx.float32), scales32)
    mismatched = (nf4_unpack(packed) != nf4_unpack(packed32)).sum().item()
    assert mismatched == 0, f"{mismatched} of {w.size} codes differ from quantizing in float32"
