"""Elementwise math that MLX's CPU backend does slowly."""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for the hot loops (SSM state decays, the vocabulary softmax).

    On MLX's CPU backend ``power(2, x log2 e)`` is ~2x faster than ``exp`` at the same float32
    accuracy (both ~2e-6 relative); GPUs use ``exp`` directly.
    """
    if mx.default_device() == mx.cpu:
        return mx.power(2.0, x * _LOG2E)
    return mx.exp(x)
