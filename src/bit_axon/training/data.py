"""Training datasets: chat (``messages``), Alpaca and ORPO preference files, tokenized with loss masks.

Files are JSON Lines (one object per line) or a JSON array of objects. Every record is checked
and tokenized when the dataset is built, so a bad record stops the run before training starts
(``DatasetError`` naming ``file:line``) and over-long examples are counted in a single warning.

An SFT item is ``(token_ids, loss_mask)``: ``loss_mask[t] == 1`` means token ``t`` is a
training target. It is 1 exactly on assistant content and the ``<|im_end|>`` that closes it, so
the model learns what to say and when to stop, never the prompt, the role header or the newline
between turns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from bit_axon.tokenizer import IM_END, IM_START, QwenTokenizerWrapper

import numpy as np

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
DatasetFormat = Literal["messages", "alpaca", "orpo"]
FORMATS: tuple[str, ...] = ("messages", "alpaca", "orpo")

# A piece of a rendered conversation and whether its tokens are training targets.
Piece = tuple[str, bool]


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and line."""


class PreferencePair(NamedTuple):
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]


@dataclass(frozen=True)
class Record:
    where: str  # "path:line", for error messages
    data: dict[str, Any]


# --- reading files ---------------------------------------------------------------------------


def _iter_json_array(text: str, path: Path) -> Iterator[Record]:
    # Decode element by element so that each record knows the line it starts on.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted_to = 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield _as_record(obj, f"{path}:{line}")
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        err_line = text.count("\n", 0, pos) + 1
        raise DatasetError(f"{path}:{err_line}: invalid JSON: expected ',' or ']' between records")


def _as_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return Record(where, obj)


def iter_records(path: str | Path) -> Iterator[Record]:
    """The JSON objects of a JSON Lines file or of a file holding one JSON array, with their lines."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text, path)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield _as_record(obj, f"{path}:{number}")


def read_records(path: str | Path) -> list[Record]:
    records = list(iter_records(path))
    if not records:
        raise DatasetError(f"{path}: no records (empty file)")
    return records


# --- record validation -----------------------------------------------------------------------


def _field(record: Record, name: str) -> Any:
    if name not in record.data:
        raise DatasetError(f"{record.where}: missing field {name!r} (fields: {sorted(record.data)})")
    return record.data[name]


def _string(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: {what} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: {what}[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in message:
                raise DatasetError(f"{where}: {what}[{i}] is missing field {key!r}")
        role = message["role"]
        if role not in ROLES:
            raise DatasetError(f"{where}: {what}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        messages.append({"role": role, "content": _string(message["content"], where, f"{what}[{i}].content")})
    return messages


def sft_messages(record: Record) -> list[dict[str, str]]:
    messages = _messages(_field(record, "messages"), record.where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{record.where}: conversation has no assistant turn, so nothing to train on")
    return messages


def alpaca_messages(record: Record) -> list[dict[str, str]]:
    instruction = _string(_field(record, "instruction"), record.where, "instruction")
    output = _string(_field(record, "output"), record.where, "output")
    extra = record.data.get("input")
    if extra is not None and _string(extra, record.where, "input"):
        instruction = f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


def orpo_parts(record: Record) -> tuple[list[dict[str, str]], str, str]:
    """The prompt messages and the chosen and rejected response texts of a preference record."""
    prompt = _field(record, "prompt")
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages(prompt, record.where, "prompt")
    return prompt_messages, _response(record, "chosen"), _response(record, "rejected")


def _response(record: Record, name: str) -> str:
    value = _field(record, name)
    if isinstance(value, str):
        return value
    messages = _messages(value, record.where, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DatasetError(f"{record.where}: {name} must be a string or a list of exactly one assistant message")
    return messages[0]["content"]


def detect_format(path: str | Path) -> DatasetFormat:
    """``"messages"``, ``"alpaca"`` or ``"orpo"``, from the fields of the file's first record."""
    first = next(iter_records(path), None)
    if first is None:
        raise DatasetError(f"{path}: no records (empty file)")
    return _record_format(first)


def _record_format(record: Record) -> DatasetFormat:
    keys = record.data.keys()
    if "messages" in keys:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "orpo"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise DatasetError(
        f"{record.where}: unknown record format with fields {sorted(keys)}; expected 'messages', "
        "'instruction'/'output' (Alpaca) or 'prompt'/'chosen'/'rejected' (ORPO). "
        "`bit-axon prepare` converts other shapes."
    )


# --- tokenization ----------------------------------------------------------------------------


def chat_pieces(messages: Sequence[Mapping[str, str]], train_roles: Sequence[str] = ("assistant",)) -> list[Piece]:
    """ChatML pieces of ``messages``; content and closing ``<|im_end|>`` of ``train_roles`` are targets."""
    pieces: list[Piece] = []
    for m in messages:
        train = m["role"] in train_roles
        pieces += [(f"{IM_START}{m['role']}\n", False), (m["content"], train), (IM_END, train), ("\n", False)]
    return pieces


def generation_header() -> Piece:
    return (f"{IM_START}assistant\n", False)


def tokenize_pieces(tokenizer: QwenTokenizerWrapper, examples: Sequence[Sequence[Piece]]) -> list[tuple[list[int], list[int]]]:
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


def _truncate(examples: list[tuple[list[int], list[int]]], max_seq_len: int) -> list[int]:
    """Cut examples to ``max_seq_len`` in place; the indices of those that were cut."""
    cut = []
    for i, (ids, mask) in enumerate(examples):
        if len(ids) > max_seq_len:
            examples[i] = (ids[:max_seq_len], mask[:max_seq_len])
            cut.append(i)
    return cut


def _warn_truncated(path: Path, cut: Sequence[int], total: int, records: Sequence[Record], max_seq_len: int) -> None:
    if cut:
        logger.warning(
            "%s: %d of %d examples are longer than max_seq_len=%d tokens and were truncated (first: %s)",
            path, len(cut), total, max_seq_len, records[cut[0]].where,
        )


def _check_max_seq_len(max_seq_len: int) -> None:
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")


# --- datasets --------------------------------------------------------------------------------


class _ChatDataset:
    """Chat examples from a file, each item ``(token_ids, loss_mask)``; subclasses read records."""

    def __init__(self, path: str | Path, tokenizer: QwenTokenizerWrapper, max_seq_len: int = 2048):
        _check_max_seq_len(max_seq_len)
        self.path = Path(path)
        self.max_seq_len = max_seq_len
        records = read_records(self.path)
        examples = tokenize_pieces(tokenizer, [chat_pieces(self._messages(r)) for r in records])
        cut = _truncate(examples, max_seq_len)
        _warn_truncated(self.path, cut, len(records), records, max_seq_len)
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


class ORPODataset:
    """Preference pairs ``{"prompt", "chosen", "rejected"}``, each a string or a message list.

    Both sequences share the chat-templated prompt ending in the ``<|im_start|>assistant\\n``
    generation header, then hold the response and its ``<|im_end|>``, which alone are masked 1.
    """

    def __init__(self, path: str | Path, tokenizer: QwenTokenizerWrapper, max_seq_len: int = 2048):
        _check_max_seq_len(max_seq_len)
        self.path = Path(path)
        self.max_seq_len = max_seq_len
        records = read_records(self.path)
        chosen_pieces, rejected_pieces = [], []
        for record in records:
            prompt, chosen, rejected = orpo_parts(record)
            prefix = [*chat_pieces(prompt, train_roles=()), generation_header()]
            chosen_pieces.append([*prefix, (chosen, True), (IM_END, True)])
            rejected_pieces.append([*prefix, (rejected, True), (IM_END, True)])
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
        _warn_truncated(self.path, cut, len(records), records, max_seq_len)
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
    tokenizer: QwenTokenizerWrapper,
    max_seq_len: int = 2048,
    format: DatasetFormat | None = None,
) -> SFTDataset | AlpacaDataset | ORPODataset:
    """The dataset class for ``path``'s format (detected from its first record when not given)."""
    if format is None:
        format = detect_format(path)
    if format not in _DATASETS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    return _DATASETS[format](path, tokenizer, max_seq_len=max_seq_len)
