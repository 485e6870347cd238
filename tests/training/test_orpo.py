import math

from bit_axon.training.collate import IGNORE_INDEX, iterate_orpo_batches
from bit_axon.training.orpo_loss import compute_orpo_loss, get_logps, log1mexp, orpo_loss
from bit_axon.training.orpo_trainer import ORPOTrainer
from toy import PAD, SignalAt, config, preference_task, tiny_model, trainer_kwargs

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten


def reference_penalty(chosen, rejected, beta):
    """The guide's formula in float64 numpy, with log(1 - p) from the direct definition."""
    def log_odds(lp):
        lp = np.minimum(lp, -1e-6)
        return lp - np.log(-np.expm1(lp))

    ratio = log_odds(chosen) - log_odds(rejected)
    return -np.mean(-np.logaddexp(0.0, -beta * ratio))  # -mean(log sigmoid(beta * ratio))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_matches_numpy_reference_including_extreme_probabilities(beta):
    rng = np.random.default_rng(0)
    chosen = -rng.exponential(1.0, 64)
    rejected = -rng.exponential(1.0, 64)
    # probabilities next to 1 (log p -> 0) and next to 0 (log p very negative)
    chosen[:4] = [-1e-9, -1e-7, -80.0, 0.0]
    rejected[:4] = [-60.0, -1e-8, -1e-9, -200.0]
    got = orpo_loss(mx.array(chosen, dtype=mx.float32), mx.array(rejected, dtype=mx.float32), beta=beta).item()
    assert math.isfinite(got)
    assert got == pytest.approx(reference_penalty(chosen.astype(np.float32).astype(np.float64),
                                                  rejected.astype(np.float32).astype(np.float64), beta), rel=1e-4)
    grads = mx.grad(lambda c: orpo_loss(c, mx.array(rejected, dtype=mx.float32), beta))(mx.array(chosen, dtype=mx.float32))
    assert np.isfinite(np.array(grads)).all()


def test_log1mexp_is_stable_at_both_ends():
    x = mx.array([-1e-7, -0.5, -0.7, -5.0, -100.0])
    expected = np.log1p(-np.exp(np.array([-1e-7, -0.5, -0.7, -5.0, -100.0], dtype=np.float64)))
    np.testing.assert_allclose(np.array(log1mexp(x)), expected, rtol=1e-5, atol=1e-30)


def test_get_logps_ignores_prompt_and_padding_and_shifts():
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(size=(2, 6, 7)).astype(np.float32))
    labels = mx.array([[5, 5, 3, 1, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 2, 4, 6, 0, 3]])
    labels = mx.where(mx.array([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]) == 1, labels, IGNORE_INDEX)
    logp = np.array(mx.log(mx.softmax(logits, axis=-1)))
    lab = np.array(labels)
    expected = [
        np.mean([logp[b, t - 1, lab[b, t]] for t in range(1, 6) if lab[b, t] != IGNORE_INDEX]) for b in range(2)
    ]
    np.testing.assert_allclose(np.array(get_logps(logits, labels)), expected, rtol=1e-5)
    # Changing logits where the prompt/padding sit changes nothing.
    poked = np.array(logits)
    poked[0, 4:] += 10.0
    poked[1, 0] -= 5.0
    np.testing.assert_allclose(np.array(get_logps(mx.array(poked), labels)), expected, rtol=1e-5)


def test_compute_orpo_loss_metrics():
    model = tiny_model()
    batch = next(iterate_orpo_batches(preference_task(4), 4, 32, shuffle=False, pad_token_id=PAD))
    loss, metrics = compute_orpo_loss(model, *batch, beta=0.1)
    assert metrics["reward_margin"].item() == pytest.approx(
        metrics["chosen_reward"].item() - metrics["rejected_reward"].item(), abs=1e-6)
    assert loss.item() == pytest.approx(metrics["nll"].item() + metrics["orpo_penalty"].item(), rel=1e-5)
    assert 0.0 <= metrics["reward_accuracy"].item() <= 1.0


def test_pairs_stay_whole_in_batches():
    pairs = preference_task(9)
    seen = []
    for batch in iterate_orpo_batches(pairs, 4, 32, shuffle=True, seed=3, pad_token_id=PAD):
        for row in range(batch.chosen_ids.shape[0]):
            n = int((np.array(batch.chosen_ids[row]) != PAD).sum())
            seen.append(tuple(np.array(batch.chosen_ids[row])[:n]))
    assert sorted(seen) == sorted(tuple(p.chosen_ids) for p in pairs)


def test_orpo_training_raises_reward_accuracy_and_margin_on_held_out_pairs(tmp_path):
    train, held_out = preference_task(120, seed=0), preference_task(24, seed=7)
    trainer = ORPOTrainer(
        tiny_model(), config(tmp_path, training_mode="orpo", beta=1.0, max_steps=30, learning_rate=1e-2,
                             max_seq_len=32),
        train, held_out, **trainer_kwargs(),
    )
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    assert {"step", "loss", "grad_norm", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"} <= set(result)
    assert after["val_reward_margin"] > before["val_reward_margin"] + 0.05, (before, after)
    assert after["val_reward_accuracy"] > max(before["val_reward_accuracy"], 0.8), (before, after)


def test_orpo_resume_matches_uninterrupted(tmp_path):
    data = preference_task(40)
    cfg = dict(training_mode="orpo", max_steps=4, max_seq_len=32)
    full = tiny_model()
    ORPOTrainer(full, config(tmp_path / "a", **cfg), data, **trainer_kwargs()).train()
    first = tiny_model()
    # Stop after step 2 (as Ctrl-C would), then resume to 4.
    stopped = ORPOTrainer(first, config(tmp_path / "b", save_every=2, **cfg), data, cooling_scheduler=SignalAt(2),
                          **trainer_kwargs())
    assert stopped.train()["step"] == 2
    resumed = tiny_model()
    result = ORPOTrainer(resumed, config(tmp_path / "b", **cfg), data, **trainer_kwargs()).train(resume=True)
    assert result["step"] == 4
    for (k, a), (_, b) in zip(tree_flatten(full.trainable_parameters()), tree_flatten(resumed.trainable_parameters()),
                              strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-7, err_msg=k)


# --- the two forms of the penalty: the same beta means different things ------------------------


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        # p_c = 0.5 (log-odds 0), p_r = 0.2 (log-odds log 1/4): the ratio is log 4.
        ("guide", math.log(1.5)),  # -log sigmoid(0.5 * log 4) = -log sigmoid(log 2) = -log(2/3)
        ("paper", 0.5 * math.log(1.25)),  # -0.5 * log sigmoid(log 4) = -0.5 * log(4/5)
    ],
)
def test_orpo_forms_match_hand_computed_values(form, expected):
    chosen, rejected = mx.array([math.log(0.5)]), mx.array([math.log(0.2)])
    assert orpo_loss(chosen, rejected, beta=0.5, form=form).item() == pytest.approx(expected, rel=1e-5)


def test_unknown_orpo_form_is_refused():
    with pytest.raises(ValueError, match="unknown ORPO form 'trl'"):
        orpo_loss(mx.array([-1.0]), mx.array([-2.0]), form="trl")
    from bit_axon.training.config import TrainingConfig

    with pytest.raises(ValueError, match="orpo_form must be one of"):
        TrainingConfig(orpo_form="trl")


def test_orpo_trainer_uses_the_configured_form(tmp_path):
    from bit_axon.training.orpo_loss import orpo_terms

    model = tiny_model()
    batch = next(iterate_orpo_batches(preference_task(4), 4, 32, shuffle=False, pad_token_id=PAD))
    nll = orpo_terms(model, batch)[1]["nll"].sum().item()
    penalties = {}
    for form in ("guide", "paper"):
        trainer = ORPOTrainer(model, config(tmp_path, training_mode="orpo", beta=0.5, orpo_form=form), preference_task(4),
                              **trainer_kwargs())
        total, _, metrics = trainer.loss_terms(model, batch)
        expected = orpo_terms(model, batch, beta=0.5, form=form)[0].sum().item()
        assert total.item() == pytest.approx(expected, rel=1e-5)
        penalties[form] = metrics["orpo_penalty"].item()
        assert total.item() == pytest.approx(nll + penalties[form], rel=1e-5)
    assert penalties["guide"] != pytest.approx(penalties["paper"], rel=1e-3)
