"""evaluate_model: token-weighted loss and perplexity against a direct, unpacked computation."""

from __future__ import annotations

import math

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.inference import evaluate_model
from bit_axon.training.data import PreferencePair

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

VOCAB = 97
IDS = dict(eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    m = BitAxonModel(BitAxonConfig.small(vocab_size=VOCAB, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128))
    mx.eval(m.parameters())
    return m


def examples(seed: int = 0, n: int = 5) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 12))
        ids = rng.integers(2, VOCAB, length).tolist()
        prompt = int(rng.integers(1, length - 1))
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return out


def direct_token_losses(model, data) -> list[float]:
    """Per-target losses, example by example with no packing, in dataset order."""
    losses = []
    for ids, mask in data:
        logits, _ = model(mx.array([ids[:-1]]))
        ce = nn.losses.cross_entropy(logits[0], mx.array(ids[1:]), reduction="none")
        losses += [float(v) for v, m in zip(np.array(ce), mask[1:], strict=True) if m]
    return losses


def test_loss_and_perplexity_match_direct_computation(model):
    data = examples()
    expected = direct_token_losses(model, data)
    # seq_length 16 packs several examples per row; batch_size 2 leaves a padded final batch.
    result = evaluate_model(model, data, batch_size=2, seq_length=16, **IDS)
    assert result["tokens"] == len(expected)
    assert result["loss"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(np.mean(expected)), rel=1e-5)
    # Packing and batching must not change the numbers.
    again = evaluate_model(model, data, batch_size=1, seq_length=64, **IDS)
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-5) and again["tokens"] == result["tokens"]


def test_max_tokens_stops_after_exactly_that_many(model):
    data = examples(seed=1, n=6)
    expected = direct_token_losses(model, data)
    n = len(expected) // 2 + 1
    result = evaluate_model(model, data, batch_size=1, seq_length=16, max_tokens=n, **IDS)
    assert result["tokens"] == n
    assert result["loss"] == pytest.approx(np.mean(expected[:n]), rel=1e-5)


def test_preference_pairs_use_the_chosen_side(model):
    chosen, rejected = examples(seed=2, n=3), examples(seed=3, n=3)
    pairs = [PreferencePair(*c, *r) for c, r in zip(chosen, rejected, strict=True)]
    result = evaluate_model(model, pairs, batch_size=2, seq_length=32, **IDS)
    assert result == pytest.approx(evaluate_model(model, chosen, batch_size=2, seq_length=32, **IDS))
    assert result["tokens"] == len(direct_token_losses(model, chosen))


def test_errors(model):
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_model(model, [([2, 3, 4], [0, 0, 0])], batch_size=1, seq_length=8, **IDS)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate_model(model, [([2, 300, 4], [0, 1, 1])], batch_size=1, seq_length=8, **IDS)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):  # the default separator id
        evaluate_model(model, [([2, 3, 4], [0, 1, 1])], batch_size=1, seq_length=8)
    with pytest.raises(ValueError, match="max_tokens"):
        evaluate_model(model, examples(), batch_size=1, seq_length=8, max_tokens=0, **IDS)
    assert model.training  # restored after evaluation


def test_trainer_evaluate_and_evaluate_model_are_one_computation(model, tmp_path):
    from bit_axon.training.config import TrainingConfig
    from bit_axon.training.trainer import Trainer

    data = examples(seed=4, n=7)
    config = TrainingConfig(batch_size=2, max_seq_len=16, max_steps=1, warmup_steps=0, output_dir=str(tmp_path))
    trainer = Trainer(model, config, data, data, show_progress=False, **IDS)
    from_trainer = trainer.evaluate()
    result = evaluate_model(model, data, batch_size=2, seq_length=16, **IDS)
    assert from_trainer["val_loss"] == result["loss"] and from_trainer["val_perplexity"] == result["perplexity"]


def test_perplexity_is_inf_where_exp_overflows():
    from bit_axon.training.evaluation import perplexity

    assert perplexity(1.5) == pytest.approx(math.exp(1.5))
    assert perplexity(708.0) == pytest.approx(math.exp(708.0))
    assert perplexity(710.0) == math.inf and perplexity(math.inf) == math.inf
