"""The fused GPU selective scan against the pure-MLX chunked scan, forward+backward, at the full
model's SSM size (E = 7680 channels, d_state 16, batch 1), printed as ratios in one run.

    python bench/ssm_kernel.py                      # on a CUDA or Metal GPU
    python bench/ssm_kernel.py --lengths 512 --chunks 8 16 32

Each row: seconds per forward+backward of the scan alone (inputs are random, gradients taken for
x, dt, A, B, C, D), MLX's peak memory above the inputs, and chunked/fused. ``--chunks`` also times
the fused kernel with other checkpoint intervals (``scan_kernels.DEFAULT_CHUNK`` is the default).
"""

from __future__ import annotations

import argparse
import time

import bit_axon  # noqa: F401  (loads the fast BLAS before mlx)
from bit_axon import BitAxonConfig
from bit_axon.layers.scan import selective_scan
from bit_axon.layers.scan_kernels import DEFAULT_CHUNK, fused_scan, kernel_backend

import mlx.core as mx


def make_inputs(L: int, E: int, N: int):
    mx.random.seed(0)
    x = mx.random.normal((1, L, E))
    dt = mx.log1p(mx.exp(mx.random.normal((1, L, E)) - 3.0))
    A = -mx.exp(mx.random.normal((E, N)))
    B = mx.random.normal((1, L, N))
    C = mx.random.normal((1, L, N))
    D = mx.random.normal((E,))
    w = mx.random.normal((1, L, E))
    mx.eval(x, dt, A, B, C, D, w)
    return (x, dt, A, B, C, D), w


def time_scan(scan, args, w, repeats: int) -> tuple[float, float]:
    def loss(*a):
        y, h = scan(*a)
        return (y * w).sum() + h.sum()

    step = mx.value_and_grad(loss, argnums=tuple(range(6)))
    mx.eval(step(*args))  # warm-up: kernel compilation
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(step(*args))
    mx.synchronize()
    return (time.perf_counter() - start) / repeats, (mx.get_peak_memory() - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--chunks", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = BitAxonConfig()
    E, N = config.ssm_intermediate_dim, config.ssm_d_state
    backend = kernel_backend()
    print(f"device: {mx.default_device()}  kernel backend: {backend}  E={E} N={N} batch 1 float32 fwd+bwd")
    if backend is None:
        raise SystemExit("The fused scan needs a CUDA or Metal GPU as the default device.")
    zeros = mx.zeros((1, E, N))
    print(f"{'L':>6} {'chunk':>6} {'fused s':>9} {'chunked s':>10} {'fused MB':>9} {'chunked MB':>11} {'chunked/fused':>14}")
    for L in args.lengths:
        inputs, w = make_inputs(L, E, N)
        keep = mx.ones((1, L))
        t_ref, m_ref = time_scan(
            lambda *a: selective_scan(*a, h0=zeros, method="chunked"), inputs, w, args.repeats
        )
        for chunk in [DEFAULT_CHUNK, *[c for c in args.chunks if c != DEFAULT_CHUNK]]:
            t, m = time_scan(lambda *a, c=chunk, k=keep: fused_scan(*a, zeros, k, chunk=c), inputs, w, args.repeats)
            print(f"{L:>6} {chunk:>6} {t:>9.4f} {t_ref:>10.4f} {m:>9.0f} {m_ref:>11.0f} {t_ref / t:>13.1f}x", flush=True)


if __name__ == "__main__":
    main()
