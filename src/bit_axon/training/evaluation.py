"""The one loss-and-evaluation path: token-weighted loss sums over batches, shared across ranks.

``Trainer.evaluate`` (validation during training, SFT or ORPO) and
``bit_axon.inference.evaluate_model`` (``bit-axon evaluate``) both call :func:`evaluate_loss` with a
*loss-terms* function, ``loss_terms(model, batch) -> (sum of losses, sum of weights, metric sums)``
(the weight of an SFT batch is its number of target tokens), and report the perplexity with
:func:`perplexity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bit_axon.training.distributed import all_sum_tree
from bit_axon.training.losses import TargetBatch, target_loss

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

LossTerms = Callable[[nn.Module, Any], tuple[mx.array, mx.array, dict[str, mx.array]]]

_MAX_EXP_ARG = 709.0  # math.exp overflows a float above ~709.78


def sft_loss_terms(model: nn.Module, batch: TargetBatch) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """Loss terms of a packed SFT batch: (sum of target-token losses, number of target tokens, no metrics)."""
    loss_sum, tokens = target_loss(model, batch)
    return loss_sum, tokens, {}


def perplexity(loss: float) -> float:
    """exp(loss), and inf where that overflows a float."""
    return math.exp(loss) if loss < _MAX_EXP_ARG else math.inf


@dataclass
class LossTotals:
    """Sums of a loss, its weights and its metrics over the evaluated batches."""

    loss_sum: float = 0.0
    weight: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The weighted mean loss (per target token for SFT); requires ``weight > 0``."""
        return self.loss_sum / self.weight

    def metric_means(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.metric_sums.items()}

    def add(self, loss_sum: float, weight: float, metrics: dict[str, float]) -> None:
        self.loss_sum += loss_sum
        self.weight += weight
        for k, v in metrics.items():
            self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v


def evaluate_loss(
    model: nn.Module, batches: Iterable[Any], loss_terms: LossTerms, group: mx.distributed.Group | None = None
) -> LossTotals:
    """Sum ``loss_terms`` over ``batches`` with the model in eval mode (no adapter dropout).

    With a ``group`` of several ranks, rank r scores batches r, r + W, r + 2W, ... of the stream
    and the sums are added across ranks, so every rank returns the totals of the whole stream.
    The model's training mode is restored afterwards.
    """
    rank, size = (0, 1) if group is None else (group.rank(), group.size())
    totals = LossTotals()

    def add(batch: Any, scale: float = 1.0) -> None:
        loss_sum, weight, metrics = loss_terms(model, batch)
        mx.eval(loss_sum, weight, metrics)
        totals.add(scale * loss_sum.item(), scale * weight.item(), {k: scale * v.item() for k, v in metrics.items()})

    was_training = model.training
    model.eval()
    try:
        first = None
        scored = 0
        for i, batch in enumerate(batches):
            first = batch if first is None else first
            if i % size == rank:
                add(batch)
                scored += 1
        if size > 1:
            if not scored and first is not None:
                # Fewer batches than ranks: score one anyway, weighted 0, so this rank sends the
                # same metric names to the sum as the others.
                add(first, scale=0.0)
            summed = all_sum_tree(
                (mx.array(totals.loss_sum), mx.array(totals.weight), tree_map(mx.array, totals.metric_sums)), group
            )
            totals = LossTotals(summed[0].item(), summed[1].item(), {k: v.item() for k, v in summed[2].items()})
    finally:
        model.train(was_training)
    return totals
