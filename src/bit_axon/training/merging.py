"""Fold trained LoRA/DoRA adapters into the base weights for deployment."""

from __future__ import annotations

from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.loading import load_model, save_model
from bit_axon.quantization import (
    DEFAULT_MODE,
    SPEC_FIELDS,
    base_quantization,
    dequantize_model,
    quantization_spec,
    quantize_model,
)
from bit_axon.training.checkpoint import check_adapter_file, load_adapter
from bit_axon.training.lora import AdapterConfig, adapter_config, adapter_layers

import mlx.nn as nn
from mlx.utils import tree_unflatten


def merge_adapters(model: nn.Module) -> list[str]:
    """Replace every LoRA/DoRA layer of ``model`` by its fused layer, in place; returns their paths.

    LoRA: ``W + scale B^T A^T``; DoRA: ``(m / ||W + delta||_row) (W + delta)``. A quantized base is
    dequantized, fused and quantized again in its own layer's format, so the model keeps its
    ``base_quantization`` (call ``dequantize_model`` first to fuse in full precision).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA/DoRA adapters to merge")
    fused = [(path, layer.fuse(requantize=True)) for path, layer in layers]
    model.update_modules(tree_unflatten(fused))
    return [path for path, _ in fused]


def save_merged_model(model: nn.Module, path: str | Path, config: BitAxonConfig | None = None) -> Path:
    """Save a merged model as a model directory (``bit_axon.loading.save_model``).

    ``config`` (default ``model.config``) must describe a Bit-Axon model as it is now, quantization
    included; a pretrained model describes itself (leave ``config`` out).
    """
    if adapter_layers(model):
        raise ValueError("The model still has adapters; call merge_adapters(model) before saving it")
    current = getattr(model, "config", None)
    if config is not None and (not isinstance(current, BitAxonConfig) or config.to_dict() != current.to_dict()):
        raise ValueError(
            "config does not describe the model (architecture or quantization differ); "
            "pass model.config or leave config out"
        )
    return save_model(model, path)


def load_and_merge(
    base_model_path: str | Path,
    adapter_path: str | Path,
    output_dir: str | Path,
    quantize_after_merge: bool = True,
    bits: int = 4,
    group_size: int = 64,
    lora_rank: int | None = AdapterConfig.rank,
) -> Path:
    """Load a base model (any source ``bit_axon.loading`` reads) and an adapter file, merge them and
    save the result to ``output_dir`` (a pretrained base as an mlx-lm/HF-layout directory).

    The adapter's kind and rank come from the file (see ``load_adapter``, which also refuses a base
    other than the one it was trained on); ``lora_rank`` is checked against it (``None`` skips the
    check). With ``quantize_after_merge`` the merged model is quantized with ``bits``/``group_size``
    in the base's mode (NF4 for a float base, see ``bit_axon.quantization``); a base already in that
    format keeps its untouched layers' codes as they are and only the fused layers are quantized
    again. A base in mixed per-layer formats (e.g. a GGUF file's 8-bit embedding and 4-bit
    projections) keeps them: each fused layer goes back to its own base layer's format. Without
    ``quantize_after_merge``, everything is saved in full precision (a quantized base is
    dequantized). Returns ``output_dir``.
    """
    base_model_path, adapter_path = Path(base_model_path), check_adapter_file(adapter_path)
    model = load_model(base_model_path)
    load_adapter(model, adapter_path)  # on the base as it is, so its record of the base can be checked
    rank = adapter_config(model).rank
    if lora_rank is not None and rank != lora_rank:
        raise ValueError(f"Adapter {adapter_path} has rank {rank}, but lora_rank={lora_rank} was given")

    base_spec = base_quantization(model)
    mixed = base_spec is not None and not set(base_spec) <= set(SPEC_FIELDS)
    target = None
    if quantize_after_merge and not mixed:
        mode = base_spec["mode"] if base_spec else DEFAULT_MODE
        target = quantization_spec({"mode": mode, "bits": bits, "group_size": group_size})
    if base_spec is not None and base_spec != target and not (mixed and quantize_after_merge):
        # Fuse in full precision and quantize once at the end rather than through two formats.
        dequantize_model(model)
    merge_adapters(model)
    if target is not None:
        quantize_model(model, **target)
    return save_model(model, output_dir)
