"""mlx-lm models with the Bit-Axon model interface: names, head split, caches, packing, loading."""

from __future__ import annotations

import json

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.quantization import adopt_quantized
from bit_axon.sources import build_pretrained, load_hf_directory, pretrained_class
from sources.tiny_lm import tiny_config, tiny_mlx_lm_model

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models.llama
import pytest
from mlx.utils import tree_flatten

TOKENS = mx.array([[3, 17, 42, 5, 9, 61, 2, 33, 14, 70]])


def weights_of(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def pretrained_copy(model_type: str, **overrides):
    config = tiny_config(model_type, **overrides)
    reference = tiny_mlx_lm_model(config)
    return build_pretrained(config, weights_of(reference)), reference


def test_is_an_mlx_lm_model_with_its_names():
    model, reference = pretrained_copy("llama", tie_word_embeddings=False)
    assert isinstance(model, mlx_lm.models.llama.Model)
    assert type(model) is pretrained_class(mlx_lm.models.llama)
    assert weights_of(model).keys() == weights_of(reference).keys()
    assert "model.layers.1.self_attn.q_proj.weight" in weights_of(model)
    assert model.output_head is model.lm_head
    logits, cache = model(TOKENS)
    assert cache is None
    assert mx.array_equal(logits, reference(TOKENS)).item()
    assert mx.array_equal(model.mlx_lm_forward(TOKENS), logits).item()
    assert mx.array_equal(model.head(model.features(TOKENS)), logits).item()


def test_tied_head_is_the_embedding():
    model, _ = pretrained_copy("qwen2", tie_word_embeddings=True)
    assert model.output_head is model.model.embed_tokens


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_greedy_decoding_with_caches_equals_full_forwards(model_type):
    model, _ = pretrained_copy(model_type)
    prompt = [3, 17, 42, 5]
    cache, x, cached = model.make_cache(), mx.array([prompt]), []
    for _ in range(8):
        logits, cache = model(x, cache)
        cached.append(int(mx.argmax(logits[0, -1]).item()))
        x = mx.array([[cached[-1]]])
    full = list(prompt)
    for _ in range(8):
        logits, _ = model(mx.array([full]))
        full.append(int(mx.argmax(logits[0, -1]).item()))
    assert cached == full[len(prompt):]


def segment_loss(model, tokens, segment_ids=None):
    logits, _ = model(tokens[:, :-1], segment_ids=segment_ids)
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_row_equals_segments_run_alone(model_type):
    """Two examples packed in one row: same logits and loss gradients as each run alone."""
    model, _ = pretrained_copy(model_type)
    a, b = [3, 17, 42, 5, 9, 61, 2], [33, 14, 70, 8, 21]
    packed = mx.array([a + b])
    segments = mx.array([[1] * len(a) + [2] * len(b)])
    logits, _ = model(packed, segment_ids=segments)
    alone_a, _ = model(mx.array([a]))
    alone_b, _ = model(mx.array([b]))
    assert mx.allclose(logits[:, : len(a)], alone_a, atol=1e-5).item()
    assert mx.allclose(logits[:, len(a):], alone_b, atol=1e-4).item()
    unmasked, _ = model(packed)
    assert not mx.allclose(unmasked[:, len(a):], alone_b, atol=1e-2).item()  # the mask is what matters

    def packed_loss(m):  # the pair (a[-1], b[0]) crosses the boundary: leave it out, as packing does
        logits, _ = m(packed, segment_ids=segments)
        logp = nn.losses.cross_entropy(logits[:, :-1], packed[:, 1:], reduction="none")
        return logp[:, : len(a) - 1].sum() + logp[:, len(a):].sum()

    def separate_loss(m):
        return segment_loss(m, mx.array([a])) + segment_loss(m, mx.array([b]))

    loss_p, grads_p = nn.value_and_grad(model, packed_loss)(model)
    loss_s, grads_s = nn.value_and_grad(model, separate_loss)(model)
    assert loss_p.item() == pytest.approx(loss_s.item(), rel=1e-5)
    for (name, gp), (_, gs) in zip(tree_flatten(grads_p), tree_flatten(grads_s), strict=True):
        assert mx.allclose(gp, gs, rtol=1e-3, atol=1e-5).item(), name


def test_recompute_gives_the_same_gradients():
    model, _ = pretrained_copy("llama")
    tokens, segments = mx.array([[3, 17, 42, 5, 9, 61, 2, 33]]), mx.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    loss_and_grad = nn.value_and_grad(model, lambda m: segment_loss(m, tokens, segments[:, :-1]))
    loss, grads = loss_and_grad(model)
    model.set_recompute(True)
    assert type(model.model.layers[0]).__name__ == "RecomputedTransformerBlock"
    loss_r, grads_r = loss_and_grad(model)
    assert loss_r.item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, g), (_, gr) in zip(tree_flatten(grads), tree_flatten(grads_r), strict=True):
        assert mx.allclose(g, gr, rtol=1e-4, atol=1e-6).item(), name
    cached, _ = model(tokens[:, :3], cache=model.make_cache())  # decoding still writes its caches
    assert mx.allclose(cached, model(tokens[:, :3])[0], atol=1e-5).item()
    model.set_recompute(False)
    assert type(model.model.layers[0]).__name__ == "TransformerBlock"


def test_segment_ids_with_a_cache_is_an_error():
    model, _ = pretrained_copy("llama")
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model(TOKENS, cache=model.make_cache(), segment_ids=mx.zeros_like(TOKENS))


def quantized_reference(config: dict) -> nn.Module:
    reference = tiny_mlx_lm_model(config)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path == "model.embed_tokens":
            return {"group_size": 32, "bits": 8}
        return hasattr(module, "to_quantized")

    nn.quantize(reference, group_size=32, bits=4, class_predicate=predicate)
    adopt_quantized(reference)  # loaded models take the CPU fast path (test_adopt_quantized: allclose to MLX's)
    mx.eval(reference.parameters())
    return reference


@pytest.mark.parametrize("with_config", [True, False])
def test_quantized_weights_keep_their_format(with_config):
    config = tiny_config("llama")
    reference = quantized_reference(config)
    if with_config:  # mlx-lm's format: defaults plus per-layer overrides
        config["quantization"] = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    model = build_pretrained(config, weights_of(reference))
    embed, q_proj = model.model.embed_tokens, model.model.layers[0].self_attn.q_proj
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (8, 32)
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    assert mx.array_equal(model(TOKENS)[0], reference(TOKENS)).item()


def test_strict_loading_names_missing_and_unexpected_keys():
    config = tiny_config("llama")
    weights = weights_of(tiny_mlx_lm_model(config))
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = mx.zeros((2,))
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight; "
                                         r"unexpected: model\.layers\.1\.mlp\.extra\.weight"):
        build_pretrained(config, weights)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="not supported"):
        build_pretrained(tiny_config("no_such_architecture"), {})


@pytest.mark.parametrize("quantized", [False, True])
def test_hugging_face_directory(tmp_path, quantized):
    config = tiny_config("qwen2", tie_word_embeddings=False)
    reference = quantized_reference(config) if quantized else tiny_mlx_lm_model(config)
    if quantized:
        config["quantization"] = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights_of(reference))
    model, loaded_config = load_hf_directory(tmp_path)
    assert type(model).__name__ == "PretrainedQwen2"
    assert loaded_config["model_type"] == "qwen2"
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear) is quantized
    assert mx.array_equal(model(TOKENS)[0], reference(TOKENS)).item()


def test_not_a_hugging_face_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_directory(tmp_path)
