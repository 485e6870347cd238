"""Shared test fixtures."""

from __future__ import annotations

import pytest

from bit_axon.tokenizer import QwenTokenizerWrapper


@pytest.fixture(scope="session")
def qwen_tokenizer() -> QwenTokenizerWrapper:
    """The bundled Qwen2.5 tokenizer (offline); loading takes a second or two, so once per session."""
    return QwenTokenizerWrapper()
