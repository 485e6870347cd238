"""DoRA (weight-decomposed LoRA, Liu et al., 2024): LoRA plus a trainable per-row magnitude ``m``.

    output = (m / ||W + scale B^T A^T||_row) * (W x + scale (dropout(x) A) B) + bias

``m`` starts as the row norms of the frozen base weight (dequantized for quantized bases), so a fresh
adapter reproduces the base layer. As recommended in the paper (Sec. 4.3) and done by PEFT and
mlx-lm, the adapted row norm is treated as a constant in the backward pass (``mx.stop_gradient``):
gradients reach ``m`` directly and ``A``/``B`` through the LoRA path only, which saves the memory of
differentiating a norm over the full (out, in) weight at a negligible cost in accuracy.

The adapted row norm is the norm of the adapted weight itself, formed from the weight the forward
pass already has: the expanded form ||W_o||^2 + 2 s (W A)_o . B_o + s^2 ||(A B)_o||^2 cancels
catastrophically in float32 when a row of W + delta is much smaller than ||W_o|| (NaN at a ratio
of 1e-4), where ``fuse()``, which has the adapted weight, would disagree with the forward.
"""

from __future__ import annotations

from bit_axon.quantization import dense_weight, linear_matmul_and_weight, quantize_like
from bit_axon.training.lora import AdapterConfig, LoRALinear, register_adapter_kind

import mlx.core as mx
import mlx.nn as nn


def _row_norms(w: mx.array) -> mx.array:
    return mx.sqrt((w * w).sum(axis=1))


@register_adapter_kind("dora")
class DoRALinear(LoRALinear):
    """A LoRA layer whose output rows are re-scaled to the trainable magnitude ``m`` (output_dims,)."""

    parameter_names = (*LoRALinear.parameter_names, "m")

    def __init__(self, linear: nn.Module, config: AdapterConfig):
        super().__init__(linear, config)
        # Computed exactly as adapted_norm() does with B = 0, so a fresh adapter's ratio is exactly 1.
        self.m = _row_norms(dense_weight(self.linear).astype(mx.float32))

    def adapted_norm(self, w: mx.array | None = None) -> mx.array:
        """Row norms of ``W + scale B^T A^T`` (output_dims,), in float32.

        ``w`` is the base's float weight when the caller already has it (saves a dequantization).
        """
        w = (dense_weight(self.linear) if w is None else w).astype(mx.float32)
        return _row_norms(w + self.delta().astype(mx.float32))

    def fuse(self, requantize: bool = False) -> nn.Module:
        """A plain layer with weight ``(m / ||W + delta||_row) (W + delta)``, ``delta = scale B^T A^T``.

        Quantized bases are dequantized first; ``requantize=True`` quantizes the result again with the
        base's format, bits and group size.
        """
        fused = super().fuse(requantize=False)
        adapted = fused.weight
        norm = _row_norms(adapted.astype(mx.float32))
        fused.weight = ((self.m / norm)[:, None] * adapted).astype(adapted.dtype)
        return quantize_like(fused, self.linear) if requantize else fused

    def __call__(self, x: mx.array) -> mx.array:
        # One dequantization of a quantized base serves the matmul and the row norms.
        y, w = linear_matmul_and_weight(self.linear, x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        out = y + (self.scale * z).astype(y.dtype)
        norm = mx.stop_gradient(self.adapted_norm(mx.stop_gradient(w)))
        out = (self.m / norm).astype(out.dtype) * out
        if "bias" in self.linear:
            out = out + self.linear["bias"]
        return out
