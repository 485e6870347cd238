"""Shared test fixtures."""

from __future__ import annotations

from bit_axon.tokenizer import QwenTokenizerWrapper

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer() -> QwenTokenizerWrapper:
    """The bundled Qwen2.5 tokenizer (offline); loading takes a second or two, so once per session."""
    return QwenTokenizerWrapper()
