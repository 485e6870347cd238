"""Multi-turn chat that keeps the model caches between turns, so each turn reads only its new tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from bit_axon.inference.generate import Cache, GenerationChunk, stream_generate
from bit_axon.tokenizer import BaseTokenizer

import mlx.nn as nn

logger = logging.getLogger(__name__)


class ChatSession:
    """A conversation with the model, in its tokenizer's chat template.

    The caches hold exactly ``self.tokens``: the conversation fed so far, each reply as the tokens
    the model actually generated (its stop token included). Each turn renders the whole conversation
    with the template and feeds only what follows ``self.tokens``: the rest of the rendering's
    tokens when they start with ``self.tokens``; else, when the text of ``self.tokens`` starts the
    rendering (a reply whose text re-encodes to other tokens), the tokens of the rest of the text.
    Either way a reply cut off by ``max_tokens`` gets its end-of-turn token from the template. When
    neither holds (a template that rewrites earlier turns, a reply that stopped on an end-of-document
    token), the caches are reset and the whole rendering is read again, logged once per session.
    """

    def __init__(self, model: nn.Module, tokenizer: BaseTokenizer, system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self._logged_reread = False
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict[str, str]] = []
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})
        self.tokens: list[int] = []
        self._cache: Cache = self.model.make_cache()

    def _new_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokens to feed for ``messages`` and the generation prompt (see the class)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.encode(text)
        cached = len(self.tokens)
        if ids[:cached] == self.tokens:
            return ids[cached:]
        fed = self.tokenizer.decode(self.tokens)
        if text.startswith(fed):
            return self.tokenizer.encode(text[len(fed) :])
        if not self._logged_reread:
            logger.warning(
                "The chat template renders this conversation's earlier turns differently from the tokens "
                "in the cache; reading the whole conversation again (further occurrences not logged)"
            )
            self._logged_reread = True
        self.tokens = []
        self._cache = self.model.make_cache()
        return ids

    def send(self, message: str, **generation: Any) -> Iterator[GenerationChunk]:
        """Stream the reply to the user ``message``; ``generation`` goes to ``stream_generate``.

        Consume the stream up to its last chunk (``finish_reason`` set): the conversation is updated
        as the reply streams.
        """
        user = {"role": "user", "content": message}
        new_ids = self._new_tokens([*self.messages, user])
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
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            yield chunk
