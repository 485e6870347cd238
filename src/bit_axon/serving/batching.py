"""Several sequences decoded in one forward pass: joining and dropping rows of per-layer caches.

A sequence is prefilled alone, with the model's own ``make_cache()``; its caches then join the
running batch (``join``), and a finished sequence's rows leave it (``keep_rows``). Bit-Axon's
caches batch themselves (``bit_axon.cache``); mlx-lm's ``KVCache`` batches as mlx-lm's own
``BatchKVCache``, which its models' attention masks and RoPE offsets already understand.
"""

from __future__ import annotations

from typing import Any

from bit_axon import cache as own

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache

LayerCache = Any


def batchable(cache: list[LayerCache]) -> bool:
    """Whether every layer cache of a sequence can join a batch."""
    return all(isinstance(c, (own.KVCache, own.SSMCache, mlx_lm_cache.KVCache, mlx_lm_cache.BatchKVCache)) for c in cache)


def _join_layer(batch: LayerCache | None, single: LayerCache) -> LayerCache:
    if isinstance(single, own.SSMCache):
        return own.SSMCache.join([single] if batch is None else [batch, single])
    if isinstance(single, own.KVCache):
        return own.BatchKVCache.join([single] if batch is None else [batch, single])
    rows = mlx_lm_cache.BatchKVCache.merge([single])
    if batch is None:
        return rows
    batch.extend(rows)
    return batch


def join(batch: list[LayerCache] | None, single: list[LayerCache]) -> list[LayerCache]:
    """The caches of ``batch`` (None: an empty batch) with the sequence ``single`` appended as the last row."""
    if not batchable(single):
        kinds = sorted({type(c).__name__ for c in single})
        raise TypeError(f"caches of kind {', '.join(kinds)} cannot be batched")
    layers = [None] * len(single) if batch is None else batch
    return [_join_layer(b, s) for b, s in zip(layers, single, strict=True)]


def keep_rows(batch: list[LayerCache], rows: list[int]) -> list[LayerCache]:
    """The caches of ``batch`` with only ``rows`` (in that order) left."""
    kept = []
    for layer in batch:
        if isinstance(layer, mlx_lm_cache.BatchKVCache):
            layer.filter(mx.array(rows, dtype=mx.int32))
            kept.append(layer)
        else:
            kept.append(layer.keep_rows(rows))
    return kept


def states(batch: list[LayerCache]) -> list[mx.array]:
    """The arrays to evaluate so that a step's cache updates are done."""
    out = []
    for layer in batch:
        state = layer.state
        out.extend(s for s in (state if isinstance(state, (list, tuple)) else [state]) if isinstance(s, mx.array))
    return out
