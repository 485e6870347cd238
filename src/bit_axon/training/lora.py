"""Adapters: a frozen base layer plus a trainable rank-r update ``scale * B^T A^T``.

``AdapterConfig`` holds an adapter's settings and their defaults; ``ADAPTER_KINDS`` maps each kind's
name to its layer class (``lora`` here, ``dora`` in ``dora.py``; a new kind is one module whose class
is decorated with ``register_adapter_kind``). ``apply_adapters`` wraps the target layers named in
the training guide; ``LoRALinear.fuse`` folds a trained adapter back into a plain (optionally
re-quantized) layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from bit_axon.quantization import dense_weight, is_linear_base, linear_dims, quantize_like

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

# Adapter kind name -> layer class, filled by ``register_adapter_kind``.
ADAPTER_KINDS: dict[str, type[LoRALinear]] = {}


@dataclass(frozen=True)
class AdapterConfig:
    """What a model's adapters are: enough to rebuild them before loading their weights.

    These are the adapter defaults of the whole package (``TrainingConfig``, the CLI and the function
    signatures read them from here).
    """

    kind: str = "dora"
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            known = ", ".join(sorted(ADAPTER_KINDS))
            raise ValueError(f"Unknown adapter kind {self.kind!r}; known kinds: {known}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"Adapter rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"Adapter scale must be finite, got {self.scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Adapter dropout must be in [0, 1), got {self.dropout}")

    @staticmethod
    def kind_for(use_dora: bool) -> str:
        """The kind the guide's ``use_dora`` switch selects."""
        return "dora" if use_dora else "lora"

    @property
    def use_dora(self) -> bool:
        return self.kind == "dora"

    @property
    def layer_class(self) -> type[LoRALinear]:
        return ADAPTER_KINDS[self.kind]

    def wrap(self, linear: nn.Module) -> LoRALinear:
        """``linear`` (frozen) inside a fresh adapter of these settings."""
        return self.layer_class(linear, self)

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata for adapter files, so a loader needs no guessing.

        ``use_dora`` is redundant with ``adapter_kind``; it stays for readers of older files' keys.
        """
        return {
            "adapter_kind": self.kind,
            "lora_rank": str(self.rank),
            "lora_scale": repr(float(self.scale)),
            "lora_dropout": repr(float(self.dropout)),
            "use_dora": "true" if self.use_dora else "false",
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> AdapterConfig:
        """The settings ``metadata()`` wrote; a missing key takes its default."""
        return cls(
            kind=metadata.get("adapter_kind", cls.kind),
            rank=int(metadata.get("lora_rank", cls.rank)),
            scale=float(metadata.get("lora_scale", cls.scale)),
            dropout=float(metadata.get("lora_dropout", cls.dropout)),
        )


AdapterClass = TypeVar("AdapterClass", bound="type[LoRALinear]")


def register_adapter_kind(name: str) -> Callable[[AdapterClass], AdapterClass]:
    """Class decorator: make ``cls`` the layer of adapter kind ``name`` (recorded in adapter files)."""

    def register(cls: AdapterClass) -> AdapterClass:
        if ADAPTER_KINDS.get(name, cls) is not cls:
            raise ValueError(f"Adapter kind {name!r} is already registered to {ADAPTER_KINDS[name].__name__}")
        cls.kind = name
        ADAPTER_KINDS[name] = cls
        return cls

    return register


@register_adapter_kind("lora")
class LoRALinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ lora_a) @ lora_b`` with the base layer frozen.

    ``lora_a`` (input_dims, r) starts uniform in +-1/sqrt(input_dims) and ``lora_b`` (r, output_dims)
    at zero, so a fresh adapter leaves the base layer's output unchanged. Build one with the guide's
    ``from_base(linear, r=..., scale=..., dropout=...)`` or with ``AdapterConfig.wrap(linear)``.
    """

    kind: ClassVar[str]
    # The trainable tensors of one layer, as named in adapter files (``{layer path}.{name}``).
    parameter_names: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b")

    def __init__(self, linear: nn.Module, config: AdapterConfig):
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} is the {self.kind!r} adapter, not {config.kind!r}")
        if not is_linear_base(linear):
            raise TypeError(f"Expected a linear base layer (nn.Linear, nn.QuantizedLinear, NF4Linear), "
                            f"got {type(linear).__name__}")
        input_dims, output_dims = linear_dims(linear)
        linear.freeze()
        self.linear = linear
        self.dropout = nn.Dropout(p=config.dropout)
        self.dropout_p = config.dropout
        self.scale = config.scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, config.rank))
        self.lora_b = mx.zeros((config.rank, output_dims))

    @classmethod
    def from_base(
        cls,
        linear: nn.Module,
        r: int = AdapterConfig.rank,
        scale: float = AdapterConfig.scale,
        dropout: float = AdapterConfig.dropout,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, ``nn.QuantizedLinear`` or ``NF4Linear``, keeping its weights."""
        return cls(linear, AdapterConfig(cls.kind, rank=r, scale=scale, dropout=dropout))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    @property
    def config(self) -> AdapterConfig:
        return AdapterConfig(self.kind, self.rank, float(self.scale), float(self.dropout_p))

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
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA/DoRA adapters")
    configs = {layer.config for _, layer in layers}
    if len(configs) > 1:
        raise ValueError(f"The model's adapters have different settings: {sorted(configs, key=str)}")
    return configs.pop()


def apply_adapters(
    model: nn.Module, config: AdapterConfig, target: Callable[[str], bool] = lora_target
) -> list[str]:
    """Freeze ``model`` and wrap every target layer in an adapter of ``config.kind``, in place.

    Targets are the layers whose path ``target`` accepts: by default (``lora_target``) those named in
    ``LORA_TARGET_NAMES`` except those whose path contains one of ``LORA_EXCLUDED_PATHS`` or whose
    name is in ``LORA_EXCLUDED_NAMES``. Afterwards only the adapter parameters (the kind's
    ``parameter_names``) are trainable. Returns the wrapped paths.
    """
    if adapter_layers(model):
        raise ValueError("The model already has LoRA/DoRA adapters")
    model.freeze()
    wrapped = []
    for path, module in reversed(model.named_modules()):
        if not target(path):
            continue
        if not is_linear_base(module):
            raise TypeError(f"Target layer {path} is a {type(module).__name__}, not a linear layer")
        wrapped.append((path, config.wrap(module)))
    if not wrapped:
        raise ValueError("The model has no layers to adapt")
    model.update_modules(tree_unflatten(wrapped))
    return [path for path, _ in wrapped]


def apply_lora_to_model(
    model: nn.Module,
    rank: int = AdapterConfig.rank,
    dropout: float = AdapterConfig.dropout,
    scale: float = AdapterConfig.scale,
    use_dora: bool = AdapterConfig.kind == "dora",
) -> list[str]:
    """The guide's entry point: ``apply_adapters`` with DoRA (default) or LoRA adapters of these settings."""
    config = AdapterConfig(AdapterConfig.kind_for(use_dora), rank=rank, scale=scale, dropout=dropout)
    return apply_adapters(model, config)
