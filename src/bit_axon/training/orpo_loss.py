"""ORPO: odds-ratio preference optimisation (Hong et al., 2024), no reference model.

    L = NLL(chosen) + penalty
    log_odds_ratio = log(p_c / (1 - p_c)) - log(p_r / (1 - p_r))

with p the (geometric-mean) per-token probability of a response, i.e. log p = its average token
log-probability. ``log(1 - p)`` is computed in log space with a stable ``log1mexp``. The penalty has
two forms (``ORPO_FORMS``), in which the same ``beta`` means different things:

- ``"guide"`` (the default; the training guide and its reference implementation):
  ``-log sigmoid(beta * log_odds_ratio)``: beta scales the ratio inside the sigmoid, so it sets how
  soon the penalty saturates; its weight against the NLL stays 1.
- ``"paper"`` (the ORPO paper's ``lambda``, and TRL's ``ORPOTrainer``):
  ``-beta * log sigmoid(log_odds_ratio)``: beta weights the penalty against the NLL.
"""

from __future__ import annotations

import math

from bit_axon.training.collate import IGNORE_INDEX, OrpoBatch

import mlx.core as mx
import mlx.nn as nn

# log p is clamped just below 0 so log(1 - p) stays finite when a response is certain (p -> 1).
_MAX_LOGP = -1e-6
GUIDE_FORM, PAPER_FORM = "guide", "paper"
ORPO_FORMS = (GUIDE_FORM, PAPER_FORM)


def get_logps(logits: mx.array, labels: mx.array, mask: mx.array | None = None) -> mx.array:
    """Average log-probability of the response tokens of each row, shape (B,).

    ``labels`` are aligned with the inputs (not shifted): logits at t score label t + 1. Positions
    labelled ``IGNORE_INDEX`` (prompt, padding) and, if given, where ``mask`` is 0 do not count.
    """
    logits = logits[:, :-1].astype(mx.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask[:, 1:] != 0)
    safe_targets = mx.where(valid, targets, 0)
    token_logps = -nn.losses.cross_entropy(logits, safe_targets, reduction="none")
    weights = valid.astype(mx.float32)
    return (token_logps * weights).sum(-1) / mx.maximum(weights.sum(-1), 1.0)


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler, 2012)."""
    return mx.where(x > -math.log(2.0), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def log_odds(logps: mx.array) -> mx.array:
    logps = mx.minimum(logps, _MAX_LOGP)
    return logps - log1mexp(logps)


def orpo_loss(
    chosen_logps: mx.array, rejected_logps: mx.array, beta: float = 0.1, form: str = GUIDE_FORM
) -> mx.array:
    """The mean odds-ratio penalty: ``-log sigmoid(beta * log_odds_ratio)`` (``form="guide"``) or
    ``-beta * log sigmoid(log_odds_ratio)`` (``form="paper"``)."""
    return _penalties(chosen_logps, rejected_logps, beta, form).mean()


def _penalties(chosen_logps: mx.array, rejected_logps: mx.array, beta: float, form: str) -> mx.array:
    ratio = log_odds(chosen_logps) - log_odds(rejected_logps)
    if form == GUIDE_FORM:
        return -nn.log_sigmoid(beta * ratio)
    if form == PAPER_FORM:
        return -beta * nn.log_sigmoid(ratio)
    raise ValueError(f"unknown ORPO form {form!r}; expected one of {', '.join(ORPO_FORMS)}")


def orpo_terms(
    model: nn.Module, batch: OrpoBatch, beta: float = 0.1, form: str = GUIDE_FORM
) -> tuple[mx.array, dict[str, mx.array]]:
    """Per-pair losses (B,) and per-pair metrics; chosen and rejected go through one forward pass."""
    chosen_ids, chosen_labels, rejected_ids, rejected_labels = batch
    n = chosen_ids.shape[0]
    if chosen_ids.shape[1] == rejected_ids.shape[1]:
        logits, _ = model(mx.concatenate([chosen_ids, rejected_ids], axis=0))
        logps = get_logps(logits, mx.concatenate([chosen_labels, rejected_labels], axis=0))
        chosen_logps, rejected_logps = logps[:n], logps[n:]
    else:
        chosen_logps = get_logps(model(chosen_ids)[0], chosen_labels)
        rejected_logps = get_logps(model(rejected_ids)[0], rejected_labels)
    nll = -chosen_logps
    penalty = _penalties(chosen_logps, rejected_logps, beta, form)
    chosen_reward = beta * chosen_logps
    rejected_reward = beta * rejected_logps
    metrics = {
        "nll": nll,
        "orpo_penalty": penalty,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "reward_margin": chosen_reward - rejected_reward,
        "reward_accuracy": (chosen_reward > rejected_reward).astype(mx.float32),
        "log_odds_ratio": log_odds(chosen_logps) - log_odds(rejected_logps),
    }
    return nll + penalty, metrics


def compute_orpo_loss(
    model: nn.Module,
    chosen_ids: mx.array,
    chosen_labels: mx.array,
    rejected_ids: mx.array,
    rejected_labels: mx.array,
    beta: float = 0.1,
    form: str = GUIDE_FORM,
) -> tuple[mx.array, dict[str, mx.array]]:
    """NLL on the chosen responses plus the odds-ratio penalty (of ``form``), averaged over pairs, and metrics.

    The NLL of a pair is its chosen response's average token NLL, so a batch's loss is a mean over
    pairs and gradient accumulation weights every pair equally.
    """
    batch = OrpoBatch(chosen_ids, chosen_labels, rejected_ids, rejected_labels)
    losses, metrics = orpo_terms(model, batch, beta, form)
    return losses.mean(), {k: v.mean() for k, v in metrics.items()}
