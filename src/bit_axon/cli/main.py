"""The ``bit-axon`` command line. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

from bit_axon.cli.demo import demo
from bit_axon.cli.distill import distill
from bit_axon.cli.download import download
from bit_axon.cli.evaluate import evaluate
from bit_axon.cli.merge import merge
from bit_axon.cli.port import port_weights
from bit_axon.cli.prepare import prepare
from bit_axon.cli.quantize import quantize
from bit_axon.cli.run import run
from bit_axon.cli.serve import serve
from bit_axon.cli.train import train
from bit_axon.cli.upload import upload

import typer

app = typer.Typer(
    name="bit-axon",
    help="Fine-tune the Bit-Axon language model on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"bit-axon {version('bit-axon')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fine-tune the Bit-Axon language model on your own machine."""
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False)],
        force=True,
    )
    # Keep third-party debug chatter out of --verbose; it is about bit_axon.
    for name in ("matplotlib", "PIL", "urllib3", "httpx", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The one-time ~20 s kernel build would otherwise look like a hang.
    if not verbose:
        logging.getLogger("bit_axon.quantization.cpu_kernels").setLevel(logging.INFO)
    from bit_axon.blas import blas_in_use

    # The preload ran at import, before logging was configured: say it again now.
    logging.getLogger("bit_axon.blas").debug("BLAS in use: %s", blas_in_use())


app.command("demo")(demo)
app.command("prepare")(prepare)
app.command("quantize")(quantize)
app.command("merge")(merge)
app.command("train")(train)
app.command("run")(run)
app.command("serve")(serve)
app.command("evaluate")(evaluate)
app.command("port-weights")(port_weights)
app.command("distill")(distill)
app.command("download")(download)
app.command("upload")(upload)

if __name__ == "__main__":
    app()
