"""Quantize and dequantize a whole model, and read the quantization of its base weights.

``quantize_model`` replaces every eligible float base layer (``nn.Linear``, MoE ``SwitchLinear``,
``nn.Embedding``) with the chosen format's layer. ``base_quantization(model)`` is the one way to
ask what a model's base is: the model's ``quantization`` attribute (a ``BitAxonModel`` records it in
``config.quantization``, which is how ``bit_axon.loading`` rebuilds the same structure later; a
pretrained model reads it from its layers), else read from the layers: ``None`` for a float base,
``{"mode", "bits", "group_size"}`` when every quantized layer shares one format, and for mixed
formats (e.g. a GGUF file's 8-bit embedding with 4-bit projections) the most common format plus
per-layer entries for the others, keyed by layer path (mlx-lm's ``quantization`` layout).

Eligible means: the layer's input width is a multiple of ``group_size`` (every format quantizes
groups along the input dimension), and it is not a router. The MoE router ``gate`` (hidden ->
experts) and the ``shared_expert_gate`` (hidden -> 1) stay in full precision: together they are
~0.01% of the weights, and quantization noise in router logits changes which experts a token is
sent to. Layers narrower than a group (``dt_proj``, input width ``dt_rank``) are skipped by the
width rule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

# Importing a format registers it.
import bit_axon.quantization.nf4  # noqa: F401
from bit_axon.quantization.affine import QuantizedEmbedding, QuantizedLinear
from bit_axon.quantization.base import FORMATS, find_base

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

DEFAULT_MODE = "nf4"
# Every registered format, the default first.
QUANT_MODES = (DEFAULT_MODE, *sorted(set(FORMATS) - {DEFAULT_MODE}))
GROUP_SIZES = (32, 64, 128)
ROUTER_NAMES = ("gate", "shared_expert_gate")
SPEC_FIELDS = ("mode", "bits", "group_size")
# MLX's own quantized layers (as mlx-lm builds them) -> our subclasses with the CPU fast path.
FAST_PATH_CLASSES = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def quantization_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``config.quantization`` entry and return it as ``{"mode", "bits", "group_size"}``.

    The one place modes, bit widths and group sizes are checked. A spec without ``"mode"`` is read
    as ``"affine"``, the meaning of mlx-lm's ``{"group_size", "bits"}``.
    """
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
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

    Any model: a ``BitAxonModel`` records the spec in ``config.quantization`` (``record_quantization``).
    Calling it again with the same settings quantizes only layers that are still float (e.g. freshly
    fused adapters); a model already quantized with other settings is refused, since that would mix
    two formats.
    """
    spec = quantization_spec({"mode": mode, "bits": bits, "group_size": group_size})
    # Adapters are built on the base weights they wrap (DoRA's magnitudes are their row norms), so
    # the base must be quantized first. (Duck-typed: bit_axon.training imports this package.)
    if any("lora_a" in module for _, module in model.named_modules()):
        raise ValueError("The model has LoRA/DoRA adapters; quantize the base model before applying them")
    current = base_quantization(model)
    if current is not None and current != spec:
        raise ValueError(
            f"Model is already quantized with {current}; dequantize it first to re-quantize with {spec}"
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
    _record(model, spec)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer with its float equivalent, in place; the base becomes float (None).

    The new float layers are trainable like freshly built ones; freeze the model again if needed.
    """
    replacements = []
    for path, module in model.named_modules():
        base = find_base(module)
        if base is not None and base.quantized:
            replacements.append((path, base.to_float()))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    _record(model, None)
    return model


def _record(model: nn.Module, spec: dict[str, Any] | None) -> None:
    record = getattr(model, "record_quantization", None)
    if record is not None:  # a model that stores its spec (BitAxonModel: config.json); others read their layers
        record(spec)


def layer_quantization(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer path: {"mode", "bits", "group_size"}}`` for every quantized base layer of ``model``."""
    found = {}
    for path, module in model.named_modules():
        base = find_base(module)
        if base is not None and base.quantized:
            found[path] = {"mode": module.mode, "bits": module.bits, "group_size": module.group_size}
    return found


def summarize_quantization(per_layer: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Per-layer specs as one entry: the most common spec, plus the layers that differ from it."""
    if not per_layer:
        return None
    counts = Counter(tuple(spec[k] for k in SPEC_FIELDS) for spec in per_layer.values())
    default = dict(zip(SPEC_FIELDS, counts.most_common(1)[0][0], strict=True))
    return {**default, **{path: spec for path, spec in per_layer.items() if spec != default}}


def base_quantization(model: nn.Module) -> dict[str, Any] | None:
    """How ``model``'s base weights are quantized (see the module docstring); None for a float base."""
    if not hasattr(type(model), "quantization"):
        return summarize_quantization(layer_quantization(model))
    recorded = model.quantization
    if recorded is not None and set(recorded) <= set(SPEC_FIELDS):
        return quantization_spec(recorded)  # mlx-lm's {"group_size", "bits"} means affine
    return recorded


def adopt_quantized(model: nn.Module) -> int:
    """Give MLX's own quantized layers (``nn.QuantizedLinear``/``nn.QuantizedEmbedding``, e.g. mlx-lm's)
    our subclasses' CPU fast path, in place: same parameters and values, only the class changes.
    Returns the number of layers changed."""
    changed = 0
    for _, module in model.named_modules():
        fast = FAST_PATH_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            changed += 1
    return changed


DAMAGED = "the weights are damaged, or were saved from a run that diverged; re-create or re-download the model"


class NonFiniteWeightsError(ValueError):
    """A model's weights (or quantization scales) hold NaN or Inf; the message names the tensor."""


def check_finite(arrays: Mapping[str, mx.array], where: str, remedy: str = DAMAGED) -> None:
    """Raise ``NonFiniteWeightsError`` naming the first floating-point tensor of ``arrays`` (weights,
    quantization scales and biases) that holds NaN or Inf. Every reader of model weights calls it
    once; one reduction per tensor, evaluated together, costs about one read of the weights."""
    names = [name for name, value in arrays.items() if mx.issubdtype(value.dtype, mx.floating)]
    if not names:
        return
    finite = mx.stack([mx.isfinite(arrays[name]).all() for name in names]).tolist()
    bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NonFiniteWeightsError(f"{where}: tensor {bad[0]!r} holds NaN or Inf values{more}; {remedy}")
