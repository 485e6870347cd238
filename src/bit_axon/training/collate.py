"""Batches for the trainers: packed SFT rows and padded ORPO preference pairs, as ``mx.array``s.

SFT: ``Batch(token_ids, loss_mask, segment_ids)``, each (B, max_seq_len). The trainer's
next-token loss uses inputs ``token_ids[:, :-1]``, targets ``token_ids[:, 1:]`` and weights
``loss_mask[:, 1:]``: ``loss_mask[:, t] == 1`` means token t is a training target.

ORPO: ``OrpoBatch(chosen_ids, chosen_labels, rejected_ids, rejected_labels)``, each (B, L), L the
longest sequence of the batch. Labels are the token ids (not shifted) on response tokens and
``IGNORE_INDEX`` on the prompt and the padding.

Nothing here cuts examples: the datasets did, once, when they were built with the same
``max_seq_len`` (an example that is still too long is an error).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeVar

from bit_axon.training.data import PreferencePair
from bit_axon.training.packing import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    PackedBatch,
    SequencePacker,
    check_max_seq_len,
    padding_row,
)

import mlx.core as mx
import numpy as np

IGNORE_INDEX = -100

_Example = TypeVar("_Example")


class Batch(NamedTuple):
    token_ids: mx.array  # int32 (B, L)
    loss_mask: mx.array  # float32 (B, L), 0 or 1
    segment_ids: mx.array  # int32 (B, L)


class OrpoBatch(NamedTuple):
    chosen_ids: mx.array  # int32 (B, L)
    chosen_labels: mx.array  # int32 (B, L)
    rejected_ids: mx.array  # int32 (B, L)
    rejected_labels: mx.array  # int32 (B, L)


class BatchCollator:
    """Turns packed rows into a ``Batch``; with ``batch_size``, a short list is filled with padding rows."""

    def __init__(self, batch_size: int | None = None, pad_token_id: int = PAD_TOKEN_ID):
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[PackedBatch]) -> Batch:
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        length = len(rows[0].token_ids)
        if any(len(r.token_ids) != length or len(r.loss_mask) != length or len(r.segment_ids) != length for r in rows):
            raise ValueError("packed rows must all have the same length")
        rows = list(rows)
        if self.batch_size is not None:
            if len(rows) > self.batch_size:
                raise ValueError(f"{len(rows)} rows do not fit in a batch of {self.batch_size}")
            rows += [padding_row(length, self.pad_token_id)] * (self.batch_size - len(rows))
        return Batch(
            mx.array([r.token_ids for r in rows], dtype=mx.int32),
            mx.array([r.loss_mask for r in rows], dtype=mx.float32),
            mx.array([r.segment_ids for r in rows], dtype=mx.int32),
        )


def _epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)


def _visit(dataset: Sequence[_Example], loop: bool, shuffle: bool, seed: int) -> Iterator[_Example]:
    """The examples of one epoch, or of epoch after epoch forever with ``loop``, each in ``_epoch_order``."""
    epoch = 0
    while True:
        for i in _epoch_order(len(dataset), shuffle, seed, epoch):
            yield dataset[int(i)]
        epoch += 1
        if not loop:
            return


def _check_args(dataset: Sequence, batch_size: int, max_seq_len: int) -> None:
    if len(dataset) == 0:
        raise ValueError("cannot iterate over an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_max_seq_len(max_seq_len)


def iterate_batches(
    dataset: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    max_seq_len: int,
    loop: bool = False, shuffle: bool = True, seed: int = 0,
    eos_token_id: int = EOS_TOKEN_ID,
    pad_token_id: int = PAD_TOKEN_ID,
) -> Iterator[Batch]:
    """Packed SFT batches of ``(token_ids, loss_mask)`` examples, each (batch_size, max_seq_len).

    Examples are visited in an order shuffled per epoch by ``default_rng(seed + epoch)``, so a seed
    fixes every batch. Without ``loop`` the last rows are kept: the final batch is filled up with
    padding rows (mask 0). With ``loop`` epochs follow each other forever and packing runs on across
    the epoch boundary, so every batch is full of real data.
    """
    _check_args(dataset, batch_size, max_seq_len)
    packer = SequencePacker(max_seq_len, eos_token_id, pad_token_id)
    collate = BatchCollator(batch_size, pad_token_id)
    rows: list[PackedBatch] = []
    for example in _visit(dataset, loop, shuffle, seed):
        rows += packer.add_example(*example)
        while len(rows) >= batch_size:
            yield collate(rows[:batch_size])
            rows = rows[batch_size:]
    last = packer.flush()
    if last is not None:
        rows.append(last)
    if rows:
        yield collate(rows)


def collate_orpo(pairs: Sequence[PreferencePair], pad_token_id: int = PAD_TOKEN_ID) -> OrpoBatch:
    """Pads chosen and rejected sequences to the batch's longest one (so both can share a forward pass)."""
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    length = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)

    def pad(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        if len(ids) != len(mask):
            raise ValueError(f"token ids and mask differ in length: {len(ids)} != {len(mask)}")
        fill = length - len(ids)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        return ids + [pad_token_id] * fill, labels + [IGNORE_INDEX] * fill

    chosen = [pad(p.chosen_ids, p.chosen_mask) for p in pairs]
    rejected = [pad(p.rejected_ids, p.rejected_mask) for p in pairs]
    return OrpoBatch(
        mx.array([ids for ids, _ in chosen], dtype=mx.int32),
        mx.array([labels for _, labels in chosen], dtype=mx.int32),
        mx.array([ids for ids, _ in rejected], dtype=mx.int32),
        mx.array([labels for _, labels in rejected], dtype=mx.int32),
    )


def _fitting(pair: PreferencePair, max_seq_len: int) -> PreferencePair:
    length = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if length > max_seq_len:
        raise ValueError(
            f"a preference pair of {length} tokens is longer than max_seq_len={max_seq_len}; build the dataset "
            f"with max_seq_len={max_seq_len} so that it is cut when loaded"
        )
    return pair


def iterate_orpo_batches(
    dataset: Sequence[PreferencePair],
    batch_size: int,
    max_seq_len: int,
    loop: bool = False, shuffle: bool = True, seed: int = 0,
    pad_token_id: int = PAD_TOKEN_ID,
) -> Iterator[OrpoBatch]:
    """Batches of whole preference pairs (chosen and rejected always together), no packing.

    Order as in ``iterate_batches``. Without ``loop`` the final batch may hold fewer than
    ``batch_size`` pairs (a padding pair would have no response tokens to average over); with
    ``loop`` pairs run on across epochs and every batch is full.
    """
    _check_args(dataset, batch_size, max_seq_len)
    pending: list[PreferencePair] = []
    for pair in _visit(dataset, loop, shuffle, seed):
        pending.append(_fitting(pair, max_seq_len))
        if len(pending) == batch_size:
            yield collate_orpo(pending, pad_token_id)
            pending = []
    if pending:
        yield collate_orpo(pending, pad_token_id)
