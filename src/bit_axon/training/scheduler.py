"""Learning-rate schedule: linear warmup from 0 to the peak, then cosine decay to 0 at max_steps."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim


def cosine_with_warmup(learning_rate: float, warmup_steps: int, max_steps: int) -> Callable[[mx.array], mx.array]:
    """The schedule as a function of the optimizer step (0-based), built from mlx.optimizers parts."""
    decay = optim.cosine_decay(learning_rate, max(max_steps - warmup_steps, 1), 0.0)
    if warmup_steps == 0:
        return decay
    warmup = optim.linear_schedule(0.0, learning_rate, warmup_steps)
    return optim.join_schedules([warmup, decay], [warmup_steps])
