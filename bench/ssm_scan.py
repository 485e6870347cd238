"""Forward+backward time and peak memory of AxonSSM against (a) the plain sequential recurrence and
(b) mlx-lm's Mamba block at the same dimensions, printed as ratios in one run.

    python bench/ssm_scan.py
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import bit_axon  # noqa: F401  (loads the fast BLAS before mlx)
from bit_axon import BitAxonConfig
from bit_axon.blas import blas_in_use
from bit_axon.layers import ssm as ssm_module
from bit_axon.layers.scan import sequential_scan

import mlx.core as mx
import mlx.nn as nn


def fwd_bwd(layer: nn.Module, x: mx.array):
    def loss(model, x):
        out = model(x) if not hasattr(model, "conv_kernel_size") else model(x, None)
        return (out * out).mean()

    return nn.value_and_grad(layer, loss)(layer, x)


def measure(layer: nn.Module, x: mx.array, repeats: int) -> tuple[float, float]:
    mx.eval(fwd_bwd(layer, x))  # warm-up
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fwd_bwd(layer, x))
    return (time.perf_counter() - start) / repeats, mx.get_peak_memory() / 2**20


def mlx_lm_block(config: BitAxonConfig) -> nn.Module:
    from mlx_lm.models.mamba import MambaBlock, ModelArgs

    args = ModelArgs(
        model_type="mamba", vocab_size=32, hidden_size=config.hidden_dim,
        intermediate_size=config.ssm_intermediate_dim, state_size=config.ssm_d_state,
        num_hidden_layers=1, conv_kernel=config.ssm_d_conv, use_bias=False, use_conv_bias=True,
        time_step_rank=config.ssm_dt_rank,
    )
    return MambaBlock(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    configs = {
        "small (H256 E512 N4)": BitAxonConfig.small(),
        "H1024 E2048 N16": BitAxonConfig.small(hidden_dim=1024, ssm_expand=2, ssm_d_state=16, num_heads=8),
    }
    print(f"device: {mx.default_device()}  BLAS: {blas_in_use()}  batch 1, fwd+bwd, float32")
    header = f"{'config':<22}{'L':>6} {'ours s':>8} {'seq s':>8} {'mlx-lm s':>9} {'ours MB':>8} {'seq MB':>8} {'mlx-lm MB':>9}  {'seq/ours':>8} {'mlx-lm/ours':>11}"
    print(header)
    for name, config in configs.items():
        for L in args.lengths:
            mx.random.seed(0)
            x = mx.random.normal((1, L, config.hidden_dim))
            ours = ssm_module.AxonSSM(config)
            mx.eval(ours.parameters())
            t_ours, m_ours = measure(ours, x, args.repeats)
            with mock.patch.object(ssm_module, "selective_scan", lambda *a, recompute=False, **k: sequential_scan(*a, **k)):
                t_seq, m_seq = measure(ours, x, args.repeats)
            theirs = mlx_lm_block(config)
            mx.eval(theirs.parameters())
            t_lm, m_lm = measure(theirs, x, args.repeats)
            print(
                f"{name:<22}{L:>6} {t_ours:>8.3f} {t_seq:>8.3f} {t_lm:>9.3f} {m_ours:>8.0f} {m_seq:>8.0f} {m_lm:>9.0f}"
                f"  {t_seq / t_ours:>7.2f}x {t_lm / t_ours:>10.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
