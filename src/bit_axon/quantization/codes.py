"""Quantized codes to and from float values with MLX ops: NF4 and MLX's affine format.

These are the formats' reference implementations, on every backend. The layers
(:mod:`~bit_axon.quantization.nf4`, :mod:`~bit_axon.quantization.affine`) use the compiled CPU kernels of
:mod:`~bit_axon.quantization.cpu_kernels` instead where they load, which are checked against these
bit for bit.

NF4 (QLoRA, Dettmers et al., 2023): each group of ``group_size`` consecutive weights along the input
dimension is divided by its absolute maximum and rounded to the nearest of the 16 NF4 values below,
which are quantiles of N(0, 1) scaled to [-1, 1] (with an exact zero). The 4-bit codes are packed
eight to a uint32 in input order, lowest bits first — MLX's own 4-bit layout — so a packed
(out, in / 8) weight has the same shape as an MLX affine 4-bit weight. Scales (the per-group absmax)
keep the source weight's dtype; QLoRA's "double quantization" of the scales is not implemented (it
would save 0.37 bits per weight).
"""

from __future__ import annotations

import functools

from bit_axon.backend import settings

import mlx.core as mx

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
CODES_PER_WORD = 8  # 32-bit words / 4-bit codes
_SHIFTS = mx.arange(0, 32, 4, dtype=mx.uint32)
_BYTES = mx.arange(256, dtype=mx.uint32)
_BYTE_TABLE = mx.stack([_CODEBOOK[_BYTES & 0xF], _CODEBOOK[_BYTES >> 4]], axis=-1)  # (256, 2)
# The same pairs, each as one 64-bit element (256,): MLX's CPU gather costs per gathered element,
# so where the compiled kernel (cpu_kernels) is unavailable the CPU fast path copies one element
# per byte instead of two floats (faster than this table and than a 16-bit-word table of 4 floats,
# which misses the cache: bench/README.md, "Measurements behind code choices"). Built here, so
# that a first use inside mx.compile finds a constant rather than the ops that make it.
_BYTE_PAIRS = mx.view(_BYTE_TABLE, mx.uint64).reshape(256)
mx.eval(_BYTE_PAIRS)


def nf4_quantize(w: mx.array, group_size: int = 64) -> tuple[mx.array, mx.array]:
    """Quantize ``w`` (..., in) to packed codes (..., in / 8) uint32 and absmax scales (..., in / group_size).

    Lazy like ``mx.quantize``: nothing is computed until the result is evaluated.
    """
    *lead, n_in = w.shape
    if group_size <= 0 or group_size % CODES_PER_WORD:
        raise ValueError(f"NF4 group_size must be a positive multiple of {CODES_PER_WORD}, got {group_size}")
    if n_in % group_size:
        raise ValueError(f"NF4 needs the last dimension ({n_in}) to be divisible by group_size ({group_size})")
    groups = w.reshape(*lead, n_in // group_size, group_size)
    absmax = mx.abs(groups).max(axis=-1, keepdims=True)
    packed = _nf4_pack_codes(groups, absmax).reshape(*lead, n_in // CODES_PER_WORD, CODES_PER_WORD)
    return packed.sum(axis=-1), absmax.squeeze(-1)


@mx.compile
def _nf4_pack_codes(groups: mx.array, absmax: mx.array) -> mx.array:
    """Each weight's code, shifted to its place in its 32-bit word: one fused elementwise pass.

    The code is the number of midpoints below the normalised weight (15 comparisons against
    constants). Compiled, the chain has no per-weight temporaries: quantizing the full model's
    embedding this way peaks at a few copies of it, where a gather-based search held many
    (bench/README.md, "Measurements behind code choices").
    """
    # An all-zero group has absmax 0; dividing by 1 instead maps it to the exact-zero code. The
    # division is in float32 whatever the weights' dtype (exact casts): divided in bfloat16, the
    # rounded quotient would put some weights on the wrong side of a midpoint.
    groups, absmax = groups.astype(mx.float32), absmax.astype(mx.float32)
    normed = groups / mx.where(absmax > 0, absmax, 1)
    codes = mx.zeros(normed.shape, dtype=mx.uint32)
    for midpoint in _MIDPOINTS:
        codes = codes + (normed > midpoint).astype(mx.uint32)
    position = mx.arange(groups.shape[-1], dtype=mx.uint32) % CODES_PER_WORD
    return codes << (position * 4)


def nf4_unpack(packed: mx.array) -> mx.array:
    """Packed (..., in / 8) uint32 -> codes (..., in) uint32 in [0, 16)."""
    codes = (packed[..., None] >> _SHIFTS) & 0xF
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * CODES_PER_WORD)


def nf4_dequantize_ops(packed: mx.array, scales: mx.array) -> mx.array:
    """:func:`nf4_dequantize` with MLX ops (every backend; the reference for the CPU kernel)."""
    # Read the words as bytes (little-endian, as on every MLX platform: byte k holds codes 2k and
    # 2k + 1) and look each byte up in a 256 x 2 table of value pairs: half the gathers of a per-code
    # lookup and no per-code integer temporaries (faster on CPU than unpacking the codes first).
    # On the CPU each pair is gathered as one 64-bit element and read back as two float32s
    # (rounded to the scales' dtype afterwards: the same values as rounding the table first).
    bytes_ = mx.view(packed, mx.uint8)
    if settings().cpu_fast_path():
        looked_up = mx.view(_BYTE_PAIRS[bytes_], mx.float32)
        if scales.dtype != mx.float32:
            looked_up = looked_up.astype(scales.dtype)
    else:
        looked_up = _BYTE_TABLE.astype(scales.dtype)[bytes_]
    *lead, n_words = packed.shape
    n_in, n_groups = n_words * CODES_PER_WORD, scales.shape[-1]
    values = looked_up.reshape(*lead, n_groups, n_in // n_groups)
    return (values * scales[..., None]).reshape(*lead, n_in)


# --- affine (MLX's format) ---------------------------------------------------------------------


@functools.cache
def _affine_unpacker(bits: int):
    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mask = (1 << bits) - 1

    # Compiled, so the shift / mask / convert / scale-and-bias chain is one fused pass (faster on the
    # CPU than mx.dequantize's kernel), working on (..., groups, words per group, codes per word).
    @mx.compile
    def unpack(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        *lead, words = w.shape
        groups = scales.shape[-1]
        codes = (w.reshape(*lead, groups, words // groups, 1) >> shifts) & mask
        values = codes.astype(scales.dtype) * scales[..., None, None] + biases[..., None, None]
        return values.reshape(*lead, words * per_word)

    return unpack


def affine_dequantize_ops(
    w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """``mx.dequantize`` of MLX's affine format, as one fused pass where the bit width allows."""
    if unpackable(w, scales, group_size, bits):
        return _affine_unpacker(bits)(w, scales, biases)
    return mx.dequantize(w, scales, biases, group_size, bits)


def cast(x: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """``x`` in ``dtype`` (``x`` itself when ``dtype`` is None or already its dtype)."""
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def unpackable(w: mx.array, scales: mx.array, group_size: int, bits: int) -> bool:
    """Whether codes split evenly into words (2, 4, 8 bits) and the shapes agree with ``group_size``."""
    return bits in (2, 4, 8) and w.shape[-1] == scales.shape[-1] * (group_size * bits // 32)
