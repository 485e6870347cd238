"""A model's own tokenizer and chat template: from GGUF metadata or a Hugging Face directory.

The interface of ``bit_axon.tokenizer.BaseTokenizer``, rendering the model's Jinja chat template
like transformers does; ``chat_pieces`` cuts that rendering into target (assistant content and its
end-of-turn token) and non-target text, for assistant-only loss masks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bit_axon.tokenizer import ENDOFTEXT, IM_END, BaseTokenizer

import mlx.core as mx
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType): control tokens are special; user-defined ones are added.
CONTROL, USER_DEFINED = 3, 4
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of llama.cpp's ``tokenizer.ggml.pre`` type (the splits before BPE)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in ("gpt2", "default"):
        logger.warning("GGUF pre-tokenizer %r is not known here; splitting text like GPT-2", pre)
    return byte_level


def _int(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return None if value is None else int(value.item() if isinstance(value, mx.array) else value)


_GGUF_SPECIALS = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}


def gguf_tokenizer(metadata: Mapping[str, Any]) -> tuple[Tokenizer, dict]:
    """The BPE tokenizer and its special tokens from a GGUF file's ``tokenizer.*`` metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "gpt2"))
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in metadata else []
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    )
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == USER_DEFINED])

    def token(key: str) -> str | None:
        token_id = _int(metadata, f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[token_id]

    specials = {key: token(name) for key, name in _GGUF_SPECIALS.items()}
    specials["chat_template"] = metadata.get("tokenizer.chat_template")
    return tokenizer, specials


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, Mapping) else value


def hf_tokenizer(directory: Path) -> tuple[Tokenizer, dict]:
    """The tokenizer and special tokens of a Hugging Face directory (tokenizer.json + its config)."""
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    specials = {key: _token_text(config.get(key)) for key in _GGUF_SPECIALS}
    template = config.get("chat_template")
    template_file = directory / "chat_template.jinja"
    if template is None and template_file.is_file():
        template = template_file.read_text()
    if isinstance(template, list):  # named templates: transformers' default is "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    specials["chat_template"] = template
    return tokenizer, specials


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTokenizer(BaseTokenizer):
    """A model's tokenizer with its chat template (the interface of ``BaseTokenizer``)."""

    def __init__(self, tokenizer: Tokenizer, specials: Mapping[str, Any], source: str = "tokenizer"):
        self.source = source
        self.tokenizer = tokenizer
        self.bos_token = specials.get("bos_token") or None
        self.eos_token = specials.get("eos_token")
        template = specials.get("chat_template")
        if not template:
            raise ValueError(f"{source}: no chat template (tokenizer.chat_template / tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.chat_template = template
        self.template = env.from_string(template)
        # The end of an assistant turn: ChatML closes every turn with <|im_end|>, whatever the eos.
        self.end_of_turn = IM_END if IM_END in template and self._id(IM_END) is not None else self.eos_token
        self.eos_token_id = self._required_id(self.end_of_turn, "end-of-turn")
        self.pad_token = self._pad_token(specials)
        self.pad_token_id = self._required_id(self.pad_token, "padding")
        # The end of a turn, then the ends of a document: the source's eos and <|endoftext|>.
        stops = [self.eos_token_id, self._id(self.eos_token), self._id(ENDOFTEXT)]
        self.stop_token_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    def _pad_token(self, specials: Mapping[str, Any]) -> str:
        """The source's pad token, unless it is the end-of-turn token (GGUF files often say pad = eos),
        which training appends and counts as a real token: then the vocabulary's end-of-document
        token, else bos, else unk."""
        pad = specials.get("pad_token") or self.eos_token
        if self._id(pad) != self.eos_token_id:
            return pad
        for candidate in (ENDOFTEXT, specials.get("bos_token"), specials.get("unk_token")):
            if self._id(candidate) not in (None, self.eos_token_id):
                logger.info("%s: the pad token %r also ends a turn; padding with %r instead", self.source, pad, candidate)
                return candidate
        logger.warning(
            "%s: no token to pad with other than the end-of-turn token %r; training would not count the "
            "end-of-turn tokens as real tokens", self.source, pad,
        )
        return pad

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "GGUF file") -> ChatTokenizer:
        tokenizer, specials = gguf_tokenizer(metadata)
        return cls(tokenizer, specials, source)

    @classmethod
    def from_hf_directory(cls, directory: str | Path) -> ChatTokenizer:
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"No tokenizer.json in {directory}")
        tokenizer, specials = hf_tokenizer(directory)
        return cls(tokenizer, specials, str(directory))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def _required_id(self, token: str | None, what: str) -> int:
        token_id = self._id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: the {what} token {token!r} is not in the vocabulary")
        return token_id

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages``, rendered with transformers' variables."""
        return self.template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def chat_pieces(self, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
        """The rendering of ``messages`` as ``(text, is_target)`` pieces, in order.

        Targets are each assistant message's content and the end-of-turn token closing it; found by
        rendering the prefixes of the conversation (with and without the generation prompt), so the
        template's own headers, default system prompt and separators stay non-targets.
        """
        full = self.render(messages)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = len(self._prefix(messages[:i], True, full))
            turn = self._prefix(messages[: i + 1], False, full)
            content_at = turn.find(message["content"], start)
            end_at = turn.find(self.end_of_turn, content_at + len(message["content"]))
            if content_at != start or end_at < 0:
                raise ValueError(
                    f"{self.source}: the chat template does not render assistant message {i} as its "
                    f"content followed by {self.end_of_turn!r}"
                )
            end = end_at + len(self.end_of_turn)
            pieces += [(full[done:start], False), (full[start:end], True)]
            done = end
        pieces.append((full[done:], False))
        return [(text, target) for text, target in pieces if text]

    def _prefix(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, full: str) -> str:
        text = self.render(messages, add_generation_prompt)
        if not full.startswith(text):
            raise ValueError(
                f"{self.source}: the chat template renders a conversation's first {len(messages)} messages "
                f"differently from the start of the whole conversation; assistant targets cannot be found"
            )
        return text
