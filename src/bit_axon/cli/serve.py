"""``bit-axon serve``: an OpenAI-compatible API and a web page for chat and for watching training runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

ADAPTER_HELP = (
    "NAME=PATH: also serve the base with this adapter file on top, as model NAME (repeat for more). "
    "Each adapter holds its own copy of the base in memory."
)


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` pairs; ``typer.BadParameter`` names the one that is wrong."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise typer.BadParameter(f"{value!r} is not NAME=PATH (for example ticket=./run/best_adapter.safetensors)",
                                     param_hint="--adapter")
        if name in adapters:
            raise typer.BadParameter(f"the name {name!r} is given twice", param_hint="--adapter")
        if not Path(path).is_file():
            raise typer.BadParameter(f"{path}: no such adapter file", param_hint="--adapter")
        adapters[name.strip()] = Path(path)
    return adapters


def serve(
    model: str | None = typer.Argument(
        None, help="Model to serve: a Bit-Axon or Hugging Face directory, a .gguf file or a hub id. "
        "Leave it out to watch training runs only (--runs)."),
    adapter: list[str] = typer.Option([], "--adapter", "-a", help=ADAPTER_HELP),
    name: str | None = typer.Option(None, "--name", help="The base model's id in the API (default: its file or "
                                    "directory name)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="BIT_AXON_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on the /v1 API."),
    runs: Path | None = typer.Option(None, "--runs", help="Directory of training runs to show on the dashboard "
                                     "(every folder under it with a metrics.jsonl)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most requests per model decoded together; more wait."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Reply length when a request gives no max_tokens."),
    context_length: int | None = typer.Option(None, "--context-length",
                                              help="Cap on prompt + reply tokens (default: the model's own)."),
) -> None:
    """Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)
    with a web page at / for chat and for the training runs under --runs."""
    from bit_axon.serving.app import create_app
    from bit_axon.serving.engine import Engine
    from bit_axon.serving.models import load_served

    import uvicorn

    console = Console(stderr=True)
    adapters = parse_adapters(adapter)
    if model is None and runs is None:
        raise typer.BadParameter("give a MODEL to serve, or --runs DIR to watch training runs", param_hint="MODEL")
    if model is None and adapters:
        raise typer.BadParameter("adapters need a base MODEL", param_hint="--adapter")
    if runs is not None and not runs.is_dir():
        raise typer.BadParameter(f"{runs}: no such directory", param_hint="--runs")
    if max_batch < 1:
        raise typer.BadParameter(f"must be >= 1, got {max_batch}", param_hint="--max-batch")
    try:
        served = load_served(model, adapters, name=name, max_context=context_length) if model else []
    except (OSError, ValueError) as error:
        console.print(f"[red]Error:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    with Engine(served, max_batch=max_batch) as engine:
        app = create_app(engine, runs_dir=runs, api_key=api_key, default_max_tokens=max_tokens)
        shown = host if ":" not in host else f"[{host}]"
        ids = ", ".join(m.name for m in served) or "none (runs only)"
        console.print(f"Serving {ids} on http://{shown}:{port}/  (API: http://{shown}:{port}/v1)", highlight=False)
        uvicorn.run(app, host=host, port=port, log_level="warning")
