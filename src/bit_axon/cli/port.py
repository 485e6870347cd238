"""``bit-axon port-weights``: a Bit-Axon base model initialised from a local Qwen2.5 checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from bit_axon.cli.paths import check_output_dir
from bit_axon.config import BitAxonConfig
from bit_axon.porting import port_weights as port_checkpoint

import mlx.core as mx
import typer
from rich.console import Console


class DType(str, Enum):
    source = "source"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Fields the Qwen checkpoint fixes; a --config file may state them only with the same values.
_SOURCE_FIELDS = {"vocab_size": "vocab_size", "d_source_model": "hidden_size"}


def _architecture(config_file: Path | None, config_small: bool, qwen_dir: Path) -> BitAxonConfig | None:
    if config_file is not None and config_small:
        raise ValueError("pass --config or --config-small, not both")
    if config_small:
        return BitAxonConfig.small()
    if config_file is None:
        return None
    if not config_file.is_file():
        raise FileNotFoundError(f"Config file not found: {config_file}")
    data = json.loads(config_file.read_text())
    qwen_file = qwen_dir / "config.json"
    qwen = json.loads(qwen_file.read_text()) if qwen_file.is_file() else {}
    for ours, theirs in _SOURCE_FIELDS.items():
        if ours in data and theirs in qwen and data[ours] != qwen[theirs]:
            raise ValueError(
                f"{config_file}: {ours}={data[ours]} conflicts with the checkpoint's {theirs}={qwen[theirs]} "
                f"(it is taken from the checkpoint; leave it out)"
            )
    return BitAxonConfig.from_dict(data)


def port_weights(
    qwen_dir: Path = typer.Argument(..., help="Local Qwen2.5 checkpoint directory (config.json + *.safetensors)."),
    output: Path = typer.Option(..., "--output", "-o", help="New directory for the Bit-Axon model."),
    config_small: bool = typer.Option(False, "--config-small", help="Use the small architecture (tests, demos)."),
    config_file: Path | None = typer.Option(
        None, "--config", help="Bit-Axon config.json with the architecture (default: the full 24-layer model)."
    ),
    expert_noise: float = typer.Option(
        0.01, "--expert-noise", help="Relative noise on each routed expert's copy of the MLP, so experts diverge."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for new weights, expert noise and calibration tokens."),
    calibration_tokens: int = typer.Option(
        64, "--calibration-tokens", help="Random tokens used to measure the final hidden-state RMS."
    ),
    dtype: DType = typer.Option(DType.source, "--dtype", help="Weight dtype of the output (default: the checkpoint's)."),
) -> None:
    """Build a Bit-Axon base model from a Qwen2.5 checkpoint (Hugging Face layout).

    Vocabulary, embedding and tied head are Qwen's (d_source_model = Qwen's hidden size). Qwen's
    residual stream enters Bit-Axon's wider one through input_proj = [I; 0]; every copied weight is
    placed through that map. Only the MoE layers (zones 2 and 3) take Qwen weights, the k-th from
    Qwen layer round(k * (n_qwen - 1) / (n_moe_layers - 1)). Attention: Qwen's q/k/v/o, k/v heads
    repeated (GQA), each Qwen head split over consecutive Bit-Axon heads; RoPE and the q/v biases are
    not reproduced. MLP: copied into the shared expert and, with --expert-noise, every routed expert
    (top channels by weight norm when the expert is narrower), scaled for the near-uniform initial
    router. SSM mixers are new (Mamba init) with out_proj = 0, so they start as the identity. RMSNorm
    weights are copied (rescaled for the zero extra coordinates); Qwen's final norm is folded into
    output_proj with the median RMS measured on --calibration-tokens random tokens. Details: README, "Using
    the trained model". Writes config.json, model.safetensors, porting.json and the tokenizer files.
    """
    console = Console(stderr=True)
    try:
        check_output_dir(output)
        architecture = _architecture(config_file, config_small, qwen_dir)
        with console.status(f"Porting {qwen_dir}"):
            out = port_checkpoint(
                qwen_dir,
                output,
                architecture,
                expert_noise=expert_noise,
                seed=seed,
                calibration_tokens=calibration_tokens,
                dtype=None if dtype is DType.source else getattr(mx, dtype.value),
            )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    report = json.loads((out / "porting.json").read_text())
    layers = ", ".join(f"{i}<-{j}" for i, j in report["layer_sources"].items())
    console.print(f"Saved Bit-Axon model to {out} (Bit-Axon layer <- Qwen layer: {layers})")
