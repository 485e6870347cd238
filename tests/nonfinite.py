"""Model directories with a non-finite weight, for the tests of the check that refuses them."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np


def poisoned_copy(model_dir: Path, folder: Path) -> tuple[Path, str]:
    """A copy of ``model_dir`` with one Inf in one float tensor (written around save_model's check)."""
    shutil.copytree(model_dir, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    name = next(k for k, v in sorted(weights.items()) if mx.issubdtype(v.dtype, mx.floating) and v.size > 1)
    values = np.array(weights[name].astype(mx.float32))
    values.flat[1] = np.inf
    weights[name] = mx.array(values).astype(weights[name].dtype)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    return folder, name
