"""Next-token cross-entropy on packed rows, as (sum, weight) so accumulation is token-weighted."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Target counts are rounded up to a multiple of this so a compiled step sees few distinct shapes.
TARGET_BUCKET = 128


def shift_packed(token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array):
    """Inputs, targets, target weights and input segment ids for next-token prediction.

    A target only counts when it is in the same packed segment as the token predicting it, so the
    first token of an example is never predicted from the end of the previous one.
    """
    inputs, targets = token_ids[:, :-1], token_ids[:, 1:]
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    weights = loss_mask[:, 1:].astype(mx.float32) * same
    return inputs, targets, weights, segment_ids[:, :-1]


def masked_cross_entropy_sum(logits: mx.array, targets: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    """Sum of weighted token losses and the sum of weights (the number of target tokens)."""
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    return (losses * weights).sum(), weights.sum()


def sft_loss(model: nn.Module, token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array):
    """(sum of target-token losses, number of target tokens) for a packed batch."""
    inputs, targets, weights, segments = shift_packed(token_ids, loss_mask, segment_ids)
    logits, _ = model(inputs, segment_ids=segments)
    return masked_cross_entropy_sum(logits, targets, weights)


class TargetBatch(NamedTuple):
    """A packed batch with its loss targets gathered: only those positions go through the head.

    The vocabulary head and its softmax cost more than the rest of a small model, and in chat data
    most positions (system/user text, separators, padding) are not targets.
    """

    inputs: mx.array  # (B, L - 1) token ids
    segment_ids: mx.array  # (B, L - 1)
    positions: mx.array  # (K,) flat indices into B * (L - 1), K a multiple of TARGET_BUCKET
    targets: mx.array  # (K,) token ids to predict
    weights: mx.array  # (K,) 1 for real targets, 0 for the bucket's padding


def gather_targets(token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array) -> TargetBatch:
    inputs, targets, weights, segments = shift_packed(token_ids, loss_mask, segment_ids)
    flat_weights = np.array(weights).reshape(-1)
    positions = np.flatnonzero(flat_weights > 0)
    k = max(TARGET_BUCKET, -(-len(positions) // TARGET_BUCKET) * TARGET_BUCKET)
    padded = np.zeros(k, dtype=np.int32)
    padded[: len(positions)] = positions
    target_weights = np.zeros(k, dtype=np.float32)
    target_weights[: len(positions)] = flat_weights[positions]
    flat_targets = np.array(targets).reshape(-1)[padded]
    return TargetBatch(inputs, segments, mx.array(padded), mx.array(flat_targets), mx.array(target_weights))


def target_loss(model: nn.Module, batch: TargetBatch) -> tuple[mx.array, mx.array]:
    """``sft_loss`` on a ``TargetBatch``: the same sums, with the head run on target positions only."""
    hidden = model.features(batch.inputs, segment_ids=batch.segment_ids)
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.positions]
    return masked_cross_entropy_sum(model.head(hidden), batch.targets, batch.weights)
