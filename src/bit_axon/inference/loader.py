"""Loading a model for inference: a model directory (float or quantized), optionally with an adapter."""

from __future__ import annotations

from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.loading import load_model
from bit_axon.model import BitAxonModel
from bit_axon.training.checkpoint import load_adapter

import mlx.core as mx


def default_dtype() -> mx.Dtype | None:
    """float32 on the CPU (MLX's CPU backend sends only float32 matmuls through BLAS), else as stored."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def load_for_inference(
    model_path: str | Path | None,
    adapter_path: str | Path | None = None,
    config_small: bool = False,
    dtype: mx.Dtype | None = None,
) -> BitAxonModel:
    """The model at ``model_path`` with the adapter file ``adapter_path`` applied on top (not merged).

    ``config_small`` builds a fresh ``BitAxonConfig.small()`` model with random weights instead
    (smoke tests; it generates noise). ``dtype`` casts the stored floating-point weights; the
    default is ``default_dtype()``. Raises ``FileNotFoundError`` for a missing model directory or
    adapter file and ``ValueError`` when the adapter does not fit the model.
    """
    if config_small == (model_path is not None):
        raise ValueError("pass either a model directory or config_small=True (not both)")
    if dtype is None:
        dtype = default_dtype()
    if config_small:
        model = BitAxonModel(BitAxonConfig.small())
        if dtype is not None:
            model.set_dtype(dtype)
    else:
        model = load_model(model_path, dtype=dtype)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    model.eval()  # adapter dropout off
    mx.eval(model.parameters())
    return model
