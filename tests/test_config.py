import json

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
