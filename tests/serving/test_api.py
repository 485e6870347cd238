"""The OpenAI-compatible API against a live server, through the ``openai`` client."""

from __future__ import annotations

from bit_axon.inference import generate

import openai
import pytest

MESSAGES = [{"role": "user", "content": "the cat is"}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_prompt(served, name):
    return served[name].tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bitaxon"])
def test_chat_greedy_equals_generate(client, served, name):
    m = served[name]
    expected = generate(m.model, m.tokenizer, chat_prompt(served, name), max_tokens=12)
    reply = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(chat_prompt(served, name))
    assert reply.usage.completion_tokens == len(m.tokenizer.encode(expected)) or reply.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, temperature=0, max_tokens=12)
    stream = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_equal_generate(client, served):
    m = served["tiny-bitaxon"]
    expected = generate(m.model, m.tokenizer, "the cat", max_tokens=10)
    reply = client.completions.create(model="tiny-bitaxon", prompt="the cat", temperature=0, max_tokens=10)
    assert reply.choices[0].text == expected


def test_adapter_changes_the_answer_as_the_adapter_does(client, served):
    base, adapted = served["tiny-llama"], served["ticket"]
    prompt = chat_prompt(served, "tiny-llama")
    expected = generate(adapted.model, adapted.tokenizer, prompt, max_tokens=12)
    assert expected != generate(base.model, base.tokenizer, prompt, max_tokens=12)
    reply = client.chat.completions.create(model="ticket", messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected


def test_models_lists_the_base_and_the_adapters(client):
    assert {m.id for m in client.models.list().data} == {"tiny-llama", "ticket", "tiny-bitaxon"}
