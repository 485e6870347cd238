"""LoRA adapters: a frozen base layer plus a trainable rank-r update ``scale * B^T A^T``.

``apply_lora_to_model`` wraps the target layers named in the training guide; ``LoRALinear.fuse``
folds a trained adapter back into a plain (optionally re-quantized) layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bit_axon.quantization import NF4Linear, dense_weight, linear_dims, quantize_like

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

LORA_TARGET_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "in_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_proj",
    "output_proj",
)
LORA_EXCLUDED_PATHS = ("switch_mlp", "lm_head")
LORA_EXCLUDED_NAMES = ("x_proj", "dt_proj", "gate", "shared_expert_gate")

# Base layers an adapter can wrap.
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, NF4Linear)


class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ lora_a) @ lora_b`` with the base layer frozen.

    ``lora_a`` (input_dims, r) starts uniform in +-1/sqrt(input_dims) and ``lora_b`` (r, output_dims)
    at zero, so a fresh adapter leaves the base layer's output unchanged.
    """

    def __init__(self, linear: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(linear, LINEAR_TYPES):
            raise TypeError(f"Expected nn.Linear, nn.QuantizedLinear or NF4Linear, got {type(linear).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        input_dims, output_dims = linear_dims(linear)
        linear.freeze()
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = dropout
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, ``nn.QuantizedLinear`` or ``NF4Linear``, keeping its weights."""
        return cls(linear, r=r, scale=scale, dropout=dropout)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def delta(self) -> mx.array:
        """The weight update ``scale * B^T A^T`` (output_dims, input_dims)."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def _fused_weight(self) -> mx.array:
        w = dense_weight(self.linear)
        return w + self.delta().astype(w.dtype)

    def fuse(self, requantize: bool = False) -> nn.Module:
        """A plain layer with the adapter folded in: ``W + scale * B^T A^T``.

        Quantized bases are dequantized first; with ``requantize=True`` the result is quantized again
        with the base's format, bits and group size (a float base stays float).
        """
        input_dims, output_dims = linear_dims(self.linear)
        has_bias = "bias" in self.linear
        fused = nn.Linear(input_dims, output_dims, bias=has_bias)
        fused.weight = self._fused_weight()
        if has_bias:
            fused.bias = self.linear.bias
        return quantize_like(fused, self.linear) if requantize else fused

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)


@dataclass(frozen=True)
class AdapterConfig:
    """What a model's adapters are: enough to rebuild them before loading their weights."""

    rank: int
    scale: float
    dropout: float
    use_dora: bool

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata for adapter files, so a loader needs no guessing."""
        return {
            "lora_rank": str(self.rank),
            "lora_scale": repr(self.scale),
            "lora_dropout": repr(self.dropout),
            "use_dora": "true" if self.use_dora else "false",
        }


def lora_target(path: str) -> bool:
    """Whether the module at ``path`` gets an adapter, by the guide's target and exclusion rules."""
    name = path.rsplit(".", 1)[-1]
    if any(excluded in path for excluded in LORA_EXCLUDED_PATHS) or name in LORA_EXCLUDED_NAMES:
        return False
    return name in LORA_TARGET_NAMES


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` for every LoRA/DoRA layer of ``model``, in definition order."""
    return [(path, m) for path, m in reversed(model.named_modules()) if isinstance(m, LoRALinear)]


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The shared settings of ``model``'s adapters (an error if there are none or they differ)."""
    from bit_axon.training.dora import DoRALinear

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA/DoRA adapters")
    configs = {
        AdapterConfig(layer.rank, float(layer.scale), float(layer.dropout_p), isinstance(layer, DoRALinear))
        for _, layer in layers
    }
    if len(configs) > 1:
        raise ValueError(f"The model's adapters have different settings: {sorted(configs, key=str)}")
    return configs.pop()


def apply_lora_to_model(
    model: nn.Module, rank: int = 8, dropout: float = 0.0, scale: float = 20.0, use_dora: bool = True
) -> list[str]:
    """Freeze ``model`` and wrap every target layer in a DoRA (default) or LoRA adapter, in place.

    Targets are the layers named in ``LORA_TARGET_NAMES`` except those whose path contains one of
    ``LORA_EXCLUDED_PATHS`` or whose name is in ``LORA_EXCLUDED_NAMES``. Afterwards only the adapter
    parameters (``lora_a``, ``lora_b`` and DoRA's ``m``) are trainable. Returns the wrapped paths.
    """
    from bit_axon.training.dora import DoRALinear

    adapter_cls = DoRALinear if use_dora else LoRALinear
    if adapter_layers(model):
        raise ValueError("The model already has LoRA/DoRA adapters")
    model.freeze()
    wrapped = []
    for path, module in reversed(model.named_modules()):
        if not lora_target(path):
            continue
        if not isinstance(module, LINEAR_TYPES):
            raise TypeError(f"Target layer {path} is a {type(module).__name__}, not a linear layer")
        wrapped.append((path, adapter_cls.from_base(module, r=rank, scale=scale, dropout=dropout)))
    if not wrapped:
        raise ValueError("The model has no layers to adapt")
    model.update_modules(tree_unflatten(wrapped))
    return [path for path, _ in wrapped]
