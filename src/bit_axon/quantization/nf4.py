"""4-bit NormalFloat (NF4) weights, as in QLoRA (Dettmers et al., 2023): the layers and their matmuls.

The format itself (codebook, packing, the MLX-op (de)quantization) is in
:mod:`~bit_axon.quantization.codes`. There is no NF4 matmul kernel in MLX, so the layers dequantize
and then use the ordinary (gather) matmul, which runs on every backend (on Linux CPUs the
dequantization is a compiled kernel, ``cpu_kernels``, with the same values). Their backward passes
dequantize again instead of keeping the float weight alive between forward and backward: the frozen
base then costs 4.5 bits per weight during training, not 32.
"""

from __future__ import annotations

import math

import bit_axon.quantization.cpu_kernels as cpu_kernels
from bit_axon.backend import settings
from bit_axon.layers.moe import SwitchLinear
from bit_axon.quantization import base
from bit_axon.quantization.codes import (
    CODES_PER_WORD,
    NF4_CODEBOOK,
    cast,
    nf4_dequantize_ops,
    nf4_quantize,
    nf4_unpack,
)
from bit_axon.quantization.fast_path import (
    after,
    dequantized_gather_matmul,
    dequantized_matmul,
    shared_dense_matmul,
)

import mlx.core as mx
import mlx.nn as nn

__all__ = [
    "NF4_CODEBOOK",
    "NF4Embedding",
    "NF4Linear",
    "NF4SwitchLinear",
    "nf4_dequantize",
    "nf4_dequantize_ops",
    "nf4_gather_matmul",
    "nf4_matmul",
    "nf4_quantize",
    "nf4_unpack",
]


def nf4_dequantize(packed: mx.array, scales: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
    """Codes (..., in / 8) and scales (..., in / group) -> weights (..., in) in ``dtype`` (default:
    the scales' dtype).

    The group size is implied by the shapes, so it cannot disagree with how the weight was quantized.
    On the CPU fast path this is the compiled kernel of ``cpu_kernels`` where it loads (the same
    values as :func:`nf4_dequantize_ops`, several times faster).
    """
    if settings().cpu_fast_path() and (kernels := cpu_kernels.load()) is not None:
        return cast(kernels.nf4_dequantize(packed, scales, dtype=cpu_kernels.output_dtype(dtype, scales)), dtype)
    return cast(nf4_dequantize_ops(packed, scales), dtype)


def nf4_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """``x @ W.T`` for the NF4 weight W (out, in), dequantized for this call only (``dequantized_matmul``)."""
    return dequantized_matmul(nf4_dequantize)(x, packed, scales)


@mx.custom_function
def _nf4_selected_matmul(x, packed, scales, indices):
    packed, scales = after(x, packed, scales)
    return x @ nf4_dequantize(packed[indices], scales[indices]).swapaxes(-1, -2)


@_nf4_selected_matmul.vjp
def _nf4_selected_matmul_vjp(primals, cotangent, output):
    x, packed, scales, indices = primals
    packed, scales = after(cotangent, packed, scales)
    w = nf4_dequantize(packed[indices], scales[indices])
    return (
        (cotangent @ w).astype(x.dtype),
        mx.zeros_like(packed),
        mx.zeros_like(scales),
        mx.zeros_like(indices),
    )


def nf4_gather_matmul(
    x: mx.array, packed: mx.array, scales: mx.array, indices: mx.array, sorted_indices: bool = False
) -> mx.array:
    """``mx.gather_mm`` of x with the stacked NF4 expert weights (X, out, in) chosen by ``indices``.

    Dequantizing is the costly part, so with fewer index entries than experts (decoding: a few
    tokens, each its own batch entry) only the chosen experts are dequantized, and the matmul
    is batched over them; otherwise all experts are dequantized once and gathered.
    """
    if indices.size < packed.shape[0] and x.shape[:-2] == indices.shape:
        return _nf4_selected_matmul(x, packed, scales, indices)
    return dequantized_gather_matmul(nf4_dequantize, sorted_indices)(x, packed, scales, indices)


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 weights (QLoRA's base layer): ``x @ dequantize().T + bias``."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, group_size: int = 64):
        super().__init__()
        self.group_size = group_size
        self.bits = 4
        self.mode = "nf4"
        bound = 1 / math.sqrt(input_dims)
        w = mx.random.uniform(-bound, bound, (output_dims, input_dims))
        self.weight, self.scales = nf4_quantize(w, group_size)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> NF4Linear:
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, bias="bias" in linear, group_size=group_size)
        layer.weight, layer.scales = nf4_quantize(linear.weight, group_size)
        if "bias" in linear:
            layer.bias = linear.bias
        layer.freeze()
        return layer

    @property
    def input_dims(self) -> int:
        return self.weight.shape[-1] * CODES_PER_WORD

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0]

    def dequantize(self) -> mx.array:
        """The float weight (out, in)."""
        return nf4_dequantize(self["weight"], self["scales"])

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}, "
            f"group_size={self.group_size}, bits=4, mode=nf4"
        )

    def __call__(self, x: mx.array) -> mx.array:
        y = nf4_matmul(x, self["weight"], self["scales"])
        if "bias" in self:
            y = y + self["bias"]
        return y


class NF4SwitchLinear(base.PackedSwitchLinear):
    """NF4 version of :class:`SwitchLinear`: stacked expert weights (X, out, in) applied by index."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64):
        super().__init__()
        self.group_size = group_size
        self.bits = 4
        self.mode = "nf4"
        bound = 1 / math.sqrt(input_dims)
        w = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))
        self.weight, self.scales = nf4_quantize(w, group_size)
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int = 64) -> NF4SwitchLinear:
        num_experts, output_dims, input_dims = layer.weight.shape
        q = cls(input_dims, output_dims, num_experts, group_size=group_size)
        q.weight, q.scales = nf4_quantize(layer.weight, group_size)
        q.freeze()
        return q

    def dequantize(self) -> mx.array:
        """The float expert weights (X, out, in)."""
        return nf4_dequantize(self["weight"], self["scales"])

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return nf4_gather_matmul(x, self["weight"], self["scales"], indices, sorted_indices)


class NF4Embedding(nn.Module):
    """NF4 embedding table (vocab, dims); ``as_linear`` is the tied output head.

    Lookups dequantize only the rows they need. ``as_linear`` dequantizes the whole table for the
    matmul (a transient vocab x dims float array, not kept for the backward pass).
    """

    def __init__(self, num_embeddings: int, dims: int, group_size: int = 64):
        super().__init__()
        self.group_size = group_size
        self.bits = 4
        self.mode = "nf4"
        w = mx.random.normal((num_embeddings, dims), scale=math.sqrt(1 / dims))
        self.weight, self.scales = nf4_quantize(w, group_size)
        self.freeze()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group_size: int = 64) -> NF4Embedding:
        num_embeddings, dims = embedding.weight.shape
        q = cls(num_embeddings, dims, group_size=group_size)
        q.weight, q.scales = nf4_quantize(embedding.weight, group_size)
        q.freeze()
        return q

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def dims(self) -> int:
        return self.weight.shape[-1] * CODES_PER_WORD

    def dequantize(self) -> mx.array:
        """The float table (vocab, dims)."""
        return nf4_dequantize(self["weight"], self["scales"])

    def _extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dims}, group_size={self.group_size}, bits=4, mode=nf4"

    def __call__(self, ids: mx.array) -> mx.array:
        return nf4_dequantize(self["weight"][ids], self["scales"][ids])

    def as_linear(self, x: mx.array) -> mx.array:
        return nf4_matmul(x, self["weight"], self["scales"])


# --- the common interface ---------------------------------------------------------------------


class _NF4Base(base.BaseLayer):
    def dequantize(self) -> mx.array:
        return self.layer.dequantize()

    def row_dequantizer(self) -> base.RowDequantizer:
        return nf4_dequantize, (self.layer["weight"], self.layer["scales"])


@base.register(NF4Linear)
class NF4LinearBase(_NF4Base):
    def dims(self) -> tuple[int, int]:
        return self.layer.input_dims, self.layer.output_dims

    def matmul(self, x: mx.array) -> mx.array:
        return nf4_matmul(x, self.layer["weight"], self.layer["scales"])

    def matmul_and_weight(self, x: mx.array) -> tuple[mx.array, mx.array]:
        w = nf4_dequantize(*after(x, self.layer["weight"], self.layer["scales"]), dtype=x.dtype)
        return shared_dense_matmul(x, w, nf4_dequantize, self.layer["weight"], self.layer["scales"]), w

    def quantize_like(self, linear: nn.Linear) -> nn.Module:
        return NF4Linear.from_linear(linear, self.layer.group_size)


@base.register(NF4Embedding)
class NF4EmbeddingBase(_NF4Base, base.EmbeddingBase):
    def dims(self) -> tuple[int, int]:
        return self.layer.dims, self.layer.num_embeddings


@base.register(NF4SwitchLinear)
class NF4SwitchBase(_NF4Base, base.SwitchBase):
    pass


base.register_format(
    base.QuantFormat(
        name="nf4",
        bits=(4,),
        bits_error="nf4 quantization is 4-bit only; got bits={bits} (use mode='affine' for other widths)",
        quantizers={
            "linear": lambda layer, group_size, bits: NF4Linear.from_linear(layer, group_size),
            "switch": lambda layer, group_size, bits: NF4SwitchLinear.from_switch_linear(layer, group_size),
            "embedding": lambda layer, group_size, bits: NF4Embedding.from_embedding(layer, group_size),
        },
    )
)
