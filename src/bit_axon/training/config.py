"""TrainingConfig: every hyperparameter of a fine-tuning run, with the guide's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRAINING_MODES = ("sft", "orpo")
QUANTIZE_MODES = ("nf4", "affine", "none")


@dataclass
class TrainingConfig:
    # Optimizer
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 10_000
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 4
    # LoRA / DoRA
    lora_rank: int = 8
    lora_dropout: float = 0.0
    lora_scale: float = 20.0
    use_dora: bool = True
    # ORPO alignment
    beta: float = 0.1
    training_mode: str = "sft"
    # Quantization
    quantize_bits: int = 4
    quantize_group_size: int = 64
    quantize_mode: str = "nf4"
    # Data
    batch_size: int = 1
    max_seq_len: int = 2048
    # Checkpointing
    save_every: int = 500
    eval_every: int = 500
    output_dir: str = "checkpoints"
    keep_checkpoints: int = 3
    # Thermal thresholds (°C)
    temp_max_speed: float = 75.0
    temp_pause: float = 85.0
    temp_stop: float = 95.0
    temp_poll_interval: float = 1.0
    # Misc
    seed: int = 42
    grad_checkpoint: bool = False  # recompute each layer in the backward pass (less memory, ~30% slower)
    # MLX's evaluation memory limit for the run (mx.set_memory_limit). Above it, MLX waits for
    # queued operations to finish before allocating more: lower peaks, somewhat slower steps.
    memory_limit_gb: float | None = None
    max_eval_batches: int | None = None  # None evaluates the whole validation set
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainingConfig: {message}")

        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(0 <= self.warmup_steps <= self.max_steps,
              f"warmup_steps must be between 0 and max_steps ({self.max_steps}), got {self.warmup_steps}")
        check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("grad_accum_steps", "lora_rank", "batch_size", "save_every", "eval_every",
                     "keep_checkpoints", "max_nonfinite_steps", "quantize_group_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        check(self.memory_limit_gb is None or self.memory_limit_gb > 0,
              f"memory_limit_gb must be > 0 (or None), got {self.memory_limit_gb}")
        check(self.max_seq_len >= 8, f"max_seq_len must be >= 8, got {self.max_seq_len}")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(self.training_mode in TRAINING_MODES,
              f"training_mode must be one of {TRAINING_MODES}, got {self.training_mode!r}")
        check(self.quantize_mode in QUANTIZE_MODES,
              f"quantize_mode must be one of {QUANTIZE_MODES}, got {self.quantize_mode!r}")
        check(self.quantize_bits in (2, 3, 4, 6, 8), f"quantize_bits must be 2, 3, 4, 6 or 8, got {self.quantize_bits}")
        check(self.quantize_mode != "nf4" or self.quantize_bits == 4, "nf4 quantization is 4-bit only")
        check(self.temp_max_speed < self.temp_pause < self.temp_stop,
              "thermal thresholds must satisfy temp_max_speed < temp_pause < temp_stop, got "
              f"{self.temp_max_speed} / {self.temp_pause} / {self.temp_stop}")
        check(self.temp_poll_interval > 0, f"temp_poll_interval must be > 0, got {self.temp_poll_interval}")
        check(self.max_eval_batches is None or self.max_eval_batches >= 1, "max_eval_batches must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
