"""Autoregressive generation with the model's caches: one prefill pass, then one token per step.

``generate_step`` is the token loop (ids in, ids out); ``stream_generate`` adds the tokenizer,
stop tokens, incremental text and timing; ``generate`` returns the finished text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bit_axon.cache import KVCache, SSMCache
from bit_axon.inference.detokenizer import StreamingDetokenizer
from bit_axon.inference.sampling import Sampler
from bit_axon.tokenizer import BaseTokenizer

import mlx.core as mx
import mlx.nn as nn

Cache = list[KVCache | SSMCache]
FinishReason = Literal["stop", "length"]

# Prompt tokens per prefill forward: bounds the (L x L) attention scores of a long prompt.
DEFAULT_PREFILL_STEP = 2048


def _prompt_array(prompt_ids: Sequence[int] | mx.array) -> mx.array:
    prompt = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(list(prompt_ids), dtype=mx.int32)
    if prompt.ndim != 1:
        raise ValueError(f"prompt_ids must be one sequence of token ids, got shape {tuple(prompt.shape)}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to start from")
    return prompt[None]


def prefill(model: nn.Module, prompt: mx.array, cache: Cache, step_size: int = DEFAULT_PREFILL_STEP) -> None:
    """Run ``prompt`` (1, L) through ``model`` into ``cache``, ``step_size`` tokens at a time."""
    for start in range(0, prompt.shape[1], step_size):
        model(prompt[:, start : start + step_size], cache=cache)
        mx.eval([c.state for c in cache])


def generate_step(
    model: nn.Module,
    prompt_ids: Sequence[int] | mx.array,
    *,
    sampler: Callable[[mx.array], mx.array] | None = None,
    max_tokens: int = 256,
    cache: Cache | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` generated token ids.

    The prompt runs through the model once (in chunks of ``prefill_step_size`` tokens), then each
    step feeds only the previous token, with the caches carrying the context. Pass ``cache`` (from
    ``model.make_cache()``) to continue a sequence already in it. When a token is yielded, the step
    that feeds it is already queued, so ``cache`` then holds the prompt and every yielded token:
    a chat can continue from it. (Queuing the next step before handing out a token lets the
    device compute it while the caller decodes and prints.) Closing the generator early waits for
    that queued step.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    prompt = _prompt_array(prompt_ids)
    sampler = sampler or Sampler()
    if cache is None:
        cache = model.make_cache()

    def step(tokens: mx.array) -> mx.array:
        logits, _ = model(tokens, cache=cache)
        return sampler(logits[:, -1, :])

    length = prompt.shape[1]
    # The last prompt token's logits give the first new token; with max_tokens=0 it is just cached.
    prefill(model, prompt[:, : length - 1 if max_tokens else length], cache, prefill_step_size)
    if max_tokens == 0:
        return
    token = step(prompt[:, length - 1 :])
    mx.async_eval(token)
    queued = token
    try:
        for _ in range(max_tokens):
            queued = step(token[:, None])
            mx.async_eval(queued)
            yield token.item()
            token = queued
    finally:
        # Runs at the end and when the caller stops early (close()). The queued step completes the
        # caches, and no work may be left in flight: MLX's CPU backend deadlocks at interpreter
        # exit while an async_eval is still running (MLX 0.32).
        mx.eval(queued)


def _per_second(count: int, seconds: float) -> float:
    return count / seconds if count > 0 and seconds > 0 else 0.0


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    prompt_seconds: float  # the prefill pass, up to the first generated token
    generation_tokens: int
    generation_seconds: float  # from the first generated token to the last

    @property
    def prompt_tps(self) -> float:
        return _per_second(self.prompt_tokens, self.prompt_seconds)

    @property
    def generation_tps(self) -> float:
        """Decode steps per second (the first token comes from the prefill pass)."""
        return _per_second(self.generation_tokens - 1, self.generation_seconds)

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s"
        )


@dataclass(frozen=True)
class GenerationChunk:
    """One step of ``stream_generate``.

    ``text`` is the new text since the previous chunk (possibly "" while a multi-byte character is
    incomplete). The last chunk has ``finish_reason`` and ``stats`` set; its ``token`` is the stop
    token when generation stopped on one (stop tokens are never part of the text).
    """

    text: str
    token: int | None
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int] = field(default_factory=list)  # generated tokens, without the stop token
    finish_reason: FinishReason = "length"
    stats: GenerationStats | None = None


def stream_generate(
    model: nn.Module,
    tokenizer: BaseTokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Iterable[int] | None = None,
    cache: Cache | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
) -> Iterator[GenerationChunk]:
    """Generate from ``prompt`` (text, sent as-is with no chat template, or token ids), streaming text.

    Stops at the first of ``stop_ids`` (default: ``tokenizer.stop_token_ids``, the ends of a turn and
    of a document, ``<|im_end|>`` and ``<|endoftext|>`` in ChatML) or after ``max_tokens`` tokens.
    Sampling is greedy at ``temperature=0``; see :class:`Sampler`.
    """
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stops = frozenset(tokenizer.stop_token_ids if stop_ids is None else stop_ids)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    detokenizer = StreamingDetokenizer(tokenizer)
    tokens = generate_step(
        model, prompt_ids, sampler=sampler, max_tokens=max_tokens, cache=cache, prefill_step_size=prefill_step_size
    )
    start = time.perf_counter()
    first_token_at = last_token_at = None
    count = 0
    finish: FinishReason = "length"
    stop_token = None
    try:
        for token in tokens:
            last_token_at = time.perf_counter()
            if first_token_at is None:
                first_token_at = last_token_at
            if token in stops:
                finish, stop_token = "stop", token
                break
            count += 1
            yield GenerationChunk(detokenizer.add_token(token), token)
    finally:
        tokens.close()  # finish the step queued after the last token before anything else happens
    if first_token_at is None:  # max_tokens=0
        first_token_at = last_token_at = time.perf_counter()
    stats = GenerationStats(
        prompt_tokens=len(prompt_ids),
        prompt_seconds=first_token_at - start,
        generation_tokens=count + (stop_token is not None),
        generation_seconds=last_token_at - first_token_at,
    )
    yield GenerationChunk(detokenizer.finalize(), stop_token, finish, stats)


def collect(chunks: Iterable[GenerationChunk]) -> GenerationResult:
    """Run a ``stream_generate`` stream to its end and gather it into one result."""
    parts: list[str] = []
    tokens: list[int] = []
    for chunk in chunks:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            return GenerationResult("".join(parts), tokens, chunk.finish_reason, chunk.stats)
        if chunk.token is not None:
            tokens.append(chunk.token)
    raise ValueError("the stream ended without a final chunk (finish_reason unset)")


def generate(
    model: nn.Module, tokenizer: BaseTokenizer, prompt: str | Sequence[int], max_tokens: int = 256, **options: Any
) -> str:
    """The generated text of ``stream_generate`` with the same arguments (``temperature``, ``top_k``,
    ``top_p``, ``seed``, ``stop_ids``, ...); ``collect(stream_generate(...))`` adds tokens and stats."""
    return collect(stream_generate(model, tokenizer, prompt, max_tokens, **options)).text
