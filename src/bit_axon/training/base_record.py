"""What an adapter file records about the base model it was trained on, and the check on loading.

Safetensors metadata keys (strings): ``base_source`` (the base's path or hub id, as given),
``base_quantization`` (JSON of ``bit_axon.quantization.base_quantization``: ``null`` for a float
base, ``{"mode", "bits", "group_size"}``, or a default plus per-layer entries for mixed formats) and
``base_fingerprint``: sha256 over the sorted frozen base tensors' names and shapes and a strided
sample of each one's values (floats compared as float32, so a float16 copy cast to float32 still
matches). Cheap and deterministic; it tells bases apart, it does not prove two bases equal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from bit_axon.quantization import SPEC_FIELDS, base_quantization, quantization_spec, quantize_model
from bit_axon.training.lora import adapter_layers

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

logger = logging.getLogger(__name__)

SOURCE_KEY, QUANTIZATION_KEY, FINGERPRINT_KEY = "base_source", "base_quantization", "base_fingerprint"
SAMPLES_PER_TENSOR = 256


def _base_name(name: str, adapters: set[str]) -> str | None:
    """A parameter's name in the base model without adapters (None for an adapter's own tensor):
    ``{adapter}.linear.{leaf}`` -> ``{adapter}.{leaf}``."""
    layer, _, leaf = name.rpartition(".")
    if layer in adapters:
        return None  # lora_a, lora_b, m
    parent, _, child = layer.rpartition(".")
    return f"{parent}.{leaf}" if child == "linear" and parent in adapters else name


def base_weights(model: nn.Module) -> dict[str, mx.array]:
    """The frozen base tensors of ``model`` under the names they have without adapters."""
    adapters = {path for path, _ in adapter_layers(model)}
    named = ((_base_name(name, adapters), value) for name, value in tree_flatten(model.parameters()))
    return {name: value for name, value in named if name is not None}


def fingerprint(model: nn.Module) -> str:
    """The fingerprint of ``model``'s frozen base weights (see the module docstring)."""
    weights = base_weights(model)
    names = sorted(weights)
    samples = []
    for name in names:
        flat = weights[name].reshape(-1)
        sample = flat[:: max(1, flat.size // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
        samples.append(sample.astype(mx.float32) if mx.issubdtype(sample.dtype, mx.floating) else sample)
    mx.eval(samples)
    digest = hashlib.sha256()
    for name, sample in zip(names, samples, strict=True):
        value = weights[name]
        kind = "float" if mx.issubdtype(value.dtype, mx.floating) else str(value.dtype)
        digest.update(f"{name}:{tuple(value.shape)}:{kind}\n".encode())
        digest.update(np.array(sample).tobytes())
    return digest.hexdigest()


def _recorded_quantization(model: nn.Module) -> dict | None:
    spec = base_quantization(model)
    if spec is None:
        return None
    adapters = {path for path, _ in adapter_layers(model)}
    # Per-layer entries are keyed by layer path: an adapted layer's base is its ``.linear``.
    return {k.removesuffix(".linear") if k.removesuffix(".linear") in adapters else k: v for k, v in spec.items()}


def base_metadata(model: nn.Module) -> dict[str, str]:
    """The adapter-file metadata recording ``model``'s base (call with the adapters attached)."""
    metadata = {
        QUANTIZATION_KEY: json.dumps(_recorded_quantization(model), sort_keys=True),
        FINGERPRINT_KEY: fingerprint(model),
    }
    source = getattr(model, "source", None)
    if source is not None:
        metadata[SOURCE_KEY] = str(source)
    return metadata


def _describe(source: str | None, quantization: dict | None) -> str:
    spec = "float" if quantization is None else json.dumps(quantization, sort_keys=True)
    return f"{source or 'a model without a recorded source'} ({spec})"


def bind_to_base(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Make ``model`` (no adapters yet) the base the adapter file ``path`` was trained on, or refuse.

    When the file says the base was quantized with a single spec and ``model`` is float, ``model``
    is quantized with it first (e.g. a ``--config-small`` run's float ``base_model`` directory, whose
    NF4 copy was trained on). Then the fingerprints must agree: a ``ValueError`` names the file, the
    recorded base and the one given. Files that record no base are loaded unchecked (logged).
    """
    if FINGERPRINT_KEY not in metadata:
        logger.info("%s records no base model fingerprint; loading it without checking the base", path)
        return
    recorded = json.loads(metadata.get(QUANTIZATION_KEY, "null"))
    if recorded is not None and base_quantization(model) is None and set(recorded) <= set(SPEC_FIELDS):
        logger.info("%s was trained on a %s base: quantizing the float model given likewise", path, recorded)
        quantize_model(model, **quantization_spec(recorded))
    if fingerprint(model) != metadata[FINGERPRINT_KEY]:
        raise ValueError(
            f"Adapter {path} does not match the base model it is loaded onto: it was trained on "
            f"{_describe(metadata.get(SOURCE_KEY), recorded)}, but the model given is "
            f"{_describe(getattr(model, 'source', None), base_quantization(model))} and its weights differ"
        )
