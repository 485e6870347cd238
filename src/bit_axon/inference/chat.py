"""Multi-turn chat that keeps the model caches between turns, so each turn reads only its new tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bit_axon.inference.generate import Cache, GenerationChunk, stream_generate
from bit_axon.tokenizer import IM_END, QwenTokenizerWrapper, render_chatml

import mlx.nn as nn


class ChatSession:
    """A ChatML conversation with the model.

    The caches hold exactly ``self.tokens``: the rendered conversation so far, with each reply as the
    tokens the model actually generated (re-encoding the reply text could tokenize it differently).
    A reply cut off by ``max_tokens`` is closed with ``<|im_end|>`` before the next user turn.
    """

    def __init__(self, model: nn.Module, tokenizer: QwenTokenizerWrapper, system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict[str, str]] = []
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})
        self.tokens: list[int] = []
        self._cache: Cache = self.model.make_cache()
        # Tokens that close the previous reply; they go in front of the next user turn.
        self._closing: list[int] = []

    def send(self, message: str, **generation: Any) -> Iterator[GenerationChunk]:
        """Stream the reply to the user ``message``; ``generation`` goes to ``stream_generate``.

        Consume the stream up to its last chunk (``finish_reason`` set): the conversation is updated
        as the reply streams.
        """
        user = {"role": "user", "content": message}
        if self.tokens:
            new_ids = self._closing + self.tokenizer.encode(render_chatml([user], add_generation_prompt=True))
        else:
            new_ids = self.tokenizer.encode(render_chatml([*self.messages, user], add_generation_prompt=True))
        self.messages.append(user)
        self.tokens += new_ids
        reply: list[str] = []
        for chunk in stream_generate(self.model, self.tokenizer, new_ids, cache=self._cache, **generation):
            reply.append(chunk.text)
            if chunk.token is not None:
                # generate_step has fed every token it yielded into the cache, the stop token included.
                self.tokens.append(chunk.token)
            if chunk.finish_reason is not None:
                # Update before handing out the last chunk: a consumer may stop right after it.
                ended = chunk.token == self.tokenizer.eos_token_id
                self._closing = self.tokenizer.encode("\n" if ended else f"{IM_END}\n")
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            yield chunk
