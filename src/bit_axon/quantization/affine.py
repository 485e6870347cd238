"""MLX's affine quantization (``mode="affine"``, 2-8 bits), with the CPU fast path.

The layers are thin subclasses of MLX's (:class:`QuantizedLinear`, :class:`QuantizedEmbedding`)
with the same parameters and checkpoint layout, whose matmuls take the dequantize-then-BLAS route
on the CPU (:mod:`~bit_axon.quantization.fast_path`), and :class:`QuantizedSwitchLinear` for MoE
experts (``mx.gather_qmm``). MLX's own ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding``
(e.g. from mlx-lm, in any of MLX's modes) meet the same interface and keep MLX's kernels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import bit_axon.quantization.cpu_kernels as cpu_kernels
from bit_axon.backend import settings
from bit_axon.layers.moe import SwitchLinear
from bit_axon.quantization import base
from bit_axon.quantization.codes import affine_dequantize_ops, cast, unpackable
from bit_axon.quantization.fast_path import (
    after,
    calls,
    dequantized_gather_matmul,
    dequantized_matmul,
    shared_dense_matmul,
    wants_dequant,
)

import mlx.core as mx
import mlx.nn as nn

AFFINE_BITS = (2, 3, 4, 5, 6, 8)


def affine_dequantize(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    bits: int,
    dtype: mx.Dtype | None = None,
) -> mx.array:
    """``mx.dequantize`` of MLX's affine format, in ``dtype`` (default: the scales'): on the CPU fast
    path the compiled kernel of ``cpu_kernels`` where it loads, else :func:`affine_dequantize_ops`
    (the same values). The kernel writes float32 directly, without a conversion pass."""
    usable = settings().cpu_fast_path() and unpackable(w, scales, group_size, bits)
    kernels = cpu_kernels.load() if usable else None
    if kernels is not None:
        direct = cpu_kernels.output_dtype(dtype, scales)
        return cast(kernels.affine_dequantize(w, scales, biases, bits, dtype=direct), dtype)
    return cast(affine_dequantize_ops(w, scales, biases, group_size, bits), dtype)


@functools.cache
def affine_dequantizer(group_size: int, bits: int) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """``affine_dequantize`` with the format bound: one function object per format (a cache key)."""

    def dequantize(w: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
        return affine_dequantize(w, scales, biases, group_size, bits, dtype)

    return dequantize


@functools.cache
def mlx_dequantizer(group_size: int, bits: int, mode: str) -> Callable[..., mx.array]:
    """``mx.dequantize`` in any of MLX's modes with the format bound (a cache key), biases optional."""

    def dequantize(w: mx.array, scales: mx.array, *biases: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
        return cast(mx.dequantize(w, scales, biases[0] if biases else None, group_size, bits, mode=mode), dtype)

    return dequantize


def affine_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """``x @ W.T`` for a quantized W (``mx.quantized_matmul(..., transpose=True)``), CPU-routed."""
    if mode == "affine" and biases is not None and wants_dequant(x, scales):
        calls["affine"] += 1
        return dequantized_matmul(affine_dequantizer(group_size, bits))(x, w, scales, biases)
    return mx.quantized_matmul(
        x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )


def affine_gather_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    indices: mx.array,
    group_size: int,
    bits: int,
    sorted_indices: bool = False,
) -> mx.array:
    """``mx.gather_qmm(..., transpose=True)`` of x with stacked affine experts, CPU-routed.

    The dequantize route pays for all experts' weights once, so it is taken when each gathered
    matmul has several rows (the MoE's blocked CPU layout), not for one row per expert.
    """
    if x.ndim >= 2 and settings().dequantize_route(x.shape[-2]):
        calls["affine_gather"] += 1
        gather = dequantized_gather_matmul(affine_dequantizer(group_size, bits), sorted_indices)
        return gather(x, w, scales, biases, indices)
    return mx.gather_qmm(
        x, w, scales, biases, rhs_indices=indices, transpose=True,
        group_size=group_size, bits=bits, sorted_indices=sorted_indices,
    )


def _params(layer: nn.Module) -> tuple[mx.array, ...]:
    """The quantized arrays of an MLX-format layer, each with the output rows first."""
    biases = layer.get("biases")
    return (layer["weight"], layer["scales"]) + (() if biases is None else (biases,))


def _quantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """The fast-path matmul of an affine layer of ours."""
    return affine_matmul(
        x, layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits, layer.mode
    )


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose matmul takes the CPU fast path (same parameters and layout)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_matmul(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (the tied head) takes the CPU fast path."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x)


class QuantizedSwitchLinear(base.PackedSwitchLinear):
    """Affine-quantized :class:`SwitchLinear`: stacked expert weights applied with ``mx.gather_qmm``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64, bits: int = 4):
        super().__init__()
        self.group_size = group_size
        self.bits = bits
        self.mode = "affine"
        bound = 1 / math.sqrt(input_dims)
        w = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits)
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int = 64, bits: int = 4) -> QuantizedSwitchLinear:
        num_experts, output_dims, input_dims = layer.weight.shape
        q = cls(input_dims, output_dims, num_experts, group_size, bits)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size, bits)
        q.freeze()
        return q

    def dequantize(self) -> mx.array:
        return affine_dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return affine_gather_matmul(
            x, self["weight"], self["scales"], self["biases"], indices, self.group_size, self.bits, sorted_indices
        )


# --- the common interface ---------------------------------------------------------------------


class _MLXFormat(base.BaseLayer):
    """A layer in one of MLX's quantized formats (affine through our fast-path dequantizer)."""

    def _dequantizer(self) -> Callable[..., mx.array]:
        layer = self.layer
        if layer.mode == "affine" and layer.get("biases") is not None:
            return affine_dequantizer(layer.group_size, layer.bits)
        return mlx_dequantizer(layer.group_size, layer.bits, layer.mode)

    def dequantize(self) -> mx.array:
        return self._dequantizer()(*_params(self.layer))

    def row_dequantizer(self) -> base.RowDequantizer:
        return self._dequantizer(), _params(self.layer)


@base.register(nn.QuantizedLinear)
class MLXQuantizedLinear(_MLXFormat):
    """MLX's own ``nn.QuantizedLinear`` (and mlx-lm's): MLX's kernel, so adapters match it bit for bit."""

    def dims(self) -> tuple[int, int]:
        # Packed width: each uint32 holds 32 / bits codes.
        return self.layer.weight.shape[1] * 32 // self.layer.bits, self.layer.weight.shape[0]

    def matmul(self, x: mx.array) -> mx.array:
        layer = self.layer
        return mx.quantized_matmul(
            x, layer["weight"], layer["scales"], layer.get("biases"), transpose=True,
            group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
        )

    def quantize_like(self, linear: nn.Linear) -> nn.Module:
        like = self.layer  # keeps the class: MLX's own or the fast-path subclass
        return type(like).from_linear(linear, like.group_size, like.bits, mode=like.mode)


@base.register(QuantizedLinear)
class AffineLinear(MLXQuantizedLinear):
    """Our :class:`QuantizedLinear`: the CPU fast path, and one dequantization for matmul + weight."""

    def matmul(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self.layer, x)

    def matmul_and_weight(self, x: mx.array) -> tuple[mx.array, mx.array]:
        layer = self.layer
        if layer.mode != "affine" or not wants_dequant(x, layer["scales"]):
            return super().matmul_and_weight(x)
        params = (layer["weight"], layer["scales"], layer["biases"])
        w = affine_dequantize(*after(x, *params), layer.group_size, layer.bits, dtype=x.dtype)
        return shared_dense_matmul(x, w, affine_dequantizer(layer.group_size, layer.bits), *params), w


@base.register(nn.QuantizedEmbedding)
class MLXQuantizedEmbedding(_MLXFormat, base.EmbeddingBase):
    def dims(self) -> tuple[int, int]:
        return self.layer.weight.shape[1] * 32 // self.layer.bits, self.layer.weight.shape[0]


@base.register(QuantizedSwitchLinear)
class AffineSwitch(base.SwitchBase):
    pass


base.register_format(
    base.QuantFormat(
        name="affine",
        bits=AFFINE_BITS,
        bits_error="Affine quantization supports bits in " + str(AFFINE_BITS) + ", got {bits}",
        quantizers={
            "linear": lambda layer, group_size, bits: QuantizedLinear.from_linear(layer, group_size, bits),
            "switch": lambda layer, group_size, bits: QuantizedSwitchLinear.from_switch_linear(layer, group_size, bits),
            "embedding": lambda layer, group_size, bits: QuantizedEmbedding.from_embedding(layer, group_size, bits),
        },
    )
)
