"""Fine-tuning: TrainingConfig, the SFT and ORPO trainers, LoRA/DoRA adapters."""

from bit_axon.training.config import TrainingConfig
from bit_axon.training.dora import DoRALinear
from bit_axon.training.lora import LoRALinear, apply_lora_to_model
from bit_axon.training.orpo_trainer import ORPOTrainer
from bit_axon.training.trainer import Trainer

__all__ = ["DoRALinear", "LoRALinear", "ORPOTrainer", "Trainer", "TrainingConfig", "apply_lora_to_model"]
