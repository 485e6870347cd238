"""4-bit NormalFloat (NF4) weights, as in QLoRA (Dettmers et al., 2023).

Each group of ``group_size`` consecutive weights along the input dimension is divided by its absolute
maximum and rounded to the nearest of the 16 NF4 values below, which are quantiles of N(0, 1) scaled
to [-1, 1] (with an exact zero). The 4-bit codes are packed eight to a uint32 in input order, lowest
bits first — MLX's own 4-bit layout — so a packed (out, in / 8) weight has the same shape as an MLX
affine 4-bit weight. Scales (the per-group absmax) keep the source weight's dtype; QLoRA's "double
quantization" of the scales is not implemented (it would save 0.37 bits per weight).

There is no NF4 matmul kernel in MLX, so the layers dequantize and then use the ordinary (gather)
matmul, which runs on every backend (on Linux CPUs the dequantization is a compiled kernel,
``cpu_kernels``, with the same values). Their backward passes dequantize again instead of keeping the
float weight alive between forward and backward: the frozen base then costs 4.5 bits per weight
during training, not 32.
"""

from __future__ import annotations

import math

from bit_axon.layers.moe import SwitchLinear
from bit_axon.quantization import cpu_kernels
from bit_axon.quantization.fast_path import (
    after,
    cpu_fast_path,
    dequantized_gather_matmul,
    dequantized_matmul,
)

import mlx.core as mx
import mlx.nn as nn

# The NF4 data type, exactly as tabulated in the QLoRA paper (Appendix E) and bitsandbytes.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_CODEBOOK = mx.array(NF4_CODEBOOK, dtype=mx.float32)
# Decision boundaries between neighbouring codes: a value maps to the number of midpoints below it.
# (exact float32 values, as Python constants for mx.compile).
_MIDPOINTS = tuple(((_CODEBOOK[1:] + _CODEBOOK[:-1]) / 2).tolist())
_CODES_PER_WORD = 8  # 32-bit words / 4-bit codes
_SHIFTS = mx.arange(0, 32, 4, dtype=mx.uint32)
_BYTES = mx.arange(256, dtype=mx.uint32)
_BYTE_TABLE = mx.stack([_CODEBOOK[_BYTES & 0xF], _CODEBOOK[_BYTES >> 4]], axis=-1)  # (256, 2)
# The same pairs, each as one 64-bit element (256,): MLX's CPU gather costs per gathered element
# (~16 ns), so where the compiled kernel (cpu_kernels) is unavailable the CPU fast path copies one
# element per byte instead of two floats. Measured on an 8 x 1024 x 1024 stack: ~8 ns per weight
# against ~9 for a 16-bit-word table of 4 floats (1 MB, it misses the cache) and ~10 for the
# (256, 2) table. Built here, so that a first use inside mx.compile finds a constant rather than
# the ops that make it.
_BYTE_PAIRS = mx.view(_BYTE_TABLE, mx.uint64).reshape(256)
mx.eval(_BYTE_PAIRS)


def nf4_quantize(w: mx.array, group_size: int = 64) -> tuple[mx.array, mx.array]:
    """Quantize ``w`` (..., in) to packed codes (..., in / 8) uint32 and absmax scales (..., in / group_size).

    Lazy like ``mx.quantize``: nothing is computed until the result is evaluated.
    """
    *lead, n_in = w.shape
    if group_size <= 0 or group_size % _CODES_PER_WORD:
        raise ValueError(f"NF4 group_size must be a positive multiple of {_CODES_PER_WORD}, got {group_size}")
    if n_in % group_size:
        raise ValueError(f"NF4 needs the last dimension ({n_in}) to be divisible by group_size ({group_size})")
    groups = w.reshape(*lead, n_in // group_size, group_size)
    absmax = mx.abs(groups).max(axis=-1, keepdims=True)
    packed = _nf4_pack_codes(groups, absmax).reshape(*lead, n_in // _CODES_PER_WORD, _CODES_PER_WORD)
    return packed.sum(axis=-1), absmax.squeeze(-1)


@mx.compile
def _nf4_pack_codes(groups: mx.array, absmax: mx.array) -> mx.array:
    """Each weight's code, shifted to its place in its 32-bit word: one fused elementwise pass.

    The code is the number of midpoints below the normalised weight (15 comparisons against
    constants). Compiled, the chain has no per-weight temporaries: quantizing the full model's
    151,936 x 2,048 embedding this way peaks at a few copies of it (a gather-based search held
    ~17 of them, 21 GB).
    """
    # An all-zero group has absmax 0; dividing by 1 instead maps it to the exact-zero code.
    normed = (groups / mx.where(absmax > 0, absmax, 1)).astype(mx.float32)
    codes = mx.zeros(normed.shape, dtype=mx.uint32)
    for midpoint in _MIDPOINTS:
        codes = codes + (normed > midpoint).astype(mx.uint32)
    position = mx.arange(groups.shape[-1], dtype=mx.uint32) % _CODES_PER_WORD
    return codes << (position * 4)


def nf4_unpack(packed: mx.array) -> mx.array:
    """Packed (..., in / 8) uint32 -> codes (..., in) uint32 in [0, 16)."""
    codes = (packed[..., None] >> _SHIFTS) & 0xF
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * _CODES_PER_WORD)


def nf4_dequantize(packed: mx.array, scales: mx.array) -> mx.array:
    """Codes (..., in / 8) and scales (..., in / group) -> weights (..., in) in the scales' dtype.

    The group size is implied by the shapes, so it cannot disagree with how the weight was quantized.
    On the CPU fast path this is the compiled kernel of ``cpu_kernels`` where it loads (the same
    values as :func:`nf4_dequantize_ops`, ~8x faster).
    """
    if cpu_fast_path() and (kernels := cpu_kernels.load()) is not None:
        return kernels.nf4_dequantize(packed, scales)
    return nf4_dequantize_ops(packed, scales)


def nf4_dequantize_ops(packed: mx.array, scales: mx.array) -> mx.array:
    """:func:`nf4_dequantize` with MLX ops (every backend; the reference for the CPU kernel)."""
    # Read the words as bytes (little-endian, as on every MLX platform: byte k holds codes 2k and
    # 2k + 1) and look each byte up in a 256 x 2 table of value pairs: half the gathers of a per-code
    # lookup and no per-code integer temporaries (~2x faster on CPU than unpacking the codes first).
    # On the CPU each pair is gathered as one 64-bit element and read back as two float32s
    # (rounded to the scales' dtype afterwards: the same values as rounding the table first).
    bytes_ = mx.view(packed, mx.uint8)
    if cpu_fast_path():
        looked_up = mx.view(_BYTE_PAIRS[bytes_], mx.float32)
        if scales.dtype != mx.float32:
            looked_up = looked_up.astype(scales.dtype)
    else:
        looked_up = _BYTE_TABLE.astype(scales.dtype)[bytes_]
    *lead, n_words = packed.shape
    n_in, n_groups = n_words * _CODES_PER_WORD, scales.shape[-1]
    values = looked_up.reshape(*lead, n_groups, n_in // n_groups)
    return (values * scales[..., None]).reshape(*lead, n_in)


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
        return self.weight.shape[-1] * _CODES_PER_WORD

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


class NF4SwitchLinear(nn.Module):
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

    @property
    def input_dims(self) -> int:
        return self.weight.shape[-1] * _CODES_PER_WORD

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dequantize(self) -> mx.array:
        """The float expert weights (X, out, in)."""
        return nf4_dequantize(self["weight"], self["scales"])

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, num_experts={self.num_experts}, "
            f"group_size={self.group_size}, bits=4, mode=nf4"
        )

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
        return self.weight.shape[-1] * _CODES_PER_WORD

    def dequantize(self) -> mx.array:
        """The float table (vocab, dims)."""
        return nf4_dequantize(self["weight"], self["scales"])

    def _extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dims}, group_size={self.group_size}, bits=4, mode=nf4"

    def __call__(self, ids: mx.array) -> mx.array:
        return nf4_dequantize(self["weight"][ids], self["scales"][ids])

    def as_linear(self, x: mx.array) -> mx.array:
        return nf4_matmul(x, self["weight"], self["scales"])
