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
from nonfinite import poisoned_copy

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


# --- output paths: never over the input, never a traceback ---------------------------------------


def _file_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_quantize_into_its_own_input_is_refused_unless_asked(base, tmp_path):
    before = _file_bytes(base)
    assert_one_line_error(runner.invoke(app, ["quantize", str(base), "-o", str(base)]), str(base), "--overwrite",
                          "replace or spoil its weights")
    assert_one_line_error(runner.invoke(app, ["quantize", str(base), "-o", str(base / "q4")]), "inside the input model")
    assert _file_bytes(base) == before  # the float weights are untouched
    result = runner.invoke(app, ["quantize", str(base), "-o", str(base), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert load_model(base).config.quantization == {"mode": "nf4", "bits": 4, "group_size": 64}


def test_merge_into_its_base_is_refused(base, adapter):
    before = _file_bytes(base)
    assert_one_line_error(runner.invoke(app, ["merge", str(base), "--adapter", str(adapter), "-o", str(base)]),
                          "is the input model", "--overwrite")
    assert _file_bytes(base) == before


@pytest.mark.parametrize("command", ["quantize", "merge", "port-weights"])
def test_an_existing_file_as_output_is_a_one_line_error(base, adapter, tmp_path, command):
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    args = {"quantize": [str(base)], "merge": [str(base), "--adapter", str(adapter)], "port-weights": [str(base)]}
    assert_one_line_error(runner.invoke(app, [command, *args[command], "-o", str(taken)]),
                          f"{taken} is an existing file", "directory")
    assert taken.read_text() == "keep me"


# --- non-finite weights: refused when read, never written ---------------------------------------


def test_non_finite_base_is_refused_by_quantize_and_merge(base, adapter, tmp_path):
    bad, name = poisoned_copy(base, tmp_path / "bad")
    for args in (["quantize", str(bad)], ["merge", str(bad), "--adapter", str(adapter)]):
        assert_one_line_error(runner.invoke(app, [*args, "-o", str(tmp_path / "out")]),
                              f"{bad / 'model.safetensors'}: tensor {name!r} holds NaN or Inf")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("re_quantize", ["--re-quantize", "--no-re-quantize"])
def test_merge_never_writes_non_finite_weights(base, tmp_path, re_quantize):
    model = load_model(base)
    apply_lora_to_model(model, rank=4)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))
    adapter = save_adapter_only(model, tmp_path / "nan_adapter.safetensors")
    out = tmp_path / "merged"
    assert_one_line_error(runner.invoke(app, ["merge", str(base), "--adapter", str(adapter), "-o", str(out), re_quantize]),
                          f"{out} not written", "holds NaN or Inf")
    assert not (out / "model.safetensors").exists()
