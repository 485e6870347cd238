"""Incremental detokenization that never splits a multi-byte UTF-8 character.

Byte-level BPE (Qwen2.5's, SmolLM2's) can cut a character (a CJK ideograph, an emoji) across tokens; decoding
such a prefix ends in U+FFFD, the replacement character. The detokenizer holds those tokens back
until the character is complete. Once the pending tokens decode to text that does not end in
U+FFFD they end on a character boundary, so later tokens cannot change that text: it is emitted and
the pending tokens are dropped, which keeps each step O(pending tokens), not O(all tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class StreamingDetokenizer:
    """Feed token ids one at a time; each call returns the text they completed ("" while held back).

    ``finalize`` flushes what is still held back (a truly invalid byte sequence then comes out as
    U+FFFD, as in a full decode). The concatenation of all returned pieces equals
    ``decoder.decode(all tokens)``.
    """

    def __init__(self, decoder: Decoder):
        self._decoder = decoder
        self._pending: list[int] = []
        self.tokens: list[int] = []
        self.text = ""

    def add_token(self, token: int) -> str:
        self.tokens.append(token)
        self._pending.append(token)
        piece = self._decoder.decode(self._pending)
        if piece.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(piece)

    def finalize(self) -> str:
        if not self._pending:
            return ""
        return self._emit(self._decoder.decode(self._pending))

    def _emit(self, piece: str) -> str:
        self._pending = []
        self.text += piece
        return piece
