"""Shared-expert mixture of experts: top-k routed SwiGLU experts (stacked weights, gather matmuls)
plus one always-on shared SwiGLU expert scaled by a sigmoid gate."""

from __future__ import annotations

import math

from bit_axon.backend import settings
from bit_axon.config import BitAxonConfig

import mlx.core as mx
import mlx.nn as nn


class ExpertStack:
    """Sizes of a module whose ``weight`` stacks ``num_experts`` (out, in) weights, in float or packed.

    A mixin for :class:`SwitchLinear` and the quantized expert stacks, which define ``input_dims``
    (the stored width, unpacked)."""

    weight: mx.array

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]


class SwitchLinear(ExpertStack, nn.Module):
    """``num_experts`` linear maps stored as one (X, out, in) weight, applied per token by index."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        bound = 1 / math.sqrt(input_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))

    @property
    def input_dims(self) -> int:
        return self.weight.shape[2]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


def expert_blocks(num_pairs: int, num_experts: int) -> int:
    """Rows per block for the blocked expert layout, or 0 for one gathered matmul row per pair:
    the backend's choice (``Backend.expert_block_rows``; CPU only, off with the CPU fast paths)."""
    return settings().expert_block_rows(num_pairs, num_experts)


def block_layout(flat: mx.array, num_experts: int, block: int) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Place (token, expert) pairs in expert-contiguous blocks of ``block`` rows (static shapes).

    ``flat`` (P,) is the expert of each pair. Each expert's pairs fill ceil(count / block) blocks,
    the last one zero-padded; the number of blocks is bounded by ceil((P + X (block - 1)) / block),
    so shapes depend on P only and the layout compiles. Returns ``slot`` (P,) the row of each pair,
    ``source`` (S,) the pair in each row, ``filled`` (S,) whether a row holds a pair, and
    ``block_expert`` (S / block,) the expert of each block (S = blocks * block).
    """
    P = flat.size
    n_blocks = -(-(P + num_experts * (block - 1)) // block)
    counts = (flat[:, None] == mx.arange(num_experts)).sum(axis=0)
    padded = (counts + block - 1) // block * block
    first_row = mx.cumsum(padded) - padded  # each expert's first row
    order = mx.argsort(flat)
    experts = flat[order]
    rank = mx.arange(P) - (mx.cumsum(counts) - counts)[experts]  # position within its expert
    slot = mx.zeros((P,), mx.int32).at[order].add((first_row[experts] + rank).astype(mx.int32))
    rows = n_blocks * block
    source = mx.zeros((rows,), mx.int32).at[slot].add(mx.arange(P, dtype=mx.int32))
    filled = mx.zeros((rows,), mx.int32).at[slot].add(1) > 0
    # Block i belongs to the expert whose row range holds its first row; trailing spare blocks
    # (all padding) go to the last expert.
    starts = mx.arange(n_blocks) * block
    block_expert = mx.minimum(((first_row + padded)[None] <= starts[:, None]).sum(axis=-1), num_experts - 1)
    return slot, source, filled, block_expert


class SwitchGLU(nn.Module):
    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def _glu(self, rows: mx.array, experts: mx.array) -> mx.array:
        gate = self.gate_proj(rows, experts, True)
        # The up projection waits for the gate's: where expert weights are dequantized per call
        # (4-bit bases on the CPU), MLX would otherwise be free to build both float stacks first,
        # nearly doubling the forward peak (bench/README.md, "Expert ordering").
        (rows,) = mx.depends([rows], [gate])
        h = nn.silu(gate) * self.up_proj(rows, experts, True)
        return self.down_proj(h, experts, True)

    def __call__(self, x: mx.array, indices: mx.array, block: int | None = None) -> mx.array:
        """x (…, H), indices (…, k) -> (…, k, H).

        ``block`` forces the layout (0: one row per pair; > 0: expert blocks of that many rows);
        by default :func:`expert_blocks` picks it.
        """
        lead, k = indices.shape[:-1], indices.shape[-1]
        H = x.shape[-1]
        flat = indices.flatten()
        x = x.reshape(-1, H)
        if block is None:
            block = expert_blocks(flat.size, self.gate_proj.num_experts)
        if block:
            slot, source, filled, block_expert = block_layout(flat, self.gate_proj.num_experts, block)
            rows = (x[source // k] * filled[:, None].astype(x.dtype)).reshape(-1, block, H)
            out = self._glu(rows, block_expert).reshape(-1, H)[slot]
        else:
            # Group the (token, expert) pairs by expert so each expert's rows form one contiguous matmul.
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            out = self._glu(x[:, None][order // k], flat[order])[inverse]
        return out.reshape(*lead, k, H)


class SwiGLU(nn.Module):
    def __init__(self, input_dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(input_dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(input_dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, input_dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Softmax over experts, then the top-k experts with their (unrenormalised) softmax weights."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(probs, indices, axis=-1)
    return indices, weights


class SharedExpertMoE(nn.Module):
    def __init__(self, config: BitAxonConfig):
        super().__init__()
        H, F, X = config.hidden_dim, config.moe_intermediate_dim, config.moe_num_experts
        self.top_k = config.moe_top_k
        self.gate = nn.Linear(H, X, bias=False)
        self.switch_mlp = SwitchGLU(H, F, X)
        if config.moe_shared_expert:
            self.shared_expert = SwiGLU(H, F)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = route(self.gate(x), self.top_k)
        routed = self.switch_mlp(x, indices)
        y = (routed * weights[..., None].astype(routed.dtype)).sum(axis=-2)
        if "shared_expert" in self:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y
