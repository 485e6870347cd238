"""The tokenizer interface (``BaseTokenizer``) and the Qwen2.5 tokenizer with ChatML, on ``tokenizers``.

``BaseTokenizer`` is what datasets, generation and chat take: encoding, the chat template, the
assistant-target pieces of a conversation, the special ids and saving in the Hugging Face layout.
A model's own tokenizer (GGUF metadata or tokenizer.json) is ``bit_axon.sources.ChatTokenizer``.

Every Qwen2.5 model shares one tokenizer, and a copy of it ships inside the package, so the
default tokenizer never needs a network. Anything else is a local ``tokenizer.json`` (plain or
gzipped), a directory holding one, or a Hugging Face hub id.
"""

from __future__ import annotations

import gzip
import json
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
# ``render_chatml`` as a Jinja chat template, for tokenizer_config.json.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_QWEN25_ID = re.compile(r"^Qwen/Qwen2\.5-[\w.-]+$", re.IGNORECASE)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# hub clients retry a dead connection for ~25 s; a TCP probe this long fails in seconds instead.
HUB_PROBE_TIMEOUT_S = 3.0


class TokenizerLoadError(OSError):
    """The tokenizer could not be found or downloaded."""


def _read_tokenizer_file(path: Path) -> Tokenizer:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return Tokenizer.from_str(f.read())
    return Tokenizer.from_file(str(path))


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached (for an error message), or None when it can."""
    from huggingface_hub import constants

    if hub_reachable(timeout):
        return None
    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"no connection within {timeout:.0f} s"


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
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
    if not hub_reachable(HUB_PROBE_TIMEOUT_S):
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


class BaseTokenizer:
    """A ``tokenizers`` tokenizer with a chat template: the one interface datasets and generation use.

    Subclasses set ``source``, ``tokenizer``, the special tokens and ids below and ``chat_template``
    (its Jinja source, for ``save``), and define ``render`` and ``chat_pieces``.
    """

    source: object
    tokenizer: Tokenizer
    chat_template: str
    bos_token: str | None
    eos_token: str | None  # the source's own end-of-sequence token (templates may render it)
    pad_token: str
    eos_token_id: int  # the end of an assistant turn: what training appends and generation stops at
    pad_token_id: int  # never a real token of an example: the trainer counts tokens as ``!= pad``
    stop_token_ids: tuple[int, ...]  # end of a turn, then end of a document

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

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (dicts with ``role`` and ``content``)."""
        raise NotImplementedError

    def chat_pieces(self, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
        """``render(messages)`` cut into ``(text, is_target)`` pieces, in order: the targets are each
        assistant message's content and the end-of-turn token that closes it."""
        raise NotImplementedError

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """``render(messages, add_generation_prompt)``; its token ids when ``tokenize``."""
        text = self.render(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, special tokens) into
        ``directory``, the Hugging Face layout that ``ChatTokenizer.from_hf_directory`` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        config = {key: token for key, token in config.items() if token}
        config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory


class QwenTokenizerWrapper(BaseTokenizer):
    """Qwen2.5 tokenizer with the ChatML template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""

    chat_template = CHATML_TEMPLATE
    bos_token = None
    eos_token = IM_END
    pad_token = ENDOFTEXT

    def __init__(self, path_or_name: str | Path | None = DEFAULT_TOKENIZER):
        self.source = path_or_name
        self.tokenizer = _read_tokenizer_file(resolve_tokenizer_file(path_or_name))
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.eos_token_id = self.im_end_id
        self.pad_token_id = self._special_id(ENDOFTEXT)
        self.stop_token_ids = (self.eos_token_id, self.pad_token_id)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerLoadError(f"Tokenizer {self.source!r} has no {token} token; it is not a ChatML tokenizer")
        return token_id

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """ChatML, with no default system prompt: the conversation is rendered exactly as given."""
        return render_chatml(messages, add_generation_prompt)

    def chat_pieces(self, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
        """ChatML pieces of ``messages``: each assistant turn's content and its ``<|im_end|>`` are targets.

        Every header, content and separator is a piece of its own, tokenized apart from the others.
        """
        pieces: list[tuple[str, bool]] = []
        for m in messages:
            train = m["role"] == "assistant"
            pieces += [(f"{IM_START}{m['role']}\n", False), (m["content"], train), (IM_END, train), ("\n", False)]
        return pieces


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
