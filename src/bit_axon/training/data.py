"""Training datasets: chat (``messages``), Alpaca and ORPO preference files, tokenized with loss masks.

Files are JSON Lines (one object per line) or a JSON array of objects, read and checked by
:mod:`bit_axon.training.records`. Every record is checked and tokenized when the dataset is built,
so a bad record stops the run before training starts (``DatasetError`` naming ``file:line``).
Over-long examples are cut there, the only place they are cut, and counted in a single warning: an SFT example to ``max_seq_len - 1`` tokens (packing puts an
EOS after it), a preference pair's sequences to ``max_seq_len`` (ORPO does not pack). Records that
teach nothing (only empty assistant replies, a pair whose chosen and rejected responses are the same,
an example the cut leaves without answer tokens) are counted in a warning naming the first
``file:line``; a file of only such records (for the cut: mostly, ``MAX_UNTRAINED_FRACTION``) is
refused. A dataset exposes its tokenizer's ``eos_token_id`` and ``pad_token_id``, which the trainers
pack and pad with.

Records are rendered with the tokenizer's own chat template and special tokens (its
``chat_pieces``). An SFT item is ``(token_ids, loss_mask)``: ``loss_mask[t] == 1`` means token ``t``
is a training target. It is 1 exactly on assistant content and the end-of-turn token that closes it
(``<|im_end|>`` in ChatML), so the model learns what to say and when to stop, never the prompt, a
default system prompt, the role headers or the separators between turns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bit_axon.tokenizer import BaseTokenizer
from bit_axon.training.packing import check_max_seq_len
from bit_axon.training.records import (
    FORMATS,
    ROLES,
    DatasetError,
    DatasetFormat,
    Record,
    alpaca_messages,
    detect_format,
    has_reply_text,
    iter_records,
    orpo_parts,
    read_records,
    sft_messages,
)

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [  # the record readers are re-exported: this stays the one import for dataset code
    "FORMATS", "ROLES", "AlpacaDataset", "CacheDataset", "DatasetError", "DatasetFormat", "ORPODataset",
    "PreferencePair", "Record", "SFTDataset", "alpaca_messages", "detect_format", "iter_records",
    "load_dataset_file", "orpo_parts", "read_records", "response_pieces", "sft_messages", "tokenize_pieces",
]

# A piece of a rendered conversation and whether its tokens are training targets.
Piece = tuple[str, bool]


class PreferencePair(NamedTuple):
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]


# --- tokenization ----------------------------------------------------------------------------


def response_pieces(pieces: Sequence[Piece]) -> list[Piece]:
    """The pieces of a conversation ending in one response, with only that response as the target.

    The response is the last run of target pieces (its content and end-of-turn token); earlier
    assistant turns become prompt, and what the template puts after the end-of-turn token is dropped.
    """
    pieces = list(pieces)
    while pieces and not pieces[-1][1]:
        pieces.pop()
    start = len(pieces)
    while start and pieces[start - 1][1]:
        start -= 1
    return [(text, False) for text, _ in pieces[:start]] + pieces[start:]


def tokenize_pieces(tokenizer: BaseTokenizer, examples: Sequence[Sequence[Piece]]) -> list[tuple[list[int], list[int]]]:
    """``(token_ids, loss_mask)`` for each example given as pieces.

    Pieces are tokenized separately so a mask boundary can never fall inside a token. With ChatML
    this matches tokenizing the whole rendered string, as role headers end in a newline and
    special tokens split the text; content that itself starts with whitespace may tokenize
    differently, exactly as it does after the generation prompt at inference time.
    """
    unique = list(dict.fromkeys(text for pieces in examples for text, _ in pieces))
    encoded = dict(zip(unique, tokenizer.encode_batch(unique), strict=True))
    out = []
    for pieces in examples:
        ids: list[int] = []
        mask: list[int] = []
        for text, train in pieces:
            piece_ids = encoded[text]
            ids += piece_ids
            mask += [int(train)] * len(piece_ids)
        out.append((ids, mask))
    return out


class _TokenStore:
    """Variable-length (ids, mask) examples in flat numpy arrays: ~5 bytes a token, not ~70 as lists."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]]):
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.ids = np.fromiter((t for ids, _ in examples for t in ids), dtype=np.int32, count=int(self.offsets[-1]))
        self.mask = np.fromiter((t for _, m in examples for t in m), dtype=np.int8, count=int(self.offsets[-1]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.ids[start:end].tolist(), self.mask[start:end].tolist()


def _truncate(examples: list[tuple[list[int], list[int]]], limit: int) -> list[int]:
    """Cut examples to ``limit`` tokens in place; the indices of those that were cut."""
    cut = []
    for i, (ids, mask) in enumerate(examples):
        if len(ids) > limit:
            examples[i] = (ids[:limit], mask[:limit])
            cut.append(i)
    return cut


def _warn_truncated(path: Path, cut: Sequence[int], records: Sequence[Record], limit: int, why: str) -> None:
    if cut:
        logger.warning(
            "%s: %d of %d examples are longer than %d tokens (%s) and were truncated (first: %s)",
            path, len(cut), len(records), limit, why, records[cut[0]].where,
        )


# Above this share of examples left without a trained token by max_seq_len, a data set is refused.
MAX_UNTRAINED_FRACTION = 0.5


def _check_teachable(path: Path, records: Sequence[Record], useless: Sequence[bool], what: str, why: str) -> None:
    """Warn with a count about records that teach nothing (``useless``); refuse a file of only those."""
    count = sum(useless)
    if count == len(records):
        raise DatasetError(f"{path}: {count} of {count} records {what}: {why}, so there is nothing to train on")
    if count:
        first = records[useless.index(True)].where
        logger.warning("%s: %d of %d records %s: %s (first: %s)", path, count, len(records), what, why, first)


def _check_targets_left(path: Path, records: Sequence[Record], examples, cut: Sequence[int], limit: int) -> None:
    """Refuse a data set where most examples lose every trained token to the cut at ``limit``
    (their prompts fill it); warn with a count when some do."""
    lost = [i for i in cut if not any(examples[i][1])]
    if not lost:
        return
    message = (
        f"{path}: {len(lost)} of {len(records)} examples keep no answer tokens when cut to {limit} tokens "
        f"(the prompt fills them; first: {records[lost[0]].where})"
    )
    remedy = "raise max_seq_len (--max-seq-len) or shorten those prompts"
    if len(lost) > MAX_UNTRAINED_FRACTION * len(records):
        raise DatasetError(f"{message}; {remedy}")
    logger.warning("%s: they teach nothing (%s)", message, remedy)


class _TokenizedDataset:
    """What every dataset built from a file and a tokenizer records: where, how long, which special ids."""

    def __init__(self, path: str | Path, tokenizer: BaseTokenizer, max_seq_len: int):
        check_max_seq_len(max_seq_len)
        self.path = Path(path)
        self.max_seq_len = max_seq_len
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id


# --- datasets --------------------------------------------------------------------------------


class _ChatDataset(_TokenizedDataset):
    """Chat examples from a file, each item ``(token_ids, loss_mask)``; subclasses read records."""

    def __init__(self, path: str | Path, tokenizer: BaseTokenizer, max_seq_len: int = 2048):
        super().__init__(path, tokenizer, max_seq_len)
        records = read_records(self.path)
        conversations = [self._messages(r) for r in records]
        _check_teachable(self.path, records, [not has_reply_text(c) for c in conversations],
                         "have only empty assistant replies", "nothing to learn from them")
        examples = tokenize_pieces(tokenizer, [tokenizer.chat_pieces(c) for c in conversations])
        # Room for the EOS that packing appends, so packing never cuts again.
        cut = _truncate(examples, max_seq_len - 1)
        _warn_truncated(self.path, cut, records, max_seq_len - 1, "max_seq_len - 1, room for the packing EOS")
        _check_targets_left(self.path, records, examples, cut, max_seq_len - 1)
        self.num_truncated = len(cut)
        self._store = _TokenStore(examples)

    @staticmethod
    def _messages(record: Record) -> list[dict[str, str]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self._store[range(len(self))[index]]

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        return (self[i] for i in range(len(self)))


class SFTDataset(_ChatDataset):
    """OpenAI-style ``{"messages": [{"role", "content"}, ...]}`` conversations; trains on every assistant turn."""

    _messages = staticmethod(sft_messages)


class AlpacaDataset(_ChatDataset):
    """``{"instruction", "input"?, "output"}`` records as a user turn (instruction, blank line, input) and an answer."""

    _messages = staticmethod(alpaca_messages)


class ORPODataset(_TokenizedDataset):
    """Preference pairs ``{"prompt", "chosen", "rejected"}``, each a string or a message list.

    Each sequence is the prompt and one response rendered through the chat template: both share the
    templated prompt up to the generation header (``<|im_start|>assistant\\n`` in ChatML), then hold
    the response and its end-of-turn token, which alone are masked 1.
    """

    def __init__(self, path: str | Path, tokenizer: BaseTokenizer, max_seq_len: int = 2048):
        super().__init__(path, tokenizer, max_seq_len)
        records = read_records(self.path)
        chosen_pieces, rejected_pieces, same = [], [], []
        for record in records:
            prompt, chosen, rejected = orpo_parts(record)
            same.append(chosen == rejected)
            for response, pieces in ((chosen, chosen_pieces), (rejected, rejected_pieces)):
                conversation = [*prompt, {"role": "assistant", "content": response}]
                pieces.append(response_pieces(tokenizer.chat_pieces(conversation)))
        _check_teachable(self.path, records, same, "have the same chosen and rejected response",
                         "they teach no preference")
        chosen = tokenize_pieces(tokenizer, chosen_pieces)
        rejected = tokenize_pieces(tokenizer, rejected_pieces)
        cut = sorted(set(_truncate(chosen, max_seq_len)) | set(_truncate(rejected, max_seq_len)))
        for i in cut:
            # The ORPO loss averages log-probabilities over response tokens: it needs at least one.
            if not any(chosen[i][1]) or not any(rejected[i][1]):
                raise DatasetError(
                    f"{records[i].where}: the prompt fills all of max_seq_len={max_seq_len} tokens, leaving "
                    "no room for the response; raise max_seq_len or shorten the prompt"
                )
        _warn_truncated(self.path, cut, records, max_seq_len, "max_seq_len")
        self.num_truncated = len(cut)
        self._chosen = _TokenStore(chosen)
        self._rejected = _TokenStore(rejected)

    def __len__(self) -> int:
        return len(self._chosen)

    def __getitem__(self, index: int) -> PreferencePair:
        index = range(len(self))[index]
        return PreferencePair(*self._chosen[index], *self._rejected[index])

    def __iter__(self) -> Iterator[PreferencePair]:
        return (self[i] for i in range(len(self)))


class CacheDataset:
    """Memoizes ``dataset[i]``, so an item is built once however many epochs read it.

    The built-in datasets already tokenize once, at load; this matters for datasets whose
    ``__getitem__`` does real work, and saves the built-ins rebuilding Python lists every epoch.
    """

    def __init__(self, dataset: Sequence[Any]):
        self.dataset = dataset
        self._items: list[Any] = [None] * len(dataset)
        # The wrapped dataset's special token ids, which the trainers read from their dataset.
        for name in ("eos_token_id", "pad_token_id"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Any:
        index = range(len(self))[index]
        if self._items[index] is None:
            self._items[index] = self.dataset[index]
        return self._items[index]

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


_DATASETS = {"messages": SFTDataset, "alpaca": AlpacaDataset, "orpo": ORPODataset}


def load_dataset_file(
    path: str | Path,
    tokenizer: BaseTokenizer,
    max_seq_len: int = 2048,
    format: DatasetFormat | None = None,
) -> SFTDataset | AlpacaDataset | ORPODataset:
    """The dataset class for ``path``'s format (detected from its first record when not given)."""
    if format is None:
        format = detect_format(path)
    if format not in _DATASETS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    return _DATASETS[format](path, tokenizer, max_seq_len=max_seq_len)
