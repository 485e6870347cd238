"""Shared-expert mixture of experts: top-k routed SwiGLU experts (stacked weights, gather matmuls)
plus one always-on shared SwiGLU expert scaled by a sigmoid gate."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from bit_axon.config import BitAxonConfig


class SwitchLinear(nn.Module):
    """``num_experts`` linear maps stored as one (X, out, in) weight, applied per token by index."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        bound = 1 / math.sqrt(input_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))

    @property
    def input_dims(self) -> int:
        return self.weight.shape[2]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


class SwitchGLU(nn.Module):
    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (…, H), indices (…, k) -> (…, k, H)."""
        lead, k = indices.shape[:-1], indices.shape[-1]
        H = x.shape[-1]
        # Group the (token, expert) pairs by expert so each expert's rows form one contiguous matmul.
        flat = indices.flatten()
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        rows = x.reshape(-1, 1, H)[order // k]  # (n*k, 1, H)
        experts = flat[order]
        h = nn.silu(self.gate_proj(rows, experts, True)) * self.up_proj(rows, experts, True)
        out = self.down_proj(h, experts, True)[inverse]
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
