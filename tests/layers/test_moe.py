import bit_axon  # noqa: F401
from bit_axon import BitAxonConfig
from bit_axon.layers.moe import SharedExpertMoE, route

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def _moe(shared=True):
    config = BitAxonConfig.small(
        vocab_size=64, hidden_dim=16, num_heads=2, moe_num_experts=5, moe_top_k=2,
        moe_intermediate_dim=24, moe_shared_expert=shared,
    )
    moe = SharedExpertMoE(config)
    mx.eval(moe.parameters())
    return moe


def per_token_reference(moe, x):
    """Each token through its top-k experts one at a time, plus the gated shared expert."""
    flat = x.reshape(-1, x.shape[-1])
    outs = []
    for token in flat:
        probs = mx.softmax(moe.gate(token))
        top = np.argsort(-np.array(probs))[: moe.top_k]
        y = mx.zeros_like(token)
        for e in top.tolist():
            sw = moe.switch_mlp
            g = sw.gate_proj.weight[e] @ token
            u = sw.up_proj.weight[e] @ token
            y = y + probs[e] * (sw.down_proj.weight[e] @ (nn.silu(g) * u))
        if "shared_expert" in moe:
            y = y + mx.sigmoid(moe.shared_expert_gate(token)) * moe.shared_expert(token)
        outs.append(y)
    return mx.stack(outs).reshape(x.shape)


def test_moe_matches_per_token_loop():
    for shared in (True, False):
        moe = _moe(shared)
        x = mx.random.normal((3, 7, 16))
        np.testing.assert_allclose(np.array(moe(x)), np.array(per_token_reference(moe, x)), rtol=1e-4, atol=1e-5)


def test_route_weights_are_the_softmax_probabilities_of_the_top_k():
    logits = mx.random.normal((50, 6))
    indices, weights = route(logits, 3)
    probs = np.array(mx.softmax(logits, axis=-1))
    idx = np.array(indices)
    for row in range(50):
        assert set(idx[row]) == set(np.argsort(-probs[row])[:3])
    np.testing.assert_allclose(np.array(weights), np.take_along_axis(probs, idx, axis=-1), rtol=1e-6)
    # Not renormalised: the k weights sum to the probability mass of the chosen experts (< 1).
    sums = np.array(weights).sum(-1)
    assert np.all(sums < 1.0) and np.all(sums >= 3 / 6 - 1e-6)


def test_moe_gradients_reach_selected_experts_only():
    moe = _moe()
    x = mx.random.normal((1, 1, 16))
    indices, _ = route(moe.gate(x), moe.top_k)

    def loss(params):
        moe.update(params)
        return moe(x).sum()

    grads = mx.grad(loss)(moe.trainable_parameters())
    g = np.abs(np.array(grads["switch_mlp"]["up_proj"]["weight"])).sum(axis=(1, 2))
    chosen = set(np.array(indices).ravel().tolist())
    assert {e for e in range(5) if g[e] > 0} == chosen
