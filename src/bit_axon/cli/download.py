"""``bit-axon download``: fetch a model or tokenizer repository from the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path

from bit_axon.tokenizer import hub_unreachable

import typer

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jsonl"]
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json"]


def download(
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. Qwen/Qwen2.5-3B."),
    directory: Path = typer.Option(..., "--dir", "-d", help="Directory to download into."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
    tokenizer_only: bool = typer.Option(False, "--tokenizer-only", help="Fetch only the tokenizer files."),
    include: list[str] | None = typer.Option(
        None, "--include", help="Glob of files to fetch (repeatable); default: configs, *.safetensors, *.txt."
    ),
) -> None:
    """Download a model or tokenizer from the Hugging Face hub (fails within seconds when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    # snapshot_download retries a dead connection for a long time; a short probe fails fast instead.
    if why := hub_unreachable():
        typer.echo(
            f"Error: cannot reach the Hugging Face hub at {constants.ENDPOINT} ({why}); {repo_id} was not downloaded",
            err=True,
        )
        raise typer.Exit(1)
    patterns = include or (TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS)
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=directory, allow_patterns=patterns)
    except (OSError, HFValidationError) as err:  # hub HTTP errors are OSErrors
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        typer.echo(f"Error: could not download {repo_id}: {message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Downloaded {repo_id} to {path}")
