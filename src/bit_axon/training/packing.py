"""Sequence packing: short examples concatenated into fixed-length rows so no compute goes to padding.

    Example 1 tokens | EOS | Example 2 tokens | EOS | Example 3 tokens | EOS | PAD ...
    loss mask as given | 0  | loss mask as given | 0  | ...              | 0   | 0
    segment      0     |  0  |       1            |  1  |        2         |  2  | 3

``segment_ids`` let the model keep attention and SSM state inside one example; the EOS separator
belongs to the example before it and the padding is a segment of its own.

Examples arrive already cut to ``max_seq_len - 1`` tokens (the datasets cut them once, when they are
built); the packer refuses a longer one rather than cutting it again. ``EOS_TOKEN_ID``/``PAD_TOKEN_ID``
are Qwen2.5's ids, the defaults for direct use: the trainers pass their dataset's tokenizer's ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

EOS_TOKEN_ID = 151645  # <|im_end|>
PAD_TOKEN_ID = 151643  # <|endoftext|>
MIN_SEQ_LEN = 2  # one token plus the EOS that packing puts after it


def check_max_seq_len(max_seq_len: Any) -> None:
    """The one rule for ``max_seq_len`` (training config, datasets, packer): an integer >= 2."""
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < MIN_SEQ_LEN:
        raise ValueError(f"max_seq_len must be an integer >= {MIN_SEQ_LEN} (one token plus its EOS), got {max_seq_len!r}")


class _Row(NamedTuple):
    token_ids: list[int]
    loss_mask: list[int]
    segment_ids: list[int]


class PackedBatch(_Row):
    """One packed row; ``PackedBatch(token_ids, loss_mask)`` (as the guide writes it) is a single segment."""

    __slots__ = ()

    def __new__(cls, token_ids: list[int], loss_mask: list[int], segment_ids: list[int] | None = None) -> PackedBatch:
        if segment_ids is None:
            segment_ids = [0] * len(token_ids)
        return super().__new__(cls, token_ids, loss_mask, segment_ids)


class SequencePacker:
    """Greedily packs examples, in the order given, into rows of exactly ``max_seq_len`` tokens.

    An example that does not fit in the rest of the current row starts a new row. An example
    longer than ``max_seq_len - 1`` (the room left for its EOS) is an error: build the dataset with
    the same ``max_seq_len`` and it cuts such examples when it loads them.
    """

    def __init__(self, max_seq_len: int, eos_token_id: int = EOS_TOKEN_ID, pad_token_id: int = PAD_TOKEN_ID):
        check_max_seq_len(max_seq_len)
        self.max_seq_len = max_seq_len
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
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
            raise ValueError(
                f"an example of {len(token_ids)} tokens does not fit a row of max_seq_len={self.max_seq_len} with "
                f"its EOS; build the dataset with max_seq_len={self.max_seq_len} so that it is cut when loaded"
            )
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
