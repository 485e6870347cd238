"""Concurrent requests run independently: 16 streaming clients mixing models and adapters each get
their single-client output, and a client that goes away frees its batch row."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

PROMPTS = ["the cat is", "he is", "is the", "a cat", "the hat", "this is it", "she sat", "hi"]
MODELS = ["tiny-llama", "ticket", "tiny-bitaxon"]


def request(i: int) -> dict:
    # Different prompt lengths join the batch with different histories; some rows sample with a seed.
    sampled = i % 4 == 3
    return {"model": MODELS[i % 3], "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] * (1 + i % 3)}],
            "max_tokens": 8 + i % 5, "temperature": 0.9 if sampled else 0.0, "seed": 1000 + i}


async def stream_text(client: openai.AsyncOpenAI, body: dict) -> str:
    stream = await client.chat.completions.create(stream=True, **body)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_sixteen_streaming_clients_each_get_their_single_client_output(live_server):
    bodies = [request(i) for i in range(16)]

    async def alone_then_together() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="none", max_retries=0,
                                      timeout=120) as client:
            single = [await stream_text(client, body) for body in bodies]
            together = await asyncio.gather(*(stream_text(client, body) for body in bodies))
        return single, list(together)

    single, together = asyncio.run(alone_then_together())
    assert sum(bool(text) for text in single) >= 12  # empty replies (an immediate stop) would prove little
    assert together == single
    assert live_server.engine.largest_batch >= 4  # they did share forward passes


def test_closing_the_connection_cancels_the_request(live_server, monkeypatch):
    engine = live_server.engine
    body = {"model": "tiny-llama", "prompt": "the cat", "max_tokens": 60, "temperature": 0}
    with httpx.Client(base_url=live_server.url, timeout=60) as http:
        assert http.post("/v1/completions", json=body).json()["choices"][0]["finish_reason"] == "length"
        model = engine.models["tiny-llama"].model
        forward = type(model).__call__

        def slow(self, *args, **kwargs):  # 60 tokens now take 6 s or more
            time.sleep(0.1)
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(type(model), "__call__", slow)
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if '"text"' in line:
                    break
            assert engine.active == 1
        closed = time.monotonic()
        while engine.active and time.monotonic() < closed + 5:
            time.sleep(0.02)
        assert engine.active == 0
        assert time.monotonic() - closed < 2  # freed at the next step, not when the reply would have ended


@pytest.mark.parametrize("several", [False, True])
def test_stop_strings_end_the_reply_before_them(live_server, several):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="none", max_retries=0)
    text = client.completions.create(model="tiny-llama", prompt="the cat", temperature=0, max_tokens=30).choices[0].text
    assert len(text) >= 8
    stop = [text[5:7], "zzzz"] if several else text[3:5]
    cut = client.completions.create(model="tiny-llama", prompt="the cat", temperature=0, max_tokens=30, stop=stop)
    first = min(i for i in (text.find(s) for s in ([stop] if isinstance(stop, str) else stop)) if i >= 0)
    assert cut.choices[0].text == text[:first]
    assert cut.choices[0].finish_reason == "stop"
