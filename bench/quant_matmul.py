"""4-bit matmuls on the CPU: Bit-Axon's fast path against MLX's native kernels, in one run.

For dense layers (``QuantizedLinear``, ``NF4Linear``) and gathered MoE experts (``SwitchGLU`` over
``QuantizedSwitchLinear`` / ``NF4SwitchLinear``, top-2 routing) at several token counts, the time of
the forward pass and of forward + input gradient (the training case: base weights are frozen),
with the fast path on and off (``bit_axon.backend.Backend.cpu_dequant``, what
``BIT_AXON_CPU_DEQUANT=0`` sets at start-up), and the ratio. Off means MLX's own kernels:
``quantized_matmul`` / ``gather_qmm`` for affine. NF4 has no MLX kernel: its rows compare with
MLX's affine kernel of the same shape (the wheel's 4-bit matmul) and, for experts, also with the
previous NF4 implementation (dequantize + ``gather_mm`` one row per (token, expert) pair). Rows
marked "MLX-op dequant" run the same fast path with dequantization by MLX ops instead of the compiled
kernels of ``bit_axon.quantization.cpu_kernels`` (what ``BIT_AXON_CPU_KERNELS=0`` does). A
float32 matmul of the same shape is printed for reference. Times are the best of up to
``--repeats`` runs within ~3 s per measurement (so the slow native rows run fewer times): on a
shared machine a short fast-path run is easily caught in a burst of another job's work, and with 3
repeats the fast times of one row varied up to 2x between runs.

    python bench/quant_matmul.py [--tokens 1 16 128 512] [--repeats 10]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

# isort: off
import bit_axon  # noqa: F401  (must load the fast BLAS before mlx is imported)

# isort: on
from bit_axon import backend
from bit_axon.blas import blas_in_use
from bit_axon.layers.moe import SwitchGLU
from bit_axon.quantization import (
    NF4Linear,
    NF4SwitchLinear,
    QuantizedLinear,
    QuantizedSwitchLinear,
    cpu_kernels,
)

import mlx.core as mx
import mlx.nn as nn


def best_time(f, repeats: int, budget: float = 3.0) -> float:
    """Best wall time of ``f`` (evaluated) over up to ``repeats`` runs after a warm-up."""
    mx.eval(f())
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(f())
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget:
            break
    return best


def fwd_bwd(f):
    """Forward and input gradient of ``sum(f(x)^2)``."""

    def run(x):
        # mx.square, not ``** 2``: MLX's CPU power kernel takes ~11 ns per value, forward and backward
        # (1.5 ms each for a 128 x 1024 output, as much as the narrow layers' matmuls themselves).
        return mx.value_and_grad(lambda x: mx.square(f(x)).sum())(x)

    return run


@contextlib.contextmanager
def mlx_op_dequantization():
    """The fast path with MLX-op dequantization instead of the compiled kernels."""
    cpu_kernels.load.cache_clear()
    try:
        with _backend(cpu_kernels=False):
            yield
    finally:
        cpu_kernels.load.cache_clear()


def _backend(**changes):
    """The current backend settings with ``changes``, as a context (``bit_axon.backend.using``)."""
    return backend.using(dataclasses.replace(backend.settings(), **changes))


def timed_pair(f, x, repeats: int) -> tuple[float, ...]:
    """(forward, forward + backward) with the fast path on, then off, then (if the compiled kernels
    load) on with MLX-op dequantization."""
    out = []
    for enabled in (True, False):
        with _backend(cpu_dequant=enabled):
            out += [best_time(lambda: f(x), repeats), best_time(lambda: fwd_bwd(f)(x), repeats)]
    if cpu_kernels.load() is not None:
        with mlx_op_dequantization():
            out += [best_time(lambda: f(x), repeats), best_time(lambda: fwd_bwd(f)(x), repeats)]
    return tuple(out)


def op_rows(label: str, tokens: int, times: tuple[float, ...], native: tuple[float, float]) -> None:
    """The row of the fast path with MLX-op dequantization, when it was measured."""
    if len(times) > 4:
        row(f"{label} (MLX-op dequant)", tokens, times[4:6], native)


def row(label: str, tokens: int, fast: tuple[float, float], native: tuple[float, float], extra: str = "") -> None:
    ms = [1e3 * t for t in (*fast, *native)]
    print(
        f"{label:<42}{tokens:>7}{ms[2]:>11.1f}{ms[0]:>9.1f}{ms[2] / ms[0]:>8.1f}x"
        f"{ms[3]:>11.1f}{ms[1]:>9.1f}{ms[3] / ms[1]:>8.1f}x  {extra}"
    )


def header(title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'layer':<42}{'tokens':>7}{'native ms':>11}{'fast ms':>9}{'ratio':>9}"
        f"{'nat. f+b':>11}{'fast f+b':>9}{'ratio':>9}"
    )


def dense(shapes: list[tuple[int, int]], tokens: list[int], repeats: int) -> None:
    header("Dense 4-bit linear, x (tokens, in) @ W.T (forward; f+b = forward + input gradient)")
    for out_dims, in_dims in shapes:
        mx.random.seed(0)
        linear = nn.Linear(in_dims, out_dims, bias=False)
        affine = QuantizedLinear.from_linear(linear, group_size=64, bits=4)
        nf4 = NF4Linear.from_linear(linear, group_size=64)
        w = linear.weight
        mx.eval(affine.parameters(), nf4.parameters(), w)
        for t in tokens:
            x = mx.random.normal((t, in_dims))
            a = timed_pair(affine, x, repeats)
            n = timed_pair(nf4, x, repeats)
            f32 = best_time(lambda x=x, w=w: x @ w.T, repeats)
            affine_label = f"affine {out_dims}x{in_dims}"
            row(affine_label, t, a[:2], a[2:4], f"(float32 matmul {1e3 * f32:.1f} ms)")
            op_rows(affine_label, t, a, a[2:4])
            # NF4 has no native kernel: its reference is MLX's affine kernel, the wheel's 4-bit matmul.
            row(f"nf4 {out_dims}x{in_dims} vs affine", t, n[:2], a[2:4])
            op_rows(f"nf4 {out_dims}x{in_dims} vs affine", t, n, a[2:4])


def experts(num_experts: int, hidden: int, inter: int, tokens: list[int], repeats: int) -> None:
    header(f"Gathered experts: SwitchGLU {num_experts} experts, {hidden} -> {inter} -> {hidden}, top-2")
    affine_native: dict[int, tuple[float, float]] = {}
    for kind, cls in (("affine", QuantizedSwitchLinear), ("nf4", NF4SwitchLinear)):
        mx.random.seed(0)
        glu = SwitchGLU(hidden, inter, num_experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            base = getattr(glu, name)
            layer = (
                cls.from_switch_linear(base, group_size=64, bits=4) if kind == "affine" else cls.from_switch_linear(base)
            )
            setattr(glu, name, layer)
        mx.eval(glu.parameters())
        for t in tokens:
            x = mx.random.normal((t, hidden))
            indices = mx.random.randint(0, num_experts, (t, 2))
            r = timed_pair(lambda x, indices=indices, glu=glu: glu(x, indices), x, repeats)
            if kind == "affine":
                affine_native[t] = r[2:4]
                row("affine experts", t, r[:2], r[2:4])
                op_rows("affine experts", t, r, r[2:4])
            else:
                # Against the wheel's 4-bit kernel (affine gather_qmm), as for the dense layers, and
                # against the NF4 code before the fast path (dequantize, then one row per pair).
                row("nf4 experts vs affine", t, r[:2], affine_native[t])
                op_rows("nf4 experts vs affine", t, r, affine_native[t])
                row("nf4 experts vs prev. nf4", t, r[:2], r[2:4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    kernels = "compiled" if cpu_kernels.load() is not None else "MLX ops (the compiled kernels did not load)"
    print(f"BLAS: {blas_in_use()}; device {mx.default_device()}; dequantization: {kernels}")
    print("ratio = native time / fast-path time")
    # Full-size attention projection (2560 x 2560) and the small config's SSM in_proj (1024 x 256).
    dense([(2560, 2560), (1024, 256)], args.tokens, args.repeats)
    # MoE experts at a reduced width (the full config is 8 x 4096 x 2560) to keep the run short.
    experts(8, 1024, 1024, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
