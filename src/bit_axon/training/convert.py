"""Conversion of common dataset record shapes into the training file formats of ``data.py``.

Shapes: ``messages`` (``messages`` or ``conversations`` lists of role/content dicts),
``sharegpt`` (``conversations`` of ``from``/``value`` dicts, roles human/gpt/system), ``alpaca``
(instruction/input/output) and ``orpo`` (prompt/chosen/rejected as strings or message lists,
including chosen/rejected that repeat the prompt as full conversations). Chat shapes become
``{"messages": [...]}``, Alpaca stays Alpaca and preferences become message-list ORPO records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from bit_axon.training.data import ROLES

Shape = Literal["messages", "sharegpt", "alpaca", "orpo"]
SHAPES: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "orpo")

# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


class ConversionError(ValueError):
    """A record that does not have the shape it is converted from."""


def detect_shape(record: Mapping[str, Any]) -> Shape:
    """The shape of ``record``, from its fields."""
    if {"chosen", "rejected"} <= record.keys():
        return "orpo"
    if {"instruction", "output"} <= record.keys():
        return "alpaca"
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], Mapping):
            return "sharegpt" if "from" in turns[0] else "messages"
    raise ConversionError(
        f"cannot tell the shape of a record with fields {sorted(record)}; pass a format "
        f"({', '.join(SHAPES)}) or use messages, conversations, instruction/output or prompt/chosen/rejected"
    )


def convert_record(record: Mapping[str, Any], shape: Shape | None = None) -> dict[str, Any]:
    """``record`` in the training format for its shape (detected when ``shape`` is None)."""
    shape = shape or detect_shape(record)
    if shape == "messages":
        return {"messages": _with_system(record, _chat(_turns(record), "role", "content", {r: r for r in ROLES}))}
    if shape == "sharegpt":
        return {"messages": _with_system(record, _chat(_turns(record), "from", "value", SHAREGPT_ROLES))}
    if shape == "alpaca":
        return _alpaca(record)
    if shape == "orpo":
        return _orpo(record)
    raise ConversionError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _turns(record: Mapping[str, Any]) -> list[Any]:
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            return record[key]
    raise ConversionError(f"record has no 'messages' or 'conversations' list (fields: {sorted(record)})")


def _chat(turns: list[Any], role_key: str, content_key: str, roles: Mapping[str, str]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise ConversionError(f"turn {i} needs {role_key!r} and {content_key!r} fields, got {turn!r}")
        speaker = turn[role_key]
        if speaker not in roles:
            raise ConversionError(f"turn {i} has unknown role {speaker!r} (known: {', '.join(sorted(roles))})")
        content = turn[content_key]
        if not isinstance(content, str):
            raise ConversionError(f"turn {i} content must be a string, got {type(content).__name__}")
        messages.append({"role": roles[speaker], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversionError("conversation has no assistant turn")
    return messages


def _with_system(record: Mapping[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    # Some ShareGPT-style datasets keep the system prompt in a column of its own.
    system = record.get("system")
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def _text(record: Mapping[str, Any], key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. numeric answers that a JSON or CSV reader typed as numbers
    if not isinstance(value, str):
        raise ConversionError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca(record: Mapping[str, Any]) -> dict[str, str]:
    out = {"instruction": _text(record, "instruction")}
    extra = _text(record, "input", optional=True)
    if extra:
        out["input"] = extra
    out["output"] = _text(record, "output")
    return out


def _orpo(record: Mapping[str, Any]) -> dict[str, Any]:
    chosen_prefix, chosen = _response(record, "chosen")
    rejected_prefix, rejected = _response(record, "rejected")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        prompt_messages = _chat_prompt(prompt)
    elif prompt is None and chosen_prefix:
        # Full conversations in chosen/rejected (e.g. UltraFeedback): the shared turns are the prompt.
        if chosen_prefix != rejected_prefix:
            raise ConversionError("chosen and rejected conversations start differently and there is no 'prompt'")
        prompt_messages = chosen_prefix
    else:
        raise ConversionError("preference record needs a 'prompt' (string or message list)")
    return {
        "prompt": prompt_messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _chat_prompt(turns: list[Any]) -> list[dict[str, str]]:
    return [_message(turn, i) for i, turn in enumerate(turns)]


def _message(turn: Any, i: int) -> dict[str, str]:
    if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
        raise ConversionError(f"message {i} needs a role ({', '.join(ROLES)}) and string content, got {turn!r}")
    return {"role": turn["role"], "content": turn["content"]}


def _response(record: Mapping[str, Any], key: str) -> tuple[list[dict[str, str]], str]:
    """The messages before the final response and the response text of ``record[key]``."""
    value = record.get(key)
    if isinstance(value, str):
        return [], value
    if not isinstance(value, list) or not value:
        raise ConversionError(f"field {key!r} must be a string or a non-empty message list")
    messages = [_message(turn, i) for i, turn in enumerate(value)]
    if messages[-1]["role"] != "assistant":
        raise ConversionError(f"the last message of {key!r} must be the assistant's response")
    return messages[:-1], messages[-1]["content"]
