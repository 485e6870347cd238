"""``bit-axon train``: the training pipeline of the guide, steps 1-10."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

from bit_axon.cli.options import Flag, given_settings, settings_options
from bit_axon.cli.paths import check_output_dir
from bit_axon.tokenizer import DEFAULT_TOKENIZER
from bit_axon.training.config import QUANTIZE_MODES, TRAINING_MODES, TrainingConfig
from bit_axon.training.data import FORMATS, ORPODataset
from bit_axon.training.orpo_loss import ORPO_FORMS

import typer
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

BASE_MODEL_DIR = "base_model"

DataFormat = Enum("DataFormat", {f: f for f in FORMATS}, type=str)

# How each TrainingConfig field appears on the command line; names, types and defaults come from
# TrainingConfig. Flags are the guide's, plus one for every other setting.
CONFIG_FLAGS = {
    "learning_rate": Flag("Peak learning rate.", "-lr"),
    "weight_decay": Flag("AdamW weight decay."),
    "warmup_steps": Flag("Warmup steps (the default is cut to --max-steps for shorter runs)."),
    "max_steps": Flag("Total training steps."),
    "max_grad_norm": Flag("Gradient clipping."),
    "grad_accum_steps": Flag("Gradient accumulation."),
    "lora_rank": Flag("Adapter rank."),
    "lora_dropout": Flag("Adapter dropout."),
    "lora_scale": Flag("Adapter scaling."),
    "use_dora": Flag("Use LoRA instead of DoRA.", name="--no-dora"),
    "beta": Flag("ORPO preference strength."),
    "orpo_form": Flag(
        "ORPO penalty: guide = -log sigmoid(beta * log-odds ratio); paper = -beta * log sigmoid(log-odds ratio) "
        "(the ORPO paper's and TRL's: the same --beta means something else).", choices=ORPO_FORMS
    ),
    "training_mode": Flag(
        "sft or orpo (default: orpo for preference data, else sft).", choices=TRAINING_MODES, show_default=False
    ),
    "quantize_bits": Flag("Base weight bits (when the model is not quantized yet)."),
    "quantize_group_size": Flag("Quantization group size."),
    "quantize_mode": Flag("nf4, affine or none.", choices=QUANTIZE_MODES),
    "batch_size": Flag("Sequences per batch."),
    "max_seq_len": Flag("Maximum sequence length."),
    "save_every": Flag("Checkpoint interval."),
    "eval_every": Flag("Evaluation interval."),
    "output_dir": Flag("Checkpoint directory.", "-o"),
    "keep_checkpoints": Flag("Step checkpoints to keep."),
    "temp_max_speed": Flag("Warm-zone threshold (°C); unless given, kept 1 °C below a lower --temp-pause."),
    "temp_pause": Flag("Pause threshold (°C)."),
    "temp_stop": Flag("Stop threshold (°C)."),
    "temp_poll_interval": Flag("Seconds between temperature reads."),
    "seed": Flag("Random seed."),
    "grad_checkpoint": Flag("Recompute layers in the backward pass (less memory)."),
    "memory_limit_gb": Flag("MLX memory limit for the run: lower peak memory, somewhat slower steps."),
    "max_eval_batches": Flag("Validation batches per evaluation (default: all)."),
    "max_nonfinite_steps": Flag("Consecutive non-finite losses before the run stops."),
}


def build_model(model_weights: Path | None, config_small: bool, config: TrainingConfig, seed: int, console: Console):
    """Steps 1-5: the model (any source ``bit_axon.loading`` reads), its float base quantized to the
    configured bits/mode (an already quantized base, e.g. a Q4 GGUF file, is kept as it is), with adapters."""
    from bit_axon import BitAxonConfig, BitAxonModel
    from bit_axon.loading import load_model, save_model
    from bit_axon.quantization import base_quantization, quantize_model
    from bit_axon.training.lora import apply_adapters

    import mlx.core as mx

    if config_small:
        mx.random.seed(seed)
        model = BitAxonModel(BitAxonConfig.small())
        mx.eval(model.parameters())
        # A fresh model has no directory of its own: keep one so the adapter can be run and merged.
        # Every rank of a data-parallel run builds the same weights from the seed; rank 0 saves them.
        base_dir = Path(config.output_dir) / BASE_MODEL_DIR
        if (base_dir / "config.json").exists():
            model = load_model(base_dir)
        elif mx.distributed.init().rank() == 0:
            save_model(model, base_dir)
        model.source = str(base_dir)  # what the adapter file records as its base
    else:
        if model_weights is None:
            raise typer.BadParameter("--model-weights is required (or pass --config-small)", param_hint="--model-weights")
        with console.status(f"Loading {model_weights}"):
            model = load_model(model_weights)
    spec = config.quantization_spec()
    if base_quantization(model) is None and spec is not None:
        with console.status(f"Quantizing base weights ({spec['mode']}, {spec['bits']}-bit)"):
            quantize_model(model, **spec)
    adapters = config.adapter_config()
    wrapped = apply_adapters(model, adapters)
    mx.eval(model.parameters())
    console.print(f"{'DoRA' if adapters.use_dora else 'LoRA'} rank {adapters.rank} on {len(wrapped)} layers")
    return model


def training_tokenizer(model_weights: Path | None, tokenizer: str):
    """The tokenizer a run trains with: a pretrained model's own (GGUF metadata, tokenizer files)
    unless ``--tokenizer`` names another than the default; for a Bit-Axon model, ``--tokenizer``."""
    from bit_axon.loading import BIT_AXON, load_tokenizer, model_source
    from bit_axon.tokenizer import QwenTokenizerWrapper

    if model_weights is not None and tokenizer == DEFAULT_TOKENIZER and model_source(model_weights) != BIT_AXON:
        return load_tokenizer(model_weights)
    return QwenTokenizerWrapper(tokenizer)


def run_training(
    data: Path,
    config: TrainingConfig,
    *,
    model_weights: Path | None = None,
    config_small: bool = False,
    tokenizer: str = DEFAULT_TOKENIZER,
    val_data: Path | None = None,
    data_format: str | None = None,
    thermal: bool = True,
    resume: bool = False,
    console: Console | None = None,
    model=None,
) -> dict[str, Any]:
    """Build everything the config describes and train; returns the trainer's result dict."""
    from bit_axon.loading import check_tokenizer_fits
    from bit_axon.training.cooling import build_cooling_scheduler
    from bit_axon.training.data import load_dataset_file
    from bit_axon.training.orpo_trainer import ORPOTrainer
    from bit_axon.training.trainer import Trainer

    console = console or Console()
    tok = training_tokenizer(None if config_small else model_weights, tokenizer)
    dataset = load_dataset_file(data, tok, config.max_seq_len, format=data_format)
    val_dataset = load_dataset_file(val_data, tok, config.max_seq_len, format=data_format) if val_data else None
    is_preference = isinstance(dataset, ORPODataset)
    if is_preference != (config.training_mode == "orpo"):
        raise ValueError(
            f"{data} holds {'preference pairs' if is_preference else 'SFT examples'} but the training mode is "
            f"{config.training_mode}; use --training-mode {'orpo' if is_preference else 'sft'}"
        )
    if model is None:
        model = build_model(model_weights, config_small, config, config.seed, console)
    check_tokenizer_fits(model, tok)
    cooling = build_cooling_scheduler(thermal, config.thermal_policy())
    trainer_cls = ORPOTrainer if config.training_mode == "orpo" else Trainer
    # The packing separator and padding are the tokenizer's, carried by the dataset.
    trainer = trainer_cls(
        model, config, dataset, val_dataset, cooling_scheduler=cooling, console=console,
        eos_token_id=dataset.eos_token_id, pad_token_id=dataset.pad_token_id,
    )
    try:
        return trainer.train(resume=resume)
    finally:
        if cooling is not None:
            cooling.close()


def print_summary(result: dict[str, Any], console: Console) -> None:
    table = Table(title="Training summary", show_header=False)
    keys = [
        "step", "loss", "val_loss", "val_perplexity", "grad_norm", "chosen_reward", "rejected_reward",
        "reward_margin", "reward_accuracy", "tokens_per_sec", "peak_memory_gb", "nonfinite_steps", "empty_steps",
        "total_pause_time", "total_cooldown_time", "elapsed_sec", "adapter_path",
    ]
    for key in keys:
        if key in result and result[key] is not None:
            value = result[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@settings_options(TrainingConfig, CONFIG_FLAGS)
def train(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Training data: JSONL (or JSON list) of chat messages, Alpaca or preference pairs."),
    model_weights: Path | None = typer.Option(
        None, "--model-weights", "-w", help="Model: a Bit-Axon or Hugging Face directory, a .gguf file or a hub id."
    ),
    tokenizer: str = typer.Option(DEFAULT_TOKENIZER, "--tokenizer", "-t", help="Tokenizer identifier or path."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation JSONL file."),
    data_format: DataFormat | None = typer.Option(None, "--format", help="Data format (detected from the file by default)."),
    no_thermal: bool = typer.Option(False, "--no-thermal", help="Disable thermal monitoring."),
    resume: bool = typer.Option(False, "--resume", help="Resume from latest checkpoint."),
    config_small: bool = typer.Option(False, "--config-small", help="Use small model for testing."),
    **settings: Any,
) -> None:
    """Fine-tune with 4-bit frozen base weights and LoRA/DoRA adapters (SFT or ORPO)."""
    from bit_axon.training.callbacks import TrainingError  # non-finite losses, no targets, a failed save
    from bit_axon.training.cooling import ThermalShutdownError
    from bit_axon.training.data import DatasetError, detect_format

    import mlx.core as mx

    # Under mlx.launch every rank runs this command; only rank 0 talks.
    console = Console(quiet=mx.distributed.init().rank() != 0)
    overrides = given_settings(ctx, TrainingConfig, settings)
    output_dir = overrides.get("output_dir", TrainingConfig.output_dir)
    try:
        if not data.exists():
            raise FileNotFoundError(f"Training data not found: {data}")
        check_output_dir(Path(output_dir), inputs=[model_weights] if model_weights else [], option="--output-dir",
                         can_overwrite=False)
        fmt = data_format.value if data_format else detect_format(data)
        overrides.setdefault("training_mode", "orpo" if fmt == "orpo" else "sft")
        if "temp_pause" in overrides and "temp_max_speed" not in overrides:
            # The guide's CLI has no warm threshold: a low --temp-pause moves the warm zone down with it.
            overrides["temp_max_speed"] = min(TrainingConfig.temp_max_speed, overrides["temp_pause"] - 1.0)
        config = TrainingConfig(**overrides)
        result = run_training(
            data, config, model_weights=model_weights, config_small=config_small, tokenizer=tokenizer,
            val_data=val_data, data_format=fmt, thermal=not no_thermal, resume=resume, console=console,
        )
    except ThermalShutdownError as err:
        console.print(f"[red]Thermal stop: {err}[/red]\nThe last checkpoint in {output_dir} is intact; "
                      "let the machine cool, then rerun with --resume.")
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError, DatasetError, TrainingError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    print_summary(result, console)
    console.print(f"Adapter: {result['adapter_path']}")
