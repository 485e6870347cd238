"""``bit-axon train``: the training pipeline of the guide, steps 1-10."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

BASE_MODEL_DIR = "base_model"


class TrainingMode(str, Enum):
    sft = "sft"
    orpo = "orpo"


class DataFormat(str, Enum):
    messages = "messages"
    alpaca = "alpaca"
    orpo = "orpo"


class QuantizeMode(str, Enum):
    nf4 = "nf4"
    affine = "affine"
    none = "none"


def build_model(model_weights: Path | None, config_small: bool, config, seed: int, console: Console):
    """Steps 1-5: the model, quantized to the configured bits/mode unless it already is, with adapters."""
    from bit_axon import BitAxonConfig, BitAxonModel
    from bit_axon.loading import load_model, save_model
    from bit_axon.quantization import quantize_model
    from bit_axon.training.lora import apply_lora_to_model

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
    else:
        if model_weights is None:
            raise typer.BadParameter("--model-weights is required (or pass --config-small)", param_hint="--model-weights")
        with console.status(f"Loading {model_weights}"):
            model = load_model(model_weights)
    if model.config.quantization is None and config.quantize_mode != "none":
        with console.status(f"Quantizing base weights ({config.quantize_mode}, {config.quantize_bits}-bit)"):
            quantize_model(model, bits=config.quantize_bits, group_size=config.quantize_group_size, mode=config.quantize_mode)
    wrapped = apply_lora_to_model(
        model, rank=config.lora_rank, dropout=config.lora_dropout, scale=config.lora_scale, use_dora=config.use_dora
    )
    mx.eval(model.parameters())
    console.print(f"{'DoRA' if config.use_dora else 'LoRA'} rank {config.lora_rank} on {len(wrapped)} layers")
    return model


def run_training(
    data: Path,
    config,
    *,
    model_weights: Path | None = None,
    config_small: bool = False,
    tokenizer: str = "Qwen/Qwen2.5-3B",
    val_data: Path | None = None,
    data_format: str | None = None,
    thermal: bool = True,
    resume: bool = False,
    console: Console | None = None,
    model=None,
) -> dict[str, Any]:
    """Build everything the config describes and train; returns the trainer's result dict."""
    from bit_axon.tokenizer import QwenTokenizerWrapper
    from bit_axon.training.cooling import ThermalPolicy, build_cooling_scheduler
    from bit_axon.training.data import load_dataset_file
    from bit_axon.training.orpo_trainer import ORPOTrainer
    from bit_axon.training.trainer import Trainer

    console = console or Console()
    tok = QwenTokenizerWrapper(tokenizer)
    dataset = load_dataset_file(data, tok, config.max_seq_len, format=data_format)
    val_dataset = load_dataset_file(val_data, tok, config.max_seq_len, format=data_format) if val_data else None
    is_preference = type(dataset).__name__ == "ORPODataset"
    if is_preference != (config.training_mode == "orpo"):
        raise ValueError(
            f"{data} holds {'preference pairs' if is_preference else 'SFT examples'} but the training mode is "
            f"{config.training_mode}; use --training-mode {'orpo' if is_preference else 'sft'}"
        )
    if model is None:
        model = build_model(model_weights, config_small, config, config.seed, console)
    policy = ThermalPolicy(max_speed_temp=config.temp_max_speed, pause_temp=config.temp_pause, stop_temp=config.temp_stop)
    cooling = build_cooling_scheduler(thermal, policy, poll_interval=config.temp_poll_interval)
    trainer_cls = ORPOTrainer if config.training_mode == "orpo" else Trainer
    trainer = trainer_cls(model, config, dataset, val_dataset, cooling_scheduler=cooling, console=console)
    try:
        return trainer.train(resume=resume)
    finally:
        if cooling is not None:
            cooling.close()


def print_summary(result: dict[str, Any], console: Console) -> None:
    table = Table(title="Training summary", show_header=False)
    keys = [
        "step", "loss", "val_loss", "val_perplexity", "grad_norm", "chosen_reward", "rejected_reward",
        "reward_margin", "reward_accuracy", "tokens_per_sec", "peak_memory_gb", "nonfinite_steps",
        "total_pause_time", "total_cooldown_time", "elapsed_sec", "adapter_path",
    ]
    for key in keys:
        if key in result and result[key] is not None:
            value = result[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def train(
    data: Path = typer.Argument(..., help="Training data: JSONL (or JSON list) of chat messages, Alpaca or preference pairs."),
    model_weights: Path | None = typer.Option(None, "--model-weights", "-w", help="Path to model weights directory."),
    tokenizer: str = typer.Option("Qwen/Qwen2.5-3B", "--tokenizer", "-t", help="Tokenizer identifier or path."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation JSONL file."),
    data_format: DataFormat | None = typer.Option(None, "--format", help="Data format (detected from the file by default)."),
    training_mode: TrainingMode | None = typer.Option(
        None, "--training-mode", help="sft or orpo (default: orpo for preference data, else sft)."
    ),
    beta: float = typer.Option(0.1, "--beta", help="ORPO preference strength."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="Adapter rank."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Adapter dropout."),
    lora_scale: float = typer.Option(20.0, "--lora-scale", help="Adapter scaling."),
    no_dora: bool = typer.Option(False, "--no-dora", help="Use LoRA instead of DoRA."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", "-lr", help="Peak learning rate."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    max_steps: int = typer.Option(10_000, "--max-steps", help="Total training steps."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences per batch."),
    grad_accum_steps: int = typer.Option(4, "--grad-accum-steps", help="Gradient accumulation."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Maximum sequence length."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", help="Warmup steps."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping."),
    seed: int = typer.Option(42, "--seed", help="Random seed."),
    quantize_bits: int = typer.Option(4, "--quantize-bits", help="Base weight bits (when the model is not quantized yet)."),
    quantize_group_size: int = typer.Option(64, "--quantize-group-size", help="Quantization group size."),
    quantize_mode: QuantizeMode = typer.Option(QuantizeMode.nf4, "--quantize-mode", help="nf4, affine or none."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute layers in the backward pass (less memory)."),
    memory_limit_gb: float = typer.Option(
        None, "--memory-limit-gb", help="MLX memory limit for the run: lower peak memory, somewhat slower steps."
    ),
    no_thermal: bool = typer.Option(False, "--no-thermal", help="Disable thermal monitoring."),
    temp_pause: float = typer.Option(85.0, "--temp-pause", help="Pause threshold (°C)."),
    temp_stop: float = typer.Option(95.0, "--temp-stop", help="Stop threshold (°C)."),
    output_dir: Path = typer.Option(Path("checkpoints"), "--output-dir", "-o", help="Checkpoint directory."),
    save_every: int = typer.Option(500, "--save-every", help="Checkpoint interval."),
    eval_every: int = typer.Option(500, "--eval-every", help="Evaluation interval."),
    resume: bool = typer.Option(False, "--resume", help="Resume from latest checkpoint."),
    config_small: bool = typer.Option(False, "--config-small", help="Use small model for testing."),
) -> None:
    """Fine-tune with 4-bit frozen base weights and LoRA/DoRA adapters (SFT or ORPO)."""
    from bit_axon.training.config import TrainingConfig
    from bit_axon.training.cooling import ThermalShutdownError
    from bit_axon.training.data import DatasetError, detect_format
    from bit_axon.training.trainer import NonFiniteLossError

    import mlx.core as mx

    # Under mlx.launch every rank runs this command; only rank 0 talks.
    console = Console(quiet=mx.distributed.init().rank() != 0)
    try:
        if not data.exists():
            raise FileNotFoundError(f"Training data not found: {data}")
        fmt = data_format.value if data_format else detect_format(data)
        mode = training_mode.value if training_mode else ("orpo" if fmt == "orpo" else "sft")
        config = TrainingConfig(
            learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=min(warmup_steps, max_steps),
            max_steps=max_steps, max_grad_norm=max_grad_norm, grad_accum_steps=grad_accum_steps,
            lora_rank=lora_rank, lora_dropout=lora_dropout, lora_scale=lora_scale, use_dora=not no_dora,
            beta=beta, training_mode=mode, quantize_bits=quantize_bits, quantize_group_size=quantize_group_size,
            quantize_mode=quantize_mode.value, batch_size=batch_size, max_seq_len=max_seq_len,
            save_every=save_every, eval_every=eval_every, output_dir=str(output_dir),
            temp_pause=temp_pause, temp_stop=temp_stop,
            temp_max_speed=min(75.0, temp_pause - 1.0), seed=seed, grad_checkpoint=grad_checkpoint,
            memory_limit_gb=memory_limit_gb,
        )
        result = run_training(
            data, config, model_weights=model_weights, config_small=config_small, tokenizer=tokenizer,
            val_data=val_data, data_format=fmt, thermal=not no_thermal, resume=resume, console=console,
        )
    except ThermalShutdownError as err:
        console.print(f"[red]Thermal stop: {err}[/red]\nThe last checkpoint in {output_dir} is intact; "
                      "let the machine cool, then rerun with --resume.")
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError, DatasetError, NonFiniteLossError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    print_summary(result, console)
    console.print(f"Adapter: {result['adapter_path']}")
