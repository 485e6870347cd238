"""Epochs: how many batches one pass over the training set makes, and how many optimizer steps
``epochs`` passes take.

The trainers draw batches from an endless stream (``loop=True``) whose examples are shuffled anew
each epoch, so a pass has no exact end in batches; a pass is counted here as the batches one
``loop=False`` pass in the order of epoch 0 (``seed``'s shuffle) makes. The order matters: greedy
packing puts examples into rows in the order they come, and another order can fill one row more or
less (with the toy data of the tests, 40 or 41 batches for the same 200 examples). The looping
stream also packs across the epoch boundary instead of padding the last rows, so later epochs may
take a batch less; the count is the first epoch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bit_axon.training.collate import _check_args, _epoch_order
from bit_axon.training.packing import SequencePacker


def packed_batches_per_epoch(
    dataset: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    max_seq_len: int,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
) -> int:
    """The SFT batches of one pass in epoch 0's order: what ``collate.iterate_batches(loop=False,
    shuffle=True, seed=seed)`` yields, counted from the packed rows without building the arrays."""
    _check_args(dataset, batch_size, max_seq_len)
    packer = SequencePacker(max_seq_len, eos_token_id, pad_token_id)
    rows = sum(len(packer.add_example(*dataset[int(i)])) for i in _epoch_order(len(dataset), True, seed, 0))
    rows += packer.flush() is not None
    return math.ceil(rows / batch_size)


def pair_batches_per_epoch(num_pairs: int, batch_size: int) -> int:
    """The ORPO batches of one pass: pairs are batched whole, without packing."""
    return math.ceil(num_pairs / batch_size)


def steps_for_epochs(batches_per_epoch: int, grad_accum_steps: int, world_size: int, epochs: int) -> int:
    """Optimizer steps for ``epochs`` passes: each step takes ``grad_accum_steps`` batches on each of
    ``world_size`` ranks; a last partial step counts (the run ends after it, past the last pass)."""
    return math.ceil(epochs * batches_per_epoch / (grad_accum_steps * world_size))
