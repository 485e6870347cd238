"""Generation: cached decoding == full forwards, stop tokens, streaming of multi-byte text, chat."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.inference import (
    ChatSession,
    StreamingDetokenizer,
    collect,
    generate,
    generate_step,
    stream_generate,
)
from bit_axon.inference.detokenizer import REPLACEMENT_CHAR

import mlx.core as mx
import pytest

IM_END, ENDOFTEXT = 151645, 151643
# Byte-level BPE splits the astronaut's zero-width joiner into two tokens that decode to U+FFFD each.
MULTIBYTE = "你好，世界！🙂👍🏽 café 🧑‍🚀 rocket 鱻𠀀 done"


def tiny_model(vocab_size: int = 97, window: int = 4) -> BitAxonModel:
    mx.random.seed(0)
    config = BitAxonConfig.small(
        vocab_size=vocab_size, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128, swa_window_size=window
    )
    model = BitAxonModel(config)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(mx.array([ids]))
        ids.append(mx.argmax(logits[0, -1]).item())
    return ids[len(prompt):]


@pytest.mark.parametrize("prefill_step_size", [2048, 3])
def test_greedy_with_cache_matches_full_forwards(model, prefill_step_size):
    # Prompt + output run well past the 4-token attention window, so the KV cache has to drop keys.
    prompt = [5, 17, 42, 8, 91, 3, 60]
    expected = greedy_without_cache(model, prompt, 12)
    got = list(generate_step(model, prompt, max_tokens=12, prefill_step_size=prefill_step_size))
    assert got == expected
    assert len(set(got)) > 1  # a degenerate constant output would prove little


def test_cache_holds_every_yielded_token(model):
    prompt = [5, 17, 42]
    cache = model.make_cache()
    got = []
    for token in generate_step(model, prompt, max_tokens=10, cache=cache):
        got.append(token)
        if len(got) == 4:
            break
    # Continuing from the cache must equal a full forward over prompt + the 4 tokens + one more.
    logits, _ = model(mx.array([[7]]), cache=cache)
    full, _ = model(mx.array([prompt + got + [7]]))
    assert mx.allclose(logits[0, -1], full[0, -1], atol=1e-4)


def test_generate_step_edge_cases(model):
    cache = model.make_cache()
    assert list(generate_step(model, [1, 2], max_tokens=0, cache=cache)) == []
    logits, _ = model(mx.array([[3]]), cache=cache)  # the prompt is still cached
    assert mx.allclose(logits[0, -1], model(mx.array([[1, 2, 3]]))[0][0, -1], atol=1e-4)
    assert len(list(generate_step(model, [1], max_tokens=3))) == 3
    with pytest.raises(ValueError, match="empty"):
        list(generate_step(model, [], max_tokens=3))


class ScriptedModel:
    """Emits ``script`` token by token (a one-hot logit at each position), whatever the input."""

    class _Position:
        def __init__(self):
            self.offset = 0

        @property
        def state(self):
            return []

    def __init__(self, script: list[int], vocab_size: int = 151_936):
        self.script = script
        self.vocab_size = vocab_size

    def make_cache(self):
        return [self._Position()]

    def __call__(self, ids, cache):
        position = cache[0]
        rows = []
        for _ in range(ids.shape[1]):
            row = mx.zeros((self.vocab_size,))
            generated = position.offset - self.prompt_length
            if generated >= 0:
                row[self.script[min(generated, len(self.script) - 1)]] = 10.0
            rows.append(row)
            position.offset += 1
        return mx.stack(rows)[None], cache


def scripted(script, prompt_length):
    model = ScriptedModel(script)
    model.prompt_length = prompt_length - 1  # the logits of the last prompt token give the first token
    return model


def test_streaming_never_splits_a_character(qwen_tokenizer):
    ids = qwen_tokenizer.encode(MULTIBYTE)
    assert any(qwen_tokenizer.decode([i]) == REPLACEMENT_CHAR for i in ids)  # the test has teeth
    detok = StreamingDetokenizer(qwen_tokenizer)
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) == qwen_tokenizer.decode(ids) == MULTIBYTE
    assert detok.text == MULTIBYTE


def test_stream_generate_stops_on_im_end(qwen_tokenizer):
    body = qwen_tokenizer.encode(MULTIBYTE)
    prompt = qwen_tokenizer.encode("Say something")
    model = scripted(body + [IM_END, 11, 12], len(prompt))
    chunks = list(stream_generate(model, qwen_tokenizer, "Say something", max_tokens=100))
    assert all(REPLACEMENT_CHAR not in c.text for c in chunks)
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.token == IM_END
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == MULTIBYTE
    assert last.stats.prompt_tokens == len(prompt)
    assert last.stats.generation_tokens == len(body) + 1
    result = collect(stream_generate(model_reset(model), qwen_tokenizer, prompt, max_tokens=100))
    assert result.tokens == body and result.text == MULTIBYTE and result.finish_reason == "stop"


def model_reset(model):
    return scripted(model.script, model.prompt_length + 1)


def test_stop_on_endoftext_and_custom_stops(qwen_tokenizer):
    body = qwen_tokenizer.encode("abc def")
    model = scripted(body + [ENDOFTEXT], 1)
    assert generate(model, qwen_tokenizer, [42], max_tokens=50) == "abc def"
    # A custom stop set: the first body token ends it at once.
    result = collect(stream_generate(scripted(body, 1), qwen_tokenizer, [42], stop_ids=[body[1]]))
    assert result.tokens == body[:1] and result.finish_reason == "stop"


def test_max_tokens_gives_length(qwen_tokenizer):
    body = qwen_tokenizer.encode("one two three four five six")
    result = collect(stream_generate(scripted(body, 1), qwen_tokenizer, [42], max_tokens=3))
    assert result.finish_reason == "length" and result.tokens == body[:3]
    assert result.text == qwen_tokenizer.decode(body[:3])


def test_seeded_sampling_is_reproducible(model):
    from bit_axon.inference.sampling import Sampler

    def run(seed):
        return list(generate_step(model, [1, 2, 3], max_tokens=8, sampler=Sampler(temperature=1.5, seed=seed)))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_chat_continues_from_the_cache(qwen_tokenizer):
    model = tiny_model(vocab_size=151_936, window=16)
    chat = ChatSession(model, qwen_tokenizer, system="Be brief.")
    first = collect(chat.send("Hi!", max_tokens=4))
    before_second = len(chat.tokens)
    second_chunks = list(chat.send("And then?", max_tokens=4))
    second = collect(second_chunks)
    assert first.finish_reason == second.finish_reason == "length"
    # The second turn's prompt closes the cut-off first reply, then adds the user turn.
    opened = qwen_tokenizer.decode(chat.tokens[before_second:])
    assert opened.startswith("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    prefix = chat.tokens[: len(chat.tokens) - len(second.tokens)]
    assert list(generate_step(model, prefix, max_tokens=4)) == second.tokens
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[-1]["content"] == second.text
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}] and chat.tokens == []


EXIT_SCRIPT = """
import bit_axon
import mlx.core as mx
from bit_axon.inference import Sampler, generate_step

class Slow:
    # ~20 GFLOP a step: the step queued after the last token is still running when the loop ends.
    def __init__(self):
        self.w = mx.random.normal((1500, 1500))
        mx.eval(self.w)

    def make_cache(self):
        return []

    def __call__(self, ids, cache):
        h = self.w
        for _ in range(3):
            h = h @ self.w
        return mx.zeros((1, ids.shape[1], 50)) + 0 * h[:1, :50], cache

model = Slow()
print(list(generate_step(model, [1, 2], max_tokens=2, sampler=Sampler(temperature=1.0, seed=0))))
early = generate_step(model, [1, 2], max_tokens=5, sampler=Sampler(temperature=1.0, seed=0))
next(early)
del early  # closed while its next step is queued
print("exiting", flush=True)
"""


def test_no_work_left_in_flight_at_exit():
    # MLX's CPU backend deadlocks at interpreter exit while an async_eval is still running, so
    # generate_step must finish its queued step when it ends or is closed.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("exiting\n")
