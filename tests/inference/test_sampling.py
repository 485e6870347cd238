"""Sampler: greedy, reproducible seeded draws, and top-k / top-p never leaving their sets."""

from __future__ import annotations

import math

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.inference.sampling import Sampler, top_k_filter, top_p_filter

import mlx.core as mx
import numpy as np
import pytest

# A crafted distribution over 8 tokens, ranked 3 > 0 > 5 > 1 > 7 > 2 > 6 > 4.
PROBS = np.array([0.25, 0.12, 0.04, 0.30, 0.01, 0.15, 0.03, 0.10])
LOGITS = mx.array(np.log(PROBS), dtype=mx.float32)
DRAWS = 4000


def draws(sampler: Sampler) -> np.ndarray:
    # One call, one key split: a (DRAWS, V) batch of identical rows gives DRAWS independent draws.
    return np.array(sampler(mx.broadcast_to(LOGITS, (DRAWS, LOGITS.size))))


def test_greedy_is_argmax():
    logits = mx.random.normal((5, 50), key=mx.random.key(1))
    assert mx.array_equal(Sampler(temperature=0.0, top_k=3, top_p=0.1)(logits), mx.argmax(logits, axis=-1))


def test_seed_is_reproducible_and_independent_of_global_state():
    a = Sampler(temperature=1.0, seed=123)
    first = [draws(a) for _ in range(3)]
    mx.random.seed(999)  # the global generator must not matter
    mx.random.uniform(shape=(10,))
    b = Sampler(temperature=1.0, seed=123)
    second = [draws(b) for _ in range(3)]
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], first[1])  # the key advances between draws
    assert not np.array_equal(first[0], draws(Sampler(temperature=1.0, seed=124)))


def test_unseeded_samplers_differ():
    assert not np.array_equal(draws(Sampler(temperature=1.0)), draws(Sampler(temperature=1.0)))


def test_temperature_one_matches_the_distribution():
    counts = np.bincount(draws(Sampler(temperature=1.0, seed=0)), minlength=8) / DRAWS
    np.testing.assert_allclose(counts, PROBS, atol=0.03)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_stays_in_the_top_k(k):
    allowed = set(np.argsort(-PROBS)[:k])
    seen = set(draws(Sampler(temperature=2.0, top_k=k, seed=k)).tolist())
    assert seen <= allowed
    assert seen == allowed  # with 4000 draws at a high temperature, every allowed token shows up


@pytest.mark.parametrize(
    ("p", "nucleus"),
    [
        (0.29, {3}),  # token 3's 0.30 alone reaches 0.29
        (0.31, {3, 0}),
        (0.69, {3, 0, 5}),  # 0.30 + 0.25 = 0.55 < 0.69 -> token 5 in; 0.70 >= 0.69 -> stop
        (0.71, {3, 0, 5, 1}),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(p, nucleus):
    seen = set(draws(Sampler(temperature=1.0, top_p=p, seed=7)).tolist())
    assert seen == nucleus


def test_top_p_is_applied_to_the_tempered_distribution():
    # At temperature 0.25 token 3 has probability > 0.5 (0.30^4 dominates), so top_p=0.5 keeps only it.
    tempered = PROBS**4 / (PROBS**4).sum()
    assert tempered[3] > 0.5
    assert set(draws(Sampler(temperature=0.25, top_p=0.5, seed=1)).tolist()) == {3}


def test_filters_directly():
    logits = mx.array([[0.0, 3.0, 1.0, 2.0]])
    assert np.isinf(np.array(top_k_filter(logits, 2))).tolist() == [[True, False, True, False]]
    assert mx.array_equal(top_k_filter(logits, 0), logits)
    kept = np.array(top_p_filter(logits, 0.9))
    probs = np.exp([0.0, 3.0, 1.0, 2.0]) / np.exp([0.0, 3.0, 1.0, 2.0]).sum()
    assert probs[1] + probs[3] < 0.9 <= probs[1] + probs[3] + probs[2]
    assert np.isinf(kept).tolist() == [[True, False, False, False]]
    np.testing.assert_array_equal(kept[0, 1:], [3.0, 1.0, 2.0])
    assert math.isinf(top_p_filter(logits, 1e-6)[0, 0].item())


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        Sampler(**kwargs)
