"""``bit-axon quantize``: write a 4-bit (or 2-8 bit affine) copy of a model directory."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from bit_axon.loading import load_model, save_model
from bit_axon.quantization import DEFAULT_MODE, quantize_model

import typer
from rich.console import Console


class QuantMode(str, Enum):
    nf4 = "nf4"
    affine = "affine"


def quantize(
    model_path: Path = typer.Argument(..., help="Model directory (config.json + *.safetensors)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the quantized model to."),
    bits: int = typer.Option(4, "--bits", "-b", help="Bits per weight (nf4: 4; affine: 2, 3, 4, 5, 6 or 8)."),
    group_size: int = typer.Option(64, "--group-size", "-g", help="Weights per scale (32, 64 or 128)."),
    mode: QuantMode = typer.Option(
        DEFAULT_MODE, "--mode", help="nf4: QLoRA's 4-bit NormalFloat; affine: MLX's native quantization."
    ),
) -> None:
    """Quantize a model's linear, expert and embedding weights."""
    console = Console(stderr=True)
    try:
        with console.status(f"Loading {model_path}"):
            model = load_model(model_path)
        if model.config.quantization is not None:
            q = model.config.quantization
            raise ValueError(
                f"{model_path} is already quantized ({q['mode']}, {q['bits']}-bit, group {q['group_size']}); "
                "quantize the full-precision model instead"
            )
        with console.status(f"Quantizing ({mode.value}, {bits}-bit, group {group_size})"):
            quantize_model(model, bits=bits, group_size=group_size, mode=mode.value)
            save_model(model, output)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    console.print(f"Saved {mode.value} {bits}-bit (group {group_size}) model to {output}")
