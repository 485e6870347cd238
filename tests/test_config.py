import json
import logging

from bit_axon import BitAxonConfig

import pytest


def test_defaults_match_architecture():
    c = BitAxonConfig()
    assert (c.vocab_size, c.hidden_dim, c.num_layers, c.num_heads, c.d_source_model) == (151_936, 2560, 24, 32, 2048)
    assert (c.ssm_d_state, c.ssm_d_conv, c.ssm_expand, c.ssm_dt_rank) == (16, 4, 3, 1)
    assert (c.swa_window_size, c.moe_num_experts, c.moe_top_k, c.moe_intermediate_dim) == (4096, 8, 2, 4096)
    assert c.moe_shared_expert and c.weight_tying and c.max_seq_len == 65_536 and c.rms_norm_eps == 1e-6
    assert c.head_dim == 80 and c.ssm_intermediate_dim == 7680 and c.zone_boundaries == (8, 16)


def test_small_covers_the_tokenizer():
    assert BitAxonConfig.small().vocab_size >= 151_665


def test_json_round_trip(tmp_path):
    c = BitAxonConfig.small(moe_top_k=1, quantization={"mode": "nf4", "bits": 4, "group_size": 64})
    c.save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "bit_axon" and data["hidden_dim"] == 256
    assert BitAxonConfig.load(tmp_path) == c
    plain = BitAxonConfig()
    plain.save(tmp_path / "c.json")
    assert "quantization" not in json.loads((tmp_path / "c.json").read_text())
    assert BitAxonConfig.load(tmp_path / "c.json") == plain


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_dim": 100, "num_heads": 3}, "divisible by num_heads"),
        ({"num_layers": 2}, "at least 3"),
        ({"moe_top_k": 9}, "cannot exceed moe_num_experts"),
        ({"ssm_d_state": 0}, "ssm_d_state must be a positive integer"),
        ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
    ],
)
def test_invalid_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BitAxonConfig(**kwargs)


def test_unknown_fields_and_bad_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_dim": 64, "num_heads": 4, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        BitAxonConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BitAxonConfig.load(tmp_path)


# --- TrainingConfig: one source for each setting --------------------------------------------------


def test_training_config_takes_its_defaults_from_the_owners():
    from bit_axon.quantization import DEFAULT_MODE, QUANT_MODES
    from bit_axon.training.config import QUANTIZE_MODES, TrainingConfig
    from bit_axon.training.cooling import ThermalPolicy
    from bit_axon.training.lora import AdapterConfig

    c = TrainingConfig()
    assert c.adapter_config() == AdapterConfig()
    assert c.thermal_policy() == ThermalPolicy()
    assert c.quantization_spec() == {"mode": DEFAULT_MODE, "bits": 4, "group_size": 64}
    assert set(QUANTIZE_MODES) == {*QUANT_MODES, "none"} and len(QUANTIZE_MODES) == len(QUANT_MODES) + 1
    # The guide's values, wherever they live now.
    assert (c.lora_rank, c.lora_scale, c.lora_dropout, c.use_dora) == (8, 20.0, 0.0, True)
    assert (c.temp_max_speed, c.temp_pause, c.temp_stop) == (75.0, 85.0, 95.0)
    assert TrainingConfig(use_dora=False, lora_rank=4).adapter_config() == AdapterConfig("lora", rank=4)
    policy = TrainingConfig(temp_max_speed=60.0, temp_pause=70.0, temp_stop=80.0).thermal_policy()
    assert (policy.max_speed_temp, policy.pause_temp, policy.stop_temp) == (60.0, 70.0, 80.0)


def test_training_config_quantization_agrees_with_the_quantization_package():
    from bit_axon.quantization import quantization_spec
    from bit_axon.training.config import TrainingConfig

    five = TrainingConfig(quantize_mode="affine", quantize_bits=5)
    assert five.quantization_spec() == quantization_spec({"mode": "affine", "bits": 5, "group_size": 64})
    assert TrainingConfig(quantize_mode="none", quantize_bits=7).quantization_spec() is None
    with pytest.raises(ValueError, match="quantize_group_size must be one of"):
        TrainingConfig(quantize_mode="affine", quantize_group_size=48)
    with pytest.raises(ValueError, match="quantize_mode must be one of"):
        TrainingConfig(quantize_mode="gguf")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temp_stop": 80.0}, "need temp_max_speed < temp_pause < temp_stop, got 75.0 / 85.0 / 80.0"),
        ({"temp_poll_interval": 0.0}, "temp_poll_interval must be > 0"),
        ({"lora_rank": 0}, "lora_rank must be a positive integer"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"max_seq_len": 1}, "max_seq_len must be an integer >= 2"),
        ({"max_seq_len": 64.0}, "max_seq_len must be an integer >= 2"),
    ],
)
def test_training_config_errors_name_its_own_fields(kwargs, message):
    from bit_axon.training.config import TrainingConfig

    with pytest.raises(ValueError, match="^TrainingConfig: ") as info:
        TrainingConfig(**kwargs)
    assert message in str(info.value)


def test_default_warmup_is_cut_to_a_short_run_with_one_warning(caplog):
    from bit_axon.training.config import TrainingConfig

    with caplog.at_level(logging.WARNING, logger="bit_axon.training.config"):
        c = TrainingConfig(max_steps=3)
        again = TrainingConfig.from_dict(c.to_dict())
    assert c.warmup_steps == 3 and again == c
    assert len(caplog.records) == 1 and "max_steps=3" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match="warmup_steps must be between 0 and max_steps"):
        TrainingConfig(warmup_steps=20, max_steps=10)  # an explicit warmup is not silently changed


def test_training_config_dict_round_trip(tmp_path):
    from bit_axon.training.config import TrainingConfig

    c = TrainingConfig(learning_rate=3e-4, use_dora=False, quantize_mode="affine", quantize_bits=5,
                       memory_limit_gb=1.5, temp_pause=80.0, output_dir=str(tmp_path), training_mode="orpo")
    data = json.loads(json.dumps(c.to_dict()))
    assert TrainingConfig.from_dict(data) == c
    assert TrainingConfig.from_dict({}) == TrainingConfig()
    with pytest.raises(ValueError, match="unknown setting.*'lora_alpha'"):
        TrainingConfig.from_dict({**data, "lora_alpha": 16})
