"""Pretrained models saved as mlx-lm / Hugging Face-layout directories.

``config.json`` is the model's mlx-lm config dict with mlx-lm's ``quantization`` entry for the
layers in MLX's formats (defaults plus per-layer entries where formats differ, as mlx-lm writes
it), and ``OWN_QUANTIZATION_KEY`` for layers in our own formats (NF4), which only our loader reads;
the weights are one ``model.safetensors`` under mlx-lm's parameter names. A float or MLX-quantized
directory therefore loads with ``mlx_lm.utils.load_model`` as well as with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

from bit_axon.io import atomic_save_safetensors, atomic_write_text
from bit_axon.quantization import layer_quantization, summarize_quantization
from bit_axon.sources.pretrained import OWN_QUANTIZATION_KEY

import mlx.nn as nn
from mlx.utils import tree_flatten

WEIGHTS_FILE = "model.safetensors"
MLX_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


def pretrained_config(model: nn.Module) -> dict:
    """The config.json dict of a pretrained model as it is now (quantization read from its layers)."""
    config = model.source_config
    per_layer = layer_quantization(model)
    mlx = summarize_quantization({p: s for p, s in per_layer.items() if s["mode"] in MLX_MODES})
    own = {p: s for p, s in per_layer.items() if s["mode"] not in MLX_MODES}
    if mlx is not None:
        config["quantization"] = mlx
    if own:
        config[OWN_QUANTIZATION_KEY] = own
    return config


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of a pretrained model into ``path`` (atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    atomic_save_safetensors(path / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
    atomic_write_text(path / "config.json", json.dumps(pretrained_config(model), indent=2) + "\n")
    return path
