"""``bit-axon evaluate``: loss and perplexity of a model (plus optional adapter) on a data file."""

from __future__ import annotations

from pathlib import Path

from bit_axon.cli.run import TOKENIZER_HELP
from bit_axon.inference import evaluate_model, load
from bit_axon.training.data import load_dataset_file

import typer
from rich.console import Console


def evaluate(
    model_path: Path = typer.Argument(..., help="Model: a Bit-Axon or Hugging Face directory, a .gguf file or a hub id."),
    data: Path = typer.Option(..., "--data", help="JSONL file: chat messages, Alpaca or ORPO preference pairs."),
    adapter: Path | None = typer.Option(None, "--adapter", help="LoRA/DoRA adapter file, applied without merging."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", "-t", help=TOKENIZER_HELP),
    batch_size: int = typer.Option(1, "--batch-size", help="Packed rows per forward pass."),
    seq_length: int = typer.Option(2048, "--seq-length", help="Tokens per packed row (longer examples are cut)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop after this many target tokens."),
) -> None:
    """Token-weighted loss and perplexity on the target tokens of a data file.

    Targets are what training learns: assistant replies and their closing <|im_end|> (for ORPO
    files, the chosen responses). Prints ``loss``, ``perplexity`` and the number of target tokens.
    """
    console = Console(stderr=True)
    try:
        model, tok = load(model_path, adapter, tokenizer)
        dataset = load_dataset_file(data, tok, max_seq_len=seq_length)
        with console.status(f"Evaluating on {data}"):
            result = evaluate_model(
                model, dataset, batch_size, seq_length, max_tokens=max_tokens,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
    except (ValueError, OSError) as err:  # DatasetError is a ValueError, TokenizerLoadError an OSError
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  tokens {result['tokens']}")
