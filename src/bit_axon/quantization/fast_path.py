"""Quantized matmuls on MLX's CPU backend: dequantize one layer, then a float matmul (BLAS).

MLX's CPU ``quantized_matmul`` / ``gather_qmm`` kernels do not use BLAS and reach ~2 GFLOP/s,
while a float32 matmul through the OpenBLAS that ``bit_axon.blas`` preloads reaches ~50-100. For
inputs of more than a few rows it is therefore much faster to dequantize the layer's weight (a
fused elementwise pass) and multiply in float. The float weight is a transient, rebuilt a tile of
output rows at a time (two CPU streams dequantizing in turns while BLAS multiplies): the
hand-written backward pass (gradient w.r.t. the input only; base weights are frozen) dequantizes
again instead of keeping it, so training holds 4.5 bits per base weight, not 32.

Only on the CPU device: Metal and CUDA keep MLX's fused quantized kernels. ``BIT_AXON_CPU_DEQUANT=0``
(read once, at import) turns the routing off and restores the native kernels everywhere, together
with the other CPU fast paths that consult :func:`cpu_fast_path` (the MoE's blocked expert layout
in ``bit_axon.layers.moe``, the compiled dequantization kernels of ``cpu_kernels`` and NF4's
64-bit pair lookup, their fallback). Results match the native kernels to float32 rounding (the
same products, summed in another order).

``calls`` counts, per kind, how often a fast path was put in a graph (at trace time: a compiled
step traces once), for tests and benchmarks.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable

from bit_axon.quantization import cpu_kernels

import mlx.core as mx

logger = logging.getLogger(__name__)

ENV_VAR = "BIT_AXON_CPU_DEQUANT"
ENABLED = os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "off", "false", "no"}

# Below this many input rows the native kernel wins: dequantizing costs about as much as ~3 rows
# of the native CPU kernel (bench/quant_matmul.py), so one-token decoding stays native.
MIN_ROWS = 4

calls: Counter[str] = Counter()
_logged_disabled = False


def cpu_fast_path() -> bool:
    """Whether quantized matmuls built now take the dequantize-then-BLAS route."""
    global _logged_disabled
    if mx.default_device() != mx.cpu:
        return False
    if not ENABLED and not _logged_disabled:
        _logged_disabled = True
        logger.info("%s=0: CPU quantized matmuls and MoE experts use MLX's native kernels (slow for long inputs)", ENV_VAR)
    return ENABLED


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 0


def after(trigger: mx.array, *qparams: mx.array) -> list[mx.array]:
    """``qparams`` made to depend on ``trigger``: a dequantization from them waits for it.

    Every dequantization for a matmul takes its inputs through here, with the matmul's input (in
    the forward pass) or the incoming gradient (in the backward pass) as the trigger, for two
    reasons. Order: MLX would otherwise be free to dequantize a layer long before its input is
    ready, holding its float weight meanwhile (with this and SwitchGLU's ordering, a compiled
    training step of a full-width three-layer model at 512 tokens peaked at 3.1 GB above the
    weights instead of 4.7).
    Identity: ``mx.compile`` merges identical subgraphs, so a backward dequantization of
    the same codes would become the forward's and the float weight of every layer would be kept
    from the forward to the backward pass (measured: all 32 layers' weights alive in a compiled
    32-layer chain).
    """
    # (Frozen codes: no gradient flows back through the dependency into the trigger.)
    return [mx.stop_gradient(q) for q in mx.depends(list(qparams), [trigger])]


def wants_dequant(x: mx.array) -> bool:
    """Route ``x @ W.T`` for a quantized W through dequantize + float matmul (CPU, enough rows)."""
    return cpu_fast_path() and _rows(x) >= MIN_ROWS


# --- affine dequantization ----------------------------------------------------------------------


@functools.cache
def _affine_unpacker(bits: int):
    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    mask = (1 << bits) - 1

    # Compiled, so the shift / mask / convert / scale-and-bias chain is one fused pass (~3x faster
    # on the CPU than mx.dequantize's kernel), working on (..., groups, words per group, codes per word).
    @mx.compile
    def unpack(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        *lead, words = w.shape
        groups = scales.shape[-1]
        codes = (w.reshape(*lead, groups, words // groups, 1) >> shifts) & mask
        values = codes.astype(scales.dtype) * scales[..., None, None] + biases[..., None, None]
        return values.reshape(*lead, words * per_word)

    return unpack


def affine_dequantize(
    w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """``mx.dequantize`` of MLX's affine format: on the CPU fast path the compiled kernel of
    ``cpu_kernels`` where it loads, else :func:`affine_dequantize_ops` (the same values)."""
    kernels = cpu_kernels.load() if cpu_fast_path() and _unpackable(w, scales, group_size, bits) else None
    if kernels is not None:
        return kernels.affine_dequantize(w, scales, biases, bits)
    return affine_dequantize_ops(w, scales, biases, group_size, bits)


def affine_dequantize_ops(
    w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """``mx.dequantize`` of MLX's affine format, as one fused pass where the bit width allows."""
    if _unpackable(w, scales, group_size, bits):
        return _affine_unpacker(bits)(w, scales, biases)
    return mx.dequantize(w, scales, biases, group_size, bits)


def _unpackable(w: mx.array, scales: mx.array, group_size: int, bits: int) -> bool:
    """Whether codes split evenly into words (2, 4, 8 bits) and the shapes agree with ``group_size``."""
    return bits in (2, 4, 8) and w.shape[-1] == scales.shape[-1] * (group_size * bits // 32)


@functools.cache
def affine_dequantizer(group_size: int, bits: int) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """``affine_dequantize`` with the format bound: one function object per format (a cache key)."""

    def dequantize(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        return affine_dequantize(w, scales, biases, group_size, bits)

    return dequantize


# --- dequantize-then-matmul, any format ------------------------------------------------------

# A layer's float weight is rebuilt and multiplied a tile of output rows at a time on the CPU:
# tiles of at most TILE_VALUES values, but at least MIN_TILE_ROWS rows. MLX's CPU allocator
# caches freed buffers only up to 32 MB in all (its default cache limit), so a whole-layer float
# weight (an 8 x 1024 x 1024 expert stack is 32 MB) came fresh from the OS on every call, paying
# ~3.5 ns of page faults per value, twice what dequantizing it costs; 8 MB tiles are reused from
# the cache. Narrower tiles than ~256 rows make the gathered experts' BLAS calls too thin (the
# full config's 8 x 4096 x 2560 stacks: 256-row tiles of 21 MB beat 8 MB ones). Measurements in
# bench/README.md ("4-bit matmuls on the CPU").
TILE_VALUES = 1 << 21
MIN_TILE_ROWS = 256


def weight_tiles(out_dims: int, row_values: int, output_rows: int) -> list[tuple[int, int]]:
    """Output-row ranges [start, stop) of at most ``TILE_VALUES`` float values or ``MIN_TILE_ROWS`` rows.

    ``row_values`` is the number of values one output row holds across the stack (experts x input
    dims), ``output_rows`` the number of rows the product has. One range off the CPU, and when the
    product is at least as large as the weight (a vocabulary head over a batch): the tiles'
    outputs are concatenated, and holding the output twice would cost more than the whole weight.
    Splitting the output rows leaves every dot product whole: a tiled product differs from an
    untiled one only by the BLAS kernel's summation order.
    """
    if not cpu_fast_path() or output_rows >= row_values:
        return [(0, out_dims)]
    rows = max(MIN_TILE_ROWS, TILE_VALUES // row_values)
    return [(start, min(start + rows, out_dims)) for start in range(0, out_dims, rows)]


def _dequantize_after(dequantize: Callable[..., mx.array], trigger: mx.array, qparams) -> mx.array:
    """The float weight, rebuilt once ``trigger`` exists (``after``) and cast to its dtype (all
    tiles of one product share a dtype: the first trigger is its input, the next ones its outputs)."""
    return dequantize(*after(trigger, *qparams)).astype(trigger.dtype)


@functools.cache
def _dequantize_streams() -> tuple[mx.Stream, mx.Stream]:
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


def _dequantize_tile(dequantize, qparams, tiles, i: int, triggers: list[mx.array]) -> mx.array:
    """Tile ``i`` of the float weight, dequantized once ``triggers[i]`` exists.

    With several tiles, two extra CPU streams take turns, so the next tile is rebuilt while this
    one is multiplied (MLX's CPU elementwise kernels use one thread; the BLAS matmul uses all).
    The callers pass the product from two tiles back as the trigger: at most three tiles are alive.
    """
    start, stop = tiles[i]
    rows = [q[..., start:stop, :] for q in qparams]
    if len(tiles) == 1:
        return _dequantize_after(dequantize, triggers[i], rows)
    with mx.stream(_dequantize_streams()[i % 2]):
        return _dequantize_after(dequantize, triggers[i], rows)


def _tiled_product(
    dequantize: Callable[..., mx.array],
    qparams,
    tiles: list[tuple[int, int]],
    x: mx.array,
    multiply: Callable[[mx.array, mx.array], mx.array],
) -> mx.array:
    """``multiply(x, W)`` for ``W = dequantize(*qparams)``, one tile of W's output rows at a time,
    the outputs concatenated along their last axis."""
    outputs, triggers = [], [x, x]
    for i in range(len(tiles)):
        outputs.append(multiply(x, _dequantize_tile(dequantize, qparams, tiles, i, triggers)))
        triggers.append(outputs[-1])
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-1)


def _tiled_input_grad(
    dequantize: Callable[..., mx.array],
    qparams,
    tiles: list[tuple[int, int]],
    cotangent: mx.array,
    multiply: Callable[[mx.array, mx.array], mx.array],
) -> mx.array:
    """The sum over tiles of ``multiply(cotangent[..., tile], W[..., tile, :])``: the input gradient
    of ``_tiled_product``, each tile rebuilt from the codes."""
    total, triggers = cotangent, [cotangent, cotangent]
    for i, (start, stop) in enumerate(tiles):
        part = multiply(cotangent[..., start:stop], _dequantize_tile(dequantize, qparams, tiles, i, triggers))
        total = part if i == 0 else total + part
        triggers.append(total)
    return total


def _matmul_t(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.swapaxes(-1, -2)


def _matmul(x: mx.array, w: mx.array) -> mx.array:
    return x @ w


@functools.cache
def dequantized_matmul(dequantize: Callable[..., mx.array]):
    """``x @ W.T`` with ``W = dequantize(*qparams)`` built for this call only, as a custom function.

    W is cast to the input's dtype and built a tile of output rows at a time (``weight_tiles``).
    The backward pass (gradient w.r.t. x only: base weights are frozen) rebuilds W rather than
    keeping it, and ``after`` keeps ``mx.compile`` from merging the two dequantizations back into
    one W that would live from forward to backward. ``dequantize`` must be a module-level function
    or come from a cached factory (it keys this cache).
    """

    @mx.custom_function
    def matmul(x, *qparams):
        tiles = weight_tiles(qparams[0].shape[-2], x.shape[-1], _rows(x))
        return _tiled_product(dequantize, qparams, tiles, x, _matmul_t)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, *qparams = primals
        tiles = weight_tiles(qparams[0].shape[-2], x.shape[-1], _rows(x))
        dx = _tiled_input_grad(dequantize, qparams, tiles, cotangent, _matmul)
        return (dx.astype(x.dtype), *(mx.zeros_like(q) for q in qparams))

    return matmul


@functools.cache
def dequantized_gather_matmul(dequantize: Callable[..., mx.array], sorted_indices: bool):
    """``mx.gather_mm`` of x with stacked experts ``dequantize(*qparams)`` (X, out, in), all of them
    dequantized once per call, in tiles of output rows; called as ``(x, *qparams, indices)``.
    Backward as ``dequantized_matmul``."""

    def tiles_of(x, qparams):
        return weight_tiles(qparams[0].shape[-2], qparams[0].shape[0] * x.shape[-1], _rows(x))

    @mx.custom_function
    def gather(x, *qparams_and_indices):
        *qparams, indices = qparams_and_indices

        def multiply(x, w):
            return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

        return _tiled_product(dequantize, qparams, tiles_of(x, qparams), x, multiply)

    @gather.vjp
    def gather_vjp(primals, cotangent, output):
        x, *qparams, indices = primals

        def multiply(cotangent, w):
            return mx.gather_mm(cotangent, w, rhs_indices=indices, sorted_indices=sorted_indices)

        dx = _tiled_input_grad(dequantize, qparams, tiles_of(x, qparams), cotangent, multiply)
        return (
            sum_to_shape(dx, x.shape).astype(x.dtype),
            *(mx.zeros_like(q) for q in qparams),
            mx.zeros_like(indices),
        )

    return gather


def sum_to_shape(g: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Undo broadcasting: sum ``g`` over the axes that broadcasting added or expanded from 1."""
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    expanded = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=expanded, keepdims=True) if expanded else g


# --- affine matmuls -----------------------------------------------------------------------------


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
    if mode == "affine" and biases is not None and wants_dequant(x):
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
    if x.ndim >= 2 and x.shape[-2] >= MIN_ROWS and cpu_fast_path():
        calls["affine_gather"] += 1
        gather = dequantized_gather_matmul(affine_dequantizer(group_size, bits), sorted_indices)
        return gather(x, w, scales, biases, indices)
    return mx.gather_qmm(
        x, w, scales, biases, rhs_indices=indices, transpose=True,
        group_size=group_size, bits=bits, sorted_indices=sorted_indices,
    )


# --- a dense weight shared with other forward computations ---------------------------------------


@functools.cache
def _shared_dense_matmul(dequantize: Callable[..., mx.array]):
    @mx.custom_function
    def matmul(x, dense, *qparams):
        return x @ dense.T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, dense, *qparams = primals
        # Rebuilt from the codes: ``dense`` is not referenced here, so it is freed after forward.
        tiles = weight_tiles(dense.shape[-2], dense.shape[-1], _rows(x))
        dx = _tiled_input_grad(dequantize, qparams, tiles, cotangent, _matmul)
        return (dx.astype(x.dtype), mx.zeros_like(dense), *(mx.zeros_like(q) for q in qparams))

    return matmul


def shared_dense_matmul(
    x: mx.array, dense: mx.array, dequantize: Callable[..., mx.array], *qparams: mx.array
) -> mx.array:
    """``x @ dense.T`` where ``dense = dequantize(*qparams)`` was built by the caller for other uses too.

    For a forward pass that needs the float weight twice (DoRA's row norms and its matmul): one
    dequantization in forward instead of two, and the backward pass still rebuilds the weight from
    the codes instead of keeping ``dense`` alive. ``dequantize`` must be a module-level function
    (it keys a cache of compiled custom functions).
    """
    calls["shared_dense"] += 1
    return _shared_dense_matmul(dequantize)(x, dense, *qparams)
