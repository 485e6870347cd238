"""BitAxonModel: embedding -> bridge -> 24-layer SSM / SWA+MoE / SSM+MoE sandwich -> bridge -> tied head."""

from __future__ import annotations

from collections.abc import Callable

from bit_axon.cache import KVCache, SSMCache
from bit_axon.config import BitAxonConfig
from bit_axon.layers.blocks import AxonSSMBlock, AxonSSMMoEBlock, AxonSWAMoEBlock

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

Cache = list[KVCache | SSMCache]


def block_class(config: BitAxonConfig, index: int) -> type[nn.Module]:
    zone2, zone3 = config.zone_boundaries
    if index < zone2:
        return AxonSSMBlock
    if index < zone3:
        return AxonSWAMoEBlock
    return AxonSSMMoEBlock


def recompute_in_backward(fn: Callable[..., mx.array]) -> Callable[..., mx.array]:
    """``fn`` whose activations are recomputed in the backward pass instead of kept (``mx.checkpoint``).

    Unlike ``mx.checkpoint``, the recomputation takes inputs made to depend on the incoming
    gradient, so it is a subgraph of its own that cannot run (or be merged by ``mx.compile``) ahead
    of the backward pass. With ``mx.checkpoint``, a compiled step of a model with DoRA adapters
    still kept memory per layer; this does not (bench/README.md, "Measurements behind code choices").
    """

    @mx.custom_function
    def wrapped(*arrays: mx.array) -> mx.array:
        return fn(*arrays)

    @wrapped.vjp
    def wrapped_vjp(primals, cotangent, output):
        _, grads = mx.vjp(fn, mx.depends(list(primals), [cotangent]), [cotangent])
        return tuple(grads)

    return wrapped


def recomputed(module: nn.Module, call: Callable[..., mx.array], *inputs: mx.array) -> mx.array:
    """``call(*inputs)``, a forward pass of ``module``, with its activations recomputed in the
    backward pass (``recompute_in_backward``); ``module``'s trainable parameters go in as inputs so
    that their gradients flow."""
    flat = tree_flatten(module.trainable_parameters())
    names, params = [k for k, _ in flat], [v for _, v in flat]
    n = len(params)

    def forward(*arrays: mx.array) -> mx.array:
        module.update(tree_unflatten(list(zip(names, arrays[:n], strict=True))))
        return call(*arrays[n:])

    out = recompute_in_backward(forward)(*params, *inputs)
    module.update(tree_unflatten(list(zip(names, params, strict=True))))
    return out


class BitAxonModel(nn.Module):
    def __init__(self, config: BitAxonConfig):
        super().__init__()
        self.config = config
        self.recompute = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_source_model)
        self.input_proj = nn.Linear(config.d_source_model, config.hidden_dim, bias=False)
        for i in range(config.num_layers):
            # Layers are attributes ``layer_{i}`` (not a list) to keep the reference checkpoint names.
            setattr(self, f"layer_{i}", block_class(config, i)(config))
        self.output_proj = nn.Linear(config.hidden_dim, config.d_source_model, bias=False)
        if not config.weight_tying:
            self.lm_head = nn.Linear(config.d_source_model, config.vocab_size, bias=False)

    @property
    def blocks(self) -> list[nn.Module]:
        return [getattr(self, f"layer_{i}") for i in range(self.config.num_layers)]

    def make_cache(self) -> Cache:
        """One cache per layer for incremental decoding."""
        return [block.make_cache() for block in self.blocks]

    def set_recompute(self, enabled: bool) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        self.recompute = enabled

    @property
    def quantization(self) -> dict | None:
        """The base weights' quantization ``{"mode", "bits", "group_size"}`` (None: float), as in config.json."""
        return self.config.quantization

    def record_quantization(self, spec: dict | None) -> None:
        """Record how the base weights are quantized (``quantize_model``/``dequantize_model`` call this)."""
        self.config.quantization = spec

    @property
    def output_head(self) -> nn.Module:
        """The layer that maps hidden states to logits: the embedding (applied with ``as_linear``)
        when the weights are tied, else ``lm_head``."""
        return self.embed_tokens if self.config.weight_tying else self.lm_head

    def head(self, h: mx.array) -> mx.array:
        if self.config.weight_tying:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def _run_block(self, block: nn.Module, x: mx.array, segment_ids: mx.array | None) -> mx.array:
        seg = () if segment_ids is None else (segment_ids,)
        return recomputed(block, lambda x, *seg: block(x, None, seg[0] if seg else None), x, *seg)

    def features(
        self,
        input_ids: mx.array,
        cache: Cache | None = None,
        segment_ids: mx.array | None = None,
    ) -> mx.array:
        """Hidden states before the vocabulary head, (B, L, d_source_model)."""
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are for packed training rows; they cannot be combined with a cache")
        x = self.input_proj(self.embed_tokens(input_ids))
        for i, block in enumerate(self.blocks):
            if self.recompute and cache is None:
                x = self._run_block(block, x, segment_ids)
            else:
                x = block(x, None if cache is None else cache[i], segment_ids)
        return self.output_proj(x)

    def __call__(
        self,
        input_ids: mx.array,
        cache: Cache | None = None,
        segment_ids: mx.array | None = None,
    ) -> tuple[mx.array, Cache | None]:
        """Logits (B, L, vocab) and the updated caches.

        ``segment_ids`` (B, L) marks the examples of a packed row: attention, the SSM state and the
        conv window never cross from one segment into the next.
        """
        return self.head(self.features(input_ids, cache, segment_ids)), cache
