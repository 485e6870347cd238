"""Bad requests get an OpenAI-style error with a 4xx status and a message that says what to fix,
and the server goes on serving."""

from __future__ import annotations

import httpx
import pytest

OK_CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4,
           "temperature": 0}


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        yield client


def long_prompt(served) -> str:
    limit = served["tiny-llama"].context_length
    return "the " * (limit + 10)


BAD = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [', 400, "not valid JSON"),
    "missing messages": ("/v1/chat/completions", {"model": "tiny-llama"}, 400, "messages: Field required"),
    "missing model": ("/v1/completions", {"prompt": "hi"}, 400, "model: Field required"),
    "unknown model": ("/v1/chat/completions", {**OK_CHAT, "model": "gpt-9"}, 404, "'gpt-9' is not served here"),
    "temperature too high": ("/v1/chat/completions", {**OK_CHAT, "temperature": 7}, 400, "temperature:"),
    "top_p zero": ("/v1/completions", {"model": "tiny-llama", "prompt": "a", "top_p": 0}, 400, "top_p:"),
    "max_tokens zero": ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens:"),
    "bad role": ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "bot", "content": "x"}]}, 400,
                 "messages.0.role"),
    "n > 1": ("/v1/chat/completions", {**OK_CHAT, "n": 2}, 400, "n:"),
    "five stops": ("/v1/completions", {"model": "tiny-llama", "prompt": "a", "stop": list("abcde")}, 400,
                   "at most 4 stop sequences"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_refused_clearly_and_the_server_goes_on(http, case):
    path, body, status, message = BAD[case]
    response = http.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(
        body, bytes) else http.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"]
    assert http.post("/v1/chat/completions", json=OK_CHAT).status_code == 200


def test_prompt_longer_than_the_context(http, served):
    response = http.post("/v1/completions", json={"model": "tiny-llama", "prompt": long_prompt(served)})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"reads at most {served['tiny-llama'].context_length} tokens" in error["message"]
    assert http.post("/v1/chat/completions", json=OK_CHAT).status_code == 200


def test_failure_inside_generation_is_a_500_with_a_message(http, live_server, monkeypatch):
    model = live_server.engine.models["tiny-bitaxon"].model

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(type(model), "__call__", broken)
    response = http.post("/v1/chat/completions", json={**OK_CHAT, "model": "tiny-bitaxon"})
    assert response.status_code == 500
    assert "out of memory (simulated)" in response.json()["error"]["message"]
    with http.stream("POST", "/v1/chat/completions", json={**OK_CHAT, "model": "tiny-bitaxon", "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data:")]
    assert "out of memory (simulated)" in lines[-2] and lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert http.post("/v1/chat/completions", json={**OK_CHAT, "model": "tiny-bitaxon"}).status_code == 200


def test_unknown_route_is_a_json_404(http):
    response = http.get("/v1/nothing")
    assert response.status_code == 404
    assert "error" in response.json()


def test_api_key_is_required_on_the_api_only(live_server):
    from bit_axon.serving.app import create_app

    from fastapi.testclient import TestClient

    client = TestClient(create_app(live_server.engine, api_key="s3cret"))
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and "--api-key" in refused.json()["error"]["message"]
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself asks for the key in its form
