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


# ---- load(path) -> (model, tokenizer) ---------------------------------------------------------------


def write_small_chatml_tokenizer(path):
    """A 6-token ChatML tokenizer.json, far smaller than the bundled Qwen2.5 one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3, "hello": 4, "world": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))


def test_load_gives_the_model_with_its_adapter_and_the_directory_tokenizer(tmp_path):
    from bit_axon.inference import load
    from bit_axon.training.checkpoint import save_adapter_only
    from bit_axon.training.lora import adapter_layers, apply_lora_to_model

    save_model(tiny_model(), tmp_path / "model")
    write_small_chatml_tokenizer(tmp_path / "model")
    adapted = tiny_model()
    apply_lora_to_model(adapted, rank=2)
    for _, layer in adapter_layers(adapted):
        layer.lora_b = mx.ones(layer.lora_b.shape) * 0.1
    adapter = save_adapter_only(adapted, tmp_path / "adapter.safetensors")

    model, tok = load(tmp_path / "model", adapter)
    assert tok.vocab_size == 6 and tok.encode("hello world") == [4, 5]
    assert not model.training and len(adapter_layers(model)) == len(adapter_layers(adapted))
    assert mx.allclose(model(IDS)[0], adapted(IDS)[0], atol=1e-5)
    if mx.default_device() == mx.cpu:
        assert model.embed_tokens.weight.dtype == mx.float32


def test_load_defaults_to_the_bundled_tokenizer_and_checks_that_it_fits(tmp_path, qwen_tokenizer):
    from bit_axon.inference import load

    save_model(tiny_model(), tmp_path)  # a 512-token vocabulary, too small for Qwen2.5's ids
    with pytest.raises(ValueError, match=f"the tokenizer has {qwen_tokenizer.vocab_size} tokens but the model's "
                                         "vocabulary has only 512"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="Model directory not found"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No config.json"):
        load(tmp_path / "empty")


# --- non-finite weights: found once when read, never written ---------------------------------------


def test_non_finite_weights_are_refused_when_loaded_naming_tensor_and_file(tmp_path):
    from bit_axon.quantization.model import NonFiniteWeightsError
    from nonfinite import poisoned_copy

    bad, name = poisoned_copy(save_model(tiny_model(), tmp_path / "good"), tmp_path / "bad")
    with pytest.raises(NonFiniteWeightsError, match=f"{bad / 'model.safetensors'}: tensor {name!r} holds NaN or Inf"):
        load_model(bad)


def test_non_finite_weights_of_a_pretrained_source_are_refused(tmp_path):
    from bit_axon.quantization.model import NonFiniteWeightsError
    from sources.tiny_lm import hf_directory

    import numpy as np

    path, _ = hf_directory(tmp_path / "hf", quantized=False)
    [file] = path.glob("*.safetensors")
    weights = mx.load(str(file))
    name = sorted(weights)[0]
    values = np.array(weights[name].astype(mx.float32))
    values.flat[0] = np.nan
    weights[name] = mx.array(values).astype(weights[name].dtype)
    mx.save_safetensors(str(file), weights)
    with pytest.raises(NonFiniteWeightsError, match=f"{path}: tensor .* holds NaN or Inf"):
        load_model(path)


def test_save_model_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    from bit_axon.quantization.model import NonFiniteWeightsError

    model = tiny_model()
    model.update({"embed_tokens": {"weight": model.embed_tokens.weight * float("inf")}})
    with pytest.raises(NonFiniteWeightsError, match=f"{tmp_path / 'out'} not written: tensor 'embed_tokens.weight'"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Quantization scales are floats too: a quantized model with an Inf scale is refused the same way.
    from mlx.utils import tree_flatten, tree_unflatten

    model = quantize_model(tiny_model(), mode="nf4")
    name, scales = next((k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("scales"))
    model.update(tree_unflatten([(name, scales * float("inf"))]))
    with pytest.raises(NonFiniteWeightsError, match=f"tensor {name!r}"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
