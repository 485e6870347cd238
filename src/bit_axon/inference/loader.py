"""``load_for_inference``: a model (any source ``bit_axon.loading`` reads), optionally with an adapter.

The model half of ``bit_axon.loading.load``, plus a random small model for smoke tests.
"""

from __future__ import annotations

from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.loading import default_dtype, open_model, ready_for_inference
from bit_axon.model import BitAxonModel

import mlx.core as mx
import mlx.nn as nn

__all__ = ["default_dtype", "load_for_inference"]


def load_for_inference(
    model_path: str | Path | None,
    adapter_path: str | Path | None = None,
    config_small: bool = False,
    dtype: mx.Dtype | None = None,
) -> nn.Module:
    """The model at ``model_path`` with the adapter file ``adapter_path`` applied on top (not merged).

    ``config_small`` builds a fresh ``BitAxonConfig.small()`` model with random weights instead
    (smoke tests; it generates noise). ``dtype`` casts the stored floating-point weights; the
    default is ``default_dtype()``. Raises ``FileNotFoundError`` for a missing model directory or
    adapter file and ``ValueError`` when the adapter does not fit the model.
    """
    if config_small == (model_path is not None):
        raise ValueError("pass either a model directory or config_small=True (not both)")
    if not config_small:
        return open_model(model_path, adapter_path, dtype)
    model = BitAxonModel(BitAxonConfig.small())
    dtype = dtype if dtype is not None else default_dtype()
    if dtype is not None:
        model.set_dtype(dtype)
    return ready_for_inference(model, adapter_path)
