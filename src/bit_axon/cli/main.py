"""The ``bit-axon`` command line. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import typer

from bit_axon.cli.merge import merge
from bit_axon.cli.prepare import prepare
from bit_axon.cli.quantize import quantize

app = typer.Typer(
    name="bit-axon",
    help="Fine-tune the Bit-Axon language model on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Fine-tune the Bit-Axon language model on your own machine."""


@app.command()
def demo() -> None:
    """Build the small model and run a forward pass (becomes a training demo with the trainer)."""
    import time

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bit_axon import BitAxonConfig, BitAxonModel
    from bit_axon.blas import blas_in_use

    config = BitAxonConfig.small()
    model = BitAxonModel(config)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    ids = mx.random.randint(0, config.vocab_size, (1, 128))
    start = time.perf_counter()
    logits, _ = model(ids)
    mx.eval(logits)
    typer.echo(f"BLAS: {blas_in_use()}")
    typer.echo(f"small model: {n_params:,} parameters; logits {tuple(logits.shape)} in {time.perf_counter() - start:.2f}s")


app.command("prepare")(prepare)
app.command("quantize")(quantize)
app.command("merge")(merge)

if __name__ == "__main__":
    app()
