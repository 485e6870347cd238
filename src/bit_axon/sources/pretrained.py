"""mlx-lm architectures as Bit-Axon models, keeping mlx-lm's parameter names.

``pretrained_class(arch)`` subclasses ``arch.Model`` (an mlx-lm architecture module such as
``mlx_lm.models.llama``) with :class:`PretrainedLMMixin`, so an instance IS an mlx-lm model (same
parameter paths ``model.layers.N.self_attn.q_proj...``, same ``sanitize``) that also meets the
model interface of the trainer: ``features``/``head``/``output_head``/``__call__ -> (logits, cache)``/
``make_cache``, and packed rows through ``segment_ids``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Collection
from pathlib import Path
from types import ModuleType
from typing import Any

from bit_axon.model import recomputed
from bit_axon.quantization import adopt_quantized, layer_quantization, summarize_quantization
from bit_axon.quantization.base import FORMATS, find_base
from bit_axon.quantization.model import check_finite

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache

MAX_NAMES_IN_ERROR = 8
# config.json key for the layers in formats of ours that mlx-lm does not know (NF4):
# ``{layer path: {"mode", "bits", "group_size"}}``. mlx-lm's own ``quantization`` entry lists the rest.
OWN_QUANTIZATION_KEY = "bit_axon_quantization"
QUANTIZATION_KEYS = ("quantization", "quantization_config", OWN_QUANTIZATION_KEY)


class PackedRowAttention:
    """A per-layer stand-in for a KV cache that keeps the examples of packed rows apart.

    mlx-lm's models take their attention mask from ``cache.make_mask`` and their RoPE offset from
    ``cache.offset``; this object stores nothing (offset 0, keys passed through) and answers a
    block-diagonal causal mask built from ``segment_ids`` (B, L), so no token attends across
    examples. RoPE positions continue across a row; RoPE being relative, that changes the scores
    inside a segment only by rounding.
    """

    offset = 0

    def __init__(self, segment_ids: mx.array):
        if segment_ids.ndim != 2:
            raise ValueError(f"segment_ids must be (batch, length), got shape {segment_ids.shape}")
        self.segment_ids = segment_ids

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if n != self.segment_ids.shape[1]:
            raise ValueError(f"segment_ids cover {self.segment_ids.shape[1]} positions, the input has {n}")
        causal = create_causal_mask(n, window_size=window_size)
        same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        return (same & causal)[:, None]  # (B, 1, L, L), broadcast over heads


@functools.cache
def _recomputed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` (a transformer layer) recomputing its activations in the backward pass.

    Only without a real KV cache (training): a cache's state must not be written inside the
    recomputed function.
    """

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        if cache is not None and not isinstance(cache, PackedRowAttention):
            return cls.__call__(self, x, *args, **kwargs)
        return recomputed(self, lambda x: cls.__call__(self, x, *args, **kwargs), x)

    return type(f"Recomputed{cls.__name__}", (cls,), {"__call__": __call__, "recomputes": cls})


class PretrainedLMMixin:
    """The Bit-Axon model interface on top of an mlx-lm ``Model`` (put first in the bases)."""

    @property
    def quantization(self) -> dict | None:
        """The base weights' quantization, read from the layers (``base_quantization``'s layout)."""
        return summarize_quantization(layer_quantization(self))

    @property
    def source_config(self) -> dict:
        """The mlx-lm config dict the model was built from (without its quantization entries)."""
        return dict(self.__dict__["_source_config"])

    def remember_config(self, config: dict) -> None:
        # Kept outside the module tree: nn.Module would store a dict attribute as a child.
        self.__dict__["_source_config"] = {k: v for k, v in config.items() if k not in QUANTIZATION_KEYS}

    @property
    def output_head(self) -> nn.Module:
        """The frozen layer mapping hidden states to logits: ``lm_head``, or the tied embedding."""
        return self.get("lm_head", self.model.embed_tokens)

    def head(self, h: mx.array) -> mx.array:
        layer = self.output_head
        return layer.as_linear(h) if hasattr(layer, "as_linear") else layer(h)

    def features(
        self,
        input_ids: mx.array,
        cache: list[Any] | None = None,
        segment_ids: mx.array | None = None,
    ) -> mx.array:
        """Hidden states after the final norm, before the head, (B, L, hidden)."""
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids are for packed training rows; they cannot be combined with a cache")
            cache = [PackedRowAttention(segment_ids)] * len(self.layers)
        return self.model(input_ids, cache)

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[Any] | None = None,
        segment_ids: mx.array | None = None,
    ) -> tuple[mx.array, list[Any] | None]:
        """Logits (B, L, vocab) and the updated caches, like ``BitAxonModel``."""
        return self.head(self.features(input_ids, cache, segment_ids)), cache

    def mlx_lm_forward(self, inputs: mx.array, cache: list[Any] | None = None, **kwargs: Any) -> mx.array:
        """mlx-lm's own ``Model.__call__`` (logits only), for code written against mlx-lm."""
        return super().__call__(inputs, cache=cache, **kwargs)

    def set_recompute(self, enabled: bool) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        for layer in self.layers:
            plain = getattr(type(layer), "recomputes", type(layer))
            layer.__class__ = _recomputed_class(plain) if enabled else plain

    def make_cache(self) -> list[Any]:
        """mlx-lm's cache objects for incremental decoding (the architecture's own, else KVCache)."""
        own = getattr(super(), "make_cache", None)
        return own() if own is not None else [KVCache() for _ in self.layers]


def architecture_module(config: dict) -> ModuleType:
    """The mlx-lm architecture module for a config dict (``model_type``), by mlx-lm's own lookup."""
    from mlx_lm.utils import _get_classes

    model_class, _ = _get_classes(config)
    return importlib.import_module(model_class.__module__)


@functools.cache
def pretrained_class(arch: ModuleType) -> type[nn.Module]:
    """``class Pretrained<Arch>(PretrainedLMMixin, arch.Model)``, one per architecture module."""
    name = "Pretrained" + "".join(part.capitalize() for part in arch.__name__.rsplit(".", 1)[-1].split("_"))
    return type(name, (PretrainedLMMixin, arch.Model), {"__module__": __name__})


def _model_classes(config: dict) -> tuple[type[nn.Module], type]:
    arch = architecture_module(config)
    return pretrained_class(arch), arch.ModelArgs


def check_head_split(model: nn.Module) -> None:
    """Fail clearly when an architecture's logits are not ``head(features(x))`` (e.g. soft-capping)."""
    tokens = mx.array([[0, 1]])
    expected = model.mlx_lm_forward(tokens)
    got = model.head(model.features(tokens))
    if expected.shape != got.shape or not mx.allclose(expected, got, rtol=1e-3, atol=1e-3).item():
        raise NotImplementedError(
            f"{type(model).__name__}: this architecture transforms the logits after its head; "
            f"its features/head split is not supported"
        )


def infer_quantization(model: nn.Module, weights: dict[str, mx.array], skip: Collection[str] = ()) -> dict | None:
    """mlx-lm's ``quantization`` config for the quantized layers among ``weights`` (per layer, read
    from their shapes by mlx-lm's ``infer_quant_config``); ``model`` must still be float."""
    from mlx_lm.utils import infer_quant_config

    per_layer = {
        path: infer_quant_config(path, module, weights)
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and f"{path}.scales" in weights and path not in skip
    }
    if not per_layer:
        return None
    return {**next(iter(per_layer.values())), **per_layer}


def quantize_like(
    model: nn.Module, quantization: dict, weights: dict[str, mx.array], skip: Collection[str] = ()
) -> None:
    """``nn.quantize`` as the config says: top-level defaults, per-layer dict entries overriding them
    (the layers in ``skip`` are left alone)."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in skip:
            return False
        if path in quantization:
            return quantization[path]  # a dict of overrides, or False for a layer kept in float
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def quantize_own_formats(model: nn.Module, layers: dict[str, dict]) -> None:
    """Give the layers in ``layers`` (``{path: {"mode", "bits", "group_size"}}``) our formats' structure."""
    modules = dict(model.named_modules())
    replacements = []
    for path, spec in layers.items():
        base = find_base(modules[path]) if path in modules else None
        if base is None or base.quantized:
            raise ValueError(f"{OWN_QUANTIZATION_KEY}: {path} is not a float base layer of the model")
        replacements.append((path, FORMATS[spec["mode"]].quantize(modules[path], base.kind, spec["group_size"], spec["bits"])))
    model.update_modules(tree_unflatten(replacements))


def _names(keys: set[str]) -> str:
    shown = sorted(keys)[:MAX_NAMES_IN_ERROR]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def load_weights_strict(model: nn.Module, weights: dict[str, mx.array], source: str = "weights") -> None:
    """Load ``weights`` into ``model``, naming the missing and unexpected keys when they don't match."""
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        parts = [f"missing: {_names(missing)}" if missing else "", f"unexpected: {_names(unexpected)}" if unexpected else ""]
        raise ValueError(f"{source} do not match the model: " + "; ".join(p for p in parts if p))
    model.load_weights(list(weights.items()), strict=True)


def build_pretrained(config: dict, weights: dict[str, mx.array], source: str = "weights") -> nn.Module:
    """An mlx-lm model (with the Bit-Axon interface) from an mlx-lm config dict and its weights.

    ``config["quantization"]`` (mlx-lm's format: ``group_size``, ``bits``, ``mode`` and per-layer
    entries keyed by parameter path) is honoured; without one, quantized weights (``scales``) keep
    the format their shapes tell; layers in our own formats are listed under ``OWN_QUANTIZATION_KEY``.
    The weights must match the model exactly.
    """
    arch = architecture_module(config)
    model = pretrained_class(arch)(arch.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    own = config.get(OWN_QUANTIZATION_KEY) or {}
    quantization = config.get("quantization") or infer_quantization(model, weights, skip=own)
    if quantization is not None:
        quantize_like(model, quantization, weights, skip=own)
    if own:
        quantize_own_formats(model, own)
    model.eval()
    load_weights_strict(model, weights, source)
    mx.eval(model.parameters())
    return ready_pretrained(model, config, source)


def ready_pretrained(model: nn.Module, config: dict, source: str) -> nn.Module:
    """A freshly loaded pretrained model as the pipeline uses it: MLX's quantized layers on our CPU
    fast path (``adopt_quantized``), its config kept for saving, its weights checked to be finite and
    its logits to be head(features)."""
    adopt_quantized(model)
    model.remember_config(config)
    check_finite(dict(tree_flatten(model.parameters())), source)  # before the split check computes with them
    check_head_split(model)
    return model


def load_hf_directory(path: str | Path) -> tuple[nn.Module, dict]:
    """A Hugging Face-layout directory (config.json + model*.safetensors), float or MLX-quantized,
    through mlx-lm's loader with the classes of :func:`pretrained_class` (a directory with layers in
    our own formats, as ``save_pretrained`` writes NF4, through :func:`build_pretrained`)."""
    from mlx_lm.utils import load_config, load_model

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    config = load_config(path)
    if OWN_QUANTIZATION_KEY in config:
        weights: dict[str, mx.array] = {}
        for file in sorted(path.glob("model*.safetensors")):
            weights.update(mx.load(str(file)))
        return build_pretrained(config, weights, source=str(path)), config
    model, config = load_model(path, get_model_classes=_model_classes)
    return ready_pretrained(model, config, str(path)), config
