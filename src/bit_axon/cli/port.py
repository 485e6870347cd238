"""``bit-axon port-weights``: a Bit-Axon base model initialised from a Llama / Qwen2 checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from bit_axon.cli.paths import check_output_dir
from bit_axon.config import BitAxonConfig
from bit_axon.porting import SourceConfig, default_config, read_source
from bit_axon.porting import port_weights as port_checkpoint
from bit_axon.porting_ssm import fit_summary

import mlx.core as mx
import typer
from rich.console import Console


class DType(str, Enum):
    source = "source"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class SSMInit(str, Enum):
    identity = "identity"
    attention = "attention"


class Depth(str, Enum):
    moe = "moe"
    all = "all"


# Fields the source fixes; a --config file may state them only with the same values.
_SOURCE_FIELDS = {"vocab_size": "vocab_size", "d_source_model": "hidden_size"}


def architecture(
    source: SourceConfig, config_file: Path | None = None, config_small: bool = False, config_full: bool = False
) -> BitAxonConfig:
    """The Bit-Axon architecture to port into: sized from the source (``default_config``), or the small
    or full designed one, with a ``--config`` file's fields on top."""
    if sum((config_file is not None, config_small, config_full)) > 1:
        raise ValueError("pass only one of --config, --config-small and --config-full")
    if config_small:
        return BitAxonConfig.small()
    if config_full:
        return BitAxonConfig()
    base = default_config(source)
    if config_file is None:
        return base
    if not config_file.is_file():
        raise FileNotFoundError(f"Config file not found: {config_file}")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object of BitAxonConfig fields")
    for ours, theirs in _SOURCE_FIELDS.items():
        if ours in data and data[ours] != getattr(source, theirs):
            raise ValueError(
                f"{config_file}: {ours}={data[ours]} conflicts with the source's {theirs}={getattr(source, theirs)} "
                f"(it is taken from the source; leave it out)"
            )
    data = {k: v for k, v in data.items() if k != "model_type"}
    return BitAxonConfig.from_dict({**base.to_dict(), **data})


def port_weights(
    source: str = typer.Argument(
        ..., help="Llama / Qwen2 model: a Hugging Face directory, a .gguf file or a hub id (org/name)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="New directory for the Bit-Axon model."),
    ssm_init: SSMInit = typer.Option(
        SSMInit.identity, "--ssm-init",
        help="SSM mixers start as the identity (distills stably), or as a linear attention fitted to their source "
             "layer's attention (closer at step 0, but bit-axon distill diverges from it; docs/porting.md).",
    ),
    depth: Depth = typer.Option(
        Depth.moe, "--depth",
        help="Which layers take a source layer: the MoE layers (zones 2, 3), or all (zone 1 too; needs --ssm-init attention).",
    ),
    config_file: Path | None = typer.Option(
        None, "--config", help="JSON of BitAxonConfig fields overriding the architecture sized from the source."
    ),
    config_small: bool = typer.Option(False, "--config-small", help="Use the small architecture (tests, demos)."),
    config_full: bool = typer.Option(False, "--config-full", help="Use the designed full Bit-Axon architecture."),
    expert_noise: float = typer.Option(
        0.01, "--expert-noise", help="Relative noise on each routed expert's copy of the MLP, so experts diverge."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for new weights, expert noise and calibration tokens."),
    calibration_tokens: int = typer.Option(
        64, "--calibration-tokens", help="Random tokens used to measure the final hidden-state RMS."
    ),
    ssm_calibration_tokens: int = typer.Option(
        2048, "--ssm-calibration-tokens", help="Random tokens run through the source to fit the attention start."
    ),
    dtype: DType = typer.Option(
        DType.source, "--dtype", help="Weight dtype of the output (default: the source's; float32 for a quantized one)."
    ),
) -> None:
    """Build a Bit-Axon base model from a Llama or Qwen2 checkpoint (docs/porting.md).

    Vocabulary, embedding, tied head and tokenizer are the source's (d_source_model = its hidden
    size). Default architecture, sized from the source: hidden = the source's hidden size, layers =
    the largest multiple of 3 not above the source's, heads = the source's, MoE of 4 experts (top-1,
    no shared expert) each as wide as the source's MLP. The MoE layers take evenly spaced source
    layers (attention and MLP; RoPE and biases are not reproduced); SSM mixers start as the identity,
    or with --ssm-init attention as a linear attention built from their source layer's V, K, Q and O
    (fitted on random tokens run through the source). Writes config.json, model.safetensors,
    porting.json and the tokenizer files.
    """
    console = Console(stderr=True)
    try:
        check_output_dir(output, inputs=[source])
        if output.exists() and any(output.iterdir()):
            raise FileExistsError(f"Output directory {output} already exists and is not empty")
        with console.status(f"Reading {source}"):
            loaded = read_source(source)
        config = architecture(loaded.config, config_file, config_small, config_full)
        with console.status(f"Porting {source} ({ssm_init.value} start)"):
            out = port_checkpoint(
                source,
                output,
                config,
                loaded=loaded,
                ssm_init=ssm_init.value,
                depth=depth.value,
                expert_noise=expert_noise,
                seed=seed,
                calibration_tokens=calibration_tokens,
                ssm_calibration_tokens=ssm_calibration_tokens,
                dtype=None if dtype is DType.source else getattr(mx, dtype.value),
            )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    report = json.loads((out / "porting.json").read_text())
    layers = ", ".join(f"{i}<-{j}" for i, j in report["layer_sources"].items())
    console.print(f"Saved Bit-Axon model to {out} (Bit-Axon layer <- source layer: {layers})", soft_wrap=True)
    if report["ssm_fits"]:
        console.print(fit_summary(report["ssm_fits"]) + " on the calibration tokens")
