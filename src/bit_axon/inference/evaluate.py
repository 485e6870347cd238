"""Token-weighted loss and perplexity of a model on a dataset's target tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from bit_axon.training.collate import Batch, iterate_batches
from bit_axon.training.data import PreferencePair
from bit_axon.training.losses import sft_loss, shift_packed
from bit_axon.training.packing import EOS_TOKEN_ID, PAD_TOKEN_ID

import mlx.core as mx
import mlx.nn as nn

_MAX_EXP_ARG = 709.0  # math.exp overflows a float above ~709.78


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


def _cap_targets(token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array, budget: int) -> mx.array:
    """A loss mask keeping only the first ``budget`` target tokens of the batch (row-major order)."""
    _, _, weights, _ = shift_packed(token_ids, loss_mask, segment_ids)
    order = mx.cumsum(weights.reshape(-1)).reshape(weights.shape)
    kept = weights * (order <= budget)
    # sft_loss reads targets from loss_mask[:, 1:]; position 0 is never a target.
    return mx.concatenate([mx.zeros_like(loss_mask[:, :1]), kept.astype(loss_mask.dtype)], axis=1)


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
    examples, not averaged per batch) and the perplexity its exponential. Examples are packed into
    rows of ``seq_length`` tokens in file order, as in training, with no attention across examples.
    ``max_tokens`` stops after exactly that many target tokens. Preference (ORPO) datasets are
    evaluated on their chosen responses. ``eos_token_id``/``pad_token_id`` are the packing separator
    and padding (never targets).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches = iterate_batches(
        sft_examples(dataset), batch_size, seq_length, shuffle=False, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    was_training = model.training
    model.eval()  # no adapter dropout while measuring
    try:
        total_loss, total_tokens = _loss_sum(model, batches, max_tokens)
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the dataset has no target tokens (loss mask is 0 everywhere) to evaluate on")
    loss = total_loss / total_tokens
    perplexity = math.exp(loss) if loss < _MAX_EXP_ARG else math.inf
    return {"loss": loss, "perplexity": perplexity, "tokens": total_tokens}


def _loss_sum(model: nn.Module, batches: Iterable[Batch], max_tokens: int | None) -> tuple[float, int]:
    vocab_size = model.config.vocab_size
    total_loss = 0.0
    total_tokens = 0
    for batch in batches:
        # An out-of-range id would read past the embedding table instead of failing.
        if (largest := batch.token_ids.max().item()) >= vocab_size:
            raise ValueError(f"token id {largest} is outside the model's vocabulary of {vocab_size}")
        loss_mask = batch.loss_mask
        if max_tokens is not None:
            loss_mask = _cap_targets(batch.token_ids, loss_mask, batch.segment_ids, max_tokens - total_tokens)
        loss_sum, count = sft_loss(model, batch.token_ids, loss_mask, batch.segment_ids)
        mx.eval(loss_sum, count)
        total_loss += loss_sum.item()
        total_tokens += int(count.item())
        if max_tokens is not None and total_tokens >= max_tokens:
            break
    return total_loss, total_tokens
