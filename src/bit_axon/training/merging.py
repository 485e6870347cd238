"""Fold trained LoRA/DoRA adapters into the base weights for deployment."""

from __future__ import annotations

from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.loading import load_model, save_model
from bit_axon.quantization import DEFAULT_MODE, dequantize_model, quantization_spec, quantize_model
from bit_axon.training.checkpoint import load_adapter
from bit_axon.training.lora import AdapterConfig, adapter_config, adapter_layers

import mlx.nn as nn
from mlx.utils import tree_unflatten


def merge_adapters(model: nn.Module) -> list[str]:
    """Replace every LoRA/DoRA layer of ``model`` by its fused layer, in place; returns their paths.

    LoRA: ``W + scale B^T A^T``; DoRA: ``(m / ||W + delta||_row) (W + delta)``. A quantized base is
    dequantized, fused and quantized again in its own format, so the model keeps matching
    ``model.config.quantization`` (call ``dequantize_model`` first to fuse in full precision).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA/DoRA adapters to merge")
    fused = [(path, layer.fuse(requantize=True)) for path, layer in layers]
    model.update_modules(tree_unflatten(fused))
    return [path for path, _ in fused]


def save_merged_model(model: nn.Module, path: str | Path, config: BitAxonConfig | None = None) -> Path:
    """Save a merged model as a model directory (``config.json`` + ``model.safetensors``).

    ``config`` (default ``model.config``) must describe the model as it is now, quantization included.
    """
    if adapter_layers(model):
        raise ValueError("The model still has adapters; call merge_adapters(model) before saving it")
    if config is not None and config.to_dict() != model.config.to_dict():
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
    """Load a base model directory and an adapter file, merge them and save the result to ``output_dir``.

    The adapter's kind and rank come from the file (see ``load_adapter``); ``lora_rank`` is checked
    against it (``None`` skips the check). With ``quantize_after_merge`` the merged model is
    quantized with ``bits``/``group_size`` in the base's mode (NF4 for a float base, see
    ``bit_axon.quantization``); a base already in that format keeps its untouched layers' codes
    as they are and only the fused layers are quantized again. Without it, everything is saved in
    full precision (a quantized base is dequantized). Returns ``output_dir``.
    """
    base_model_path, adapter_path = Path(base_model_path), Path(adapter_path)
    if not adapter_path.is_file():
        raise FileNotFoundError(f"Adapter file not found: {adapter_path}")
    model = load_model(base_model_path)
    base_spec = model.config.quantization
    target = None
    if quantize_after_merge:
        mode = base_spec["mode"] if base_spec else DEFAULT_MODE
        target = quantization_spec({"mode": mode, "bits": bits, "group_size": group_size})
    if base_spec is not None and quantization_spec(base_spec) != target:
        # Fuse in full precision and quantize once at the end rather than through two formats.
        dequantize_model(model)

    load_adapter(model, adapter_path)
    rank = adapter_config(model).rank
    if lora_rank is not None and rank != lora_rank:
        raise ValueError(f"Adapter {adapter_path} has rank {rank}, but lora_rank={lora_rank} was given")
    merge_adapters(model)
    if target is not None:
        quantize_model(model, **target)
    return save_model(model, output_dir)
