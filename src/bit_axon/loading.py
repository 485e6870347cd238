"""Loading models: ``load(path) -> (model, tokenizer)``, and Bit-Axon model directories.

A Bit-Axon model directory is ``config.json`` plus one or more ``*.safetensors`` files. A
quantized model records ``{"mode", "bits", "group_size"}`` under ``quantization`` in its
``config.json``; loading rebuilds that quantized structure before the stored codes and scales go in.

``load`` is the one way in for using a model (``bit-axon run``/``evaluate``,
``load_for_inference``): ``model_source`` tells what a path holds, and the reader of that source
builds the model; an adapter goes on top and the tokenizer is the model's own when it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.io import atomic_save_safetensors
from bit_axon.model import BitAxonModel
from bit_axon.quantization import quantization_spec, quantize_model
from bit_axon.tokenizer import TOKENIZER_FILES, QwenTokenizerWrapper
from bit_axon.training.checkpoint import load_adapter

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
BIT_AXON = "bit-axon"


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


# ---- load(path) -> (model, tokenizer) -------------------------------------------------------------


def default_dtype() -> mx.Dtype | None:
    """float32 on the CPU (MLX's CPU backend sends only float32 matmuls through BLAS), else as stored."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def model_source(path: Path) -> str:
    """What kind of model ``path`` holds: the one place where sources are told apart.

    Raises ``FileNotFoundError`` when ``path`` holds no model this package can read.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"Model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {path}: not a model directory")
    return BIT_AXON


# Readers by source: (path, dtype) -> model.
_READERS: dict[str, Callable[[Path, mx.Dtype | None], nn.Module]] = {BIT_AXON: load_model}


def output_vocab_size(model: nn.Module) -> int:
    """The number of logits the model's output head gives (every head type stores the vocabulary first)."""
    return model.output_head["weight"].shape[0]


def ready_for_inference(model: nn.Module, adapter_path: str | Path | None = None) -> nn.Module:
    """``model`` with the adapter file ``adapter_path`` applied on top (not merged), in eval mode, evaluated."""
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    model.eval()  # adapter dropout off
    mx.eval(model.parameters())
    return model


def open_tokenizer(tokenizer: str | Path | QwenTokenizerWrapper | None = None, model_path: Path | None = None):
    """``tokenizer`` as a tokenizer: an object is used as is, a str/path is a tokenizer id, file or
    directory; None is the model directory's ``tokenizer.json`` when it has one, else the bundled
    Qwen2.5 tokenizer."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is None and model_path is not None and any((model_path / n).is_file() for n in TOKENIZER_FILES):
        tokenizer = model_path
    if tokenizer is None:
        logger.info("Using the bundled Qwen2.5 tokenizer")
        return QwenTokenizerWrapper()
    return QwenTokenizerWrapper(tokenizer)


def check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """Raise ``ValueError`` when the tokenizer makes ids beyond the model's vocabulary."""
    vocab = output_vocab_size(model)
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has only {vocab}; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )


def open_model(path: str | Path, adapter_path: str | Path | None = None, dtype: mx.Dtype | None = None) -> nn.Module:
    """The model at ``path`` (any source ``model_source`` knows) with the adapter on top, ready for inference.

    ``dtype`` casts the stored floating-point weights; the default is ``default_dtype()``.
    """
    path = Path(path)
    model = _READERS[model_source(path)](path, dtype if dtype is not None else default_dtype())
    return ready_for_inference(model, adapter_path)


def load(
    path: str | Path,
    adapter_path: str | Path | None = None,
    tokenizer: str | Path | QwenTokenizerWrapper | None = None,
    dtype: mx.Dtype | None = None,
) -> tuple[nn.Module, QwenTokenizerWrapper]:
    """``(model, tokenizer)`` for the model at ``path``, with the adapter file ``adapter_path`` on top.

    ``tokenizer`` as in ``open_tokenizer``; ``dtype`` as in ``open_model``. Raises
    ``FileNotFoundError`` for a missing model or adapter, ``ValueError`` when the adapter or the
    tokenizer does not fit the model (``TokenizerLoadError``, an ``OSError``, for a bad tokenizer).
    """
    model = open_model(path, adapter_path, dtype)
    tok = open_tokenizer(tokenizer, Path(path))
    check_tokenizer_fits(model, tok)
    return model, tok
