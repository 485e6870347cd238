"""Learning-rate schedule: linear warmup to the peak, then cosine decay to 0 at max_steps.

Update k (0-based) of the warmup runs at ``peak * (k + 1) / warmup_steps``: the first update
already moves the weights (a warmup from exactly 0 would spend it at lr 0), and the last warmup
update reaches the peak.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim


def cosine_with_warmup(learning_rate: float, warmup_steps: int, max_steps: int) -> Callable[[mx.array], mx.array]:
    """The schedule as a function of the optimizer step (0-based), built from mlx.optimizers parts."""
    decay = optim.cosine_decay(learning_rate, max(max_steps - warmup_steps, 1), 0.0)
    if warmup_steps == 0:
        return decay

    def warmup(step: mx.array) -> mx.array:
        return learning_rate * mx.minimum(step + 1, warmup_steps) / warmup_steps

    return optim.join_schedules([warmup, decay], [warmup_steps])
