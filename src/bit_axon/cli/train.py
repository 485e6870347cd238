"""``bit-axon train``: the training pipeline of the guide, steps 1-10."""

from __future__ import annotations

import inspect
import logging
import os
import re
import shlex
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any

from bit_axon.cli.options import Flag, flag_name, given_settings, settings_options
from bit_axon.cli.paths import check_output_dir, check_run_dir
from bit_axon.cli.run_errors import RunErrors
from bit_axon.cli.settings_file import read_settings_file, write_settings_file
from bit_axon.tokenizer import DEFAULT_TOKENIZER
from bit_axon.training.config import QUANTIZE_MODES, REPORT_TO, TRAINING_MODES, SettingError, TrainingConfig
from bit_axon.training.data import FORMATS, ORPODataset
from bit_axon.training.orpo_loss import ORPO_FORMS

import typer
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

BASE_MODEL_DIR = "base_model"
RUN_SETTINGS_FILE = "train_config.yaml"  # in the output dir: the resolved settings of the run

# The settings-file keys of the command's own options (snake_case flag name -> parameter); the other
# keys are TrainingConfig's fields. Not in a file: what is about one invocation only.
FILE_OPTIONS = {
    "data": "data", "model_weights": "model_weights", "config_small": "config_small", "tokenizer": "tokenizer",
    "val_data": "val_data", "format": "data_format", "no_thermal": "no_thermal",
}
INPUT_PATHS = ("data", "model_weights", "val_data", "tokenizer")  # written absolute when they are local paths
NOT_IN_FILE = {
    "resume": "is not a setting of the run; pass --resume on the command line",
    "dry_run": "is not a setting of the run; pass --dry-run on the command line",
    "config": "a settings file cannot name another one",
}

DataFormat = Enum("DataFormat", {f: f for f in FORMATS}, type=str)

# How each TrainingConfig field appears on the command line; names, types and defaults come from
# TrainingConfig. Flags are the guide's, plus one for every other setting.
CONFIG_FLAGS = {
    "learning_rate": Flag("Peak learning rate.", "-lr"),
    "weight_decay": Flag("AdamW weight decay."),
    "warmup_steps": Flag("Warmup steps (the default is cut to --max-steps for shorter runs)."),
    "max_steps": Flag("Total training steps."),
    "epochs": Flag("Passes over the packed training set (instead of --max-steps).", show_default=False),
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
    "keep_checkpoints": Flag("Step checkpoints to keep (the best one is never deleted)."),
    "early_stopping_patience": Flag("Stop after N evaluations without a better validation loss.", show_default=False),
    "eval_prompts": Flag("File of prompts answered greedily at each evaluation (default: validation prompts).",
                         show_default=False),
    "eval_samples": Flag("Prompts answered at each evaluation (0: none)."),
    "sample_max_tokens": Flag("Tokens per sample answer."),
    "report_to": Flag("Experiment tracker.", choices=REPORT_TO),
    "log_every": Flag("Steps between progress lines when the output is not a terminal."),
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
    # The adapters' initial values come from the seed too, whatever drew random numbers before (a
    # fresh model's init, an earlier run in this process), so a run is repeated by its settings.
    mx.random.seed(seed)
    wrapped = apply_adapters(model, adapters)
    mx.eval(model.parameters())
    console.print(f"{'DoRA' if adapters.use_dora else 'LoRA'} rank {adapters.rank} on {len(wrapped)} layers")
    return model


def training_tokenizer(model_weights: Path | None, tokenizer: str):
    """The tokenizer a run trains with: the model's own (GGUF metadata, tokenizer files, or the
    ``tokenizer.json`` a ported or distilled Bit-Axon directory carries; else the bundled Qwen2.5
    one) unless ``--tokenizer`` names another than the default."""
    from bit_axon.loading import load_tokenizer
    from bit_axon.tokenizer import QwenTokenizerWrapper

    if model_weights is not None and tokenizer == DEFAULT_TOKENIZER:
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
    dry_run: bool = False,
) -> dict[str, Any] | None:
    """Build everything the config describes and train; returns the trainer's result dict.

    Writes the run's settings to ``OUT/train_config.yaml`` first. ``dry_run`` builds the data and
    the model, prints the memory estimate and returns None: nothing is trained or written."""
    from bit_axon.loading import check_tokenizer_fits
    from bit_axon.training.cooling import build_cooling_scheduler
    from bit_axon.training.data import load_dataset_file
    from bit_axon.training.orpo_trainer import ORPOTrainer
    from bit_axon.training.trainer import Trainer

    import mlx.core as mx

    console = console or Console()
    if not dry_run and mx.distributed.init().rank() == 0:
        write_run_settings(config, {
            "data": data, "model_weights": None if config_small else model_weights, "config_small": config_small,
            "tokenizer": tokenizer, "val_data": val_data, "format": data_format, "no_thermal": not thermal,
        })
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
    print_memory_estimate(model, config, console)
    if dry_run:
        return None
    cooling = build_cooling_scheduler(thermal, config.thermal_policy())
    trainer_cls = ORPOTrainer if config.training_mode == "orpo" else Trainer
    # The samples at each evaluation generate with inference's code (training does not import it).
    from bit_axon.inference import generate

    # The packing separator and padding are the tokenizer's, carried by the dataset.
    trainer = trainer_cls(
        model, config, dataset, val_dataset, cooling_scheduler=cooling, console=console,
        eos_token_id=dataset.eos_token_id, pad_token_id=dataset.pad_token_id, tokenizer=tok, generate=generate,
    )
    try:
        return trainer.train(resume=resume)
    finally:
        if cooling is not None:
            cooling.close()


def print_memory_estimate(model, config: TrainingConfig, console: Console) -> None:
    """The estimated training peak against the machine's memory, with a warning when it will not fit."""
    from bit_axon.training.memory import available_memory_bytes, describe_memory, estimate_training_memory

    for line in describe_memory(estimate_training_memory(model, config), available_memory_bytes()):
        console.print(line, highlight=False, soft_wrap=True)


def _absolute(path: str | Path | None) -> str | Path | None:
    """A local path made absolute (the settings file then works from any folder); a hub id as it is."""
    return Path(path).resolve() if path is not None and Path(path).exists() else path


def write_run_settings(config: TrainingConfig, options: dict[str, Any]) -> Path:
    """``OUT/train_config.yaml``: the command's ``options`` and every resolved setting of ``config``,
    which ``bit-axon train --config`` (and ``--resume``) read back into the same run."""
    path = Path(config.output_dir) / RUN_SETTINGS_FILE
    local = {k: _absolute(v) if k in INPUT_PATHS else v for k, v in options.items()}
    write_settings_file(path, {**local, **config.to_dict()}, header=(
        f"The resolved settings of a bit-axon train run. `bit-axon train --config {path}` repeats it;\n"
        f"`bit-axon train --resume -o {config.output_dir}` continues it (flags given override these)."
    ))
    return path


def print_summary(result: dict[str, Any], console: Console) -> None:
    table = Table(title="Training summary", show_header=False)
    keys = [
        "step", "loss", "val_loss", "val_perplexity", "grad_norm", "chosen_reward", "rejected_reward",
        "reward_margin", "reward_accuracy", "tokens_per_sec", "peak_memory_gb", "nonfinite_steps", "empty_steps",
        "total_pause_time", "total_cooldown_time", "elapsed_sec", "best_val_loss", "best_step", "adapter_path",
        "best_adapter_path",
    ]
    for key in keys:
        if key in result and result[key] is not None:
            value = result[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"  # by name: typer has its own copy of click


def _file_annotations() -> dict[str, Any]:
    """Settings-file key -> the type its flag takes (the command's own options, then TrainingConfig's)."""
    params = inspect.signature(train).parameters
    return {key: params[name].annotation for key, name in FILE_OPTIONS.items()} | {
        f.name: params[f.name].annotation for f in fields(TrainingConfig)
    }


def _setting_message(err: SettingError, flags: set[str], settings_file: Path | None, from_file: set[str]) -> str:
    """``err`` in the names the user gave: ``--lora-rank: ...`` for a flag, ``run.yaml: lora_rank: ...``
    for a key of the settings file."""
    known = sorted((f.name for f in fields(TrainingConfig)), key=len, reverse=True)
    mentioned = [err.field] if err.field else re.findall(rf"\b({'|'.join(known)})\b", err.problem)
    if settings_file is not None and any(f in from_file and f not in flags for f in mentioned):
        return f"{settings_file}: {err.field}: {err.problem}" if err.field else f"{settings_file}: {err.problem}"
    problem = re.sub(rf"\b({'|'.join(known)})\b", lambda m: flag_name(TrainingConfig, CONFIG_FLAGS, m[1]), err.problem)
    return f"{flag_name(TrainingConfig, CONFIG_FLAGS, err.field)}: {problem}" if err.field else problem


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is a directory; give the data file")
    if not os.access(path, os.R_OK):
        raise FileNotFoundError(f"{what} {path} is not readable; check its permissions")


def check_inputs(data: Path, val_data: Path | None, model_weights: Path | None, config_small: bool,
                 eval_prompts: str | None = None) -> None:
    """What can be checked in a moment, before any data is tokenized or model loaded: the files
    exist and are readable, the model path holds a model (or reads as a hub id)."""
    from bit_axon.loading import model_source

    _check_readable(data, "Training data")
    if val_data is not None:
        _check_readable(val_data, "--val-data")
    if eval_prompts is not None:
        _check_readable(Path(eval_prompts), "--eval-prompts")
    if config_small:
        return
    if model_weights is None:
        raise ValueError("--model-weights is required (or pass --config-small)")
    try:
        model_source(model_weights)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--model-weights: {err}") from None


@settings_options(TrainingConfig, CONFIG_FLAGS)
def train(
    ctx: typer.Context,
    data: Path | None = typer.Argument(
        None, show_default=False,
        help="Training data: JSONL (or JSON list) of chat messages, Alpaca or preference pairs (or `data:` in --config).",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML file of these options in snake_case (lora_rank: 16); flags given override it."
    ),
    model_weights: Path | None = typer.Option(
        None, "--model-weights", "-w", help="Model: a Bit-Axon or Hugging Face directory, a .gguf file or a hub id."
    ),
    tokenizer: str = typer.Option(DEFAULT_TOKENIZER, "--tokenizer", "-t", help="Tokenizer identifier or path."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation JSONL file."),
    data_format: DataFormat | None = typer.Option(None, "--format", help="Data format (detected from the file by default)."),
    no_thermal: bool = typer.Option(False, "--no-thermal", help="Disable thermal monitoring."),
    resume: bool = typer.Option(
        False, "--resume", help=f"Resume from the latest checkpoint in --output-dir, with its {RUN_SETTINGS_FILE}."
    ),
    config_small: bool = typer.Option(False, "--config-small", help="Use small model for testing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build the model and data, print the memory estimate, exit."),
    **settings: Any,
) -> None:
    """Fine-tune with 4-bit frozen base weights and LoRA/DoRA adapters (SFT or ORPO)."""
    from bit_axon.training.data import detect_format

    import mlx.core as mx

    # Under mlx.launch every rank runs this command; only rank 0 talks.
    console = Console(quiet=mx.distributed.init().rank() != 0)
    own = {"data": data, "model_weights": model_weights, "tokenizer": tokenizer, "val_data": val_data,
           "data_format": data_format.value if data_format else None, "no_thermal": no_thermal,
           "config_small": config_small}
    flags = given_settings(ctx, TrainingConfig, settings)
    settings_file, from_file = config, {}
    if settings_file is None and resume:
        # A resumed run takes the settings it recorded; the flags given change them (and the resume says so).
        recorded = Path(flags.get("output_dir", TrainingConfig.output_dir)) / RUN_SETTINGS_FILE
        settings_file = recorded if recorded.is_file() else None
    with RunErrors(console) as errors:
        if settings_file is not None:
            from_file = read_settings_file(settings_file, _file_annotations(), NOT_IN_FILE)
        if settings_file is not None and config is None:
            console.print(f"Settings from {settings_file} (the flags given override them).", highlight=False,
                          soft_wrap=True)
        for key, name in FILE_OPTIONS.items():
            if key in from_file:
                value = from_file.pop(key)
                if not _from_command_line(ctx, name):
                    own[name] = value
        if own["data"] is None:
            raise ValueError("no training data: give DATA (or `data:` in the --config file)")
        overrides = {**from_file, **flags}
        output_dir = errors.output_dir = Path(overrides.get("output_dir", TrainingConfig.output_dir))
        check_run_dir(output_dir, resume=resume)
        check_inputs(Path(own["data"]), own["val_data"], own["model_weights"], own["config_small"],
                     overrides.get("eval_prompts"))
        fmt = own["data_format"] or detect_format(own["data"])
        overrides.setdefault("training_mode", "orpo" if fmt == "orpo" else "sft")
        if "temp_pause" in overrides and "temp_max_speed" not in overrides:
            # The guide's CLI has no warm threshold: a low --temp-pause moves the warm zone down with it.
            overrides["temp_max_speed"] = min(TrainingConfig.temp_max_speed, overrides["temp_pause"] - 1.0)
        try:
            run_config = TrainingConfig(**overrides)
        except SettingError as err:
            raise ValueError(_setting_message(err, set(flags), settings_file, set(from_file))) from None
        check_output_dir(output_dir, inputs=[own["model_weights"]] if own["model_weights"] else [],
                         option="--output-dir", can_overwrite=False)
        result = run_training(
            Path(own["data"]), run_config, model_weights=own["model_weights"], config_small=own["config_small"],
            tokenizer=own["tokenizer"], val_data=own["val_data"], data_format=fmt, thermal=not own["no_thermal"],
            resume=resume, console=console, dry_run=dry_run,
        )
    if result is None:
        console.print("Dry run: nothing was trained.")
        return
    if result.get("interrupted"):
        where = result.get("checkpoint") or output_dir
        console.print(
            f"Interrupted at step {result['step']}; checkpoint saved in {where}. Resume with: "
            f"{shlex.join(['bit-axon', 'train', '--resume', '-o', str(output_dir)])}", highlight=False, soft_wrap=True,
        )
        raise typer.Exit(130)
    print_summary(result, console)
    console.print(f"Adapter: {result['adapter_path']}", highlight=False, soft_wrap=True)
