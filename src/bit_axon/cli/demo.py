"""``bit-axon demo``: fine-tune the small model on the bundled example chats and compare answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bit_axon.cli.train import build_model, print_summary, run_training

import typer
from rich.console import Console
from rich.table import Table


def examples_dir() -> Path:
    """The repository's ``examples/`` (next to ``src/``), else ``./examples``."""
    beside_source = Path(__file__).resolve().parents[3] / "examples"
    return beside_source if beside_source.is_dir() else Path("examples")


def _questions(val_path: Path, n: int) -> list[list[dict[str, str]]]:
    prompts = []
    for line in val_path.read_text().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:first_answer])
    return prompts


def demo(
    steps: int = typer.Option(80, "--steps", help="Optimizer steps (about 2 s each on a 2-core CPU)."),
    output_dir: Path = typer.Option(Path("demo-run"), "--output-dir", "-o", help="Where checkpoints go."),
    learning_rate: float = typer.Option(2e-3, "--learning-rate", "-lr", help="Peak learning rate."),
    no_thermal: bool = typer.Option(False, "--no-thermal", help="Disable thermal monitoring."),
) -> None:
    """Train the small model (QLoRA: 4-bit NF4 base, DoRA rank 8) on examples/sft.jsonl, then show
    the validation loss and answers before and after."""
    from bit_axon.blas import blas_in_use
    from bit_axon.inference.evaluate import evaluate_model
    from bit_axon.inference.generate import generate
    from bit_axon.tokenizer import QwenTokenizerWrapper
    from bit_axon.training.config import TrainingConfig
    from bit_axon.training.data import SFTDataset

    console = Console()
    data_dir = examples_dir()
    train_path, val_path = data_dir / "sft.jsonl", data_dir / "sft_val.jsonl"
    if not train_path.exists():
        typer.echo(f"Error: example data not found at {train_path}; run from the repository root.", err=True)
        raise typer.Exit(1)
    import mlx.core as mx

    console.print(f"[bold]Bit-Axon demo[/bold] — device {mx.default_device()}, BLAS {blas_in_use()}")
    config = TrainingConfig(
        learning_rate=learning_rate, warmup_steps=max(1, steps // 10), max_steps=steps, grad_accum_steps=1,
        batch_size=2, max_seq_len=256, save_every=max(1, steps // 2), eval_every=steps,
        output_dir=str(output_dir), max_eval_batches=8,
    )
    tokenizer = QwenTokenizerWrapper()
    model = build_model(None, True, config, config.seed, console)
    val = SFTDataset(val_path, tokenizer, max_seq_len=config.max_seq_len)
    questions = _questions(val_path, 3)

    def snapshot() -> tuple[float, list[str]]:
        model.eval()
        loss = evaluate_model(
            model, val, batch_size=2, seq_length=config.max_seq_len, max_tokens=400,
            eos_token_id=val.eos_token_id, pad_token_id=val.pad_token_id,
        )["loss"]
        answers = [
            generate(model, tokenizer, tokenizer.apply_chat_template(q, add_generation_prompt=True), max_tokens=20)
            for q in questions
        ]
        return loss, answers

    before_loss, before = snapshot()
    start = time.perf_counter()
    result = run_training(train_path, config, val_data=val_path, thermal=not no_thermal, console=console, model=model)
    minutes = (time.perf_counter() - start) / 60
    after_loss, after = snapshot()

    print_summary(result, console)
    table = Table(title=f"Before and after {result['step']} steps ({minutes:.1f} min)")
    table.add_column("question")
    table.add_column("before")
    table.add_column("after")
    for q, b, a in zip(questions, before, after, strict=True):
        table.add_row(q[-1]["content"], b.strip() or "(nothing)", a.strip() or "(nothing)")
    table.add_row("validation loss", f"{before_loss:.3f}", f"{after_loss:.3f}")
    console.print(table)
    console.print(
        f"Adapter: {result['adapter_path']}\nTry it: bit-axon run --model {output_dir}/base_model "
        f"--adapter {result['adapter_path']} \"What is 12 + 30?\""
    )
