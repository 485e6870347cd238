"""``bit-axon quantize``: write a 4-bit (or 2-8 bit affine) copy of a float model (any source)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from bit_axon.cli.options import parameter_defaults
from bit_axon.cli.paths import OVERWRITE_FLAG, check_output_dir, one_line_errors
from bit_axon.loading import load_model, save_model
from bit_axon.quantization import AFFINE_BITS, GROUP_SIZES, QUANT_MODES, base_quantization, quantize_model

import typer
from rich.console import Console

QuantMode = Enum("QuantMode", {m: m for m in QUANT_MODES}, type=str)
DEFAULTS = parameter_defaults(quantize_model)  # bits, group_size, mode


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}"


def quantize(
    model_path: Path = typer.Argument(..., help="Float model: a Bit-Axon or Hugging Face directory, a .gguf file or a hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the quantized model to."),
    bits: int = typer.Option(DEFAULTS["bits"], "--bits", "-b", help=f"Bits per weight (nf4: 4; affine: {_listed(AFFINE_BITS)})."),
    group_size: int = typer.Option(DEFAULTS["group_size"], "--group-size", "-g", help=f"Weights per scale ({_listed(GROUP_SIZES)})."),
    mode: QuantMode = typer.Option(
        DEFAULTS["mode"], "--mode", help="nf4: QLoRA's 4-bit NormalFloat; affine: MLX's native quantization."
    ),
    overwrite: bool = typer.Option(False, OVERWRITE_FLAG, help="Allow --output to be the input model's own directory."),
) -> None:
    """Quantize a model's linear, expert and embedding weights."""
    console = Console(stderr=True)
    with one_line_errors(output):
        check_output_dir(output, inputs=[model_path], overwrite=overwrite)
        with console.status(f"Loading {model_path}"):
            model = load_model(model_path)
        q = base_quantization(model)
        if q is not None:
            mixed = ", mixed per layer" if len(q) > 3 else ""
            raise ValueError(
                f"{model_path} is already quantized ({q['mode']}, {q['bits']}-bit, group {q['group_size']}{mixed}); "
                "quantize the full-precision model instead"
            )
        with console.status(f"Quantizing ({mode.value}, {bits}-bit, group {group_size})"):
            quantize_model(model, bits=bits, group_size=group_size, mode=mode.value)
            save_model(model, output)
    console.print(f"Saved {mode.value} {bits}-bit (group {group_size}) model to {output}", soft_wrap=True)
