"""Decoding caches: a window-bounded KV cache for attention, (conv, ssm) state for SSM layers."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of the last ``window - 1`` positions, enough for the next query's window."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # absolute position of the next token

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append (B, heads, L, D) keys/values; return all visible ones and the first one's position."""
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
        start = self.offset - (0 if self.keys is None else self.keys.shape[2])
        self.offset += keys.shape[2]
        keep = max(self.window - 1, 0)
        self.keys = all_k[:, :, -keep:] if keep else all_k[:, :, :0]
        self.values = all_v[:, :, -keep:] if keep else all_v[:, :, :0]
        return all_k, all_v, start

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class SSMCache:
    """The last ``d_conv - 1`` conv inputs and the (B, E, N) recurrent state."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.ssm_state: mx.array | None = None

    @property
    def state(self) -> list[mx.array]:
        return [s for s in (self.conv_state, self.ssm_state) if s is not None]
