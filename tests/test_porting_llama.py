"""port-weights from a Llama checkpoint (GGUF and HF layouts), with the identity and the attention start."""

from __future__ import annotations

import json
import math

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.cli.main import app
from bit_axon.layers.blocks import AxonSSMBlock, AxonSSMMoEBlock, AxonSWAMoEBlock
from bit_axon.loading import load_model, load_tokenizer
from bit_axon.porting import (
    SourceConfig,
    default_config,
    layer_sources,
    port_model,
    port_weights,
    read_source,
)
from bit_axon.porting_ssm import GATE_LEVEL, SourceCalibration
from bit_axon.sources import ChatTokenizer
from sources.tiny_lm import hf_directory, tiny_config, tiny_mlx_lm_model, tokenizer_metadata, write_gguf

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

runner = CliRunner()
LAYERS = 3  # Bit-Axon's default for 3 source layers: 0 SSM, 1 attention + MoE, 2 SSM + MoE
HEADS, KV_HEADS, HEAD_DIM, S = 4, 2, 16, 64
CHAT = [{"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "yes, it is."}]


def llama_config() -> dict:
    return tiny_config("llama", num_hidden_layers=3, tie_word_embeddings=True, max_position_embeddings=256)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The reference mlx-lm Llama (HF row order), its GGUF file (llama.cpp order, with a tokenizer)
    and an HF directory of the same weights."""
    from sources.tiny_lm import gguf_metadata

    root = tmp_path_factory.mktemp("llama")
    config = llama_config()
    reference = tiny_mlx_lm_model(config, seed=3)
    metadata = {**gguf_metadata(config), **tokenizer_metadata(config["vocab_size"])}
    gguf = write_gguf(root / "tiny.gguf", config, reference, metadata=metadata)
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(hf / "model.safetensors"), dict(tree_flatten(reference.parameters())))
    return reference, gguf, hf


def weights(reference, name: str) -> np.ndarray:
    return np.array(dict(tree_flatten(reference.parameters()))[name])


def repeat_kv(w: np.ndarray) -> np.ndarray:
    return np.repeat(w.reshape(KV_HEADS, HEAD_DIM, -1), HEADS // KV_HEADS, axis=0).reshape(HEADS * HEAD_DIM, -1)


def rms_norm(x, g, eps=1e-5):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * g


def silu(x):
    return x / (1 + np.exp(-x))


def test_default_config_is_sized_from_the_source():
    smollm2 = SourceConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True, model_type="llama",
        max_position_embeddings=8192,
    )
    config = default_config(smollm2)
    assert (config.hidden_dim, config.d_source_model, config.vocab_size) == (576, 576, 49152)
    assert (config.num_layers, config.num_heads, config.head_dim) == (30, 9, 64)
    assert (config.moe_intermediate_dim, config.moe_num_experts, config.moe_top_k) == (1536, 4, 1)
    assert not config.moe_shared_expert and config.ssm_intermediate_dim == 576
    assert (config.max_seq_len, config.swa_window_size, config.rms_norm_eps) == (8192, 4096, 1e-5)
    from dataclasses import replace

    assert default_config(replace(smollm2, num_hidden_layers=31)).num_layers == 30
    assert default_config(replace(smollm2, num_hidden_layers=2)).num_layers == 3
    assert default_config(replace(smollm2, max_position_embeddings=10**6)).max_seq_len == 65_536
    with pytest.raises(ValueError, match="not divisible by its 7 heads"):
        default_config(replace(smollm2, num_attention_heads=7, num_key_value_heads=7))


def test_gguf_and_hf_directory_port_alike(llama):
    """The GGUF's q/k rows are put back in HF order, so both layouts of one model port identically."""
    reference, gguf, hf = llama
    from_gguf, report = port_model(gguf, expert_noise=0.0, ssm_init="identity")
    from_hf, _ = port_model(hf, expert_noise=0.0, ssm_init="identity")
    assert report.layer_sources == {1: 0, 2: 2} and any("interleaved" in n for n in report.notes)
    assert from_gguf.config.to_dict() == from_hf.config.to_dict()
    a, b = dict(tree_flatten(from_gguf.parameters())), dict(tree_flatten(from_hf.parameters()))
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.array(a["embed_tokens.weight"]), weights(reference, "model.embed_tokens.weight"))


@pytest.fixture(scope="module")
def identity_port(llama):
    _, gguf, _ = llama
    return port_model(gguf, expert_noise=0.0, ssm_init="identity")


def test_identity_start_and_moe_equals_the_mlp(llama, identity_port):
    reference, _, _ = llama
    model, _ = identity_port
    x = mx.random.normal((1, 5, S), key=mx.random.key(0))
    assert isinstance(model.layer_0, AxonSSMBlock) and mx.array_equal(model.layer_0(x), x)
    block = model.layer_2  # SSM (identity) + MoE from source layer 2
    assert isinstance(block, AxonSSMMoEBlock)
    block.moe.gate.weight = mx.zeros_like(block.moe.gate.weight)  # exactly uniform routing: top-1 weight 1/4
    layer = reference.model.layers[2]
    expected = x + layer.mlp(layer.post_attention_layernorm(x))
    np.testing.assert_allclose(np.array(block(x)), np.array(expected), atol=1e-4)


def test_attention_layer_computes_the_source_values(llama, identity_port):
    reference, _, _ = llama
    model, _ = identity_port
    block, layer = model.layer_1, reference.model.layers[0]
    assert isinstance(block, AxonSWAMoEBlock)
    x = mx.random.normal((1, 1, S), key=mx.random.key(1))  # one token attends only to itself: RoPE is moot
    expected = layer.self_attn(layer.input_layernorm(x))
    np.testing.assert_allclose(np.array(block.attention(block.input_norm(x))), np.array(expected), atol=1e-4)
    # Scores summed over heads equal the source's in HF row order (no RoPE), so the GGUF order was undone.
    y = mx.random.normal((S,), key=mx.random.key(2))
    p = "model.layers.0.self_attn."
    q, k = weights(reference, p + "q_proj.weight"), repeat_kv(weights(reference, p + "k_proj.weight"))
    ours = float((block.attention.q_proj(y) * block.attention.k_proj(y)).sum())
    assert ours == pytest.approx(float((q @ np.array(y)) @ (k @ np.array(y))), rel=1e-4)


@pytest.fixture(scope="module")
def attention_port(llama):
    """The attention start with d_state above the rank of the score form, so nothing is truncated."""
    _, gguf, _ = llama
    loaded = read_source(gguf)
    config = default_config(loaded.config)
    from dataclasses import replace

    model, report = port_model(
        gguf, replace(config, ssm_d_state=40), ssm_init="attention", expert_noise=0.0, loaded=loaded,
        ssm_calibration_tokens=512,
    )
    return loaded, model, report


def linearised_inputs(ssm, h: np.ndarray, source_w: dict) -> tuple[np.ndarray, np.ndarray]:
    """The conv offset b and scale alpha, read from the SSM, and G [h; 1] (x in SiLU's linear range)."""
    conv = np.array(ssm.conv1d.weight)[:, :, 0]
    alpha, b = conv[:, -1], np.array(ssm.conv1d.bias)
    assert np.all(conv[:, :-1] == 0) and np.allclose(alpha, alpha[0])
    s = 1 / (1 + np.exp(-b))
    dsilu = s * (1 + b * (1 - s))
    return b, silu(b) + dsilu * alpha * (h @ source_w["v"].T)


def test_attention_start_maps_v_k_q_o(llama, attention_port):
    reference, _, _ = llama
    _, model, report = attention_port
    assert report.layer_sources == {1: 0, 2: 2} and list(report.ssm_fits) == [2]
    fit = report.ssm_fits[2]
    ssm, layer = model.layer_2.ssm, reference.model.layers[2]
    p = "model.layers.2.self_attn."
    w = {"q": weights(reference, p + "q_proj.weight"), "k": repeat_kv(weights(reference, p + "k_proj.weight")),
         "v": repeat_kv(weights(reference, p + "v_proj.weight")), "o": weights(reference, p + "o_proj.weight")}
    np.testing.assert_array_equal(np.array(model.layer_2.input_norm.weight), np.array(layer.input_layernorm.weight))
    E, N = 64, 40
    # x <- V: in_proj's x rows are V; the conv is one tap alpha plus offset b; SiLU stays linear.
    np.testing.assert_allclose(np.array(ssm.in_proj.weight)[:E], w["v"], rtol=1e-6)
    h = np.array(layer.input_layernorm(mx.random.normal((1, 6, S), key=mx.random.key(4))))[0]
    b, x_lin = linearised_inputs(ssm, h, w)
    xs = np.array(nn.silu(ssm._conv(ssm.in_proj(mx.array(h[None]))[..., :E], None, None)))[0]
    signal = np.abs(x_lin - silu(b)).max()
    assert np.abs(xs - x_lin).max() < 0.02 * signal
    # B <- K, C <- Q: on the linearised x, C_t . B_s = beta + h_t^T P M P h_s (no direction truncated).
    xp = np.array(ssm.x_proj.weight)
    B, C, dt_rows = x_lin @ xp[:N].T, x_lin @ xp[N : 2 * N].T, xp[2 * N :]
    P = np.linalg.pinv(w["v"]) @ w["v"]
    M = w["q"].T @ w["k"] / math.sqrt(HEAD_DIM)
    np.testing.assert_allclose(C @ B.T, fit["beta"] + h @ P @ M @ P @ h.T, atol=2e-3 * np.abs(h @ M @ h.T).max())
    assert fit["score_energy"] == pytest.approx(1.0)
    # dt: constant dt0 (dt row 0), A = -1, D = 0.
    assert np.all(dt_rows == 0) and np.all(np.array(ssm.A_log) == 0) and np.all(np.array(ssm.D) == 0)
    np.testing.assert_allclose(np.array(nn.softplus(ssm.dt_proj.bias)), fit["dt"], rtol=1e-5)
    # out_proj <- O: on the linearised x, out_proj x = sum_g lambda_g O_g V_g h (constant channels cancel).
    heads = np.arange(HEADS).repeat(HEAD_DIM)
    expected = sum(lam * (h @ w["v"][heads == g].T) @ w["o"][:, heads == g].T for g, lam in enumerate(fit["head_scales"]))
    got = x_lin @ np.array(ssm.out_proj.weight).T
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())
    # z: every row rho * u with u . h averaging 1 on the calibration tokens.
    z = np.array(ssm.in_proj.weight)[E:]
    np.testing.assert_allclose(z, np.broadcast_to(z[0], z.shape), rtol=1e-6)


def test_attention_start_fits_better_than_the_identity(attention_port):
    """On the calibration tokens the fitted SSM's error is below the identity's (the whole output)."""
    loaded, model, report = attention_port
    calibration = SourceCalibration(loaded.model, 512, seed=0, vocab_size=model.config.vocab_size)
    for _ in calibration.layers([2]):
        target = np.array(calibration.attention)
        block = model.layer_2
        out = np.array(block.ssm(calibration.h))  # h is already the normalised input
        z = np.array(block.ssm.in_proj(calibration.h))[..., 64:]
    explained = 1 - ((out - target) ** 2).sum() / (target**2).sum()
    assert explained == pytest.approx(report.ssm_fits[2]["explained"], abs=1e-3)
    assert explained > 0.05  # more than the identity start's 0
    # The gate: z = rho u . h with u . h averaging 1 over the calibration tokens.
    assert z.mean() == pytest.approx(GATE_LEVEL, rel=1e-3)


def test_every_layer_takes_a_source_layer_with_depth_all(llama):
    _, gguf, _ = llama
    model, report = port_model(gguf, ssm_init="attention", depth="all", ssm_calibration_tokens=256)
    assert report.layer_sources == {0: 0, 1: 1, 2: 2} and sorted(report.ssm_fits) == [0, 2]
    assert report.ssm_fits[0]["source_layer"] == 0 and model.layer_0.ssm.out_proj.weight.any()
    assert layer_sources(model.config, 3, "all") == {0: 0, 1: 1, 2: 2}
    with pytest.raises(ValueError, match="use it with ssm_init 'attention'"):
        port_model(gguf, ssm_init="identity", depth="all")


def test_ported_directory_carries_the_tokenizer_and_generates(llama, tmp_path):
    from bit_axon.inference import load
    from bit_axon.inference.generate import generate

    _, gguf, _ = llama
    out = port_weights(gguf, tmp_path / "ported", ssm_init="attention", ssm_calibration_tokens=256)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "porting.json",
                                                "tokenizer.json", "tokenizer_config.json"}
    source, ported = load_tokenizer(gguf), ChatTokenizer.from_hf_directory(out)
    text = "is the sky blue? the sea is."
    assert ported.encode(text) == source.encode(text) and ported.vocab_size == source.vocab_size
    assert ported.apply_chat_template(CHAT) == source.apply_chat_template(CHAT)
    assert ported.apply_chat_template(CHAT, tokenize=False).startswith("<|im_start|>system\nbe brief")
    assert (ported.eos_token_id, ported.pad_token_id, ported.bos_token) == (
        source.eos_token_id, source.pad_token_id, source.bos_token)
    model, tokenizer = load(out)
    assert model.config.vocab_size == 80 and model.config.ssm_intermediate_dim == 64
    assert tokenizer.encode(text) == source.encode(text)
    reply = generate(model, tokenizer, "is the sky blue?", max_tokens=4, temperature=0.0)
    assert isinstance(reply, str)


def test_quantized_source_is_dequantized(tmp_path):
    path, reference = hf_directory(tmp_path / "q", quantized=True)
    model, report = port_model(path, expert_noise=0.0, ssm_init="identity")
    embed = reference.model.embed_tokens
    expected = mx.dequantize(embed.weight, embed.scales, embed.biases, group_size=32, bits=8)
    np.testing.assert_allclose(np.array(model.embed_tokens.weight), np.array(expected), atol=1e-6)
    assert report.dtype == "float32" and model.embed_tokens.weight.dtype == mx.float32
    assert any("dequantized" in n for n in report.notes)


def test_cli_config_overrides_and_conflicts(llama, tmp_path):
    _, gguf, _ = llama
    (tmp_path / "small.json").write_text(json.dumps({"moe_num_experts": 2, "ssm_d_state": 8}))
    out = tmp_path / "o"
    result = runner.invoke(app, ["port-weights", str(gguf), "-o", str(out), "--config", str(tmp_path / "small.json")])
    assert result.exit_code == 0, result.output
    config = load_model(out).config
    assert (config.moe_num_experts, config.ssm_d_state, config.hidden_dim, config.num_layers) == (2, 8, 64, 3)
    (tmp_path / "bad.json").write_text(json.dumps({"d_source_model": 128}))
    result = runner.invoke(app, ["port-weights", str(gguf), "-o", str(tmp_path / "b"), "--config", str(tmp_path / "bad.json")])
    assert result.exit_code == 1 and "d_source_model=128 conflicts with the source's hidden_size=64" in result.output
    result = runner.invoke(app, ["port-weights", str(gguf), "-o", str(tmp_path / "s"), "--config-small"])
    assert result.exit_code == 0, result.output
    small = load_model(tmp_path / "s").config
    assert (small.hidden_dim, small.vocab_size, small.d_source_model) == (256, 80, 64)


def test_unsupported_family_is_refused(tmp_path):
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({"model_type": "gemma", "hidden_size": 8}))
    result = runner.invoke(app, ["port-weights", str(tmp_path / "gemma"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "model_type 'gemma' is not supported" in result.output and "'llama', 'qwen2'" in result.output
    mistral = SourceConfig.from_dict({**llama_config(), "model_type": "mistral"})
    assert mistral.family == "llama"  # mlx-lm runs Mistral with its Llama module
