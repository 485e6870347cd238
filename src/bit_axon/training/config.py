"""TrainingConfig: every setting of a fine-tuning run, as the guide names them, flat.

Each group of fields belongs to the dataclass or function that uses it, which holds its default and
its validation: the adapter fields to ``AdapterConfig`` (``adapter_config()``), the thermal thresholds
to ``ThermalPolicy`` (``thermal_policy()``), the quantization fields to
``bit_axon.quantization.quantization_spec``. ``TrainingConfig`` takes its defaults from them and asks
them to validate, renaming their fields to its own in the message. ``to_dict``/``from_dict`` round-trip
(checkpoints record the resolved settings); the CLI's options are generated from the fields.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from bit_axon.quantization import DEFAULT_MODE, QUANT_MODES, quantization_spec
from bit_axon.training.cooling import ThermalPolicy
from bit_axon.training.lora import AdapterConfig
from bit_axon.training.orpo_loss import GUIDE_FORM, ORPO_FORMS
from bit_axon.training.packing import check_max_seq_len

logger = logging.getLogger(__name__)

TRAINING_MODES = ("sft", "orpo")
REPORT_TO = ("none", "wandb", "tensorboard")  # experiment trackers (bit_axon.training.tracking)
NO_QUANTIZATION = "none"  # train on the base weights as they are (a float base stays float)
QUANTIZE_MODES = (*QUANT_MODES, NO_QUANTIZATION)

# TrainingConfig field -> the owning dataclass's (or spec's) field of the same setting.
ADAPTER_FIELDS = {"lora_rank": "rank", "lora_scale": "scale", "lora_dropout": "dropout"}
THERMAL_FIELDS = {
    "temp_max_speed": "max_speed_temp", "temp_pause": "pause_temp", "temp_stop": "stop_temp",
    "temp_poll_interval": "poll_interval",
}
QUANTIZE_FIELDS = {"quantize_mode": "mode", "quantize_bits": "bits", "quantize_group_size": "group_size"}

T = TypeVar("T")


class SettingError(ValueError):
    """A bad ``TrainingConfig`` value. ``field`` is the setting it is about (None for a rule that ties
    several, all named in ``problem``); ``problem`` says what is wrong without naming ``field`` again,
    so a front end can put its own name for the setting first (the CLI's ``--lora-rank: ...``)."""

    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"TrainingConfig: {field} {problem}" if field else f"TrainingConfig: {problem}")


def _owned(build: Callable[[], T], names: Mapping[str, str]) -> T:
    """``build()``, its ValueError re-raised as a ``SettingError`` in ``TrainingConfig``'s field names."""
    try:
        return build()
    except ValueError as err:
        message = str(err)
        for ours, theirs in names.items():
            message = re.sub(rf"\b{theirs}\b", ours, message)
        # "Adapter lora_rank must be ..." (once renamed) is about that one setting.
        for ours in names:
            if match := re.match(rf"(?:[A-Z]\w* )?{ours} (.+)", message, re.S):
                raise SettingError(ours, match.group(1)) from None
        raise SettingError(None, message) from None


@dataclass
class TrainingConfig:
    # Optimizer
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100  # the default is cut to max_steps for shorter runs, with a warning
    max_steps: int = 10_000
    epochs: int | None = None  # instead of max_steps: passes over the packed training set
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 4
    # LoRA / DoRA
    lora_rank: int = AdapterConfig.rank
    lora_dropout: float = AdapterConfig.dropout
    lora_scale: float = AdapterConfig.scale
    use_dora: bool = AdapterConfig.kind == "dora"
    # ORPO alignment
    beta: float = 0.1
    orpo_form: str = GUIDE_FORM  # how beta enters the penalty (bit_axon.training.orpo_loss)
    training_mode: str = "sft"
    # Quantization of a float base before the adapters go on
    quantize_bits: int = 4
    quantize_group_size: int = 64
    quantize_mode: str = DEFAULT_MODE
    # Data
    batch_size: int = 1
    max_seq_len: int = 2048
    # Checkpointing
    save_every: int = 500
    eval_every: int = 500
    output_dir: str = "checkpoints"
    keep_checkpoints: int = 3
    early_stopping_patience: int | None = None  # evaluations without a better val_loss before stopping
    # Samples at each evaluation: greedy answers to the prompts of this file (default: the first
    # eval_samples validation prompts), printed and written to metrics.jsonl.
    eval_prompts: str | None = None
    eval_samples: int = 3
    sample_max_tokens: int = 48
    # Tracking
    report_to: str = "none"
    log_every: int = 10  # steps between plain progress lines when the output is not a terminal
    # Thermal thresholds (°C)
    temp_max_speed: float = ThermalPolicy.max_speed_temp
    temp_pause: float = ThermalPolicy.pause_temp
    temp_stop: float = ThermalPolicy.stop_temp
    temp_poll_interval: float = ThermalPolicy.poll_interval
    # Misc
    seed: int = 42
    grad_checkpoint: bool = False  # recompute each layer in the backward pass (less memory, slower)
    # MLX's evaluation memory limit for the run (mx.set_memory_limit). Above it, MLX waits for
    # queued operations to finish before allocating more: lower peaks, somewhat slower steps.
    memory_limit_gb: float | None = None
    max_eval_batches: int | None = None  # None evaluates the whole validation set
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        if self.warmup_steps == TrainingConfig.warmup_steps and 1 <= self.max_steps < self.warmup_steps:
            # A short run keeps the default warmup's shape instead of failing on it (an explicit
            # warmup longer than the run is still refused below).
            logger.warning("warmup_steps=%d is longer than max_steps=%d: warming up over all %d steps",
                           self.warmup_steps, self.max_steps, self.max_steps)
            self.warmup_steps = self.max_steps
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, field: str, problem: str) -> None:
            if not ok:
                raise SettingError(field, problem)

        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(0 <= self.warmup_steps <= self.max_steps,
              "warmup_steps", f"must be between 0 and max_steps ({self.max_steps}), got {self.warmup_steps}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        for name in ("grad_accum_steps", "batch_size", "save_every", "eval_every", "keep_checkpoints",
                     "max_nonfinite_steps"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        check(self.memory_limit_gb is None or self.memory_limit_gb > 0,
              "memory_limit_gb", f"must be > 0 (or None), got {self.memory_limit_gb}")
        _owned(lambda: check_max_seq_len(self.max_seq_len), {"max_seq_len": "max_seq_len"})
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.orpo_form in ORPO_FORMS, "orpo_form", f"must be one of {ORPO_FORMS}, got {self.orpo_form!r}")
        check(self.training_mode in TRAINING_MODES,
              "training_mode", f"must be one of {TRAINING_MODES}, got {self.training_mode!r}")
        check(self.quantize_mode in QUANTIZE_MODES,
              "quantize_mode", f"must be one of {QUANTIZE_MODES}, got {self.quantize_mode!r}")
        self.quantization_spec()
        self.adapter_config()
        self.thermal_policy()
        check(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
              "epochs", f"must be an integer >= 1 (or None), got {self.epochs!r}")
        check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
              "early_stopping_patience", f"must be >= 1 (or None), got {self.early_stopping_patience}")
        check(self.eval_samples >= 0, "eval_samples", f"must be >= 0, got {self.eval_samples}")
        check(self.sample_max_tokens >= 1, "sample_max_tokens", f"must be >= 1, got {self.sample_max_tokens}")
        check(self.report_to in REPORT_TO, "report_to", f"must be one of {REPORT_TO}, got {self.report_to!r}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.max_eval_batches is None or self.max_eval_batches >= 1, "max_eval_batches", "must be >= 1 or None")

    # ---- the settings as their owners' objects -------------------------------------------------
    def adapter_config(self) -> AdapterConfig:
        """The adapters this run puts on the model."""
        return _owned(lambda: AdapterConfig(
            kind=AdapterConfig.kind_for(self.use_dora), rank=self.lora_rank, scale=self.lora_scale,
            dropout=self.lora_dropout,
        ), ADAPTER_FIELDS)

    def thermal_policy(self) -> ThermalPolicy:
        """The cooling policy of this run (pause slice and cool-down control at their defaults)."""
        return _owned(lambda: ThermalPolicy(**{theirs: getattr(self, ours) for ours, theirs in THERMAL_FIELDS.items()}),
                      THERMAL_FIELDS)

    def quantization_spec(self) -> dict[str, Any] | None:
        """``{"mode", "bits", "group_size"}`` for ``quantize_model``; None for ``quantize_mode="none"``."""
        if self.quantize_mode == NO_QUANTIZATION:
            return None
        return _owned(lambda: quantization_spec({theirs: getattr(self, ours) for ours, theirs in QUANTIZE_FIELDS.items()}),
                      QUANTIZE_FIELDS)

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """The config ``to_dict`` wrote; a missing key takes its default, an unknown one is refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainingConfig: unknown setting(s) {', '.join(map(repr, unknown))}")
        return cls(**data)
