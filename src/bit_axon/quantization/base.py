"""One interface for every base layer type: float, MLX-quantized, NF4 (and the next format).

A :class:`BaseLayer` wraps one layer and gives its dimensions, its float weight, its matmul (as the
layer computes it) and what the fused vocabulary head needs (a dequantizer that can be applied a
slice of rows at a time). One registry, keyed by layer type, finds the right one:
:func:`base_layer`. A format registers its layer types here (``register``) and its quantizers
(``register_format``), so adding a format is one new module.

Kinds: ``"linear"`` (``x @ W.T + b``; what adapters wrap), ``"embedding"`` (a (vocab, d) table whose
``as_linear`` is a tied head) and ``"switch"`` (stacked MoE expert weights, applied by index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from bit_axon.layers.moe import ExpertStack, SwitchLinear

import mlx.core as mx
import mlx.nn as nn

RowDequantizer = tuple[Callable[..., mx.array], tuple[mx.array, ...]]
LINEAR_TYPE_NAMES = "nn.Linear, nn.QuantizedLinear or NF4Linear"


class BaseLayer:
    """A base layer seen through the common interface (subclassed and registered per layer type)."""

    kind: ClassVar[str] = "linear"
    quantized: ClassVar[bool] = True

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def dims(self) -> tuple[int, int]:
        """``(input_dims, output_dims)``; an embedding as the head maps d -> vocab."""
        out_dims, in_dims = self.dequantize().shape[-2:]
        return in_dims, out_dims

    def dequantize(self) -> mx.array:
        """The float weight: (out, in), (vocab, d) or (experts, out, in)."""
        raise NotImplementedError

    def matmul(self, x: mx.array) -> mx.array:
        """``x @ W.T`` without the bias, computed exactly as the layer computes it."""
        raise NotImplementedError

    def matmul_and_weight(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """``matmul(x)`` and the float weight, for forward passes that need both."""
        return self.matmul(x), self.dequantize()

    def row_dequantizer(self) -> RowDequantizer | None:
        """``(dequantize, params)`` with ``dequantize(*params)`` the float weight and every param's
        first axis its rows, so ``dequantize(*(p[a:b] for p in params))`` gives rows a..b; None when
        the weight cannot be used frozen (a trainable float layer)."""
        return None

    def quantize_like(self, linear: nn.Linear) -> nn.Module:
        """The float ``linear`` quantized the way this layer is (``linear`` itself for a float layer)."""
        raise TypeError(f"Expected {LINEAR_TYPE_NAMES}, got {type(self.layer).__name__}")

    def to_float(self) -> nn.Module:
        """The float layer of the same kind with the dequantized weight (and the bias)."""
        weight = self.dequantize()
        if self.kind == "switch":
            num_experts, out_dims, in_dims = weight.shape
            layer = SwitchLinear(in_dims, out_dims, num_experts)
        elif self.kind == "embedding":
            layer = nn.Embedding(*weight.shape)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in self.layer)
            if "bias" in self.layer:
                layer.bias = self.layer.bias
        layer.weight = weight
        return layer


class EmbeddingBase(BaseLayer):
    """An embedding table (vocab, d); as the head it is applied with ``as_linear``."""

    kind = "embedding"

    def matmul(self, x: mx.array) -> mx.array:
        return self.layer.as_linear(x)


class SwitchBase(BaseLayer):
    """Stacked expert weights (experts, out, in), quantized along the last axis in every format."""

    kind = "switch"

    def dims(self) -> tuple[int, int]:
        return self.layer.input_dims, self.layer.weight.shape[1]

    def dequantize(self) -> mx.array:
        return self.layer.dequantize()


_REGISTRY: dict[type, type[BaseLayer]] = {}


def register(*layer_types: type) -> Callable[[type[BaseLayer]], type[BaseLayer]]:
    """Class decorator: ``cls`` is the :class:`BaseLayer` of ``layer_types`` (and their subclasses)."""

    def decorate(cls: type[BaseLayer]) -> type[BaseLayer]:
        for layer_type in layer_types:
            _REGISTRY[layer_type] = cls
        return cls

    return decorate


def find_base(layer: nn.Module) -> BaseLayer | None:
    """The :class:`BaseLayer` of ``layer`` (the nearest registered type in its class hierarchy), or None."""
    for cls in type(layer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](layer)
    return None


def base_layer(layer: nn.Module) -> BaseLayer:
    """The :class:`BaseLayer` of ``layer``; a clear TypeError for a type no format registered."""
    base = find_base(layer)
    if base is None:
        known = ", ".join(sorted(t.__name__ for t in _REGISTRY))
        raise TypeError(f"{type(layer).__name__} is not a known base layer type ({known})")
    return base


def linear_base(layer: nn.Module) -> BaseLayer:
    """The :class:`BaseLayer` of a linear layer (an adapter's base); TypeError for anything else."""
    base = find_base(layer)
    if base is None or base.kind != "linear":
        raise TypeError(f"Expected {LINEAR_TYPE_NAMES}, got {type(layer).__name__}")
    return base


def is_linear_base(module: nn.Module) -> bool:
    """True for the base layer types an adapter can wrap (``nn.Linear``, any ``nn.QuantizedLinear``, NF4)."""
    base = find_base(module)
    return base is not None and base.kind == "linear"


def is_quantized(module: nn.Module) -> bool:
    """True for the quantized layer types of the registered formats."""
    base = find_base(module)
    return base is not None and base.quantized


class PackedSwitchLinear(ExpertStack, nn.Module):
    """What quantized MoE expert stacks share: (experts, out, packed in) codes, ``32 // bits`` per uint32.

    Subclasses set ``group_size``, ``bits``, ``mode`` and ``weight`` and define ``dequantize`` and
    ``__call__(x, indices, sorted_indices=False)``.
    """

    @property
    def input_dims(self) -> int:
        return self.weight.shape[-1] * 32 // self.bits

    def _extra_repr(self) -> str:
        sizes = f"input_dims={self.input_dims}, output_dims={self.output_dims}, num_experts={self.num_experts}"
        return f"{sizes}, group_size={self.group_size}, bits={self.bits}, mode={self.mode}"


# --- formats ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantFormat:
    """A quantization mode: its bit widths and a quantizer per float layer kind."""

    name: str
    bits: tuple[int, ...]
    bits_error: str  # the message for other widths, formatted with ``bits``
    quantizers: dict[str, Callable[[nn.Module, int, int], nn.Module]]  # kind -> (layer, group_size, bits)

    def quantize(self, layer: nn.Module, kind: str, group_size: int, bits: int) -> nn.Module:
        return self.quantizers[kind](layer, group_size, bits)


FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    FORMATS[fmt.name] = fmt
    return fmt


# --- float layers ----------------------------------------------------------------------------


def float_rows(weight: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
    """The row dequantizer of a float weight: the rows themselves (in ``dtype`` if given)."""
    return weight if dtype is None or weight.dtype == dtype else weight.astype(dtype)


class _FloatBase(BaseLayer):
    quantized = False

    def dequantize(self) -> mx.array:
        return self.layer.weight

    def row_dequantizer(self) -> RowDequantizer | None:
        if self.layer.trainable_parameters():
            return None
        return float_rows, (self.layer["weight"],)

    def to_float(self) -> nn.Module:
        return self.layer


@register(nn.Linear)
class FloatLinear(_FloatBase):
    def dims(self) -> tuple[int, int]:
        out_dims, in_dims = self.layer.weight.shape
        return in_dims, out_dims

    def matmul(self, x: mx.array) -> mx.array:
        return x @ self.layer["weight"].T

    def quantize_like(self, linear: nn.Linear) -> nn.Module:
        return linear


@register(nn.Embedding)
class FloatEmbedding(_FloatBase, EmbeddingBase):
    pass


@register(SwitchLinear)
class FloatSwitch(_FloatBase, SwitchBase):
    pass


# --- the functions adapters and the loss use ----------------------------------------------------


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """``(input_dims, output_dims)`` of a linear base layer."""
    return linear_base(layer).dims()


def dense_weight(layer: nn.Module) -> mx.array:
    """The float (out, in) weight of a linear layer, dequantized if the layer is quantized."""
    return linear_base(layer).dequantize()


def linear_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W.T`` of a linear layer without its bias, computed exactly as the layer computes it
    (an adapter over it reproduces its base layer bit for bit)."""
    return linear_base(layer).matmul(x)


def linear_matmul_and_weight(layer: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    """``linear_matmul(layer, x)`` and the float weight; a quantized weight is dequantized once for
    both uses where the format can (the backward pass rebuilds it from the codes)."""
    return linear_base(layer).matmul_and_weight(x)


def quantize_like(linear: nn.Linear, like: nn.Module) -> nn.Module:
    """Quantize float ``linear`` the way ``like`` is quantized (returned unchanged if ``like`` is float)."""
    return linear_base(like).quantize_like(linear)
