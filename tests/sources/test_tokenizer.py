"""The model's own tokenizer and chat template, from GGUF metadata or a Hugging Face directory."""

from __future__ import annotations

import gzip
import json
import logging

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.sources import ChatTokenizer
from bit_axon.tokenizer import BUNDLED_TOKENIZER, render_chatml

import mlx.core as mx
import pytest
from jinja2.exceptions import TemplateError

CHAT = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And in words?"},
    {"role": "assistant", "content": "Forty-two."},
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["Hello, world! It's 2024.", "  spaces\n\nand\tlines  ", "日本語のテキスト", "don't, we'll 1234567"]


def test_smollm2_pieces_split_the_rendering_exactly(smollm2):
    _, tokenizer = smollm2
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert full.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default prompt
    pieces = tokenizer.chat_pieces(CHAT)
    assert "".join(text for text, _ in pieces) == full
    ids = [i for text, _ in pieces for i in tokenizer.encode(text)]
    assert ids == tokenizer.encode(full) == tokenizer.apply_chat_template(CHAT)
    targets = [i for text, target in pieces if target for i in tokenizer.encode(text)]
    expected = [i for m in CHAT if m["role"] == "assistant" for i in tokenizer.encode(m["content"]) + [2]]
    assert targets == expected
    assert [t for t, target in pieces if target] == ["12 + 30 = 42.<|im_end|>", "Forty-two.<|im_end|>"]


def test_smollm2_special_tokens(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_token_id == 2 == tokenizer.encode("<|im_end|>")[0]
    # The GGUF says pad = eos = 2; padding must not be a real token, so <|endoftext|> pads instead.
    assert tokenizer.pad_token_id == 0 == tokenizer.encode("<|endoftext|>")[0]
    assert tokenizer.stop_token_ids == (2, 0)
    assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.encode("user")[0]]
    assert tokenizer.encode("1234") == [tokenizer.encode(d)[0] for d in "1234"]  # digits split one by one
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.fixture(scope="module")
def qwen_json() -> dict:
    with gzip.open(BUNDLED_TOKENIZER, "rt", encoding="utf-8") as f:
        return json.load(f)


def gguf_metadata_from(tokenizer_json: dict) -> dict:
    """What llama.cpp's converter writes for a byte-level BPE tokenizer (Qwen2's pre-tokenizer)."""
    vocab = dict(tokenizer_json["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    vocab.update(special)
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    types = [3 if t in special else 1 for t in tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": mx.array(special["<|endoftext|>"], dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(special["<|endoftext|>"], dtype=mx.uint32),
        "tokenizer.chat_template": CHATML,
    }


def test_gguf_bpe_encodes_like_the_original(qwen_json, qwen_tokenizer):
    tokenizer = ChatTokenizer.from_gguf_metadata(gguf_metadata_from(qwen_json))
    for text in [*TEXTS, render_chatml(CHAT)]:
        assert tokenizer.encode(text) == qwen_tokenizer.encode(text), text
    assert tokenizer.eos_token_id == qwen_tokenizer.im_end_id  # ChatML: the turn ends with <|im_end|>
    assert tokenizer.pad_token_id == qwen_tokenizer.pad_token_id


def test_hugging_face_directory(tmp_path, qwen_json, qwen_tokenizer):
    (tmp_path / "tokenizer.json").write_text(json.dumps(qwen_json))
    config = {"chat_template": CHATML, "eos_token": "<|endoftext|>", "pad_token": {"content": "<|endoftext|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = ChatTokenizer.from_hf_directory(tmp_path)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == render_chatml(CHAT)
    assert tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True) == qwen_tokenizer.apply_chat_template(
        CHAT[:1], add_generation_prompt=True
    )
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (qwen_tokenizer.im_end_id, qwen_tokenizer.pad_token_id)
    pieces = tokenizer.chat_pieces(CHAT)
    assert [t for t, target in pieces if target] == ["12 + 30 = 42.<|im_end|>", "Forty-two.<|im_end|>"]


def test_template_errors_and_missing_files(tmp_path, qwen_json):
    metadata = gguf_metadata_from(qwen_json)
    metadata["tokenizer.chat_template"] = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TemplateError, match="roles must alternate"):
        ChatTokenizer.from_gguf_metadata(metadata).apply_chat_template(CHAT)
    with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
        ChatTokenizer.from_hf_directory(tmp_path)
    del metadata["tokenizer.chat_template"]
    with pytest.raises(ValueError, match="no chat template"):
        ChatTokenizer.from_gguf_metadata(metadata)


def test_template_that_rewrites_history_is_refused(qwen_json):
    metadata = gguf_metadata_from(qwen_json)
    metadata["tokenizer.chat_template"] = "{{ messages | length }}" + CHATML
    with pytest.raises(ValueError, match="renders a conversation's first"):
        ChatTokenizer.from_gguf_metadata(metadata).chat_pieces(CHAT)


def test_pad_that_ends_turns_is_replaced_once_and_logged(qwen_json, caplog):
    metadata = gguf_metadata_from(qwen_json)
    metadata["tokenizer.ggml.padding_token_id"] = mx.array(151645, dtype=mx.uint32)  # <|im_end|>
    with caplog.at_level(logging.INFO, logger="bit_axon.sources.tokenizer"):
        tokenizer = ChatTokenizer.from_gguf_metadata(metadata)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    assert [r.getMessage() for r in caplog.records if "padding with" in r.getMessage()] == [
        "GGUF file: the pad token '<|im_end|>' also ends a turn; padding with '<|endoftext|>' instead"
    ]


def test_smollm2_save_round_trip(smollm2, tmp_path):
    _, tokenizer = smollm2
    tokenizer.save(tmp_path)
    loaded = ChatTokenizer.from_hf_directory(tmp_path)
    for name in ("vocab_size", "eos_token_id", "pad_token_id", "stop_token_ids", "bos_token", "eos_token", "pad_token"):
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    for messages in (CHAT, [{"role": "system", "content": "Be brief."}, *CHAT[:1]]):
        assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert loaded.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True
        )
    assert loaded.chat_pieces(CHAT) == tokenizer.chat_pieces(CHAT)
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
