"""The training peak, estimated from the model's formats and shapes before a run starts.

The estimate adds what lives through a step: the base weights (their stored bytes: packed 4-bit
codes and scales, or floats), the adapters with their gradients and AdamW's two moments (and the
accumulated gradients when ``grad_accum_steps > 1``), and the larger of two phases:

- the vocabulary head: the fused head + cross-entropy (``training.losses``) makes the logits a
  vocabulary slice at a time, each slice's weight dequantized just before its use; a few slices are
  in flight at once;
- the layers' saved activations: without recomputation every layer's, taken as the inputs and
  outputs of its matmuls (expert matmuls once per routed token), the attention scores of its
  window and the SSM's per-token states; with recomputation (``grad_checkpoint``) each layer's
  input, plus one layer's activations while it is recomputed in the backward pass.

Without recomputation the two phases overlap (the head runs while every activation is held), so
they add. The coefficients (how many copies of each tensor the autodiff graph holds, and how many
head slices are in flight) are calibrated against measured peaks in ``bench/memory.py``; the bench
README records how close the estimate comes.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from bit_axon.quantization.base import find_base
from bit_axon.training.config import TrainingConfig
from bit_axon.training.losses import HEAD_CHUNK_ELEMENTS, TARGET_BUCKET

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

FLOAT_BYTES = 4  # activations and dequantized weights are float32 on the CPU path
# Calibrated against measured peaks (see the module docstring).
HEAD_SLICES_IN_FLIGHT = 6
HEAD_WEIGHT_COPIES = 1.2  # a dequantized slice and the temporaries that make it
HEAD_LOGIT_COPIES = 1.5  # a slice's logits and their exponentials
MATMUL_COPIES = 1.5  # saved copies of each matmul's input and output
SCORE_COPIES = 1.0  # saved copies of the attention scores
SSM_STATE_COPIES = 2.0  # saved copies of the SSM's per-token (d_inner x d_state) terms
RECOMPUTE_COPIES = 1.5  # a recomputed layer's activations and their gradients


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated training peak in bytes and what it is made of (``parts`` sums to ``total_bytes``)."""

    total_bytes: int
    parts: dict[str, int]


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer holds for the backward pass, by kind."""

    matmuls: float
    scores: float
    ssm_states: float
    input: float

    @property
    def total(self) -> float:
        return self.matmuls + self.scores + self.ssm_states


def _nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def _top_k(layer: nn.Module) -> int:
    """Experts per token of the layer's mixture of experts (Bit-Axon's ``top_k``, mlx-lm's names)."""
    for _, module in layer.named_modules():
        for name in ("top_k", "num_experts_per_tok"):
            value = getattr(module, name, None)
            if isinstance(value, int):
                return value
    return 1


def _attention_heads(module: nn.Module) -> int | None:
    for name in ("num_heads", "n_heads", "num_attention_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and hasattr(module, "q_proj"):
            return value
    return None


def layer_activations(layer: nn.Module, batch_size: int, seq_len: int, hidden_dim: int) -> LayerActivations:
    """What one decoder layer saves for its backward pass, for a (batch_size, seq_len) batch."""
    tokens = batch_size * seq_len
    routed = _top_k(layer)
    widths = 0
    scores = 0
    states = 0
    for _, module in layer.named_modules():
        base = find_base(module)
        if base is not None:
            in_dims, out_dims = base.dims()
            widths += (in_dims + out_dims) * (routed if base.kind == "switch" else 1)
        heads = _attention_heads(module)
        if heads is not None:
            window = getattr(module, "window", None) or seq_len
            scores += batch_size * heads * seq_len * min(seq_len, window)
        if hasattr(module, "A_log"):  # a selective-scan mixer: A is (d_inner, d_state)
            states += math.prod(module.A_log.shape) * tokens
    return LayerActivations(
        matmuls=MATMUL_COPIES * widths * tokens * FLOAT_BYTES,
        scores=SCORE_COPIES * scores * FLOAT_BYTES,
        ssm_states=SSM_STATE_COPIES * states * FLOAT_BYTES,
        input=tokens * hidden_dim * FLOAT_BYTES,
    )


def head_workspace(model: nn.Module, targets: int) -> float:
    """Bytes of the fused head + cross-entropy for ``targets`` rows (a few vocabulary slices at once)."""
    head = getattr(model, "output_head", None)
    base = None if head is None else find_base(head)
    if base is None:
        return 0.0
    d, vocab = base.dims()  # (input, output) of the head: the hidden size and the vocabulary
    cols = max(1, HEAD_CHUNK_ELEMENTS // targets)
    in_flight = min(HEAD_SLICES_IN_FLIGHT, math.ceil(vocab / cols))
    weight_rows = min(vocab, in_flight * cols)
    return (
        HEAD_WEIGHT_COPIES * weight_rows * d * FLOAT_BYTES
        + HEAD_LOGIT_COPIES * in_flight * targets * cols * FLOAT_BYTES
    )


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    # Bit-Axon's ``blocks``; mlx-lm's ``layers``.
    layers = getattr(model, "blocks", None) or getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder layers (.blocks or .layers) to estimate memory for")
    return list(layers)


def _hidden_dim(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for source in (config, getattr(model, "args", None)):
        for name in ("hidden_dim", "hidden_size"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                return value
    raise TypeError(f"cannot tell the hidden size of {type(model).__name__}")


def estimate_training_memory(model: nn.Module, config: TrainingConfig) -> MemoryEstimate:
    """The training peak of ``model`` (quantized and adapted, as it will train) under ``config``.

    The batch is taken as full rows (``batch_size`` x ``max_seq_len`` tokens, every position a
    target): what packing produces on a large dataset, and the most the head does.
    """
    batch, seq = config.batch_size, config.max_seq_len
    targets = max(TARGET_BUCKET, -(-batch * (seq - 1) // TARGET_BUCKET) * TARGET_BUCKET)
    trainable = _nbytes(model.trainable_parameters())
    state_copies = 3 + (1 if config.grad_accum_steps > 1 else 0)  # grads, AdamW m and v, accumulation
    hidden = _hidden_dim(model)
    layers = [layer_activations(layer, batch, seq, hidden) for layer in _decoder_layers(model)]
    head = head_workspace(model, targets)
    parts = {
        "base weights": _nbytes(model.parameters()) - trainable,
        "adapters": trainable,
        "gradients + optimizer state": state_copies * trainable,
    }
    if config.grad_checkpoint:
        recompute = RECOMPUTE_COPIES * max(layer.total for layer in layers)
        parts["layer inputs"] = sum(layer.input for layer in layers)
        if head >= recompute:
            parts["logits/head"] = head
        else:
            parts["activations (one layer recomputed)"] = recompute
    else:
        parts["activations"] = sum(layer.total + layer.input for layer in layers)
        parts["logits/head"] = head
    parts = {name: int(value) for name, value in parts.items()}
    return MemoryEstimate(total_bytes=sum(parts.values()), parts=parts)


def available_memory_bytes() -> int | None:
    """Memory a run can use on this machine: MLX's recommended working set on a GPU, else the
    system's available memory (Linux ``MemAvailable``, else physical memory); None if unknown."""
    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return int(size)
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def describe_memory(estimate: MemoryEstimate, available_bytes: int | None) -> list[str]:
    """Lines for the console: the estimate and its parts, the available memory, and a warning
    with what to change when the estimate does not fit."""
    parts = ", ".join(f"{name} {value / 1e9:.3g}" for name, value in estimate.parts.items() if value)
    line = f"Estimated training peak: {_gb(estimate.total_bytes)} ({parts})"
    line += f"; available: {_gb(available_bytes)}" if available_bytes is not None else "; available memory unknown"
    lines = [line]
    if available_bytes is not None and estimate.total_bytes > available_bytes:
        lines.append(
            f"Warning: the run needs about {_gb(estimate.total_bytes)} but {_gb(available_bytes)} is available; "
            "it may swap or be killed. Lower --batch-size or --max-seq-len, or recompute layers (--grad-checkpoint true)."
        )
    return lines
