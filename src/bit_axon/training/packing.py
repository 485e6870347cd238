"""Sequence packing: short examples concatenated into fixed-length rows so no compute goes to padding.

    Example 1 tokens | EOS | Example 2 tokens | EOS | Example 3 tokens | EOS | PAD ...
    loss mask as given | 0  | loss mask as given | 0  | ...              | 0   | 0
    segment      0     |  0  |       1            |  1  |        2         |  2  | 3

``segment_ids`` let the model keep attention and SSM state inside one example; the EOS separator
belongs to the example before it and the padding is a segment of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

EOS_TOKEN_ID = 151645  # <|im_end|>
PAD_TOKEN_ID = 151643  # <|endoftext|>


class PackedBatch(NamedTuple):
    token_ids: list[int]
    loss_mask: list[int]
    segment_ids: list[int]


class SequencePacker:
    """Greedily packs examples, in the order given, into rows of exactly ``max_seq_len`` tokens.

    An example that does not fit in the rest of the current row starts a new row. An example
    longer than ``max_seq_len - 1`` (the room left for its EOS) is cut to fit and counted in
    ``num_truncated``.
    """

    def __init__(self, max_seq_len: int, eos_token_id: int = EOS_TOKEN_ID, pad_token_id: int = PAD_TOKEN_ID):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (one token plus its EOS), got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.num_truncated = 0
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._mask: list[int] = []
        self._segments: list[int] = []
        self._num_examples = 0

    def add_example(self, token_ids: Sequence[int], loss_mask: Sequence[int]) -> list[PackedBatch]:
        """Add one example; the rows it completed (zero, one or two)."""
        if len(token_ids) != len(loss_mask):
            raise ValueError(f"token_ids and loss_mask differ in length: {len(token_ids)} != {len(loss_mask)}")
        if not token_ids:
            raise ValueError("cannot pack an empty example")
        if len(token_ids) > self.max_seq_len - 1:
            token_ids, loss_mask = token_ids[: self.max_seq_len - 1], loss_mask[: self.max_seq_len - 1]
            self.num_truncated += 1
        done = []
        if len(self._ids) + len(token_ids) + 1 > self.max_seq_len:
            done.append(self._emit())
        self._ids += [*token_ids, self.eos_token_id]
        self._mask += [*loss_mask, 0]
        self._segments += [self._num_examples] * (len(token_ids) + 1)
        self._num_examples += 1
        if len(self._ids) == self.max_seq_len:
            done.append(self._emit())
        return done

    def flush(self) -> PackedBatch | None:
        """The partly filled row, padded to ``max_seq_len``; None when there is none."""
        return self._emit() if self._ids else None

    def _emit(self) -> PackedBatch:
        pad = self.max_seq_len - len(self._ids)
        row = PackedBatch(
            self._ids + [self.pad_token_id] * pad,
            self._mask + [0] * pad,
            self._segments + [self._num_examples] * pad,
        )
        self._reset()
        return row


def padding_row(max_seq_len: int, pad_token_id: int = PAD_TOKEN_ID) -> PackedBatch:
    """A row of padding only (mask 0), to fill up a final partial batch."""
    return PackedBatch([pad_token_id] * max_seq_len, [0] * max_seq_len, [0] * max_seq_len)
