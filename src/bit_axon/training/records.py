"""Dataset files as validated records: JSON Lines or a JSON array, each record knowing its ``file:line``.

The three formats (``messages``, Alpaca, ORPO preference pairs) are told apart by their fields
(``detect_format``); each reader turns a record into chat messages or fails with a ``DatasetError``
that names the file and line. Tokenizing them is ``bit_axon.training.data``'s job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
DatasetFormat = Literal["messages", "alpaca", "orpo"]
FORMATS: tuple[str, ...] = ("messages", "alpaca", "orpo")


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and line."""


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


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {err.start - line_start + 1}); "
            "save the file as UTF-8"
        ) from None


def iter_records(path: str | Path) -> Iterator[Record]:
    """The JSON objects of a JSON Lines file or of a file holding one JSON array, with their lines."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a directory: pass a data file (.jsonl or .json), e.g. one inside it")
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    text = _read_utf8(path)
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


def has_reply_text(messages: list[dict[str, str]]) -> bool:
    """Whether some assistant turn of a conversation says something (not only empty or blank replies)."""
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


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
