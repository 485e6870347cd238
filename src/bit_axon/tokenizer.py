"""The Qwen2.5 tokenizer (byte-level BPE) and its ChatML chat template, on the ``tokenizers`` library.

Every Qwen2.5 model shares one tokenizer, and a copy of it ships inside the package, so the
default tokenizer never needs a network. Anything else is a local ``tokenizer.json`` (plain or
gzipped), a directory holding one, or a Hugging Face hub id.
"""

from __future__ import annotations

import gzip
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

from tokenizers import Tokenizer

BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "qwen2.5-tokenizer.json.gz"
DEFAULT_TOKENIZER = "Qwen/Qwen2.5-3B"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.json.gz")

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

_QWEN25_ID = re.compile(r"^Qwen/Qwen2\.5-[\w.-]+$", re.IGNORECASE)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_HUB_PROBE_TIMEOUT_S = 3.0


class TokenizerLoadError(OSError):
    """The tokenizer could not be found or downloaded."""


def _read_tokenizer_file(path: Path) -> Tokenizer:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return Tokenizer.from_str(f.read())
    return Tokenizer.from_file(str(path))


def hub_reachable(timeout: float) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_tokenizer(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        return Path(hf_hub_download(repo_id, "tokenizer.json", local_files_only=True))
    except (EntryNotFoundError, OSError, HFValidationError):
        pass  # not cached: go to the network below
    # hf_hub_download retries a dead connection for ~25 s; a quick probe fails in seconds instead.
    if not hub_reachable(_HUB_PROBE_TIMEOUT_S):
        raise TokenizerLoadError(
            f"Tokenizer {repo_id!r} is not a local path, not a Qwen2.5 model (those use the bundled "
            f"tokenizer) and not in the Hugging Face cache, and the hub cannot be reached (offline?). "
            f"Pass a local tokenizer.json or a directory holding one."
        )
    try:
        return Path(hf_hub_download(repo_id, "tokenizer.json"))
    except (EntryNotFoundError, OSError, HFValidationError) as e:
        raise TokenizerLoadError(f"Could not download tokenizer.json for {repo_id!r} from the hub: {e}") from e


def resolve_tokenizer_file(path_or_name: str | Path | None = DEFAULT_TOKENIZER) -> Path:
    """The ``tokenizer.json`` (or ``.json.gz``) that ``path_or_name`` refers to."""
    if path_or_name is None:
        return BUNDLED_TOKENIZER
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                return path / name
        raise TokenizerLoadError(f"No {' or '.join(TOKENIZER_FILES)} in directory {path}")
    name = str(path_or_name)
    if _QWEN25_ID.match(name):
        return BUNDLED_TOKENIZER
    if not _HUB_ID.match(name) or name.endswith((".json", ".gz")):
        raise TokenizerLoadError(f"Tokenizer file or directory not found: {name}")
    return _download_tokenizer(name)


class QwenTokenizerWrapper:
    """Qwen2.5 tokenizer with the ChatML template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""

    def __init__(self, path_or_name: str | Path | None = DEFAULT_TOKENIZER):
        self.source = path_or_name
        self.tokenizer = _read_tokenizer_file(resolve_tokenizer_file(path_or_name))
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.eos_token_id = self.im_end_id
        self.pad_token_id = self._special_id(ENDOFTEXT)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerLoadError(f"Tokenizer {self.source!r} has no {token} token; it is not a ChatML tokenizer")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts at once (parallel in the Rust tokenizer)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render ``messages`` (dicts with ``role`` and ``content``) as ChatML; ids when ``tokenize``.

        No default system prompt is inserted: the conversation is rendered exactly as given.
        """
        text = render_chatml(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


def render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {message!r}")
        parts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
