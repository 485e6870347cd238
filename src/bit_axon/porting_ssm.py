"""The attention start of the port: an AxonSSM mixer initialised from a source layer's attention.

After "The Mamba in the Llama" (Wang et al., NeurIPS 2024), which copies an attention layer's
V, K, Q and O into a Mamba-2 mixer's x, B, C and out projections. Bit-Axon's mixer is Mamba-1
style (``bit_axon.layers.ssm``): ``in_proj -> (x, z)``; a depthwise conv then SiLU on x; B, C and dt
computed by ``x_proj`` from that inner x (not from the hidden state); one B and one C of d_state N
shared by all channels; ``y = scan(x, dt, A, B, C) + D x``; ``out_proj(y * SiLU(z))``. With h the
normalised layer input (the source's input_layernorm, copied into ``input_norm``), V/K/Q/O the
source's projections (k/v heads repeated to one per query head), the mapping is:

* x <- V. ``in_proj``'s x rows are V (channel c = inner coordinate c; channels beyond the inner width
  are "spare" with zero rows). The conv is the identity with a scale and an offset: the lag-0 tap
  alpha, the others 0, bias b, so the inner x is SiLU(alpha V h + b). b is large (8, times
  1 + 0.25 xi with random signs xi so that b is not a head-repeated vector), which keeps SiLU in its
  linear range: x = SiLU(b) + SiLU'(b) alpha V h up to < 1 % for |alpha V h| <= 2, and alpha is set
  from the calibration tokens so that 99.9 % of |alpha V h| are <= 2. So x = G [h; 1] with
  G = [SiLU'(b) alpha V, SiLU(b)]: the value projection plus a constant channel pattern.
* B <- K, C <- Q. Summed over heads, the attention scores are q_t . k_s / sqrt(d) = h_t^T M h_s with
  M = Q^T K / sqrt(d). B and C can only see V h (they come from x), so M is first restricted to the
  row space of V (P = V^+ V): P M P = U S W^T (SVD). State 0 is a constant (B_0 = C_0 = sqrt(beta)),
  states 1..N-1 hold the top N-1 singular directions: C_n = sqrt(s_n) u_n . h, B_n = sqrt(s_n) w_n . h.
  ``x_proj`` = [T_B; T_C] G^+ (least squares through the pseudo-inverse: exact for the K/Q parts in
  V's row space, and for the constant when b lies outside G's value columns, as it does with GQA or
  spare channels). So C_t . B_s = beta + the rank-(N-1) part of h_t^T P M P h_s: a linear attention
  whose weights are "1 + score" (the first-order form of exp(score)) instead of a softmax. Lost:
  the softmax, RoPE, the per-head scores (one score for all heads), the score directions beyond N-1.
* dt: the dt row of ``x_proj`` is 0 and ``dt_proj.bias`` = softplus^-1(dt0), so dt = dt0 for every
  token; A = -1 (``A_log`` = 0) for every state, D = 0. The state is an exponential moving average
  over about 1/dt0 tokens: y_t = sum_s dt0 exp(-dt0 (t - s)) (C_t . B_s) x_s, i.e. attention weights
  normalised over the recent 1/dt0 tokens instead of by a softmax.
* z gate: SiLU(z) multiplies y. Every z row is rho u (rho = 4) with u the direction of the normalised
  hidden state whose projection is most nearly constant (u = Cov^-1 mean, ridge-regularised, scaled
  so that u . h averages 1 on the calibration tokens): SiLU(z) ~ SiLU(4) within the measured spread
  (``gate_snr`` = mean / std of u . h, reported per layer).
* out_proj <- O: for head h, O_h V_h maps the attention-weighted hidden states to the head's output;
  through x it is T_O,h G^+ with T_O,h = [O_h V_h, 0] (the constant channels cancelled). out_proj =
  sum_h lambda_h T_O,h G^+.
* Fitted on calibration tokens (``SourceCalibration``: random tokens run through the source itself):
  dt0 from a grid, beta from a grid and lambda_h by least squares, minimising the squared error
  between the SSM's output and the source attention's output. lambda = 0 (the identity start) is
  one of the candidates, so on the calibration tokens the attention start's error is never larger
  than the identity start's; ``explained`` (1 - relative squared error) is reported per layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bit_axon.layers.scan import selective_scan
from bit_axon.layers.ssm import AxonSSM

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

if TYPE_CHECKING:
    from bit_axon.porting import SourceConfig

SSM_INITS = ("identity", "attention")
CONV_OFFSET = 8.0  # b: SiLU(8 +- 2) is within 1 % of linear
OFFSET_SPREAD = 0.25  # b = CONV_OFFSET * (1 + 0.25 * random signs): not a head-repeated vector
VALUE_SPAN = 2.0  # alpha: 99.9 % of |alpha V h| stay below this
GATE_LEVEL = 4.0  # rho: z ~ 4, SiLU(z) ~ 3.93, nearly linear
GATE_RIDGE = 1e-2  # ridge of the gate direction, relative to the mean variance of h
DT_GRID = (1.0, 1 / 4, 1 / 16, 1 / 64, 1 / 256)
BETA_GRID = (0.0, 1.0, 4.0, 16.0, 64.0)
CALIBRATION_ROW = 256  # tokens per calibration sequence


@dataclass
class AttentionSSMFit:
    """How one SSM was fitted to its source attention (``porting.json``, ``ssm_fits``)."""

    source_layer: int
    dt: float
    beta: float
    head_scales: list[float]
    value_scale: float  # alpha
    gate_snr: float
    score_energy: float  # share of ||P M P||_F^2 in the N-1 kept directions
    explained: float  # 1 - ||ssm - attention||^2 / ||attention||^2 on the calibration tokens
    notes: list[str] = field(default_factory=list)


def _floating(v: mx.array) -> bool:
    return mx.issubdtype(v.dtype, mx.floating)


class SourceCalibration:
    """Random tokens run through the source model, one layer at a time in float32.

    ``layers(wanted)`` yields each wanted layer index after setting ``h`` (the layer's normalised
    input, (rows, L, S)) and ``attention`` (its attention output on ``h``, causal, RoPE and all).
    """

    def __init__(self, model: nn.Module, n_tokens: int, seed: int, vocab_size: int):
        self.model = model
        rows = max(1, n_tokens // CALIBRATION_ROW)
        length = min(n_tokens, CALIBRATION_ROW)
        self.ids = mx.random.randint(0, vocab_size, (rows, length), key=mx.random.key(seed + 1))
        self.h: mx.array | None = None
        self.attention: mx.array | None = None

    def layers(self, wanted: list[int]) -> Iterator[int]:
        if not wanted:
            return
        inner = self.model.model
        x = inner.embed_tokens(self.ids).astype(mx.float32)
        for j, layer in enumerate(inner.layers[: max(wanted) + 1]):
            stored = layer.parameters()
            layer.update(tree_map(lambda v: v.astype(mx.float32) if _floating(v) else v, stored))
            if j in wanted:
                self.h = layer.input_layernorm(x)
                self.attention = layer.self_attn(self.h, mask="causal")
                mx.eval(self.h, self.attention)
                yield j
            x = layer(x, mask="causal")
            mx.eval(x)
            layer.update(stored)
        self.h = self.attention = None


def ssm_features(ssm: AxonSSM, h: mx.array, c_mask: mx.array | None = None) -> mx.array:
    """``y * SiLU(z)``: what ``out_proj`` receives, as ``AxonSSM.__call__`` computes it (no cache, no
    packing); ``c_mask`` (N,) zeroes states of C, to take the scan's terms apart."""
    N = ssm.d_state
    xs, z = mx.split(ssm.in_proj(h), 2, axis=-1)
    xs = nn.silu(ssm._conv(xs, None, None))
    B, C, dt = mx.split(ssm.x_proj(xs), [N, 2 * N], axis=-1)
    if c_mask is not None:
        C = C * c_mask
    dt = nn.softplus(ssm.dt_proj(dt))
    y, _ = selective_scan(xs, dt, -mx.exp(ssm.A_log), B, C, ssm.D)
    return y * nn.silu(z)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _dsilu(x: np.ndarray) -> np.ndarray:
    s = 1 / (1 + np.exp(-x))
    return s * (1 + x * (1 - s))


def _gate_direction(h: np.ndarray) -> tuple[np.ndarray, float]:
    """u with u . h ~ 1 for every token (most constant projection), and its mean / std."""
    mean = h.mean(axis=0)
    cov = np.cov(h.T)
    ridge = GATE_RIDGE * float(np.trace(cov)) / cov.shape[0] + 1e-12
    u = np.linalg.solve(cov + ridge * np.eye(cov.shape[0]), mean)
    proj = h @ u
    mu = float(proj.mean())
    return u / mu, mu / float(proj.std() + 1e-12)


def _place_cols(matrix: np.ndarray, residual_index: np.ndarray, width: int) -> np.ndarray:
    """(rows, S) source-space columns -> (rows, H) through the residual map."""
    out = np.zeros((matrix.shape[0], width), np.float32)
    keep = np.nonzero(residual_index >= 0)[0]
    out[:, residual_index[keep]] = matrix[:, keep]
    return out


def _place_rows(matrix: np.ndarray, residual_index: np.ndarray, width: int) -> np.ndarray:
    return _place_cols(matrix.T, residual_index, width).T


def attention_to_ssm(
    ssm: AxonSSM,
    w: dict[str, np.ndarray],
    source: SourceConfig,
    calibration: SourceCalibration,
    residual_index: np.ndarray,
    rng: np.random.Generator,
    source_layer: int = -1,
) -> AttentionSSMFit:
    """Set ``ssm``'s weights from one attention layer (module docstring) and fit its scales.

    ``w``: the source's ``q`` (inner, S), ``k`` and ``v`` (repeated to inner rows) and ``o`` (S, inner).
    """
    E, N, K = ssm.in_proj.weight.shape[0] // 2, ssm.d_state, ssm.d_conv
    H = ssm.in_proj.weight.shape[1]
    S, inner, d = source.hidden_size, source.inner_dim, source.head_dim
    heads = source.num_attention_heads
    notes = []
    m = min(E, inner)
    if m < inner:
        notes.append(f"SSM width {E} < attention width {inner}: values of inner coordinates >= {E} dropped")
    h = np.array(calibration.h, dtype=np.float64).reshape(-1, S)
    target = np.array(calibration.attention, dtype=np.float64).reshape(-1, S)
    V = np.zeros((E, S))
    V[:m] = w["v"][:m]

    # x = SiLU(alpha V h + b) = G [h; 1] in SiLU's linear range.
    alpha = VALUE_SPAN / max(float(np.quantile(np.abs(h @ V[:m].T), 0.999)), 1e-6)
    b = CONV_OFFSET * (1 + OFFSET_SPREAD * rng.choice([-1.0, 1.0], size=E))
    G = np.concatenate([(_dsilu(b) * alpha)[:, None] * V, _silu(b)[:, None]], axis=1)  # (E, S + 1)
    G_pinv = np.linalg.pinv(G)

    # The score form, restricted to what x can carry, and its top N - 1 directions.
    M = w["q"][:m].astype(np.float64).T @ w["k"][:m] / math.sqrt(d)
    P = np.linalg.pinv(V[:m]) @ V[:m]
    U, s, Wt = np.linalg.svd(P @ M @ P)
    r = min(N - 1, int((s > s[0] * 1e-6).sum()) if s.size and s[0] > 0 else 0)
    energy = float((s[:r] ** 2).sum() / max((s**2).sum(), 1e-30))
    T_B, T_C = np.zeros((N, S + 1)), np.zeros((N, S + 1))
    T_B[0, S] = T_C[0, S] = 1.0  # state 0: the constant (scaled by sqrt(beta) below)
    T_B[1 : r + 1, :S] = np.sqrt(s[:r])[:, None] * Wt[:r]
    T_C[1 : r + 1, :S] = np.sqrt(s[:r])[:, None] * U[:, :r].T
    W_B, W_C = T_B @ G_pinv, T_C @ G_pinv  # (N, E)

    gate_u, gate_snr = _gate_direction(h)
    in_proj = np.zeros((2 * E, S), np.float32)
    in_proj[:E] = V
    in_proj[E:] = GATE_LEVEL * gate_u
    ssm.in_proj.weight = mx.array(_place_cols(in_proj, residual_index, H))
    conv = np.zeros((E, K, 1), np.float32)
    conv[:, K - 1, 0] = alpha
    ssm.conv1d.weight = mx.array(conv)
    ssm.conv1d.bias = mx.array(b.astype(np.float32))
    ssm.A_log = mx.zeros((E, N))
    ssm.D = mx.zeros((E,))

    # out_proj for head g: T_O,g G^+, T_O,g = [O_g V_g, 0].
    head_outs = []
    for g in range(heads):
        cols = np.arange(g * d, min((g + 1) * d, m))
        T_O = np.zeros((S, S + 1))
        if cols.size:
            T_O[:, :S] = w["o"][:, cols].astype(np.float64) @ V[cols]
        head_outs.append(T_O @ G_pinv)  # (S, E)

    def set_x_proj(beta: float) -> None:
        scale = np.ones((N, 1))
        scale[0] = math.sqrt(beta)
        dt_rows = np.zeros((ssm.dt_rank, E))
        ssm.x_proj.weight = mx.array(np.concatenate([W_B * scale, W_C * scale, dt_rows]).astype(np.float32))

    # The block's input in Bit-Axon's residual width: h through P (its norm keeps the first S coordinates).
    rows, length = calibration.h.shape[:2]
    h_rows = mx.array(_place_cols(h.astype(np.float32), residual_index, H).reshape(rows, length, H))
    constant_only = mx.array((np.arange(N) == 0).astype(np.float32))
    best: tuple[float, float, float, np.ndarray] | None = None
    target_energy = float((target**2).sum())
    set_x_proj(1.0)
    for dt0 in DT_GRID:
        ssm.dt_proj.bias = mx.full((E,), math.log(math.expm1(dt0)))
        f0 = np.array(ssm_features(ssm, h_rows, constant_only), dtype=np.float64).reshape(-1, E)
        f1 = np.array(ssm_features(ssm, h_rows, 1 - constant_only), dtype=np.float64).reshape(-1, E)
        # Head g's output from the constant state is f0 @ o_g^T, from the score states f1 @ o_g^T; the
        # least squares needs only their inner products, taken through the features' Gram matrices.
        grams = {"00": f0.T @ f0, "01": f0.T @ f1, "11": f1.T @ f1}
        inner_products = {
            key: np.array([[float(((o_g @ c) * o_h).sum()) for o_h in head_outs] for o_g in head_outs])
            for key, c in grams.items()
        }
        t0, t1 = target.T @ f0, target.T @ f1
        r0 = np.array([float((o * t0).sum()) for o in head_outs])
        r1 = np.array([float((o * t1).sum()) for o in head_outs])
        for beta in BETA_GRID:
            gram = beta**2 * inner_products["00"] + beta * (inner_products["01"] + inner_products["01"].T)
            gram = gram + inner_products["11"]
            rhs = beta * r0 + r1
            lam = np.linalg.lstsq(gram, rhs, rcond=1e-10)[0]
            err = target_energy - 2 * float(lam @ rhs) + float(lam @ gram @ lam)
            if best is None or err < best[0]:
                best = (err, dt0, beta, lam)
    assert best is not None
    err, dt0, beta, lam = best
    if err > target_energy:  # cannot happen with least squares (lambda = 0 is feasible); kept as a guard
        lam, err = np.zeros(heads), target_energy
    set_x_proj(beta)
    ssm.dt_proj.bias = mx.full((E,), math.log(math.expm1(dt0)))
    out = sum(lam[g] * head_outs[g] for g in range(heads))
    ssm.out_proj.weight = mx.array(_place_rows(np.asarray(out, np.float32), residual_index, H))
    return AttentionSSMFit(
        source_layer=source_layer,
        dt=dt0,
        beta=beta,
        head_scales=[float(v) for v in lam],
        value_scale=alpha,
        gate_snr=gate_snr,
        score_energy=energy,
        explained=1.0 - err / max(target_energy, 1e-30),
        notes=notes,
    )


def fit_summary(fits: dict[int, Any]) -> str:
    """One line: the mean explained share of the attention output over the fitted SSM layers."""
    if not fits:
        return "no SSM fitted"
    values = [f["explained"] if isinstance(f, dict) else f.explained for f in fits.values()]
    return f"{len(values)} SSM layers from attention, explained {np.mean(values):.2f} of the attention output"
