"""``bit-axon quantize`` and ``bit-axon merge`` through typer's CliRunner, including their errors."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.cli.main import app
from bit_axon.loading import load_model, save_model
from bit_axon.quantization import quantize_model
from bit_axon.training.checkpoint import load_adapter, save_adapter_only
from bit_axon.training.lora import adapter_layers, apply_lora_to_model
from bit_axon.training.merging import merge_adapters

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

runner = CliRunner()
IDS = mx.array([[10, 20, 30, 40]])


def tiny_model(**overrides) -> BitAxonModel:
    mx.random.seed(0)
    values = dict(vocab_size=512, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128, num_heads=4)
    values.update(overrides)
    model = BitAxonModel(BitAxonConfig.small(**values))
    mx.eval(model.parameters())
    return model


@pytest.fixture
def base(tmp_path):
    return save_model(tiny_model(), tmp_path / "base")


@pytest.fixture
def adapter(base, tmp_path):
    model = load_model(base)
    apply_lora_to_model(model, rank=4)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.full(layer.lora_b.shape, 0.01)
    return save_adapter_only(model, tmp_path / "adapter.safetensors")


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(("mode", "bits"), [("nf4", 4), ("affine", 4), ("affine", 8)])
def test_quantize(base, tmp_path, mode, bits):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(base), "-o", str(out), "-b", str(bits), "-g", "64", "--mode", mode])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.config.quantization == {"mode": mode, "bits": bits, "group_size": 64}
    expected = quantize_model(load_model(base), bits=bits, group_size=64, mode=mode)
    assert mx.array_equal(model(IDS)[0], expected(IDS)[0])


def test_quantize_default_mode_is_nf4(base, tmp_path):
    result = runner.invoke(app, ["quantize", str(base), "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "q").config.quantization["mode"] == "nf4"


def test_quantize_errors(base, tmp_path):
    assert_one_line_error(
        runner.invoke(app, ["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "q")]), "not found"
    )
    assert_one_line_error(
        runner.invoke(app, ["quantize", str(base), "-o", str(tmp_path / "q"), "-b", "3", "--mode", "nf4"]), "4-bit"
    )
    assert_one_line_error(runner.invoke(app, ["quantize", str(base), "-o", str(tmp_path / "q"), "-g", "48"]), "group")
    assert not (tmp_path / "q").exists()
    quantized = save_model(quantize_model(tiny_model(), mode="nf4"), tmp_path / "already")
    assert_one_line_error(
        runner.invoke(app, ["quantize", str(quantized), "-o", str(tmp_path / "q"), "--mode", "affine"]),
        "already quantized",
    )
    result = runner.invoke(app, ["quantize", str(base), "-o", str(tmp_path / "q"), "--mode", "int4"])
    assert result.exit_code == 2  # typer's usage error for an unknown choice


def test_merge_requantizes_by_default(base, adapter, tmp_path):
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(base), "--adapter", str(adapter), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert load_model(out).config.quantization == {"mode": "nf4", "bits": 4, "group_size": 64}


def test_merge_no_requantize_matches_the_adapted_model(base, adapter, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", str(base), "--adapter", str(adapter), "-o", str(out), "--no-re-quantize", "-r", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = load_model(out)
    assert merged.config.quantization is None
    expected = load_model(base)
    load_adapter(expected, adapter)
    ref = expected(IDS)[0]
    merge_adapters(expected)
    np.testing.assert_allclose(merged(IDS)[0], ref, rtol=1e-4, atol=1e-4)


def test_merge_with_bits_and_group_size(base, adapter, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", str(base), "--adapter", str(adapter), "-o", str(out), "-b", "4", "-g", "32"]
    assert runner.invoke(app, args).exit_code == 0
    assert load_model(out).config.quantization == {"mode": "nf4", "bits": 4, "group_size": 32}


def test_merge_errors(base, adapter, tmp_path):
    out = str(tmp_path / "merged")
    assert_one_line_error(
        runner.invoke(app, ["merge", str(base), "--adapter", str(tmp_path / "none.safetensors"), "-o", out]),
        "not found",
    )
    assert_one_line_error(
        runner.invoke(app, ["merge", str(tmp_path / "nobase"), "--adapter", str(adapter), "-o", out]), "not found"
    )
    other = save_model(tiny_model(num_layers=6), tmp_path / "other")
    assert_one_line_error(
        runner.invoke(app, ["merge", str(other), "--adapter", str(adapter), "-o", out]), "does not match"
    )
    assert_one_line_error(
        runner.invoke(app, ["merge", str(base), "--adapter", str(adapter), "-o", out, "-r", "8"]), "rank 4"
    )
    assert not (tmp_path / "merged").exists()
