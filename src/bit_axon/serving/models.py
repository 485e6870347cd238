"""The models a server answers for: a base model, and the base with each adapter, each by its id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from bit_axon.inference.loader import in_float_for_speed, load
from bit_axon.serving.engine import ServedModel

import mlx.nn as nn

logger = logging.getLogger(__name__)


def context_length(model: nn.Module) -> int:
    """How many tokens (prompt and reply) the model reads: its configuration's limit."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "max_seq_len"):
        return int(config.max_seq_len)
    source = model.source_config if hasattr(model, "source_config") else {}
    return int(source.get("max_position_embeddings", 4096))


def base_name(path: str | Path) -> str:
    """The id of a base model: its file or directory name, without a ``.gguf`` suffix."""
    name = Path(str(path).rstrip("/")).name
    return name.removesuffix(".gguf") or str(path)


def load_served(
    model_path: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    name: str | None = None,
    max_context: int | None = None,
) -> list[ServedModel]:
    """The base at ``model_path`` (id ``name``, default ``base_name``) and one model per adapter.

    Each adapter sits on its own copy of the base (a batch runs one set of weights): memory grows
    by one base per adapter. On the CPU each model is then made float for speed
    (``in_float_for_speed``). ``max_context`` caps the context length read from the model's
    configuration.
    """
    name = name or base_name(model_path)
    adapters = dict(adapters or {})
    if name in adapters:
        raise ValueError(f"adapter name {name!r} is the base model's id; give the adapter another name")
    served = []
    for ident, adapter in [(name, None), *adapters.items()]:
        model, tokenizer = load(model_path, adapter_path=adapter)
        if in_float_for_speed(model):
            logger.info("%s runs in float (adapter folded in, base dequantized once): faster on this CPU", ident)
        limit = context_length(model) if max_context is None else min(max_context, context_length(model))
        served.append(ServedModel(ident, model, tokenizer, limit))
        logger.info("Serving %s%s", ident, f" ({adapter} on {model_path})" if adapter else f" ({model_path})")
    return served
