"""Selective scan for the Mamba-style SSM.

The recurrence per channel e and state n is ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t
+ D x_t``. ``sequential_scan`` is the plain loop over time and the reference for tests.

``selective_scan`` computes the same thing with a two-level linear scan: the sequence is cut into
chunks of ``T ~ sqrt(L)`` steps, all chunks are scanned at once (``T`` vectorised steps), then the
chunk-end states are carried across chunks (``L / T`` steps): O(L E N) work, ``O(sqrt(L))`` graph
nodes, no loop over channels or states.

Its gradient is written by hand (``mx.custom_function``): the backward pass of a linear recurrence is
the same recurrence run in reverse, so it reuses the scan, and everything else is a handful of
whole-tensor products. Autodiff through the loop would instead pay, for every sliced time step, a
full-size scatter in the backward pass (O(L^2 E) — slower than the sequential loop at L >= 512).
The backward recomputes the states instead of storing them, and long sequences are processed in
blocks of bounded size, so the (L, E, N) state tensor never exists whole for long inputs.
"""

from __future__ import annotations

import math

from bit_axon.backend import settings
from bit_axon.layers.scan_kernels import fused_scan, supports_fused_scan

import mlx.core as mx

# Elements of one (B, block, E, N) state tensor; bounds the scan's working set (~64 MB in float32).
_BLOCK_ELEMENTS = 1 << 24


def linear_scan(a: mx.array, u: mx.array, h0: mx.array) -> mx.array:
    """All states of ``h_t = a_t * h_{t-1} + u_t`` for (b, L, E, N) ``a``/``u`` and (b, E, N) ``h0``."""
    b, L, E, N = a.shape
    T = max(1, math.isqrt(L))
    n_chunks = -(-L // T)
    pad = n_chunks * T - L
    if pad:
        a = mx.concatenate([a, mx.ones((b, pad, E, N), a.dtype)], axis=1)
        u = mx.concatenate([u, mx.zeros((b, pad, E, N), u.dtype)], axis=1)
    a = a.reshape(b, n_chunks, T, E, N)
    u = u.reshape(b, n_chunks, T, E, N)

    local = [u[:, :, 0]]
    for t in range(1, T):
        local.append(a[:, :, t] * local[-1] + u[:, :, t])
    local_h = mx.stack(local, axis=2)
    cum_a = mx.cumprod(a, axis=2)

    carries = []
    carry = h0
    for c in range(n_chunks):
        carries.append(carry)
        carry = cum_a[:, c, -1] * carry + local_h[:, c, -1]
    h = local_h + cum_a * mx.stack(carries, axis=1)[:, :, None]
    return h.reshape(b, n_chunks * T, E, N)[:, :L]


def _discretize(x, dt, A, B, keep):
    a = settings().exp()(dt[..., None] * A) * keep[..., None, None]  # (b, L, E, N)
    u = (dt * x)[..., None] * B[:, :, None, :]
    return a, u


@mx.custom_function
def _scan_block(x, dt, A, B, C, D, h0, keep):
    a, u = _discretize(x, dt, A, B, keep)
    h = linear_scan(a, u, h0)
    y = (h @ C[..., None]).squeeze(-1) + D * x
    return y, h[:, -1]


@_scan_block.vjp
def _scan_block_vjp(primals, cotangents, outputs):
    x, dt, A, B, C, D, h0, keep = primals
    dy, dh_last = cotangents
    a, u = _discretize(x, dt, A, B, keep)
    h = linear_scan(a, u, h0)  # recomputed rather than stored
    h_prev = mx.concatenate([h0[:, None], h[:, :-1]], axis=1)

    # g_t = dL/dh_t (total) = dy_t C_t + a_{t+1} g_{t+1}: the forward scan run backwards in time.
    direct = dy[..., None] * C[:, :, None, :]
    direct[:, -1] = direct[:, -1] + dh_last
    a_next = mx.concatenate([a[:, 1:], mx.zeros_like(a[:, :1])], axis=1)
    g = linear_scan(a_next[:, ::-1], direct[:, ::-1], mx.zeros_like(h0))[:, ::-1]

    da = g * h_prev * a  # d/d(dt A) of a = exp(dt A), times the path's cotangent
    gB = (g * B[:, :, None, :]).sum(-1)  # (b, L, E): sum_n g B
    d_dt = (da * A).sum(-1) + gB * x
    dx = dy * D + gB * dt
    dA = (da * dt[..., None]).sum(axis=(0, 1))
    dB = ((g * (dt * x)[..., None]).sum(axis=2))
    dC = (dy[..., None] * h).sum(axis=2)
    dD = (dy * x).sum(axis=(0, 1))
    dh0 = g[:, 0] * a[:, 0]
    return dx, d_dt, dA, dB, dC, dD, dh0, mx.zeros_like(keep)


def _time_major(*arrays: mx.array) -> list[mx.array]:
    return [a.swapaxes(0, 1) for a in arrays]


def _decay(dt_t: mx.array, A: mx.array, keep_t: mx.array) -> mx.array:
    return settings().exp()(dt_t[..., None] * A) * keep_t[:, None, None]


@mx.custom_function
def _stepwise_scan(x, dt, A, B, C, D, h0, keep):
    L = x.shape[1]
    T = max(1, math.isqrt(L))
    xs, dts, Bs, Cs, ks = _time_major(x, dt, B, C, keep)
    h = h0
    ys, checkpoints = [], []
    for t in range(L):
        if t % T == 0:
            checkpoints.append(h)
        h = _decay(dts[t], A, ks[t]) * h + (dts[t] * xs[t])[..., None] * Bs[t][:, None, :]
        ys.append((h @ Cs[t][..., None]).squeeze(-1))
    # The chunk-start states go out as a third output so the backward pass can restart from them.
    return mx.stack(ys, axis=1) + D * x, h, mx.stack(checkpoints)


@_stepwise_scan.vjp
def _stepwise_scan_vjp(primals, cotangents, outputs):
    x, dt, A, B, C, D, h0, keep = primals
    dy, dh_last = cotangents[0], cotangents[1]
    checkpoints = outputs[2]
    L = x.shape[1]
    T = max(1, math.isqrt(L))
    xs, dts, Bs, Cs, ks, dys = _time_major(x, dt, B, C, keep, dy)
    d_drive, d_dt_decay, dB, dC = [None] * L, [None] * L, [None] * L, [None] * L
    dA = mx.zeros_like(A)
    g = dh_last  # dL/dh_t, carried backwards in time
    for c in reversed(range(checkpoints.shape[0])):
        start, stop = c * T, min(L, (c + 1) * T)
        states, decays = [checkpoints[c]], []
        for t in range(start, stop):  # recompute this chunk's states from its checkpoint
            decays.append(_decay(dts[t], A, ks[t]))
            states.append(decays[-1] * states[-1] + (dts[t] * xs[t])[..., None] * Bs[t][:, None, :])
        for i in reversed(range(stop - start)):
            t = start + i
            a, h_t, h_prev = decays[i], states[i + 1], states[i]
            g = g + dys[t][..., None] * Cs[t][:, None, :]
            dC[t] = (dys[t][:, None, :] @ h_t).squeeze(1)
            d_drive[t] = (g @ Bs[t][..., None]).squeeze(-1)  # d/d(dt x)
            dB[t] = ((dts[t] * xs[t])[:, None, :] @ g).squeeze(1)
            d_exponent = g * h_prev * a  # d/d(dt A)
            d_dt_decay[t] = (d_exponent * A).sum(-1)
            dA = dA + (d_exponent * dts[t][..., None]).sum(0)
            g = a * g
    d_drive = mx.stack(d_drive, axis=1)
    d_dt = mx.stack(d_dt_decay, axis=1) + d_drive * x
    dx = dy * D + d_drive * dt
    dD = (dy * x).sum(axis=(0, 1))
    return dx, d_dt, dA, mx.stack(dB, axis=1), mx.stack(dC, axis=1), dD, g, mx.zeros_like(keep)


def choose_scan_method(b: int, E: int, N: int) -> str:
    """"fused" on a GPU backend whose kernel has been verified, else the faster pure-MLX scan
    (the backend's choice: ``Backend.scan_method``)."""
    return settings().scan_method(b * E * N, supports_fused_scan(N))


def selective_scan(
    x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, D: mx.array,
    h0: mx.array | None = None,
    reset: mx.array | None = None,
    block_size: int | None = None,
    method: str | None = None,
) -> tuple[mx.array, mx.array]:
    """Scan ``x`` (b, L, E) with step sizes ``dt`` (b, L, E), ``A`` (E, N), ``B``/``C`` (b, L, N).

    ``reset`` (b, L) marks positions where a new packed segment starts: the state restarts from zero
    there. Returns ``y`` (b, L, E) and the final state (b, E, N). ``method`` is "fused" (one GPU kernel
    per direction, ``scan_kernels``), "chunked" (vectorised two-level scan, for GPUs without a
    verified kernel and for small states), "stepwise" (one cache-resident step at a time, best for
    large states on the CPU) or None to choose by device and size; all have hand-written gradients
    that recompute states instead of storing them.
    """
    b, L, E = x.shape
    N = A.shape[-1]
    if h0 is None:
        h0 = mx.zeros((b, E, N), dtype=x.dtype)
    keep = mx.ones((b, L), dtype=x.dtype) if reset is None else 1.0 - reset.astype(x.dtype)
    method = method or choose_scan_method(b, E, N)
    if method == "fused":
        return fused_scan(x, dt, A, B, C, D, h0, keep)
    if method == "stepwise":
        y, h, _ = _stepwise_scan(x, dt, A, B, C, D, h0, keep)
        return y, h
    if method != "chunked":
        raise ValueError(f"Unknown scan method {method!r}; use 'fused', 'chunked' or 'stepwise'")
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // (b * E * N))
    ys = []
    h = h0
    for start in range(0, L, block_size):
        sl = slice(start, start + block_size)
        y, h = _scan_block(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, h, keep[:, sl])
        ys.append(y)
    return (ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)), h


def sequential_scan(
    x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, D: mx.array,
    h0: mx.array | None = None,
    reset: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The recurrence one step at a time: the reference ``selective_scan`` must match."""
    b, L, E = x.shape
    h = mx.zeros((b, E, A.shape[-1]), dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(L):
        decay = mx.exp(dt[:, t, :, None] * A)
        if reset is not None:
            decay = mx.where(reset[:, t, None, None], 0.0, decay)
        h = decay * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return mx.stack(ys, axis=1), h
