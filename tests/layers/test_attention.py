import math

import bit_axon  # noqa: F401
from bit_axon import BitAxonConfig
from bit_axon.cache import KVCache
from bit_axon.layers.attention import SlidingWindowAttention

import mlx.core as mx
import numpy as np
import pytest


def _attention(window, hidden=32, heads=4):
    config = BitAxonConfig.small(vocab_size=64, hidden_dim=hidden, num_heads=heads, swa_window_size=window)
    layer = SlidingWindowAttention(config)
    mx.eval(layer.parameters())
    return layer


def brute_force(layer, x, segment_ids=None):
    """Masked softmax attention written out position by position in numpy."""
    W = {n: np.array(getattr(layer, n).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    x = np.array(x)
    b, L, H = x.shape
    nh, hd = layer.num_heads, layer.head_dim
    q = (x @ W["q_proj"].T).reshape(b, L, nh, hd)
    k = (x @ W["k_proj"].T).reshape(b, L, nh, hd)
    v = (x @ W["v_proj"].T).reshape(b, L, nh, hd)
    out = np.zeros((b, L, nh, hd))
    for bi in range(b):
        for t in range(L):
            visible = [
                s for s in range(L)
                if t - layer.window < s <= t and (segment_ids is None or segment_ids[bi][s] == segment_ids[bi][t])
            ]
            for h in range(nh):
                scores = np.array([q[bi, t, h] @ k[bi, s, h] for s in visible]) / math.sqrt(hd)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, t, h] = sum(pi * v[bi, s, h] for pi, s in zip(p, visible, strict=True))
    return out.reshape(b, L, H) @ W["o_proj"].T


@pytest.mark.parametrize("window", [1, 5, 64])
def test_matches_brute_force_masked_softmax(window):
    layer = _attention(window)
    x = mx.random.normal((2, 13, 32))
    np.testing.assert_allclose(np.array(layer(x)), brute_force(layer, x), rtol=1e-4, atol=1e-5)


def test_segments_do_not_attend_to_each_other():
    layer = _attention(8)
    x = mx.random.normal((2, 12, 32))
    seg = [[0] * 5 + [1] * 4 + [2] * 3, [0] * 12]
    got = layer(x, segment_ids=mx.array(seg))
    np.testing.assert_allclose(np.array(got), brute_force(layer, x, seg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [3, 6, 100])
def test_cache_continuation_matches_full_sequence(window):
    layer = _attention(window)
    x = mx.random.normal((1, 17, 32))
    full = layer(x)
    cache = KVCache(window)
    parts = [layer(x[:, :6], cache)]  # a prefill chunk, then one token at a time
    parts += [layer(x[:, t : t + 1], cache) for t in range(6, 17)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), rtol=1e-4, atol=1e-5)
    assert cache.keys.shape[2] <= max(window - 1, 0)  # the cache is bounded by the window
