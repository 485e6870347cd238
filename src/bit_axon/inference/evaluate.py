"""``evaluate_model``: token-weighted loss and perplexity of a model on a dataset's target tokens.

A thin caller of the trainer's evaluation (``bit_axon.training.evaluation``): the same loss, the
same sums, the same perplexity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from bit_axon.loading import output_vocab_size
from bit_axon.training.collate import Batch, iterate_batches
from bit_axon.training.data import PreferencePair
from bit_axon.training.evaluation import evaluate_loss, perplexity, sft_loss_terms
from bit_axon.training.losses import gather_targets, shift_packed
from bit_axon.training.packing import EOS_TOKEN_ID, PAD_TOKEN_ID

import mlx.core as mx
import mlx.nn as nn


class _ChosenView:
    """The chosen responses of a preference dataset as SFT ``(token_ids, loss_mask)`` examples."""

    def __init__(self, dataset: Sequence[PreferencePair]):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        pair = self.dataset[index]
        return pair.chosen_ids, pair.chosen_mask


def sft_examples(dataset: Sequence[Any]) -> Sequence[tuple[list[int], list[int]]]:
    """``dataset`` as ``(token_ids, loss_mask)`` examples; preference pairs contribute their chosen side."""
    if len(dataset) and isinstance(dataset[0], PreferencePair):
        return _ChosenView(dataset)
    return dataset


def _first_targets(batches: Iterator[Batch], budget: int) -> Iterator[Batch]:
    """The batches, with the loss mask cut after the first ``budget`` target tokens (row-major order)."""
    for batch in batches:
        _, _, weights, _ = shift_packed(batch.token_ids, batch.loss_mask, batch.segment_ids)
        order = mx.cumsum(weights.reshape(-1)).reshape(weights.shape)
        kept = weights * (order <= budget)
        # Targets are read from loss_mask[:, 1:]; position 0 is never a target.
        mask = mx.concatenate([mx.zeros_like(batch.loss_mask[:, :1]), kept.astype(batch.loss_mask.dtype)], axis=1)
        yield batch._replace(loss_mask=mask)
        budget -= int(kept.sum().item())
        if budget <= 0:
            return


def _in_vocabulary(batches: Iterator[Batch], vocab_size: int) -> Iterator[Batch]:
    for batch in batches:
        # An out-of-range id would read past the embedding table instead of failing.
        if (largest := batch.token_ids.max().item()) >= vocab_size:
            raise ValueError(f"token id {largest} is outside the model's vocabulary of {vocab_size}")
        yield batch


def evaluate_model(
    model: nn.Module,
    dataset: Sequence[Any],
    batch_size: int,
    seq_length: int,
    max_tokens: int | None = None,
    eos_token_id: int = EOS_TOKEN_ID,
    pad_token_id: int = PAD_TOKEN_ID,
) -> dict[str, float | int]:
    """``{"loss", "perplexity", "tokens"}`` over the dataset's target tokens (loss mask 1).

    The loss is the mean next-token cross-entropy per target token (token-weighted across
    examples, not averaged per batch) and the perplexity its exponential (inf where that
    overflows). Examples are packed into rows of ``seq_length`` tokens in file order, as in
    training, with no attention across examples. ``max_tokens`` stops after exactly that many
    target tokens. Preference (ORPO) datasets are evaluated on their chosen responses.
    ``eos_token_id``/``pad_token_id`` are the packing separator and padding (never targets).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches = iterate_batches(
        sft_examples(dataset), batch_size, seq_length, shuffle=False, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    batches = _in_vocabulary(batches, output_vocab_size(model))
    if max_tokens is not None:
        batches = _first_targets(batches, max_tokens)
    totals = evaluate_loss(model, (gather_targets(*batch) for batch in batches), sft_loss_terms)
    if totals.weight == 0:
        raise ValueError("the dataset has no target tokens (loss mask is 0 everywhere) to evaluate on")
    return {"loss": totals.loss, "perplexity": perplexity(totals.loss), "tokens": int(totals.weight)}
