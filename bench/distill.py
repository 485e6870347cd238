"""Distillation measurements: the run's curve, the teacher's cost per step, and answers side by side.

    python bench/distill.py report RUN                   # curve from RUN/metrics.jsonl, answers of teacher vs RUN/model
    python bench/distill.py teacher-cost --student DIR   # in-step teacher vs a top-k cache on disk, one process

``report`` prints the held-out KL (``val_kl``, nats per token), the student's held-out perplexity
and tokens/s against the distillation tokens seen, then the greedy answers of the teacher and of
the distilled student (``RUN/model``) to the demo's held-out prompts (``examples/tickets_val.jsonl``)
and a few general ones.

``teacher-cost`` times, on the same packed batches: the student's training step (compiled forward
+ backward + update, as ``DistillTrainer`` runs it), the teacher's targets computed in the step
(full vocabulary, and top-k), and reading top-k targets back from a file (what a cache would cost
per step), and prints the bytes per token a cache holds. Step-0 perplexity and KL of ported
students: ``bench/port_start.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.cli.distill import MODEL_DIR, RUN_FILE, teacher_in_float
from bit_axon.inference import generate
from bit_axon.loading import load_model, load_tokenizer
from bit_axon.sources.default_model import default_model_path
from bit_axon.training.collate import iterate_batches
from bit_axon.training.distill import DistillConfig, DistillTrainer, prepare_student, teacher_targets
from bit_axon.training.distill_data import chat_units, texts_dataset
from bit_axon.training.losses import gather_targets

import mlx.core as mx
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
GENERAL_PROMPTS = ["What is the capital of France?", "Explain how a rainbow forms.", "Give me three tips for sleeping better."]


def curve(run: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    print("| step | tokens | train KL | held-out KL | held-out perplexity | tokens/s |")
    print("|---|---|---|---|---|---|")
    tokens = 0
    for r in steps:
        tokens += r.get("tokens", 0)
        if "val_kl" in r:
            print(f"| {r['step']} | {tokens} | {r['kl']:.3f} | {r['val_kl']:.3f} | {r['val_perplexity']:.1f} | "
                  f"{r['tokens_per_sec']:.1f} |")
    seconds = sum(r.get("step_time", 0) for r in steps)
    print(f"\n{len(steps)} steps, {tokens} tokens, {seconds / 60:.1f} min of steps, {tokens / max(seconds, 1e-9):.1f} "
          "tokens/s over the steps")


def answers(run: Path, prompts: int, max_tokens: int) -> None:
    settings = json.loads((run / RUN_FILE).read_text())
    teacher_path = settings["inputs"]["teacher"]
    teacher, student = load_model(teacher_path), load_model(run / MODEL_DIR)
    tokenizer = load_tokenizer(teacher_path)
    rows = [json.loads(line)["messages"] for line in (ROOT / "examples" / "tickets_val.jsonl").read_text().splitlines()]
    chats = [[m for m in r[: next(i for i, m in enumerate(r) if m["role"] == "assistant")]] for r in rows[:prompts]]
    chats += [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS]
    print("\n| prompt | teacher | distilled student |\n|---|---|---|")
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        outs = [generate(m, tokenizer, ids, max_tokens=max_tokens, temperature=0.0).strip().replace("\n", " ")
                for m in (teacher, student)]
        prompt = chat[-1]["content"].split("\n\n")[-1].replace("\n", " ")
        print(f"| {prompt[:80]} | {outs[0] or '(nothing)'} | {outs[1] or '(nothing)'} |")


def timed(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def teacher_cost(student_dir: Path, teacher_path: str, top_k: int, repeats: int) -> None:
    teacher = load_model(teacher_path)
    teacher_in_float(teacher, Console())
    tokenizer = load_tokenizer(teacher_path)
    config = DistillConfig()
    chats = [json.loads(line)["messages"] for line in (ROOT / "examples" / "tickets.jsonl").read_text().splitlines()]
    data = texts_dataset(chat_units(chats, tokenizer), config.max_seq_len, tokenizer, "tickets")
    packed = iterate_batches(data, config.batch_size, config.max_seq_len, eos_token_id=data.eos_token_id,
                             pad_token_id=data.pad_token_id)
    batch = gather_targets(*next(packed))
    student = load_model(student_dir)
    prepare_student(student, config.train_rest, config.adapter_config())
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DistillTrainer(student, teacher, config.training_config(tmp), data, None, show_progress=False)
        trainer.optimizer.init(student.trainable_parameters())
        step = trainer._build_step()

        def student_step():
            _, _, _, grads = step(batch)
            trainer.optimizer.update(student, grads)
            mx.eval(student.parameters(), trainer.optimizer.state)

        cached = teacher_targets(teacher, batch, top_k)
        path = Path(tmp) / "cache.safetensors"
        mx.save_safetensors(str(path), {"logprobs": cached.logprobs, "ids": cached.ids, "tail": cached.tail})
        # The student step includes its own teacher pass (the trainer's step); time that pass alone too.
        full = timed(lambda: mx.eval(teacher_targets(teacher, batch, 0)), repeats)
        top = timed(lambda: mx.eval(teacher_targets(teacher, batch, top_k)), repeats)
        read = timed(lambda: mx.eval(mx.load(str(path))), repeats)
        total = timed(student_step, repeats)
    tokens = int(batch.weights.sum().item())
    print(f"batch: {config.batch_size} x {config.max_seq_len} tokens ({tokens} targets), teacher {teacher_path}")
    print("| part | seconds per step | share of the step |\n|---|---|---|")
    for name, seconds in [("whole step, teacher in the step (full vocabulary)", total),
                          ("teacher targets, full vocabulary", full), (f"teacher targets, top-{top_k}", top),
                          (f"reading top-{top_k} targets from a file", read)]:
        print(f"| {name} | {seconds:.3f} | {seconds / total:.1%} |")
    vocab = cached.logprobs.shape[-1] if cached.ids.shape[-1] == 0 else None
    per_token_topk = top_k * 8 + 4  # float32 log-prob + int32 id per kept token, and the tail
    full_vocab = vocab or teacher.output_head["weight"].shape[0]
    print(f"cache size per token: top-{top_k} {per_token_topk} B; full vocabulary {full_vocab * 4 / 1024:.0f} KiB")
    print(f"a cache saves at most {(full - read) / total:.1%} of a step, from the second pass over the text on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report")
    report.add_argument("run", type=Path)
    report.add_argument("--prompts", type=int, default=5, help="held-out demo prompts to answer")
    report.add_argument("--max-tokens", type=int, default=40)
    cost = sub.add_parser("teacher-cost")
    cost.add_argument("--student", type=Path, required=True)
    cost.add_argument("--teacher", default=None, help="default: the SmolLM2-135M-Instruct GGUF")
    cost.add_argument("--top-k", type=int, default=64)
    cost.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "report":
        curve(args.run)
        answers(args.run, args.prompts, args.max_tokens)
    else:
        teacher_cost(args.student, args.teacher or str(default_model_path()), args.top_k, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
