"""Token sampling: greedy, or temperature with optional top-k / top-p (nucleus) filtering.

A :class:`Sampler` owns its own PRNG key (``mx.random.key``) and splits it once per draw, so a
seed fixes every token drawn, independent of MLX's global random state and of anything else that
draws random numbers in between.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import mlx.core as mx


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """``logits`` (..., V) with all but the ``k`` largest per row set to ``-inf``; ``k <= 0`` keeps all."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    # argpartition puts the k largest first (in no particular order): drop the rest.
    dropped = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, dropped, mx.array(-float("inf"), logits.dtype), axis=-1)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability adds up to at least ``p``.

    A token is kept when the probability mass of the tokens ranked above it is below ``p``, so the
    most likely token always survives. ``p >= 1`` keeps all.
    """
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits.astype(mx.float32), axis=-1)
    mass_above = mx.cumsum(probs, axis=-1) - probs
    filtered = mx.where(mass_above < p, sorted_logits, mx.array(-float("inf"), logits.dtype))
    # Scatter back to vocabulary order.
    return mx.put_along_axis(mx.zeros_like(logits), order, filtered, axis=-1)


def _random_seed() -> int:
    return secrets.randbits(63)


@dataclass
class Sampler:
    """Draws one token per row of a (B, V) logits array.

    ``temperature == 0`` is greedy (argmax; ``top_k``/``top_p`` then change nothing). Otherwise the
    logits are divided by the temperature, filtered by top-k then top-p (on the tempered
    distribution), and one token is drawn from what is left. ``seed=None`` draws a fresh seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    _key: mx.array = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if self.seed is None:
            self.seed = _random_seed()
        self._key = mx.random.key(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: mx.array) -> mx.array:
        """Token ids (B,) for ``logits`` (B, V)."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        logits = logits.astype(mx.float32) / self.temperature
        logits = top_p_filter(top_k_filter(logits, self.top_k), self.top_p)
        self._key, key = mx.random.split(self._key)
        return mx.random.categorical(logits, axis=-1, key=key)
