"""AxonSSM: the Mamba-1 style selective state-space mixer."""

from __future__ import annotations

import math

from bit_axon.cache import SSMCache
from bit_axon.config import BitAxonConfig
from bit_axon.layers.scan import selective_scan

import mlx.core as mx
import mlx.nn as nn


def segment_starts(segment_ids: mx.array) -> mx.array:
    """(b, L) bool: True where a packed segment begins (position 0 included)."""
    first = mx.ones(segment_ids[:, :1].shape, dtype=mx.bool_)
    return mx.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


class AxonSSM(nn.Module):
    def __init__(self, config: BitAxonConfig):
        super().__init__()
        H, E = config.hidden_dim, config.ssm_intermediate_dim
        N, R, K = config.ssm_d_state, config.ssm_dt_rank, config.ssm_d_conv
        self.d_state, self.dt_rank, self.d_conv = N, R, K

        self.in_proj = nn.Linear(H, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, kernel_size=K, groups=E, bias=True)
        self.x_proj = nn.Linear(E, 2 * N + R, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        # Mamba's dt init: softplus(bias) log-uniform in [1e-3, 1e-1] so early steps neither forget
        # everything nor nothing.
        dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (E,)))
        self.dt_proj.bias = dt + mx.log(-mx.expm1(-dt))
        self.A_log = mx.log(mx.broadcast_to(mx.arange(1, N + 1, dtype=mx.float32), (E, N)))
        self.D = mx.ones((E,))
        self.out_proj = nn.Linear(E, H, bias=False)

    def _conv(self, x: mx.array, cache: SSMCache | None, segment_ids: mx.array | None) -> mx.array:
        """Depthwise causal conv as K shifted multiply-adds, so packed segments can be masked per tap."""
        b, L, E = x.shape
        K = self.d_conv
        if cache is not None and cache.conv_state is not None:
            history = cache.conv_state
        else:
            history = mx.zeros((b, K - 1, E), dtype=x.dtype)
        padded = mx.concatenate([history, x], axis=1)
        if cache is not None:
            cache.conv_state = padded[:, -(K - 1):] if K > 1 else padded[:, :0]
        weight = self.conv1d.weight[:, :, 0]  # (E, K)
        out = self.conv1d.bias
        for k in range(K):
            tap = padded[:, k : k + L] * weight[:, k]
            lag = K - 1 - k
            if segment_ids is not None and lag:
                same = segment_ids[:, lag:] == segment_ids[:, :-lag]
                same = mx.concatenate([mx.zeros((b, lag), dtype=mx.bool_), same], axis=1)
                tap = tap * same[..., None]
            out = out + tap
        return out

    def __call__(
        self, x: mx.array, cache: SSMCache | None = None, segment_ids: mx.array | None = None
    ) -> mx.array:
        N = self.d_state
        xs, z = mx.split(self.in_proj(x), 2, axis=-1)
        xs = nn.silu(self._conv(xs, cache, segment_ids))
        B, C, dt = mx.split(self.x_proj(xs), [N, 2 * N], axis=-1)
        dt = nn.softplus(self.dt_proj(dt))
        A = -mx.exp(self.A_log)
        h0 = cache.ssm_state if cache is not None else None
        reset = segment_starts(segment_ids) if segment_ids is not None else None
        y, h = selective_scan(xs, dt, A, B, C, self.D, h0=h0, reset=reset)
        if cache is not None:
            cache.ssm_state = h
        return self.out_proj(y * nn.silu(z))
