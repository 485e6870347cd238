"""GGUF files: tiny synthetic Llama/Qwen2 files in llama.cpp's layout against mlx-lm, and the errors."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.sources import GGUFError, build_pretrained, load_gguf, read_gguf
from sources.tiny_lm import gguf_metadata, gguf_tensors, tiny_config, tiny_mlx_lm_model, write_gguf

import mlx.core as mx
import pytest

TOKENS = mx.array([[3, 17, 42, 5, 9, 61, 2, 33], [7, 7, 1, 0, 79, 12, 40, 8]])


@pytest.mark.parametrize(
    ("model_type", "tied"),
    [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)],
)
def test_tiny_gguf_logits_equal_mlx_lm(tmp_path, model_type, tied):
    config = tiny_config(model_type, tie_word_embeddings=tied)
    reference = tiny_mlx_lm_model(config)
    model, tokenizer_data = load_gguf(write_gguf(tmp_path / "m.gguf", config, reference))
    assert tokenizer_data == {}
    assert ("lm_head" in model) is not tied
    if model_type == "qwen2":
        assert "bias" in model.model.layers[0].self_attn.q_proj
    logits, _ = model(TOKENS)
    assert mx.allclose(logits, reference(TOKENS), atol=1e-4).item()


def test_llama_needs_interleaved_rope_for_permuted_rows(tmp_path):
    """llama.cpp's q/k row order matters: the same file run with NeoX-style RoPE is wrong."""
    config = tiny_config("llama")
    reference = tiny_mlx_lm_model(config)
    read, weights, _ = read_gguf(write_gguf(tmp_path / "m.gguf", config, reference))
    assert read["rope_traditional"] is True
    wrong, _ = build_pretrained({**read, "rope_traditional": False}, weights)(TOKENS)
    assert not mx.allclose(wrong, reference(TOKENS), atol=1e-2).item()


def test_config_from_metadata(tmp_path):
    config = tiny_config("llama", tie_word_embeddings=False)
    read, _, _ = read_gguf(write_gguf(tmp_path / "m.gguf", config))
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        assert read[key] == config[key]
    assert read["head_dim"] == 16 and read["tie_word_embeddings"] is False
    assert read["rope_theta"] == pytest.approx(1e4) and read["rms_norm_eps"] == pytest.approx(1e-5)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_gguf("/nonexistent/nowhere.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")
    with pytest.raises(GGUFError, match="notes.gguf.*not a readable GGUF"):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    config = tiny_config("llama")
    metadata = {**gguf_metadata(config), "general.architecture": "mamba"}
    path = write_gguf(tmp_path / "m.gguf", config, metadata=metadata)
    with pytest.raises(GGUFError, match=r"m\.gguf: architecture 'mamba' is not supported; supported: llama, qwen2"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    config = tiny_config("llama")
    tensors = gguf_tensors(tiny_mlx_lm_model(config), config)
    tensors["blk.1.attn_v.weight"] = tensors["blk.1.attn_v.weight"].astype(mx.int32)
    path = write_gguf(tmp_path / "m.gguf", config, tensors=tensors)
    with pytest.raises(GGUFError, match=r"m\.gguf: tensor 'model.layers.1.self_attn.v_proj.weight' has an unsupported type"):
        load_gguf(path)


def test_missing_and_unknown_tensors(tmp_path):
    config = tiny_config("llama")
    tensors = gguf_tensors(tiny_mlx_lm_model(config), config)
    del tensors["blk.1.ffn_up.weight"]
    with pytest.raises(GGUFError, match=r"tensors missing: blk\.1\.ffn_up\.weight"):
        load_gguf(write_gguf(tmp_path / "a.gguf", config, tensors=tensors))
    tensors = {**gguf_tensors(tiny_mlx_lm_model(config), config), "rope_freqs.weight": mx.ones((8,))}
    with pytest.raises(GGUFError, match="unexpected tensor 'rope_freqs.weight'"):
        load_gguf(write_gguf(tmp_path / "b.gguf", config, tensors=tensors))
