"""The three block types of the sandwich, each a pre-norm residual stack."""

from __future__ import annotations

from bit_axon.cache import KVCache, SSMCache
from bit_axon.config import BitAxonConfig
from bit_axon.layers.attention import SlidingWindowAttention
from bit_axon.layers.moe import SharedExpertMoE
from bit_axon.layers.ssm import AxonSSM

import mlx.core as mx
import mlx.nn as nn


def _norm(config: BitAxonConfig) -> nn.RMSNorm:
    return nn.RMSNorm(config.hidden_dim, eps=config.rms_norm_eps)


class AxonSSMBlock(nn.Module):
    """Zone 1: x + SSM(norm(x))."""

    def __init__(self, config: BitAxonConfig):
        super().__init__()
        self.input_norm = _norm(config)
        self.ssm = AxonSSM(config)

    def make_cache(self) -> SSMCache:
        return SSMCache()

    def __call__(self, x: mx.array, cache: SSMCache | None = None, segment_ids: mx.array | None = None):
        return x + self.ssm(self.input_norm(x), cache, segment_ids)


class AxonSWAMoEBlock(nn.Module):
    """Zone 2: x + SWA(norm(x)); x + MoE(norm(x))."""

    def __init__(self, config: BitAxonConfig):
        super().__init__()
        self.input_norm = _norm(config)
        self.attention = SlidingWindowAttention(config)
        self.post_attention_norm = _norm(config)
        self.moe = SharedExpertMoE(config)

    def make_cache(self) -> KVCache:
        return KVCache(self.attention.window)

    def __call__(self, x: mx.array, cache: KVCache | None = None, segment_ids: mx.array | None = None):
        x = x + self.attention(self.input_norm(x), cache, segment_ids)
        return x + self.moe(self.post_attention_norm(x))


class AxonSSMMoEBlock(AxonSSMBlock):
    """Zone 3: zone 1's x + SSM(norm(x)), then x + MoE(norm(x))."""

    def __init__(self, config: BitAxonConfig):
        super().__init__(config)
        self.post_ssm_norm = _norm(config)
        self.moe = SharedExpertMoE(config)

    def __call__(self, x: mx.array, cache: SSMCache | None = None, segment_ids: mx.array | None = None):
        x = super().__call__(x, cache, segment_ids)
        return x + self.moe(self.post_ssm_norm(x))
