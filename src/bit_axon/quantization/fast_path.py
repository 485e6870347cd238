"""Quantized matmuls on MLX's CPU backend: dequantize one layer, then a float matmul (BLAS).

This module is format-agnostic: a format passes its dequantization function (``nf4``, ``affine``).
MLX's CPU ``quantized_matmul`` / ``gather_qmm`` kernels do not use BLAS and are many times slower
than a float32 matmul through the OpenBLAS that ``bit_axon.blas`` preloads (bench/README.md). For
inputs of more than a few rows it is therefore much faster to dequantize the layer's weight (a
fused elementwise pass) and multiply in float. The float weight is a transient, rebuilt a tile of
output rows at a time (two CPU streams dequantizing in turns while BLAS multiplies): the
hand-written backward pass (gradient w.r.t. the input only; base weights are frozen) dequantizes
again instead of keeping it, so training holds 4.5 bits per base weight, not 32.

Only on the CPU device: Metal and CUDA keep MLX's fused quantized kernels. Whether the route
applies is the backend's choice (``bit_axon.backend``: ``Backend.cpu_fast_path`` and
``dequantize_route``); ``BIT_AXON_CPU_DEQUANT=0`` turns it off and restores the native kernels
everywhere, together with the other CPU fast paths (the MoE's blocked expert layout, the compiled
dequantization kernels of ``cpu_kernels`` and NF4's 64-bit pair lookup, their fallback). Results match the native kernels to float32 rounding (the
same products, summed in another order).

``calls`` counts, per kind, how often a fast path was put in a graph (at trace time: a compiled
step traces once), for tests and benchmarks.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

from bit_axon.backend import settings

import mlx.core as mx

calls: Counter[str] = Counter()


def rows(x: mx.array) -> int:
    """The number of input rows of ``x`` (all axes but the last)."""
    return x.size // x.shape[-1] if x.ndim else 0


def after(trigger: mx.array, *qparams: mx.array) -> list[mx.array]:
    """``qparams`` made to depend on ``trigger``: a dequantization from them waits for it.

    Every dequantization for a matmul takes its inputs through here, with the matmul's input (in
    the forward pass) or the incoming gradient (in the backward pass) as the trigger, for two
    reasons. Order: MLX would otherwise be free to dequantize a layer long before its input is
    ready, holding its float weight meanwhile (a much higher peak: bench/README.md, "Measurements
    behind code choices").
    Identity: ``mx.compile`` merges identical subgraphs, so a backward dequantization of
    the same codes would become the forward's and the float weight of every layer would be kept
    from the forward to the backward pass (tests/quantization/test_cpu_fast_path.py checks this).
    """
    # (Frozen codes: no gradient flows back through the dependency into the trigger.)
    return [mx.stop_gradient(q) for q in mx.depends(list(qparams), [trigger])]


def wants_dequant(x: mx.array, scales: mx.array | None = None) -> bool:
    """Route ``x @ W.T`` for a quantized W through dequantize + float matmul (CPU, enough rows, or
    any rows with float16 ``scales``: ``Backend.dequantize_route``)."""
    return settings().dequantize_route(rows(x), half_scales=scales is not None and scales.dtype == mx.float16)


# --- dequantize-then-matmul, any format ------------------------------------------------------

# A layer's float weight is rebuilt and multiplied a tile of output rows at a time on the CPU:
# tiles of at most TILE_VALUES values, but at least MIN_TILE_ROWS rows. MLX's CPU allocator
# caches freed buffers only up to its (small) default cache limit, so a whole-layer float weight
# came fresh from the OS on every call, paying more in page faults than dequantizing it costs;
# 8 MB tiles are reused from the cache. Much narrower tiles make the gathered experts' BLAS calls
# too thin. Measurements in bench/README.md ("4-bit matmuls on the CPU", "Measurements behind
# code choices").
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
    if not settings().cpu_fast_path() or output_rows >= row_values:
        return [(0, out_dims)]
    rows = max(MIN_TILE_ROWS, TILE_VALUES // row_values)
    return [(start, min(start + rows, out_dims)) for start in range(0, out_dims, rows)]


def _dequantize_after(dequantize: Callable[..., mx.array], trigger: mx.array, qparams) -> mx.array:
    """The float weight, rebuilt once ``trigger`` exists (``after``) in its dtype (all tiles of one
    product share a dtype: the first trigger is its input, the next ones its outputs)."""
    return dequantize(*after(trigger, *qparams), dtype=trigger.dtype)


@functools.cache
def _dequantize_streams() -> tuple[mx.Stream, mx.Stream]:
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


class _TiledWeight(NamedTuple):
    """A quantized weight ``dequantize(*qparams)``, rebuilt one range of output rows (``tiles``) at a time."""

    dequantize: Callable[..., mx.array]
    qparams: Sequence[mx.array]
    tiles: list[tuple[int, int]]

    def tile(self, i: int, triggers: list[mx.array]) -> mx.array:
        """Tile ``i`` of the float weight, dequantized once ``triggers[i]`` exists.

        With several tiles, two extra CPU streams take turns, so the next tile is rebuilt while this
        one is multiplied (MLX's CPU elementwise kernels use one thread; the BLAS matmul uses all).
        The callers pass the product from two tiles back as the trigger: at most three tiles are alive.
        """
        start, stop = self.tiles[i]
        rows = [q[..., start:stop, :] for q in self.qparams]
        if len(self.tiles) == 1:
            return _dequantize_after(self.dequantize, triggers[i], rows)
        with mx.stream(_dequantize_streams()[i % 2]):
            return _dequantize_after(self.dequantize, triggers[i], rows)


def _tiled_product(
    weight: _TiledWeight, x: mx.array, multiply: Callable[[mx.array, mx.array], mx.array]
) -> mx.array:
    """``multiply(x, W)`` for the float weight W, one tile of its output rows at a time, the outputs
    concatenated along their last axis."""
    outputs, triggers = [], [x, x]
    for i in range(len(weight.tiles)):
        outputs.append(multiply(x, weight.tile(i, triggers)))
        triggers.append(outputs[-1])
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-1)


def _tiled_input_grad(
    weight: _TiledWeight, cotangent: mx.array, multiply: Callable[[mx.array, mx.array], mx.array]
) -> mx.array:
    """The sum over tiles of ``multiply(cotangent[..., tile], W[..., tile, :])``: the input gradient
    of ``_tiled_product``, each tile rebuilt from the codes."""
    total, triggers = cotangent, [cotangent, cotangent]
    for i, (start, stop) in enumerate(weight.tiles):
        part = multiply(cotangent[..., start:stop], weight.tile(i, triggers))
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
    or come from a cached factory (it keys this cache), and take a ``dtype`` keyword (the float
    weight's dtype: the formats' kernels write float32 directly).
    """

    def weight_of(x, qparams) -> _TiledWeight:
        return _TiledWeight(dequantize, qparams, weight_tiles(qparams[0].shape[-2], x.shape[-1], rows(x)))

    @mx.custom_function
    def matmul(x, *qparams):
        return _tiled_product(weight_of(x, qparams), x, _matmul_t)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, *qparams = primals
        dx = _tiled_input_grad(weight_of(x, qparams), cotangent, _matmul)
        return (dx.astype(x.dtype), *(mx.zeros_like(q) for q in qparams))

    return matmul


@functools.cache
def dequantized_gather_matmul(dequantize: Callable[..., mx.array], sorted_indices: bool):
    """``mx.gather_mm`` of x with stacked experts ``dequantize(*qparams)`` (X, out, in), all of them
    dequantized once per call, in tiles of output rows; called as ``(x, *qparams, indices)``.
    Backward as ``dequantized_matmul``."""

    def weight_of(x, qparams) -> _TiledWeight:
        tiles = weight_tiles(qparams[0].shape[-2], qparams[0].shape[0] * x.shape[-1], rows(x))
        return _TiledWeight(dequantize, qparams, tiles)

    @mx.custom_function
    def gather(x, *qparams_and_indices):
        *qparams, indices = qparams_and_indices

        def multiply(x, w):
            return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

        return _tiled_product(weight_of(x, qparams), x, multiply)

    @gather.vjp
    def gather_vjp(primals, cotangent, output):
        x, *qparams, indices = primals

        def multiply(cotangent, w):
            return mx.gather_mm(cotangent, w, rhs_indices=indices, sorted_indices=sorted_indices)

        dx = _tiled_input_grad(weight_of(x, qparams), cotangent, multiply)
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
        tiles = weight_tiles(dense.shape[-2], dense.shape[-1], rows(x))
        dx = _tiled_input_grad(_TiledWeight(dequantize, qparams, tiles), cotangent, _matmul)
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
