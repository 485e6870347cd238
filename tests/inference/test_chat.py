"""ChatSession with a model's own template: cached turns == one-shot generation of the rendered chat."""

from __future__ import annotations

import logging

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.inference import ChatSession, collect, stream_generate
from bit_axon.sources import ChatTokenizer, pretrained_class
from sources.tiny_lm import tiny_config, tiny_mlx_lm_model

import mlx_lm.models.llama as llama
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# SmolLM2's template: ChatML with a default system prompt when the chat has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that renders earlier turns differently once the chat grows: the cache cannot be reused.
COUNTING_TEMPLATE = "{{ messages | length }}" + SMOLLM2_TEMPLATE
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GREEDY = dict(max_tokens=6, temperature=0.0)


def ascii_tokenizer(template: str) -> ChatTokenizer:
    """Byte-level BPE over the 128 ASCII bytes, no merges: any ASCII reply re-encodes to its own tokens."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {byte_level.pre_tokenize_str(chr(b))[0][0]: b for b in range(128)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return ChatTokenizer(tokenizer, {"eos_token": "<|im_end|>", "chat_template": template}, "ascii")


@pytest.fixture(scope="module")
def llama_model():
    config = tiny_config("llama", vocab_size=128 + len(SPECIALS))
    model = pretrained_class(llama)(llama.ModelArgs.from_dict(config))
    model.update(tiny_mlx_lm_model(config, seed=3).parameters())
    return model


def one_shot(model, tokenizer, messages):
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return collect(stream_generate(model, tokenizer, prompt, **GREEDY))


def chat_and_compare(model, tokenizer, turns):
    """Each ChatSession reply equals one-shot generation of the conversation rendered so far.

    Returns the session, its replies and the cache object it held after each turn."""
    chat = ChatSession(model, tokenizer)
    history, replies, caches = [], [], []
    for text in turns:
        history.append({"role": "user", "content": text})
        expected = one_shot(model, tokenizer, history)
        got = collect(chat.send(text, **GREEDY))
        assert (got.tokens, got.text, got.finish_reason) == (expected.tokens, expected.text, expected.finish_reason)
        history.append({"role": "assistant", "content": got.text})
        replies.append(got)
        caches.append(chat._cache)
    assert chat.messages == history
    assert len({t for r in replies for t in r.tokens}) > 2  # not a degenerate reply
    return chat, replies, caches


def generated(reply, tokenizer) -> list[int]:
    """The tokens a reply fed into the cache: its text's tokens and, if it ended the turn, the end token."""
    return reply.tokens + ([tokenizer.eos_token_id] if reply.finish_reason == "stop" else [])


def test_chat_turns_equal_one_shot_generation_and_reuse_the_cache(llama_model):
    tokenizer = ascii_tokenizer(SMOLLM2_TEMPLATE)
    assert tokenizer.stop_token_ids == (130, 128) and tokenizer.pad_token_id == 128
    chat, replies, caches = chat_and_compare(llama_model, tokenizer, ["Hi there!", "And then?"])
    assert caches[0] is caches[1]  # the second turn continued from the first turn's cache
    prompt = tokenizer.apply_chat_template(chat.messages[:3], add_generation_prompt=True)
    assert chat.tokens == prompt + generated(replies[1], tokenizer)


def test_template_that_rewrites_history_rereads_the_chat_logging_once(llama_model, caplog):
    tokenizer = ascii_tokenizer(COUNTING_TEMPLATE)
    with caplog.at_level(logging.WARNING, logger="bit_axon.inference.chat"):
        chat, replies, caches = chat_and_compare(llama_model, tokenizer, ["Hi there!", "And then?", "Last one."])
    assert len(caplog.records) == 1 and "reading the whole conversation again" in caplog.records[0].getMessage()
    assert len({id(c) for c in caches}) == 3  # a fresh cache each turn
    prompt = tokenizer.apply_chat_template(chat.messages[:5], add_generation_prompt=True)
    assert chat.tokens == prompt + generated(replies[2], tokenizer)
