"""ORPOTrainer: the Trainer's loop with preference pairs and the ORPO loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bit_axon.training.collate import IGNORE_INDEX, OrpoBatch, iterate_orpo_batches
from bit_axon.training.epochs import pair_batches_per_epoch
from bit_axon.training.orpo_loss import orpo_terms
from bit_axon.training.trainer import Trainer

import mlx.core as mx
import mlx.nn as nn

# Pairs are padded per batch; rounding the length up to a multiple of this bounds how many
# distinct shapes the compiled step sees (each new shape is traced again).
_LENGTH_BUCKET = 32


def _pad_to_bucket(batch: OrpoBatch, pad_token_id: int) -> OrpoBatch:
    length = batch.chosen_ids.shape[1]
    extra = -length % _LENGTH_BUCKET
    if not extra:
        return batch

    def pad(a: mx.array, value: int) -> mx.array:
        return mx.pad(a, [(0, 0), (0, extra)], constant_values=value)

    return OrpoBatch(
        pad(batch.chosen_ids, pad_token_id), pad(batch.chosen_labels, IGNORE_INDEX),
        pad(batch.rejected_ids, pad_token_id), pad(batch.rejected_labels, IGNORE_INDEX),
    )


class ORPOTrainer(Trainer):
    def count_epoch_batches(self, dataset) -> int:
        return pair_batches_per_epoch(len(dataset), self.config.batch_size)

    def batches(self, dataset, loop: bool) -> Iterator[OrpoBatch]:
        c = self.config
        batches = iterate_orpo_batches(
            dataset, c.batch_size, c.max_seq_len, loop=loop, shuffle=loop, seed=c.seed, pad_token_id=self.pad_token_id
        )
        return (_pad_to_bucket(b, self.pad_token_id) for b in batches)

    def loss_terms(self, model: nn.Module, batch: OrpoBatch):
        losses, metrics = orpo_terms(model, batch, beta=self.config.beta, form=self.config.orpo_form)
        weight = mx.array(float(losses.shape[0]))
        return losses.sum(), weight, {k: v.sum() for k, v in metrics.items()}

    def batch_tokens(self, batch: OrpoBatch) -> int:
        pad = self.pad_token_id
        return int(((batch.chosen_ids != pad).sum() + (batch.rejected_ids != pad).sum()).item())

    def progress_fields(self, record: dict[str, Any]) -> str:
        return f"margin {record['reward_margin']:+.3f} acc {record['reward_accuracy']:.2f}"
