"""Quantize and dequantize a whole model, and validate its ``config.quantization`` entry.

``quantize_model`` replaces every eligible float base layer (``nn.Linear``, MoE ``SwitchLinear``,
``nn.Embedding``) with the chosen format's layer and records ``{"mode", "bits", "group_size"}`` in
``model.config.quantization``, which is how ``bit_axon.loading`` rebuilds the same structure later.

Eligible means: the layer's input width is a multiple of ``group_size`` (every format quantizes
groups along the input dimension), and it is not a router. The MoE router ``gate`` (hidden ->
experts) and the ``shared_expert_gate`` (hidden -> 1) stay in full precision: together they are
~0.01% of the weights, and quantization noise in router logits changes which experts a token is
sent to. Layers narrower than a group (``dt_proj``, input width ``dt_rank``) are skipped by the
width rule.
"""

from __future__ import annotations

from typing import Any

# Importing a format registers it.
import bit_axon.quantization.affine  # noqa: F401
import bit_axon.quantization.nf4  # noqa: F401
from bit_axon.quantization.base import FORMATS, find_base

import mlx.nn as nn
from mlx.utils import tree_unflatten

DEFAULT_MODE = "nf4"
# Every registered format, the default first.
QUANT_MODES = (DEFAULT_MODE, *sorted(set(FORMATS) - {DEFAULT_MODE}))
GROUP_SIZES = (32, 64, 128)
ROUTER_NAMES = ("gate", "shared_expert_gate")


def quantization_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``config.quantization`` entry and return it as ``{"mode", "bits", "group_size"}``.

    The one place modes, bit widths and group sizes are checked. A spec without ``"mode"`` is read
    as ``"affine"``, the meaning of mlx-lm's ``{"group_size", "bits"}``.
    """
    unknown = sorted(set(spec) - {"mode", "bits", "group_size"})
    if unknown:
        raise ValueError(f"Unknown quantization fields: {', '.join(unknown)}")
    mode, bits, group_size = spec.get("mode", "affine"), spec.get("bits"), spec.get("group_size")
    if mode not in FORMATS:
        raise ValueError(f"Unknown quantization mode {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if bits not in FORMATS[mode].bits:
        raise ValueError(FORMATS[mode].bits_error.format(bits=bits))
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    return {"mode": mode, "bits": bits, "group_size": group_size}


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
    fmt = FORMATS[mode]
    replacements = []
    for path, module in model.named_modules():
        base = find_base(module)
        if base is None or base.quantized or path.rsplit(".", 1)[-1] in ROUTER_NAMES:
            continue
        if module.weight.shape[-1] % group_size:
            continue
        replacements.append((path, fmt.quantize(module, base.kind, group_size, bits)))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.config.quantization = spec
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer with its float equivalent, in place; ``config.quantization`` -> None.

    The new float layers are trainable like freshly built ones; freeze the model again if needed.
    """
    replacements = []
    for path, module in model.named_modules():
        base = find_base(module)
        if base is not None and base.quantized:
            replacements.append((path, base.to_float()))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.config.quantization = None
    return model
