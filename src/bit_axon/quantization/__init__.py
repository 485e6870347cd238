"""Quantized base weights: true 4-bit NF4 (QLoRA) or MLX's native affine quantization.

``quantize_model`` is the one entry point. It replaces every eligible ``nn.Linear``, MoE
``SwitchLinear`` and ``nn.Embedding`` of a model and records ``{"mode", "bits", "group_size"}`` in
``model.config.quantization``, which is how ``bit_axon.loading`` rebuilds the same structure later.

Eligible means: the layer's input width is a multiple of ``group_size`` (both modes quantize groups
along the input dimension), and it is not a router. The MoE router ``gate`` (hidden -> experts) and
the ``shared_expert_gate`` (hidden -> 1) stay in full precision: together they are ~0.01% of the
weights, and quantization noise in router logits changes which experts a token is sent to. Layers
narrower than a group (``dt_proj``, input width ``dt_rank``) are skipped by the width rule.

Layer types per mode:

- ``nf4``: :class:`NF4Linear`, :class:`NF4SwitchLinear` (MoE experts), :class:`NF4Embedding` (its
  ``as_linear`` is the tied head). 4-bit only.
- ``affine``: ``nn.QuantizedLinear``, :class:`QuantizedSwitchLinear` (``mx.gather_qmm``),
  ``nn.QuantizedEmbedding``. 2, 3, 4, 5, 6 or 8 bits.

The default is NF4, chosen on ``bench/quant_error.py``'s 4-bit, group-64 reconstruction error (2048 x
4096 weights): on Gaussian weights affine is 2% lower (relative MSE 0.0083 vs 0.0085) but stores a
bias per group as well (4.5 vs 4.25 bits per weight with float16 constants); on heavy-tailed weights
(Student-t, 3 dof) NF4 is 11% lower (0.0149 vs 0.0167), 7% with outlier columns; at equal storage
(affine group 128) affine's error is 1.2x (Gaussian) to 1.8x (heavy-tailed) NF4's.

Speed depends on the backend: affine uses MLX's fused quantized-matmul kernels on Metal and CUDA,
NF4 dequantizes and then runs an ordinary matmul. MLX's CPU quantized kernels do not use BLAS, so on
the CPU both formats dequantize one layer into a float matmul for inputs of a few rows or more, with
a backward pass that dequantizes again rather than keeping the float weight
(:mod:`bit_axon.quantization.fast_path`; ``BIT_AXON_CPU_DEQUANT=0`` restores the native kernels).
The affine layers are therefore thin subclasses of MLX's (:class:`QuantizedLinear`,
:class:`QuantizedEmbedding`) with the same parameters and checkpoint layout.
"""

from __future__ import annotations

import math
from typing import Any

from bit_axon.layers.moe import SwitchLinear
from bit_axon.quantization.fast_path import (
    affine_dequantize,
    affine_dequantizer,
    affine_gather_matmul,
    affine_matmul,
    after,
    shared_dense_matmul,
    wants_dequant,
)
from bit_axon.quantization.nf4 import (
    NF4_CODEBOOK,
    NF4Embedding,
    NF4Linear,
    NF4SwitchLinear,
    nf4_dequantize,
    nf4_matmul,
    nf4_quantize,
)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

QUANT_MODES = ("nf4", "affine")
DEFAULT_MODE = "nf4"
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
ROUTER_NAMES = ("gate", "shared_expert_gate")

__all__ = [
    "AFFINE_BITS",
    "DEFAULT_MODE",
    "GROUP_SIZES",
    "NF4_CODEBOOK",
    "QUANT_MODES",
    "ROUTER_NAMES",
    "NF4Embedding",
    "NF4Linear",
    "NF4SwitchLinear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedSwitchLinear",
    "dense_weight",
    "dequantize_model",
    "is_quantized",
    "linear_matmul",
    "linear_matmul_and_weight",
    "linear_dims",
    "nf4_dequantize",
    "nf4_quantize",
    "quantization_spec",
    "quantize_like",
    "quantize_model",
]


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose matmul takes the CPU fast path (same parameters and layout)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = linear_matmul(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (the tied head) takes the CPU fast path."""

    def as_linear(self, x: mx.array) -> mx.array:
        return affine_matmul(
            x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
        )


class QuantizedSwitchLinear(nn.Module):
    """Affine-quantized :class:`SwitchLinear`: stacked expert weights applied with ``mx.gather_qmm``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64, bits: int = 4):
        super().__init__()
        self.group_size = group_size
        self.bits = bits
        self.mode = "affine"
        bound = 1 / math.sqrt(input_dims)
        w = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits)
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int = 64, bits: int = 4) -> QuantizedSwitchLinear:
        num_experts, output_dims, input_dims = layer.weight.shape
        q = cls(input_dims, output_dims, num_experts, group_size, bits)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size, bits)
        q.freeze()
        return q

    @property
    def input_dims(self) -> int:
        return self.weight.shape[-1] * 32 // self.bits

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dequantize(self) -> mx.array:
        return affine_dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, num_experts={self.num_experts}, "
            f"group_size={self.group_size}, bits={self.bits}, mode=affine"
        )

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return affine_gather_matmul(
            x, self["weight"], self["scales"], self["biases"], indices, self.group_size, self.bits, sorted_indices
        )


_QUANTIZED_TYPES = (
    NF4Linear,
    NF4SwitchLinear,
    NF4Embedding,
    nn.QuantizedLinear,
    QuantizedSwitchLinear,
    nn.QuantizedEmbedding,
)


def is_quantized(module: nn.Module) -> bool:
    """True for the quantized layer types this package produces."""
    return isinstance(module, _QUANTIZED_TYPES)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """``(input_dims, output_dims)`` of an ``nn.Linear``, ``nn.QuantizedLinear`` or :class:`NF4Linear`."""
    if isinstance(layer, nn.QuantizedLinear):
        # Packed width: each uint32 holds 32 / bits codes.
        return layer.weight.shape[1] * 32 // layer.bits, layer.weight.shape[0]
    if isinstance(layer, NF4Linear):
        return layer.input_dims, layer.output_dims
    if isinstance(layer, nn.Linear):
        output_dims, input_dims = layer.weight.shape
        return input_dims, output_dims
    raise TypeError(f"Expected nn.Linear, nn.QuantizedLinear or NF4Linear, got {type(layer).__name__}")


def dense_weight(layer: nn.Module) -> mx.array:
    """The float (out, in) weight of a linear layer, dequantized if the layer is quantized."""
    if isinstance(layer, nn.QuantizedLinear):
        if layer.mode == "affine":
            return affine_dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
        return mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, mode=layer.mode
        )
    if isinstance(layer, NF4Linear):
        return layer.dequantize()
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise TypeError(f"Expected nn.Linear, nn.QuantizedLinear or NF4Linear, got {type(layer).__name__}")


def linear_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W.T`` of a linear layer without its bias, computed exactly as the layer computes it.

    :class:`QuantizedLinear` takes the CPU fast path; MLX's own ``nn.QuantizedLinear`` keeps its
    kernel, so an adapter over either reproduces its base layer bit for bit.
    """
    if isinstance(layer, QuantizedLinear):
        return affine_matmul(
            x, layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits, layer.mode
        )
    if isinstance(layer, nn.QuantizedLinear):
        return mx.quantized_matmul(
            x, layer["weight"], layer["scales"], layer.get("biases"), transpose=True,
            group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
        )
    if isinstance(layer, NF4Linear):
        return nf4_matmul(x, layer["weight"], layer["scales"])
    if isinstance(layer, nn.Linear):
        return x @ layer["weight"].T
    raise TypeError(f"Expected nn.Linear, nn.QuantizedLinear or NF4Linear, got {type(layer).__name__}")


def linear_matmul_and_weight(layer: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    """``linear_matmul(layer, x)`` and the float weight, for forward passes that need both.

    A quantized weight is dequantized once for the two uses (the backward pass of the matmul
    rebuilds it from the codes, so the float weight is not kept). :class:`QuantizedLinear` does this
    where the CPU fast path applies; elsewhere affine layers keep their kernel and dequantize again
    for the weight.
    """
    if isinstance(layer, NF4Linear):
        w = nf4_dequantize(*after(x, layer["weight"], layer["scales"]))
        return shared_dense_matmul(x, w, nf4_dequantize, layer["weight"], layer["scales"]), w
    if isinstance(layer, QuantizedLinear) and layer.mode == "affine" and wants_dequant(x):
        params = (layer["weight"], layer["scales"], layer["biases"])
        w = affine_dequantize(*after(x, *params), layer.group_size, layer.bits)
        return shared_dense_matmul(x, w, affine_dequantizer(layer.group_size, layer.bits), *params), w
    return linear_matmul(layer, x), dense_weight(layer)


def quantize_like(linear: nn.Linear, like: nn.Module) -> nn.Module:
    """Quantize float ``linear`` the way ``like`` is quantized (returned unchanged if ``like`` is float)."""
    if isinstance(like, nn.QuantizedLinear):  # keeps the class: MLX's own or the fast-path subclass
        return type(like).from_linear(linear, like.group_size, like.bits, mode=like.mode)
    if isinstance(like, NF4Linear):
        return NF4Linear.from_linear(linear, like.group_size)
    if isinstance(like, nn.Linear):
        return linear
    raise TypeError(f"Expected nn.Linear, nn.QuantizedLinear or NF4Linear, got {type(like).__name__}")


def quantization_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``config.quantization`` entry and return it as ``{"mode", "bits", "group_size"}``.

    A spec without ``"mode"`` is read as ``"affine"``, the meaning of mlx-lm's ``{"group_size", "bits"}``.
    """
    unknown = sorted(set(spec) - {"mode", "bits", "group_size"})
    if unknown:
        raise ValueError(f"Unknown quantization fields: {', '.join(unknown)}")
    mode, bits, group_size = spec.get("mode", "affine"), spec.get("bits"), spec.get("group_size")
    if mode not in QUANT_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if mode == "nf4" and bits != 4:
        raise ValueError(f"NF4 is a 4-bit format; got bits={bits} (use mode='affine' for other widths)")
    if mode == "affine" and bits not in AFFINE_BITS:
        raise ValueError(f"Affine quantization supports bits in {AFFINE_BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    return {"mode": mode, "bits": bits, "group_size": group_size}


def _input_width(module: nn.Module) -> int | None:
    """Width of the quantized (last) axis for the float layer types that can be quantized."""
    if isinstance(module, (nn.Linear, SwitchLinear, nn.Embedding)):
        return module.weight.shape[-1]
    return None


def _quantize_module(module: nn.Module, mode: str, bits: int, group_size: int) -> nn.Module:
    if mode == "nf4":
        if isinstance(module, nn.Linear):
            return NF4Linear.from_linear(module, group_size)
        if isinstance(module, SwitchLinear):
            return NF4SwitchLinear.from_switch_linear(module, group_size)
        return NF4Embedding.from_embedding(module, group_size)
    if isinstance(module, nn.Linear):
        return QuantizedLinear.from_linear(module, group_size, bits)
    if isinstance(module, SwitchLinear):
        return QuantizedSwitchLinear.from_switch_linear(module, group_size, bits)
    return QuantizedEmbedding.from_embedding(module, group_size, bits)


def quantize_model(
    model: nn.Module, bits: int = 4, group_size: int = 64, mode: str = DEFAULT_MODE
) -> nn.Module:
    """Quantize ``model``'s eligible layers in place (see the module docstring) and return it.

    ``model`` is a ``BitAxonModel`` (anything with a ``config.quantization`` field); its
    ``config.quantization`` becomes ``{"mode", "bits", "group_size"}``. Calling it again with the
    same settings quantizes only layers that are still float (e.g. freshly fused adapters); a model
    already quantized with other settings is refused, since that would mix two formats.
    """
    spec = quantization_spec({"mode": mode, "bits": bits, "group_size": group_size})
    # Adapters are built on the base weights they wrap (DoRA's magnitudes are their row norms), so
    # the base must be quantized first. (Duck-typed: bit_axon.training imports this package.)
    if any("lora_a" in module for _, module in model.named_modules()):
        raise ValueError("The model has LoRA/DoRA adapters; quantize the base model before applying them")
    current = model.config.quantization
    if current is not None and quantization_spec(current) != spec:
        raise ValueError(
            f"Model is already quantized with {quantization_spec(current)}; "
            f"dequantize it first to re-quantize with {spec}"
        )
    replacements = []
    for path, module in model.named_modules():
        width = _input_width(module)
        if width is None or width % group_size or path.rsplit(".", 1)[-1] in ROUTER_NAMES:
            continue
        replacements.append((path, _quantize_module(module, mode, bits, group_size)))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.config.quantization = spec
    return model


def _dequantize_module(module: nn.Module) -> nn.Module | None:
    if isinstance(module, (nn.QuantizedLinear, NF4Linear)):
        in_dims, out_dims = linear_dims(module)
        layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
        layer.weight = dense_weight(module)
        if "bias" in module:
            layer.bias = module.bias
        return layer
    if isinstance(module, (QuantizedSwitchLinear, NF4SwitchLinear)):
        layer = SwitchLinear(module.input_dims, module.output_dims, module.num_experts)
        layer.weight = module.dequantize()
        return layer
    if isinstance(module, (nn.QuantizedEmbedding, NF4Embedding)):
        if isinstance(module, NF4Embedding):
            weight = module.dequantize()
        else:
            weight = mx.dequantize(
                module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode
            )
        layer = nn.Embedding(*weight.shape)
        layer.weight = weight
        return layer
    return None


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer with its float equivalent, in place; ``config.quantization`` -> None.

    The new float layers are trainable like freshly built ones; freeze the model again if needed.
    """
    replacements = []
    for path, module in model.named_modules():
        layer = _dequantize_module(module)
        if layer is not None:
            replacements.append((path, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.config.quantization = None
    return model
