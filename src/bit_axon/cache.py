"""Decoding caches: a window-bounded KV cache for attention, (conv, ssm) state for SSM layers.

``BatchKVCache`` and ``SSMCache.join`` hold several sequences decoded together (the server's
continuous batching): each sequence is prefilled alone, then its caches join the running batch.
"""

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

    def key_mask(self, k_positions: mx.array) -> mx.array | None:
        """Which keys exist, beyond the window rule: all of them in a single sequence."""
        return None

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class BatchKVCache(KVCache):
    """The KV caches of several sequences at once, right-aligned on one shared position counter.

    Sequences that joined with a shorter history are padded on the left; ``first[r]`` is the
    shared position of row r's first real token, and ``key_mask`` hides the keys before it. With
    no positional encoding in the attention, only distances matter, and they are the same in the
    shared positions as in each sequence's own.
    """

    def __init__(self, window: int, first: mx.array, offset: int = 0):
        super().__init__(window)
        self.first = first
        self.offset = offset

    def key_mask(self, k_positions: mx.array) -> mx.array:
        return (k_positions[None, :] >= self.first[:, None])[:, None, None, :]  # (B, 1, 1, Lk)

    @classmethod
    def join(cls, caches: list[KVCache]) -> BatchKVCache:
        """One batch of the rows of ``caches`` (plain or batch caches, the same window), in order."""
        window = caches[0].window
        if any(c.window != window for c in caches):
            raise ValueError("cannot batch KV caches with different windows")
        offset = max(c.offset for c in caches)
        stored = max(0 if c.keys is None else c.keys.shape[2] for c in caches)
        template = next((c.keys for c in caches if c.keys is not None), None)
        firsts, keys, values = [], [], []
        for c in caches:
            rows = c.first.shape[0] if isinstance(c, BatchKVCache) else 1
            shift = offset - c.offset
            first = c.first if isinstance(c, BatchKVCache) else mx.zeros((1,), mx.int32)
            firsts.append(first + shift)
            if template is None:
                continue
            b, h, _, d = template.shape
            k = c.keys if c.keys is not None else mx.zeros((rows, h, 0, d), template.dtype)
            v = c.values if c.values is not None else mx.zeros((rows, h, 0, d), template.dtype)
            pad = [(0, 0), (0, 0), (stored - k.shape[2], 0), (0, 0)]
            keys.append(mx.pad(k, pad))
            values.append(mx.pad(v, pad))
        batch = cls(window, mx.concatenate(firsts).astype(mx.int32), offset)
        if template is not None:
            batch.keys, batch.values = mx.concatenate(keys), mx.concatenate(values)
        return batch

    def keep_rows(self, rows: list[int]) -> BatchKVCache:
        index = mx.array(rows, dtype=mx.int32)
        kept = BatchKVCache(self.window, self.first[index], self.offset)
        if self.keys is not None:
            kept.keys, kept.values = self.keys[index], self.values[index]
        return kept

    @property
    def state(self) -> list[mx.array]:
        return [self.first, *super().state]


class SSMCache:
    """The last ``d_conv - 1`` conv inputs and the (B, E, N) recurrent state."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.ssm_state: mx.array | None = None

    @property
    def state(self) -> list[mx.array]:
        return [s for s in (self.conv_state, self.ssm_state) if s is not None]

    @classmethod
    def join(cls, caches: list[SSMCache]) -> SSMCache:
        """One batch of the rows of ``caches`` (each past its prompt), in order."""
        if any(c.conv_state is None or c.ssm_state is None for c in caches):
            raise ValueError("an SSM cache joins a batch only after its prompt has run")
        batch = cls()
        batch.conv_state = mx.concatenate([c.conv_state for c in caches])
        batch.ssm_state = mx.concatenate([c.ssm_state for c in caches])
        return batch

    def keep_rows(self, rows: list[int]) -> SSMCache:
        index = mx.array(rows, dtype=mx.int32)
        kept = SSMCache()
        kept.conv_state, kept.ssm_state = self.conv_state[index], self.ssm_state[index]
        return kept
