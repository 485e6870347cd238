"""Sliding-window causal self-attention (no positional encoding: the SSM zone carries position)."""

from __future__ import annotations

from bit_axon.cache import KVCache
from bit_axon.config import BitAxonConfig

import mlx.core as mx
import mlx.nn as nn


def sliding_window_mask(
    q_positions: mx.array, k_positions: mx.array, window: int, segment_ids: mx.array | None = None
) -> mx.array:
    """Bool mask (…, Lq, Lk): key s is visible to query t iff t - window < s <= t (and same segment)."""
    delta = q_positions[:, None] - k_positions[None, :]
    mask = (delta >= 0) & (delta < window)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask[None] & same
        mask = mask[:, None]  # broadcast over heads
    return mask


class SlidingWindowAttention(nn.Module):
    def __init__(self, config: BitAxonConfig):
        super().__init__()
        H = config.hidden_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = config.swa_window_size
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(H, H, bias=False)
        self.k_proj = nn.Linear(H, H, bias=False)
        self.v_proj = nn.Linear(H, H, bias=False)
        self.o_proj = nn.Linear(H, H, bias=False)

    def __call__(
        self, x: mx.array, cache: KVCache | None = None, segment_ids: mx.array | None = None
    ) -> mx.array:
        b, L, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            q_start = cache.offset
            k, v, k_start = cache.update(k, v)
        else:
            q_start = k_start = 0
        q_pos = mx.arange(q_start, q_start + L)
        k_pos = mx.arange(k_start, k_start + k.shape[2])
        mask = sliding_window_mask(q_pos, k_pos, self.window, segment_ids)
        if cache is not None and (exists := cache.key_mask(k_pos)) is not None:
            mask = mask & exists  # rows of a batch that joined with a shorter history
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, L, -1))
