"""Training throughput of Bit-Axon's ``Trainer`` against mlx-lm's ``tuner.trainer.train``, in one run.

Two models (``--model``):

- ``small`` (default): ``BitAxonConfig.small()`` (full Qwen2.5 vocabulary), quantized to a 4-bit base,
  the same LoRA/DoRA adapters from the same seed for both trainers, on ``examples/sft.jsonl``
  through ``SFTDataset`` and the bundled tokenizer;
- ``smollm2``: the offline default SmolLM2-135M-Instruct (Q4_1 GGUF). Ours is the model as
  ``bit_axon.loading.load_model`` loads it, with our adapters; mlx-lm's is its own
  ``mlx_lm.models.llama.Model`` built from the same GGUF weights with the same base quantization
  (MLX's own quantized layers and kernels) and its own adapters (``linear_to_lora_layers``: the
  same rank, scale and target layers), on ``examples/tickets.jsonl`` rendered by the model's chat
  template.

Both trainers run the same number of optimizer steps, one batch each. They differ where the
trainers differ: Bit-Axon packs examples into ``--seq-len`` rows and runs the vocabulary head on
target positions only; mlx-lm pads each batch of ``--batch-size`` examples to its longest one and
computes logits everywhere (prompt masked from ``offset``, its ``mask_prompt`` semantics: the offset
is the first token our loss mask trains on).

Printed: tokens/s of real tokens (the examples' own tokens: no padding, no packing separators)
over the steady-state steps (see ``StepClock``), peak memory of each run, their ratios, and an
MFU-style ratio (see ``matmul_flops``).

    python bench/train_throughput.py --steps 16 --batch-size 4 --seq-len 512 --dora --quant nf4
    python bench/train_throughput.py --model smollm2 --steps 24 --batch-size 4 --seq-len 128 --dora
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import tempfile
import time
from collections.abc import Iterator

# isort: off
import bit_axon  # noqa: F401  (must load the fast BLAS before mlx is imported)

# isort: on
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.blas import blas_in_use
from bit_axon.loading import load_model, load_tokenizer
from bit_axon.quantization import quantize_model
from bit_axon.sources import default_model_path, read_gguf
from bit_axon.sources.pretrained import infer_quantization, load_weights_strict, quantize_like
from bit_axon.tokenizer import QwenTokenizerWrapper
from bit_axon.training.collate import iterate_batches
from bit_axon.training.config import TrainingConfig
from bit_axon.training.data import SFTDataset
from bit_axon.training.lora import LORA_TARGET_NAMES, apply_lora_to_model
from bit_axon.training.losses import gather_targets
from bit_axon.training.scheduler import cosine_with_warmup
from bit_axon.training.trainer import Trainer

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

LORA_RANK, LORA_SCALE, LEARNING_RATE, SEED = 8, 20.0, 1e-4, 0


def build_model(args: argparse.Namespace) -> nn.Module:
    """Our model with our adapters: the small Bit-Axon model (quantized to ``--quant``), or SmolLM2
    as loaded (its Q4_1 base kept)."""
    mx.random.seed(SEED)
    if args.model == "smollm2":
        model = load_model(default_model_path())
    else:
        model = BitAxonModel(BitAxonConfig.small())
        if args.quant != "none":
            quantize_model(model, bits=4, group_size=64, mode=args.quant)
    apply_lora_to_model(model, rank=LORA_RANK, dropout=0.0, scale=LORA_SCALE, use_dora=args.dora)
    mx.eval(model.parameters())
    return model


def build_mlx_lm_model(args: argparse.Namespace) -> nn.Module:
    """mlx-lm's side: the small model behind mlx-lm's interface (our adapters, as there is no mlx-lm
    class for it), or mlx-lm's own Llama from the SmolLM2 GGUF weights with mlx-lm's adapters."""
    if args.model != "smollm2":
        return LmModel(build_model(args))
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config, weights, _ = read_gguf(default_model_path())
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = model.sanitize(weights)
    # The same formats as loaded (affine 4-bit projections, 8-bit embedding), as MLX's own layers.
    quantize_like(model, infer_quantization(model, weights), weights)
    load_weights_strict(model, weights, "the GGUF weights")
    model.freeze()
    mx.random.seed(SEED)
    keys = [path for path, _ in model.layers[0].named_modules() if path.rsplit(".", 1)[-1] in LORA_TARGET_NAMES]
    lora = {"rank": LORA_RANK, "scale": LORA_SCALE, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, len(model.layers), lora, use_dora=args.dora)
    mx.eval(model.parameters())
    return model


def adapter_weights(model: nn.Module) -> float:
    return float(sum(p.size for name, p in tree_flatten(model.trainable_parameters()) if name.endswith(("lora_a", "lora_b"))))


def pretrained_matmul_flops(model: nn.Module) -> tuple[float, float, float]:
    """``matmul_flops`` for a Llama-family model whose every matmul weight carries an adapter: the
    frozen weights are the adapted layers' (in x out, read off ``lora_a`` and ``lora_b``), the head
    the tied embedding (vocab x hidden)."""
    frozen = sum(m.lora_a.shape[0] * m.lora_b.shape[1] for _, m in model.named_modules() if "lora_a" in m)
    vocab, hidden = model.args.vocab_size, model.args.hidden_size
    return float(frozen), adapter_weights(model), float(vocab * hidden)


def matmul_flops(model: BitAxonModel) -> tuple[float, float, float]:
    """(frozen, adapter, head) matmul weights per token: our FLOP-counting convention.

    Per real token: forward 2 FLOPs per frozen weight, backward 2 more (the input gradient only: no
    weight gradient for a frozen base), so 4 x frozen; adapters 6 x (forward, input and weight
    gradients). Routed experts count top_k / num_experts of their weights (active parameters). The
    head (d_source x vocab) counts 4 x its weights per *target* token, the positions whose logits
    the loss needs. Attention scores, the SSM scan and elementwise work are not counted, nor is
    the embedding lookup.
    """
    c = model.config
    H, F, S, E = c.hidden_dim, c.moe_intermediate_dim, c.d_source_model, c.ssm_intermediate_dim
    N, R = c.ssm_d_state, c.ssm_dt_rank
    ssm = 2 * E * H + E * (2 * N + R) + R * E + E * H
    moe = H * c.moe_num_experts + 3 * H * F * c.moe_top_k + (3 * H * F + H if c.moe_shared_expert else 0)
    frozen = 2 * S * H
    for block in model.blocks:
        frozen += ("ssm" in block) * ssm + ("attention" in block) * 4 * H * H + ("moe" in block) * moe
    return float(frozen), adapter_weights(model), float(S * c.vocab_size)


def peak_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a plain float32 (n x n) @ (n x n) on this backend: best of ``repeats``."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class StepClock:
    """Timestamps each batch request: with one batch per step, the gaps are the step times.

    Both trainers compile their step once per batch shape (ours: per target-count bucket, mlx-lm:
    per padded length), so steps that meet a shape for the first time are left out: the rate is the
    steady state a long run converges to.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.targets: list[int] = []
        self.shapes: list[tuple[int, ...]] = []

    def record(self, tokens: int, targets: int, shape: tuple[int, ...]) -> None:
        self.stamps.append(time.perf_counter())
        self.tokens.append(tokens)
        self.targets.append(targets)
        self.shapes.append(shape)

    def timed_steps(self, warmup: int) -> list[int]:
        """Steps after ``warmup`` whose shape was already compiled, and that are fully timed."""
        steps = [i for i in range(warmup, len(self.stamps) - 1) if self.shapes[i] in self.shapes[:i]]
        if not steps:
            raise SystemExit("no steady-state step was timed: raise --steps")
        return steps

    def rate(self, warmup: int) -> tuple[float, int, float]:
        """(tokens/s, tokens, seconds) over ``timed_steps``."""
        steps = self.timed_steps(warmup)
        seconds = sum(self.stamps[i + 1] - self.stamps[i] for i in steps)
        tokens = sum(self.tokens[i] for i in steps)
        return tokens / seconds, tokens, seconds


class TimedTrainer(Trainer):
    """Our Trainer, with each packed batch's real tokens counted (separators and padding excluded)."""

    clock: StepClock

    def batches(self, dataset, loop: bool):
        c = self.config
        packed = iterate_batches(
            dataset, c.batch_size, c.max_seq_len, loop=loop, shuffle=loop, seed=c.seed,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )
        for batch in packed:
            ids, seg = np.array(batch.token_ids), np.array(batch.segment_ids)
            real = ids != self.pad_token_id
            examples = sum(len(np.unique(s[r])) for s, r in zip(seg, real, strict=True))
            target = gather_targets(*batch)
            self.clock.record(int(real.sum()) - examples, int(np.array(target.weights).sum()), target.targets.shape)
            yield target


def run_ours(dataset, args, clock: StepClock) -> float:
    model = build_model(args)
    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(
            learning_rate=LEARNING_RATE, warmup_steps=min(args.warmup, args.steps), max_steps=args.steps,
            grad_accum_steps=1, lora_rank=LORA_RANK, lora_scale=LORA_SCALE, use_dora=args.dora,
            batch_size=args.batch_size, max_seq_len=args.seq_len, save_every=args.steps + 1,
            eval_every=args.steps + 1, output_dir=out, seed=SEED,
        )
        trainer = TimedTrainer(model, config, dataset, show_progress=False)
        trainer.clock = clock
        mx.reset_peak_memory()
        trainer.train()
        return mx.get_peak_memory()


class LmModel(nn.Module):
    """Bit-Axon behind mlx-lm's model interface: ``model(inputs)`` returns logits."""

    def __init__(self, model: BitAxonModel):
        super().__init__()
        self.model = model

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.blocks

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.model(inputs)[0]


def run_mlx_lm(dataset, args, clock: StepClock) -> float:
    from mlx_lm.tuner import trainer as lm_trainer

    # mlx-lm items are (tokens, offset): targets from token ``offset`` to the end of the example.
    items = [(ids, mask.index(1) if 1 in mask else len(ids)) for ids, mask in dataset]

    def timed_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None) -> Iterator:
        for batch, lengths in lm_trainer.iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            spans = np.array(lengths)
            clock.record(int(spans[:, 1].sum()), int((spans[:, 1] - spans[:, 0]).sum()), batch.shape)
            yield batch, lengths

    model = build_mlx_lm_model(args)
    optimizer = optim.AdamW(
        learning_rate=cosine_with_warmup(LEARNING_RATE, min(args.warmup, args.steps), args.steps), weight_decay=0.01
    )
    with tempfile.TemporaryDirectory() as out:
        training_args = lm_trainer.TrainingArgs(
            batch_size=args.batch_size, iters=args.steps, val_batches=0, steps_per_report=args.steps,
            steps_per_eval=args.steps + 1, steps_per_save=args.steps + 1, max_seq_length=args.seq_len,
            adapter_file=f"{out}/adapters.safetensors",
        )
        mx.random.seed(SEED)
        np.random.seed(SEED)  # mlx-lm shuffles its length-sorted batches with numpy's global RNG
        mx.reset_peak_memory()
        with contextlib.redirect_stdout(io.StringIO()):
            lm_trainer.train(model, optimizer, items, args=training_args, iterate_batches=timed_batches)
        return mx.get_peak_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("small", "smollm2"), default="small")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--dora", dest="dora", action="store_true", default=True)
    kind.add_argument("--lora", dest="dora", action="store_false")
    parser.add_argument("--quant", choices=("nf4", "affine", "none"), default="nf4")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two trainers this many times")
    parser.add_argument("--data", help="default: examples/sft.jsonl (small), examples/tickets.jsonl (smollm2)")
    args = parser.parse_args()

    if args.model == "smollm2":
        tokenizer, data, flops_of = load_tokenizer(default_model_path()), "examples/tickets.jsonl", pretrained_matmul_flops
    else:
        tokenizer, data, flops_of = QwenTokenizerWrapper(), "examples/sft.jsonl", matmul_flops
    dataset = SFTDataset(args.data or data, tokenizer, max_seq_len=args.seq_len)
    frozen, adapter, head = flops_of(build_model(args))
    gc.collect()
    base = "GGUF Q4_1 (as loaded)" if args.model == "smollm2" else args.quant
    print(
        f"BLAS: {blas_in_use()}; model {args.model}; {len(dataset)} examples; {'DoRA' if args.dora else 'LoRA'} "
        f"r{LORA_RANK}, base {base}; batch {args.batch_size}, seq-len {args.seq_len}, {args.steps} steps "
        f"({args.warmup} warm-up)"
    )
    peak_flops = peak_matmul_flops()
    print(f"{'round':>5}  {'trainer':<18}{'tokens/s':>10}{'peak MB':>10}{'tokens':>9}{'seconds':>9}{'GFLOP/s':>9}")
    rows = []
    for r in range(args.rounds):
        results = {}
        for name, run in (("bit-axon Trainer", run_ours), ("mlx-lm train", run_mlx_lm)):
            clock = StepClock()
            peak = run(dataset, args, clock)
            rate, tokens, seconds = clock.rate(args.warmup)
            targets = sum(clock.targets[i] for i in clock.timed_steps(args.warmup))
            # Training FLOP/s of what each trainer needs, by the convention of ``matmul_flops``.
            flops = ((4 * frozen + 6 * adapter) * tokens + 4 * head * targets) / seconds
            results[name] = (rate, peak, flops)
            print(f"{r + 1:>5}  {name:<18}{rate:>10.1f}{peak / 1e6:>10.0f}{tokens:>9}{seconds:>9.1f}{flops / 1e9:>9.1f}")
            gc.collect()
            mx.clear_cache()
        (ours, our_peak, _), (theirs, their_peak, _) = results["bit-axon Trainer"], results["mlx-lm train"]
        print(f"{r + 1:>5}  {'ratio ours/mlx-lm':<18}{ours / theirs:>9.2f}x{our_peak / their_peak:>9.2f}x")
        rows.append(results)
    # The machine may be shared: the matmul reference is the best seen before and after the runs.
    peak_flops = max(peak_flops, peak_matmul_flops())
    print(f"float32 2048^3 matmul: {peak_flops / 1e9:.1f} GFLOP/s (best before/after the runs)")
    for r, results in enumerate(rows):
        print(
            f"round {r + 1} MFU: "
            + ", ".join(f"{name} {flops / peak_flops:.1%}" for name, (_, _, flops) in results.items())
        )
    print(
        "MFU = training FLOP/s / float32 matmul FLOP/s; training FLOPs = (4 x frozen matmul weights + "
        "6 x adapter weights) per real token + 4 x head weights per target token."
    )


if __name__ == "__main__":
    main()
