"""The fused vocabulary head + cross-entropy: same loss and gradients as logits then cross-entropy,
chunked over the vocabulary (bounded memory), and the plain path for heads it cannot fuse."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.quantization import nf4_dequantize, nf4_quantize, quantize_model
from bit_axon.training import losses
from bit_axon.training.lora import apply_lora_to_model
from bit_axon.training.losses import frozen_head, head_cross_entropy, masked_cross_entropy_sum
from toy import peak_memory

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

VOCAB, D = 700, 64


def _model(quant: str, tied: bool = True) -> BitAxonModel:
    mx.random.seed(0)
    config = BitAxonConfig.small(
        vocab_size=VOCAB, hidden_dim=64, d_source_model=D, moe_intermediate_dim=128, weight_tying=tied
    )
    model = BitAxonModel(config)
    if quant != "float":
        quantize_model(model, bits=4, group_size=64, mode=quant)
    apply_lora_to_model(model, rank=4, scale=2.0)
    mx.eval(model.parameters())
    return model


def _rows(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = mx.array(rng.normal(0, 2.0, (k, D)).astype(np.float32))
    targets = mx.array(rng.integers(0, VOCAB, k).astype(np.int32))
    weights = mx.array((rng.random(k) > 0.3).astype(np.float32))  # some padding rows, weight 0
    return hidden, targets, weights


def _loss_and_grad(f, hidden):
    value, grad = mx.value_and_grad(f)(hidden)
    mx.eval(value, grad)
    return value.item(), np.array(grad)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("quant", "tied"), [("float", True), ("nf4", True), ("affine", True), ("nf4", False)])
def test_fused_head_matches_logits_then_cross_entropy(monkeypatch, quant, tied, training):
    model = _model(quant, tied)
    model.train(training)
    monkeypatch.setattr(losses, "HEAD_CHUNK_ELEMENTS", 37 * 100)  # several uneven vocabulary slices
    hidden, targets, weights = _rows(37)
    ref_loss, ref_grad = _loss_and_grad(
        lambda h: masked_cross_entropy_sum(model.head(h), targets, weights)[0], hidden
    )
    loss, grad = _loss_and_grad(lambda h: head_cross_entropy(model, h, targets, weights)[0], hidden)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert head_cross_entropy(model, hidden, targets, weights)[1].item() == weights.sum().item()


def test_fused_head_survives_large_logits():
    model = _model("float")
    hidden, targets, weights = _rows(8)
    hidden = hidden * 300.0  # logits in the thousands: exp would overflow without the running max
    ref = masked_cross_entropy_sum(model.head(hidden), targets, weights)[0].item()
    fused = head_cross_entropy(model, hidden, targets, weights)[0].item()
    assert np.isfinite(fused) and fused == pytest.approx(ref, rel=1e-5)


def test_trainable_head_takes_the_plain_path():
    model = _model("float")
    model.embed_tokens.unfreeze()
    assert frozen_head(model) is None
    hidden, targets, weights = _rows(5)
    g = nn.value_and_grad(model, lambda m: head_cross_entropy(m, hidden, targets, weights)[0])(model)[1]
    assert np.abs(np.array(g["embed_tokens"]["weight"])).max() > 0


def test_logits_and_float_head_never_exist_whole(monkeypatch):
    k, vocab, d = 256, 20_000, 256
    monkeypatch.setattr(losses, "HEAD_CHUNK_ELEMENTS", k * 1000)  # 1 MB logit slices
    rng = np.random.default_rng(1)
    h = mx.array(rng.normal(size=(k, d)).astype(np.float32))
    packed, scales = nf4_quantize(mx.array(rng.normal(0, 0.05, (vocab, d)).astype(np.float32)))
    t = mx.array(rng.integers(0, vocab, k).astype(np.int32))
    weights = mx.ones((k,))
    mx.eval(h, packed, scales, t, weights)
    fused_ce = losses._fused_head_ce(nf4_dequantize)
    fused = mx.compile(lambda h: mx.grad(lambda h: fused_ce(h, t, weights, packed, scales)[0])(h))
    mx.eval(fused(h))
    previous = mx.set_memory_limit(mx.get_active_memory() + (4 << 20))  # no allocation run-ahead
    try:
        _, peak = peak_memory(lambda: fused(h))
    finally:
        mx.set_memory_limit(previous)
    whole = k * vocab * 4  # the logits, 20 MB; the float head is 20 MB too
    assert whole == vocab * d * 4 and peak < whole / 2, f"peak {peak / 2**20:.1f} MiB"
