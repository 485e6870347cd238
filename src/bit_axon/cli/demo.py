"""``bit-axon demo``: fine-tune a model on bundled example chats and compare answers before and after.

The default fine-tunes the offline default model, SmolLM2-135M-Instruct (``bit_axon.sources.
default_model_path``), to route support messages to a team (examples/tickets.jsonl), and measures it
on held-out phrasings (tickets_val.jsonl). ``--config-small`` trains the random-initialised small
Bit-Axon model on examples/sft.jsonl instead.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from bit_axon.cli.train import build_model, print_summary, run_training

import typer
from rich.console import Console
from rich.table import Table

# The pretrained demo's settings: stable on SmolLM2 (no logged step loss above the first one) and
# a few minutes on a 2-core CPU; measurements in bench/README.md ("The demo").
PRETRAINED_STEPS = 30
PRETRAINED_LEARNING_RATE = 2e-4
PRETRAINED_BATCH = 4
PRETRAINED_SEQ_LEN = 256
ANSWER_TOKENS = 3  # a team name is one or two tokens, then the end of the turn
SHOWN_ROWS = 4
SMALL_STEPS = 80
SMALL_LEARNING_RATE = 2e-3


def examples_dir() -> Path:
    """The repository's ``examples/`` (next to ``src/``), else ``./examples``."""
    beside_source = Path(__file__).resolve().parents[3] / "examples"
    return beside_source if beside_source.is_dir() else Path("examples")


def _conversations(val_path: Path, n: int | None = None) -> list[tuple[list[dict[str, str]], str]]:
    """(the messages before the first answer, that answer) of the first ``n`` examples."""
    rows = []
    for line in val_path.read_text().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        rows.append((messages[:first_answer], messages[first_answer]["content"]))
    return rows


@dataclass
class Snapshot:
    loss: float
    answers: list[str]
    accuracy: float | None = None  # exact match (stripped, lowercased), where the task has one answer


def _snapshot(model, tokenizer, val, conversations, config, max_tokens: int, score: bool) -> Snapshot:
    from bit_axon.inference.evaluate import evaluate_model
    from bit_axon.inference.generate import generate

    model.eval()
    loss = evaluate_model(
        model, val, batch_size=config.batch_size, seq_length=config.max_seq_len,
        eos_token_id=val.eos_token_id, pad_token_id=val.pad_token_id,
    )["loss"]
    answers = [
        generate(model, tokenizer, tokenizer.apply_chat_template(q, add_generation_prompt=True), max_tokens=max_tokens)
        for q, _ in conversations
    ]
    if not score:
        return Snapshot(loss, answers)
    hits = [a.strip().lower() == expected.strip().lower() for a, (_, expected) in zip(answers, conversations, strict=True)]
    return Snapshot(loss, answers, sum(hits) / len(hits))


def _require(path: Path) -> None:
    if not path.exists():
        typer.echo(f"Error: example data not found at {path}; run from the repository root.", err=True)
        raise typer.Exit(1)


def demo(
    config_small: bool = typer.Option(
        False, "--config-small", help="Train the random-initialised small Bit-Axon model instead of SmolLM2."
    ),
    steps: int | None = typer.Option(
        None, "--steps", help=f"Optimizer steps (default {PRETRAINED_STEPS}; {SMALL_STEPS} with --config-small)."
    ),
    output_dir: Path = typer.Option(Path("demo-run"), "--output-dir", "-o", help="Where checkpoints go."),
    learning_rate: float | None = typer.Option(
        None, "--learning-rate", "-lr",
        help=f"Peak learning rate (default {PRETRAINED_LEARNING_RATE:g}; {SMALL_LEARNING_RATE:g} with --config-small).",
    ),
    no_thermal: bool = typer.Option(False, "--no-thermal", help="Disable thermal monitoring."),
) -> None:
    """Fine-tune SmolLM2-135M-Instruct (its 4-bit GGUF base, LoRA rank 8) to route support messages
    to a team, then show held-out answers, exact-match accuracy and loss before and after."""
    from bit_axon.blas import blas_in_use
    from bit_axon.loading import load_tokenizer
    from bit_axon.sources import default_model_path
    from bit_axon.tokenizer import QwenTokenizerWrapper
    from bit_axon.training.config import TrainingConfig
    from bit_axon.training.data import SFTDataset

    import mlx.core as mx

    console = Console()
    data_dir = examples_dir()
    names = ("sft.jsonl", "sft_val.jsonl") if config_small else ("tickets.jsonl", "tickets_val.jsonl")
    train_path, val_path = (data_dir / n for n in names)
    _require(train_path)
    steps = steps or (SMALL_STEPS if config_small else PRETRAINED_STEPS)
    if config_small:
        model_path, tokenizer = None, QwenTokenizerWrapper()
        # The whole validation set, as the table's before/after losses: the summary's val_loss (the
        # trainer's evaluation at the last step) is then the same number as the table's "after".
        settings = {"batch_size": 2, "max_seq_len": 256}
        lr, title = learning_rate or SMALL_LEARNING_RATE, "the small Bit-Axon model (random initialisation)"
    else:
        try:
            model_path = default_model_path()
        except FileNotFoundError as err:
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(1) from err
        tokenizer = load_tokenizer(model_path)
        settings = {"batch_size": PRETRAINED_BATCH, "max_seq_len": PRETRAINED_SEQ_LEN, "use_dora": False}
        lr, title = learning_rate or PRETRAINED_LEARNING_RATE, f"SmolLM2-135M-Instruct ({model_path.name})"
    console.print(f"[bold]Bit-Axon demo[/bold]: {title}; device {mx.default_device()}, BLAS {blas_in_use()}")
    config = TrainingConfig(
        learning_rate=lr, warmup_steps=max(1, steps // 10), max_steps=steps, grad_accum_steps=1,
        save_every=steps, eval_every=steps, output_dir=str(output_dir), **settings,
    )
    start = time.perf_counter()
    model = build_model(model_path, config_small, config, config.seed, console)
    val = SFTDataset(val_path, tokenizer, max_seq_len=config.max_seq_len)
    conversations = _conversations(val_path, 3 if config_small else None)
    max_tokens = 20 if config_small else ANSWER_TOKENS

    def snapshot() -> Snapshot:
        return _snapshot(model, tokenizer, val, conversations, config, max_tokens, score=not config_small)

    before = snapshot()
    result = run_training(
        train_path, config, model_weights=model_path, config_small=config_small, val_data=val_path,
        thermal=not no_thermal, console=console, model=model,
    )
    after = snapshot()
    minutes = (time.perf_counter() - start) / 60

    print_summary(result, console)
    table = Table(title=f"Held-out answers before and after {result['step']} steps")
    for column in ("message" if not config_small else "question", "before", "after"):
        table.add_column(column)
    if not config_small:
        table.add_column("expected")
    for (q, expected), b, a in list(zip(conversations, before.answers, after.answers, strict=True))[:SHOWN_ROWS]:
        cells = [q[-1]["content"].split("\n\n")[-1], b.strip() or "(nothing)", a.strip() or "(nothing)"]
        table.add_row(*cells, *([] if config_small else [expected]))
    table.add_row("held-out loss", f"{before.loss:.3f}", f"{after.loss:.3f}")
    if not config_small:
        table.add_row(f"exact match ({len(conversations)} held out)", f"{before.accuracy:.0%}", f"{after.accuracy:.0%}")
    console.print(table)
    console.print(
        f"Total {minutes:.1f} min (training {result.get('elapsed_sec', 0):.0f} s at "
        f"{result.get('tokens_per_sec', 0):.0f} tokens/s, peak memory {result.get('peak_memory_gb', 0):.2f} GB)"
    )
    base = output_dir / "base_model" if config_small else model_path
    question = "What is 12 + 30?" if config_small else conversations[0][0][-1]["content"]
    # Plain output: the console would wrap the command where it is no longer one to copy.
    typer.echo(
        f"Adapter: {result['adapter_path']}\nTry it: bit-axon run --model {base} --adapter {result['adapter_path']} "
        f"--temperature 0 {shlex.quote(question)}"
    )
    if not config_small and after.accuracy <= before.accuracy:
        # The demo is also the project's learning check (bench/learning.py): no gain is no result.
        typer.echo(
            f"Error: the fine-tune did not raise held-out accuracy ({before.accuracy:.0%} -> {after.accuracy:.0%})",
            err=True,
        )
        raise typer.Exit(1)
