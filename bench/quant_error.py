"""Reconstruction error of 4-bit NF4 against MLX affine 4-bit quantization, on Gaussian weights and on
heavy-tailed "trained-looking" weights (Student-t with 3 dof, alone and with a few outlier input columns).

    python bench/quant_error.py [--rows 2048] [--cols 4096] [--seed 0]

For each weight matrix W and mode it prints the mean squared error of dequantize(quantize(W)), the
same relative to mean(W^2), and the relative error of the layer output x @ W.T for x ~ N(0, 1). The
storage column counts 4-bit codes plus per-group constants stored as float16: NF4 has one scale per
group, affine a scale and a bias, so affine group 128 is the equal-storage comparison to NF4 group 64.
"""

from __future__ import annotations

import argparse

# isort: off
import bit_axon  # noqa: F401  (must load the fast BLAS before mlx is imported)

# isort: on
from bit_axon.quantization import nf4_dequantize, nf4_quantize

import mlx.core as mx
import numpy as np


def weights(kind: str, rows: int, cols: int, rng: np.random.Generator) -> mx.array:
    std = 0.02
    if kind == "gaussian":
        w = rng.normal(0.0, std, (rows, cols))
    elif kind.startswith("student-t3"):
        # Student-t(3) has variance 3: rescale to the Gaussian's std.
        w = rng.standard_t(3, (rows, cols)) * std / np.sqrt(3)
        if kind.endswith("+outliers"):
            # 0.2% of the input columns 10x larger: the outlier features of trained transformers.
            outliers = rng.choice(cols, size=max(1, cols // 512), replace=False)
            w[:, outliers] *= 10
    else:
        raise ValueError(kind)
    return mx.array(w.astype(np.float32))


def roundtrip(w: mx.array, mode: str, group_size: int) -> mx.array:
    if mode == "nf4":
        return nf4_dequantize(*nf4_quantize(w, group_size))
    q, scales, biases = mx.quantize(w, group_size, 4)
    return mx.dequantize(q, scales, biases, group_size, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    x = mx.array(rng.normal(size=(64, args.cols)).astype(np.float32))
    configs = [("nf4", 64, 4 + 16 / 64), ("affine", 64, 4 + 32 / 64), ("affine", 128, 4 + 32 / 128)]

    print(f"W: {args.rows} x {args.cols}, 4-bit, seed {args.seed}")
    print(f"{'weights':<22}{'mode':<8}{'group':>6}{'bits/w':>8}{'MSE':>12}{'rel MSE':>10}{'out err':>10}")
    for kind in ("gaussian", "student-t3", "student-t3+outliers"):
        w = weights(kind, args.rows, args.cols, rng)
        power = mx.mean(w * w).item()
        y = x @ w.T
        base_mse = None
        for mode, group, bits_per_weight in configs:
            wq = roundtrip(w, mode, group)
            mse = mx.mean((w - wq) ** 2).item()
            out_err = (mx.linalg.norm(x @ wq.T - y) / mx.linalg.norm(y)).item()
            base_mse = base_mse or mse
            print(
                f"{kind:<22}{mode:<8}{group:>6}{bits_per_weight:>8.2f}{mse:>12.3e}{mse / power:>10.4f}"
                f"{out_err:>10.4f}   ({mse / base_mse:.2f}x NF4)"
            )


if __name__ == "__main__":
    main()
