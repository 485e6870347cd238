"""Models ready for inference: ``load(path) -> (model, tokenizer)`` with an adapter on top, and
``load_for_inference`` (the model half, plus a random small model for smoke tests).

The model comes from ``bit_axon.loading`` (any source it knows); the adapter file is applied on top
(not merged, see ``bit_axon.training.checkpoint.load_adapter``); the tokenizer is the model's own
unless one is given.
"""

from __future__ import annotations

from pathlib import Path

from bit_axon.backend import on_cpu, settings
from bit_axon.config import BitAxonConfig
from bit_axon.loading import check_tokenizer_fits, load_model, load_tokenizer
from bit_axon.model import BitAxonModel
from bit_axon.quantization import base_quantization, dequantize_model
from bit_axon.training.checkpoint import load_adapter
from bit_axon.training.lora import adapter_layers

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

__all__ = ["default_dtype", "in_float_for_speed", "load", "load_for_inference", "open_model", "ready_for_inference"]


def default_dtype() -> mx.Dtype | None:
    """float32 on the CPU (MLX's CPU backend sends only float32 matmuls through BLAS), else as stored."""
    return mx.float32 if on_cpu() else None


def ready_for_inference(model: nn.Module, adapter_path: str | Path | None = None) -> nn.Module:
    """``model`` with the adapter file ``adapter_path`` applied on top (not merged), in eval mode, evaluated."""
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    model.eval()  # adapter dropout off
    mx.eval(model.parameters())
    return model


def in_float_for_speed(model: nn.Module) -> bool:
    """Fold ``model``'s adapters in and dequantize its base once, in place, where the backend says a
    float model runs faster (the CPU: ``Backend.float_inference``). The model computes the same
    function up to rounding; it is for forward passes only (a teacher, a served model), since its
    adapters are no longer separate. Returns whether it changed anything."""
    if not settings().float_inference():
        return False
    layers = adapter_layers(model)
    if layers:
        model.update_modules(tree_unflatten([(path, layer.fuse(requantize=False)) for path, layer in layers]))
    quantized = base_quantization(model) is not None
    if quantized:
        dequantize_model(model)
    if layers or quantized:
        mx.eval(model.parameters())
    return bool(layers) or quantized


def open_model(path: str | Path, adapter_path: str | Path | None = None, dtype: mx.Dtype | None = None) -> nn.Module:
    """The model at ``path`` (any source ``bit_axon.loading.model_source`` knows) with the adapter on
    top, ready for inference. ``dtype`` casts the stored floating-point weights; the default is
    ``default_dtype()``."""
    model = load_model(path, dtype if dtype is not None else default_dtype())
    return ready_for_inference(model, adapter_path)


def load(
    path: str | Path,
    adapter_path: str | Path | None = None,
    tokenizer=None,
    dtype: mx.Dtype | None = None,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for the model at ``path``, with the adapter file ``adapter_path`` on top.

    ``tokenizer`` overrides the model's own (see ``bit_axon.loading.load_tokenizer``); ``dtype`` as
    in ``open_model``. Raises ``FileNotFoundError`` for a missing model or adapter, ``ValueError``
    when the adapter or the tokenizer does not fit the model (``TokenizerLoadError``, an
    ``OSError``, for a bad tokenizer).
    """
    model = open_model(path, adapter_path, dtype)
    tok = load_tokenizer(path, tokenizer)
    check_tokenizer_fits(model, tok)
    return model, tok


def load_for_inference(
    model_path: str | Path | None,
    adapter_path: str | Path | None = None,
    config_small: bool = False,
    dtype: mx.Dtype | None = None,
) -> nn.Module:
    """The model at ``model_path`` with the adapter file ``adapter_path`` applied on top (not merged).

    ``config_small`` builds a fresh ``BitAxonConfig.small()`` model with random weights instead
    (smoke tests; it generates noise). ``dtype`` casts the stored floating-point weights; the
    default is ``default_dtype()``. Raises ``FileNotFoundError`` for a missing model or adapter file
    and ``ValueError`` when the adapter does not fit the model.
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
