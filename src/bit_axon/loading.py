"""Model directories: ``config.json`` plus one or more ``*.safetensors`` files.

A quantized model records ``{"mode", "bits", "group_size"}`` under ``quantization`` in its
``config.json``; loading rebuilds that quantized structure before the stored codes and scales go in.
"""

from __future__ import annotations

from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.io import atomic_save_safetensors
from bit_axon.model import BitAxonModel
from bit_axon.quantization import quantization_spec, quantize_model

import mlx.core as mx
from mlx.utils import tree_flatten

WEIGHTS_FILE = "model.safetensors"


def load_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a model directory's safetensors files (shards merged)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))
    return weights


def load_model(path: str | Path, dtype: mx.Dtype | None = None) -> BitAxonModel:
    """Build the model described by ``path/config.json`` and load its weights (strict)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Model directory not found: {path}")
    config = BitAxonConfig.load(path)
    model = BitAxonModel(config)
    if config.quantization is not None:
        # Replacing the (lazy, never evaluated) random float layers costs no compute.
        quantize_model(model, **quantization_spec(config.quantization))
    weights = load_weights(path)
    if config.weight_tying:
        # Reference checkpoints store the tied head too; it is the embedding by definition.
        weights.pop("lm_head.weight", None)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Weights in {path} do not match its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape {expected[name].shape}")
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def save_model(model: BitAxonModel, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (atomically) into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    atomic_save_safetensors(path / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
    model.config.save(path / "config.json")
    return path
