"""``bit-axon merge``: fold a trained adapter into its base model and save the result."""

from __future__ import annotations

import json
from pathlib import Path

from bit_axon.cli.options import parameter_defaults
from bit_axon.cli.paths import OVERWRITE_FLAG, check_output_dir, one_line_errors
from bit_axon.training.merging import load_and_merge

import typer
from rich.console import Console

DEFAULTS = parameter_defaults(load_and_merge)  # quantize_after_merge, bits, group_size


def merge(
    base: Path = typer.Argument(..., help="Base model: a Bit-Axon or Hugging Face directory, a .gguf file or a hub id."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter file (*.safetensors) to merge."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the merged model to."),
    re_quantize: bool = typer.Option(
        DEFAULTS["quantize_after_merge"], "--re-quantize/--no-re-quantize", help="Quantize the merged model (default) or keep full precision."
    ),
    bits: int = typer.Option(DEFAULTS["bits"], "--bits", "-b", help="Bits per weight when re-quantizing."),
    group_size: int = typer.Option(DEFAULTS["group_size"], "--group-size", "-g", help="Quantization group size when re-quantizing."),
    lora_rank: int | None = typer.Option(
        None, "--lora-rank", "-r", help="Expected adapter rank; checked against the file (read from it if omitted)."
    ),
    overwrite: bool = typer.Option(False, OVERWRITE_FLAG, help="Allow --output to be the base model's own directory."),
) -> None:
    """Merge a LoRA/DoRA adapter into a base model."""
    console = Console(stderr=True)
    with one_line_errors(output):
        check_output_dir(output, inputs=[base], overwrite=overwrite)
        with console.status(f"Merging {adapter} into {base}"):
            out = load_and_merge(
                base,
                adapter,
                output,
                quantize_after_merge=re_quantize,
                bits=bits,
                group_size=group_size,
                lora_rank=lora_rank,
            )
    console.print(f"Saved {_saved_format(out)} merged model to {out}", soft_wrap=True)


def _saved_format(out: Path) -> str:
    """What the written config.json says the weights are (a GGUF base's mixed formats are kept)."""
    config = json.loads((out / "config.json").read_text())
    spec = config.get("bit_axon_quantization") or config.get("quantization")
    if not spec:
        return "full-precision"
    mixed = " (per-layer formats of the base kept)" if any(isinstance(v, dict) for v in spec.values()) else ""
    return f"{spec.get('mode', 'affine')} {spec['bits']}-bit (group {spec['group_size']}){mixed}"
