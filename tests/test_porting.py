"""port-weights: a Bit-Axon model from a tiny synthetic checkpoint in Qwen2's Hugging Face layout
(Llama sources and the attention start: tests/test_porting_llama.py)."""

from __future__ import annotations

import json
import time

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig
from bit_axon.cli.main import app
from bit_axon.layers.blocks import AxonSSMMoEBlock, AxonSWAMoEBlock
from bit_axon.loading import load_model
from bit_axon.porting import attention_index, calibration_ids, layer_sources, port_qwen

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

runner = CliRunner()
QWEN = dict(vocab=300, hidden=32, inter=48, layers=5, heads=4, kv_heads=2, eps=1e-6)
HEAD_DIM = QWEN["hidden"] // QWEN["heads"]  # 8


def write_qwen(path, tie: bool = True, shards: int = 2):
    """config.json + sharded safetensors with the key names and shapes of a real Qwen2.5 checkpoint."""
    rng = np.random.default_rng(0)
    S, inter, kv = QWEN["hidden"], QWEN["inter"], QWEN["kv_heads"] * HEAD_DIM

    def w(*shape, scale=0.2):
        return mx.array(rng.normal(0, scale, shape).astype(np.float32))

    tensors = {"model.embed_tokens.weight": w(QWEN["vocab"], S, scale=1.0), "model.norm.weight": 1 + w(S)}
    for i in range(QWEN["layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(S, S), p + "self_attn.q_proj.bias": w(S),
            p + "self_attn.k_proj.weight": w(kv, S), p + "self_attn.k_proj.bias": w(kv),
            p + "self_attn.v_proj.weight": w(kv, S), p + "self_attn.v_proj.bias": w(kv),
            p + "self_attn.o_proj.weight": w(S, S),
            p + "mlp.gate_proj.weight": w(inter, S), p + "mlp.up_proj.weight": w(inter, S), p + "mlp.down_proj.weight": w(S, inter),
            p + "input_layernorm.weight": 1 + w(S), p + "post_attention_layernorm.weight": 1 + w(S),
        })
    if not tie:
        tensors["lm_head.weight"] = w(QWEN["vocab"], S)
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    for k in range(shards):
        part = {key: tensors[key] for key in keys[k::shards]}
        mx.save_safetensors(str(path / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"), part)
    config = {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": QWEN["vocab"],
        "hidden_size": S, "intermediate_size": inter, "num_hidden_layers": QWEN["layers"],
        "num_attention_heads": QWEN["heads"], "num_key_value_heads": QWEN["kv_heads"],
        "rms_norm_eps": QWEN["eps"], "tie_word_embeddings": tie, "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return {k: np.array(v) for k, v in tensors.items()}


def architecture(**overrides) -> BitAxonConfig:
    # 3 layers: 0 SSM, 1 attention + MoE, 2 SSM + MoE. head_dim 4: each 8-wide Qwen head -> 2 heads.
    values = dict(
        hidden_dim=48, num_layers=3, num_heads=12, ssm_d_state=4, ssm_expand=2, swa_window_size=16,
        moe_num_experts=4, moe_top_k=2, moe_intermediate_dim=64,
    )
    values.update(overrides)
    return BitAxonConfig.small(**values)


def rms_norm(x, g, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * g


def silu(x):
    return x / (1 + np.exp(-x))


def test_cli_port_weights_loads_and_keeps_the_embedding(tmp_path):
    src = write_qwen(tmp_path / "qwen")
    arch = {k: v for k, v in architecture().to_dict().items() if k not in ("vocab_size", "d_source_model")}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    out = tmp_path / "ported"
    result = runner.invoke(
        app, ["port-weights", str(tmp_path / "qwen"), "-o", str(out), "--config", str(tmp_path / "arch.json")]
    )
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.config.vocab_size == QWEN["vocab"] and model.config.d_source_model == QWEN["hidden"]
    assert model.config.weight_tying
    np.testing.assert_array_equal(np.array(model.embed_tokens.weight), src["model.embed_tokens.weight"])
    report = json.loads((out / "porting.json").read_text())
    assert report["layer_sources"] == {"1": 0, "2": 4} and report["attention_layout"] == "head-split"
    assert (out / "tokenizer.json").is_file()
    logits, _ = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, QWEN["vocab"]) and bool(mx.isfinite(logits).all())
    # Refuses to overwrite.
    again = runner.invoke(app, ["port-weights", str(tmp_path / "qwen"), "-o", str(out), "--config-small"])
    assert again.exit_code == 1 and "not empty" in again.output


def test_cli_port_errors(tmp_path):
    result = runner.invoke(app, ["port-weights", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not found" in result.output
    src = tmp_path / "qwen"
    write_qwen(src)
    (tmp_path / "bad.json").write_text(json.dumps({"vocab_size": 1000}))
    result = runner.invoke(app, ["port-weights", str(src), "-o", str(tmp_path / "o"), "--config", str(tmp_path / "bad.json")])
    assert result.exit_code == 1 and "conflicts" in result.output
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    result = runner.invoke(app, ["port-weights", str(src), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "model_type 'gemma' is not supported" in result.output


@pytest.fixture
def ported(tmp_path):
    path = tmp_path / "qwen"
    src = write_qwen(path)
    model, report = port_qwen(path, architecture(), expert_noise=0.0, ssm_init="identity")
    return src, model, report


def test_fresh_ssm_mixers_start_as_identity(ported):
    _, model, _ = ported
    x = mx.random.normal((1, 5, 48), key=mx.random.key(0))
    assert mx.array_equal(model.layer_0(x), x)


def test_moe_layer_computes_the_qwen_mlp(ported):
    """With a uniform router the MoE equals Qwen's MLP (F >= I: all channels copied, no noise)."""
    src, model, _ = ported
    block = model.layer_2
    assert isinstance(block, AxonSSMMoEBlock)
    block.moe.gate.weight = mx.zeros_like(block.moe.gate.weight)  # exactly uniform routing
    p = "model.layers.4."
    x = np.random.default_rng(1).normal(0, 1, (1, 6, 32)).astype(np.float32)
    h = rms_norm(x, src[p + "post_attention_layernorm.weight"])
    mlp = (silu(h @ src[p + "mlp.gate_proj.weight"].T) * (h @ src[p + "mlp.up_proj.weight"].T)) @ src[
        p + "mlp.down_proj.weight"
    ].T
    x_h = np.concatenate([x, np.zeros((1, 6, 16), np.float32)], axis=-1)  # input_proj = [I; 0]
    out = np.array(block(mx.array(x_h)))
    np.testing.assert_allclose(out[..., :32], x + mlp, atol=2e-4)
    np.testing.assert_array_equal(out[..., 32:], 0)  # the extra coordinates stay zero


def test_attention_layer_computes_qwen_attention_values(ported):
    """One token attends only to itself, so attention = o(v(norm(x))): checks GQA, head split, norms."""
    src, model, _ = ported
    block = model.layer_1
    assert isinstance(block, AxonSWAMoEBlock)
    p = "model.layers.0."
    x = np.random.default_rng(2).normal(0, 1, (1, 1, 32)).astype(np.float32)
    h = rms_norm(x, src[p + "input_layernorm.weight"])
    v = h @ np.repeat(src[p + "self_attn.v_proj.weight"].reshape(2, HEAD_DIM, 32), 2, axis=0).reshape(32, 32).T
    expected = v @ src[p + "self_attn.o_proj.weight"].T  # the v bias is dropped by design
    x_h = mx.array(np.concatenate([x, np.zeros((1, 1, 16), np.float32)], axis=-1))
    out = np.array(block.attention(block.input_norm(x_h)))
    np.testing.assert_allclose(out[..., :32], expected, atol=1e-4)
    np.testing.assert_array_equal(out[..., 32:], 0)
    # q . k summed over the Bit-Axon heads equals Qwen's summed over its heads (no biases, no RoPE).
    y = np.random.default_rng(3).normal(0, 1, (32,)).astype(np.float32)
    y_h = mx.array(np.concatenate([y, np.zeros(16, np.float32)]))
    qk = float((block.attention.q_proj(y_h) * block.attention.k_proj(y_h)).sum())
    k_rep = np.repeat(src[p + "self_attn.k_proj.weight"].reshape(2, HEAD_DIM, 32), 2, axis=0).reshape(32, 32)
    assert qk == pytest.approx(float((src[p + "self_attn.q_proj.weight"] @ y) @ (k_rep @ y)), rel=1e-4)


def test_narrow_experts_keep_the_strongest_channels(tmp_path):
    src = write_qwen(tmp_path / "qwen")
    model, report = port_qwen(tmp_path / "qwen", architecture(moe_intermediate_dim=32), expert_noise=0.0, ssm_init="identity")
    assert report.mlp_channels == "top-32 of 48"
    p = "model.layers.4.mlp."
    gate, up, down = (src[p + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
    score = np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=0)
    keep = np.sort(np.argsort(-score)[:32])
    shared = model.layer_2.moe.shared_expert
    np.testing.assert_allclose(np.array(shared.gate_proj.weight)[:, :32], gate[keep], rtol=1e-6)
    scale = 1 / (0.5 + 2 / 4)
    np.testing.assert_allclose(np.array(shared.down_proj.weight)[:32], down[:, keep] * scale, rtol=1e-6)


def test_expert_noise_and_untied_head(tmp_path):
    src = write_qwen(tmp_path / "qwen", tie=False, shards=1)
    model, _ = port_qwen(tmp_path / "qwen", architecture(), expert_noise=0.05, seed=3, ssm_init="identity")
    assert not model.config.weight_tying
    np.testing.assert_array_equal(np.array(model.lm_head.weight), src["lm_head.weight"])
    experts = np.array(model.layer_2.moe.switch_mlp.up_proj.weight)
    assert not np.allclose(experts[0], experts[1])  # experts can diverge
    np.testing.assert_allclose(experts[0][:48, :32], src["model.layers.4.mlp.up_proj.weight"], rtol=0.3)


def test_layer_and_head_maps():
    # The full model: 16 MoE layers (8-23) take evenly spaced layers of Qwen2.5-3B's 36.
    sources = layer_sources(BitAxonConfig(), 36)
    assert list(sources) == list(range(8, 24))
    assert sources[8] == 0 and sources[23] == 35 and sorted(set(sources.values())) == list(sources.values())
    # Qwen2.5-3B's 16 heads of 128 -> Bit-Axon's 32 heads of 80: head i -> heads 2i and 2i + 1.
    index, layout = attention_index(16, 128, 32, 80)
    assert layout == "head-split"
    assert index[0] == 0 and index[79] == 79 and index[80] == 80 and index[127] == 127
    assert index[128] == 160  # Qwen head 1 starts Bit-Axon head 2
    assert len(set(index.tolist())) == index.size
    _, layout = attention_index(16, 128, 20, 80)
    assert layout == "flat"


def test_output_proj_folds_the_final_norm(ported):
    src, model, report = ported
    g = src["model.norm.weight"]
    out = np.array(model.output_proj.weight)
    np.testing.assert_allclose(np.diag(out)[:32], g / report.calibration_rms, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 32:], 0)
    # r is the median per-token RMS of the ported model's last hidden states on the calibration tokens.
    x = model.input_proj(model.embed_tokens(calibration_ids(model.config, 64, seed=0)))
    for block in model.blocks:
        x = block(x)
    rms = np.sqrt(np.mean(np.array(x)[0, :, :32] ** 2, axis=-1))
    assert report.calibration_rms == pytest.approx(float(np.median(rms)), rel=1e-5)
    assert report.calibration_rms != pytest.approx(float(np.mean(rms)), rel=1e-3)


def test_attention_start_on_a_wider_model(tmp_path):
    """Qwen2 (q/k/v biases) into H = 48 > S = 32: the SSM started from attention writes only the first S
    coordinates and explains part of the source attention's output on the calibration tokens."""
    write_qwen(tmp_path / "qwen")
    model, report = port_qwen(tmp_path / "qwen", architecture(), ssm_init="attention", ssm_calibration_tokens=256)
    assert report.ssm_init == "attention" and list(report.ssm_fits) == [2]
    assert report.ssm_fits[2]["source_layer"] == 4 and 0 < report.ssm_fits[2]["explained"] <= 1
    x = np.concatenate([np.random.default_rng(5).normal(0, 1, (1, 6, 32)), np.zeros((1, 6, 16))], axis=-1)
    out = np.array(model.layer_2.ssm(mx.array(x.astype(np.float32))))
    assert np.abs(out[..., :32]).max() > 0 and np.all(out[..., 32:] == 0)


# --- bit-axon download ---------------------------------------------------------------------------


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output


@pytest.fixture
def no_snapshot(monkeypatch):
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError("snapshot_download must not be called when the hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)


def timed_download(*args):
    start = time.monotonic()
    result = runner.invoke(app, ["download", *args])
    return result, time.monotonic() - start


def test_download_offline_fails_fast(monkeypatch, tmp_path, no_snapshot):

    monkeypatch.setattr("bit_axon.tokenizer.hub_reachable", lambda timeout: False)
    result, seconds = timed_download("Qwen/Qwen2.5-3B", "-d", str(tmp_path / "q"))
    assert seconds < 2
    assert_one_line_error(result, "cannot reach the Hugging Face hub")
    assert not (tmp_path / "q").exists()


def test_download_real_probe_against_a_closed_port(monkeypatch, tmp_path, no_snapshot):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    result, seconds = timed_download("Qwen/Qwen2.5-3B", "-d", str(tmp_path / "q"))
    assert seconds < 2
    assert_one_line_error(result, "127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(timed_download("Qwen/Qwen2.5-3B", "-d", str(tmp_path / "q"))[0], "HF_HUB_OFFLINE")


def test_download_patterns_and_hub_errors(monkeypatch, tmp_path):

    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "nobody/missing":
            raise OSError("404 Client Error. Repository Not Found for url: ...\nmore detail")
        return str(kwargs["local_dir"])

    monkeypatch.setattr("bit_axon.tokenizer.hub_reachable", lambda timeout: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    result = runner.invoke(app, ["download", "Qwen/Qwen2.5-0.5B", "-d", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "*.safetensors" in calls[-1][1]["allow_patterns"]
    result = runner.invoke(app, ["download", "Qwen/Qwen2.5-0.5B", "-d", str(tmp_path / "t"), "--tokenizer-only"])
    assert calls[-1][1]["allow_patterns"] == ["tokenizer.json", "tokenizer_config.json"]
    assert_one_line_error(runner.invoke(app, ["download", "nobody/missing", "-d", str(tmp_path / "x")]), "Repository Not Found")
