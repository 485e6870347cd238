"""Model directories of quantized models: config.json records the format, loading rebuilds it."""

from __future__ import annotations

import json

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.loading import load_model, save_model
from bit_axon.quantization import NF4Linear, QuantizedSwitchLinear, quantize_model

import mlx.core as mx
import pytest

IDS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])


def tiny_model() -> BitAxonModel:
    mx.random.seed(0)
    config = BitAxonConfig.small(
        vocab_size=512, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128, num_heads=4
    )
    model = BitAxonModel(config)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize(
    ("mode", "bits", "group_size"), [("nf4", 4, 64), ("affine", 4, 64), ("affine", 8, 32), ("nf4", 4, 32)]
)
def test_quantized_model_directory_round_trips_exactly(tmp_path, mode, bits, group_size):
    model = quantize_model(tiny_model(), bits=bits, group_size=group_size, mode=mode)
    ref, _ = model(IDS)
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"mode": mode, "bits": bits, "group_size": group_size}

    loaded = load_model(tmp_path)
    assert loaded.config.quantization == config["quantization"]
    assert type(loaded.layer_0.ssm.in_proj) is type(model.layer_0.ssm.in_proj)
    out, _ = loaded(IDS)
    assert mx.array_equal(out, ref)


def test_loaded_structure_matches_the_recorded_format(tmp_path):
    save_model(quantize_model(tiny_model(), mode="affine"), tmp_path / "affine")
    save_model(quantize_model(tiny_model(), mode="nf4"), tmp_path / "nf4")
    assert isinstance(load_model(tmp_path / "affine").layer_1.moe.switch_mlp.up_proj, QuantizedSwitchLinear)
    assert isinstance(load_model(tmp_path / "nf4").output_proj, NF4Linear)


def test_mlx_lm_style_quantization_entry_means_affine(tmp_path):
    save_model(quantize_model(tiny_model(), mode="affine"), tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"] = {"group_size": 64, "bits": 4}  # mlx-lm's form, no "mode"
    config_path.write_text(json.dumps(config))
    assert load_model(tmp_path).config.quantization == {"mode": "affine", "bits": 4, "group_size": 64}


def test_weights_that_do_not_match_the_recorded_format_are_refused(tmp_path):
    save_model(tiny_model(), tmp_path)  # float weights
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"] = {"mode": "nf4", "bits": 4, "group_size": 64}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path)
