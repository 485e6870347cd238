"""Next-token cross-entropy on packed rows, as (sum, weight) so accumulation is token-weighted.

The training loss runs the vocabulary head on target positions only and fuses it with the
cross-entropy (:func:`head_cross_entropy`): with a frozen head (QLoRA), the (targets x vocab) logits
and the float head weight are made a vocabulary slice at a time and never exist whole, and the
gradient w.r.t. the hidden states is computed in the same pass as the loss, so the costly softmax
exponentials are evaluated once, not again in the backward pass.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

from bit_axon.backend import settings
from bit_axon.quantization.base import RowDequantizer, find_base

import mlx.core as mx
import mlx.nn as nn
import numpy as np

logger = logging.getLogger(__name__)

# Target counts are rounded up to a multiple of this so a compiled step sees few distinct shapes.
TARGET_BUCKET = 128
# Logits materialised at once by the fused head + cross-entropy (rows x vocab, ~16 MB in float32).
HEAD_CHUNK_ELEMENTS = 1 << 22
_logged_unfused = False


def shift_packed(token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array):
    """Inputs, targets, target weights and input segment ids for next-token prediction.

    A target only counts when it is in the same packed segment as the token predicting it, so the
    first token of an example is never predicted from the end of the previous one.
    """
    inputs, targets = token_ids[:, :-1], token_ids[:, 1:]
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    weights = loss_mask[:, 1:].astype(mx.float32) * same
    return inputs, targets, weights, segment_ids[:, :-1]


def masked_cross_entropy_sum(logits: mx.array, targets: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    """Sum of weighted token losses and the sum of weights (the number of target tokens)."""
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    return (losses * weights).sum(), weights.sum()


def sft_loss(model: nn.Module, token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array):
    """(sum of target-token losses, number of target tokens) for a packed batch."""
    inputs, targets, weights, segments = shift_packed(token_ids, loss_mask, segment_ids)
    logits, _ = model(inputs, segment_ids=segments)
    return masked_cross_entropy_sum(logits, targets, weights)


class TargetBatch(NamedTuple):
    """A packed batch with its loss targets gathered: only those positions go through the head.

    The vocabulary head and its softmax cost more than the rest of a small model, and in chat data
    most positions (system/user text, separators, padding) are not targets.
    """

    inputs: mx.array  # (B, L - 1) token ids
    segment_ids: mx.array  # (B, L - 1)
    positions: mx.array  # (K,) flat indices into B * (L - 1), K a multiple of TARGET_BUCKET
    targets: mx.array  # (K,) token ids to predict
    weights: mx.array  # (K,) 1 for real targets, 0 for the bucket's padding


def gather_targets(token_ids: mx.array, loss_mask: mx.array, segment_ids: mx.array) -> TargetBatch:
    inputs, targets, weights, segments = shift_packed(token_ids, loss_mask, segment_ids)
    flat_weights = np.array(weights).reshape(-1)
    positions = np.flatnonzero(flat_weights > 0)
    k = max(TARGET_BUCKET, -(-len(positions) // TARGET_BUCKET) * TARGET_BUCKET)
    padded = np.zeros(k, dtype=np.int32)
    padded[: len(positions)] = positions
    target_weights = np.zeros(k, dtype=np.float32)
    target_weights[: len(positions)] = flat_weights[positions]
    flat_targets = np.array(targets).reshape(-1)[padded]
    return TargetBatch(inputs, segments, mx.array(padded), mx.array(flat_targets), mx.array(target_weights))


def target_loss(model: nn.Module, batch: TargetBatch) -> tuple[mx.array, mx.array]:
    """``sft_loss`` on a ``TargetBatch``: the same sums, with the head run on target positions only."""
    hidden = model.features(batch.inputs, segment_ids=batch.segment_ids)
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.positions]
    return head_cross_entropy(model, hidden, batch.targets, batch.weights)


def frozen_head(model: nn.Module) -> RowDequantizer | None:
    """``(dequantize, params)`` with ``dequantize(*params)`` the (vocab, d) weight of ``model.output_head``.

    Every param has the vocabulary as its first axis, so ``dequantize(*(p[a:b] for p in params))``
    gives rows a..b: the head can be dequantized a slice at a time. None when the model has no
    ``output_head``, or the head is trainable, has a bias or is not a known base layer (its
    ``BaseLayer.row_dequantizer``). Covers every QLoRA/LoRA setup: adapters never wrap the head.
    """
    layer = getattr(model, "output_head", None)
    base = None if layer is None else find_base(layer)
    if base is None or base.kind == "switch" or "bias" in layer:
        return None
    return base.row_dequantizer()


def head_cross_entropy(
    model: nn.Module, hidden: mx.array, targets: mx.array, weights: mx.array
) -> tuple[mx.array, mx.array]:
    """``masked_cross_entropy_sum(model.head(hidden), targets, weights)`` for (K, d) hidden rows.

    With a frozen head the head and the cross-entropy are fused (see the module docstring); in
    training mode the forward pass also computes the gradient w.r.t. ``hidden``. A trainable or
    unrecognised head takes the plain path (logged once).
    """
    global _logged_unfused
    head = frozen_head(model)
    if head is None:
        if not _logged_unfused:
            _logged_unfused = True
            logger.info("The output head is trainable or not a plain linear map; using the unfused cross-entropy")
        return masked_cross_entropy_sum(model.head(hidden), targets, weights)
    dequantize, params = head
    params = tuple(mx.stop_gradient(p) for p in params)
    weights = weights.astype(mx.float32)
    if getattr(model, "training", False):
        loss, _ = _fused_head_ce(dequantize)(hidden, targets, weights, *params)
    else:
        rows, *_ = _row_losses(hidden, targets, dequantize, params, with_grad=False)
        loss = (rows * weights).sum()
    return loss, weights.sum()


def _online_softmax(
    h: mx.array, dequantize: Callable[..., mx.array], params: tuple[mx.array, ...], with_grad: bool
) -> tuple[mx.array, mx.array, mx.array | None]:
    """Row max ``m``, sum ``s`` of exp(logits - m) and, with ``with_grad``, ``s * softmax @ W``.

    The logits ``h @ W.T`` are made a vocabulary slice at a time, each slice of W dequantized from
    the codes just before its use (the float head never exists whole: 1.2 GB for the full model),
    and folded into running statistics, rescaled when the running max grows, as in online softmax /
    flash attention. Each slice's statistics are packed into one array on which the next slice
    waits: MLX would otherwise start every slice at once and hold them all together.
    """
    K, d = h.shape
    cols = max(1, HEAD_CHUNK_ELEMENTS // K)
    exp = settings().exp()
    state = None
    for start in range(0, params[0].shape[0], cols):
        rows = [p[start : start + cols] for p in params]
        if state is not None:
            # (The dependency is for ordering only: no gradient flows through it into the codes.)
            rows = [mx.stop_gradient(r) for r in mx.depends(rows, [state])]
        wc = dequantize(*rows, dtype=mx.float32)
        logits = h.astype(mx.float32) @ wc.T
        top = logits.max(axis=-1, keepdims=True)
        if state is not None:
            m_old, s_old = state[:, -1:], state[:, -2:-1]
            top = mx.maximum(top, m_old)
            rescale = exp(m_old - top)
        e = exp(logits - top)
        s = e.sum(axis=-1, keepdims=True)
        parts = [s, top]
        if with_grad:
            acc = e @ wc
            parts.insert(0, acc if state is None else state[:, :d] * rescale + acc)
        if state is not None:
            parts[-2] = s_old * rescale + s
        state = mx.concatenate(parts, axis=1)
    return state[:, -1], state[:, -2], state[:, :d] if with_grad else None


def _row_losses(
    h: mx.array, targets: mx.array, dequantize: Callable[..., mx.array], params: tuple[mx.array, ...], with_grad: bool
):
    """Per-row cross-entropy, row sums, (optionally) ``s * softmax @ W`` and the target rows of W."""
    m, s, acc = _online_softmax(h, dequantize, params, with_grad)
    target_w = dequantize(*(p[targets] for p in params), dtype=mx.float32)
    target_logit = (h.astype(mx.float32) * target_w).sum(axis=-1)
    return m + mx.log(s) - target_logit, s, acc, target_w


@functools.cache
def _fused_head_ce(dequantize: Callable[..., mx.array]):
    """(sum of weighted losses, its gradient w.r.t. ``h``) in one pass over the vocabulary.

    d loss / d h = weight * (softmax @ W - W[target]), from the same exponentials as the loss.
    """

    @mx.custom_function
    def fused(h: mx.array, targets: mx.array, weights: mx.array, *params: mx.array):
        rows, s, acc, target_w = _row_losses(h, targets, dequantize, params, with_grad=True)
        wt = weights[:, None]
        return (rows * weights).sum(), (wt * (acc / s[:, None] - target_w)).astype(h.dtype)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets, weights, *params = primals
        return (
            (cotangents[0] * outputs[1]).astype(h.dtype),
            mx.zeros_like(targets),
            mx.zeros_like(weights),
            *(mx.zeros_like(p) for p in params),
        )

    return fused
