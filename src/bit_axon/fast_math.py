"""Elementwise math that MLX's CPU backend does slowly.

Which function a hot loop uses on which device is the backend's choice (``bit_axon.backend``:
``settings().exp()``); this module only holds the formulas.
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634


def pow2_exp(x: mx.array) -> mx.array:
    """exp(x) as ``power(2, x log2 e)``: on MLX's CPU backend about twice as fast as ``exp`` at the
    same float32 accuracy (both ~2e-6 relative; bench/README.md)."""
    return mx.power(2.0, x * _LOG2E)
