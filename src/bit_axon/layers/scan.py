"""Selective scan for the Mamba-style SSM.

The recurrence per channel e and state n is ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t
+ D x_t``. ``sequential_scan`` is the plain loop over time and the reference for tests.
``selective_scan`` computes the same thing with a two-level scan: the sequence is cut into chunks of
``T`` steps, every chunk is scanned at once (a loop of ``T`` vectorised steps), then the chunk-end
states are carried across chunks (a loop of ``L / T`` steps). With ``T ~ sqrt(L)`` that is
``O(sqrt(L))`` small graph nodes instead of ``L``, with the same O(L E N) work and no loop over
channels or states. Long sequences are processed in blocks of bounded size so the (L, E, N) state
tensor never has to exist whole; ``recompute=True`` also keeps only block inputs for the backward pass.
"""

from __future__ import annotations

import math

import mlx.core as mx

# Elements of one (B, block, E, N) state tensor; bounds the scan's working set (~64 MB in float32).
_BLOCK_ELEMENTS = 1 << 24


def _discretize(x, dt, A, B, keep):
    decay = mx.exp(dt[..., None] * A)  # (b, L, E, N)
    if keep is not None:
        decay = decay * keep[..., None, None]
    drive = (dt * x)[..., None] * B[:, :, None, :]
    return decay, drive


def _two_level_scan(decay: mx.array, drive: mx.array, h0: mx.array) -> tuple[mx.array, mx.array]:
    b, L, E, N = decay.shape
    T = max(1, math.isqrt(L))
    n_chunks = -(-L // T)
    pad = n_chunks * T - L
    if pad:
        # Padding steps keep the state as it is (decay 1, no drive), so the last state is unchanged.
        decay = mx.concatenate([decay, mx.ones((b, pad, E, N), decay.dtype)], axis=1)
        drive = mx.concatenate([drive, mx.zeros((b, pad, E, N), drive.dtype)], axis=1)
    decay = decay.reshape(b, n_chunks, T, E, N)
    drive = drive.reshape(b, n_chunks, T, E, N)

    local = [drive[:, :, 0]]
    for t in range(1, T):
        local.append(decay[:, :, t] * local[-1] + drive[:, :, t])
    local_h = mx.stack(local, axis=2)
    cum_decay = mx.cumprod(decay, axis=2)

    carries = []
    carry = h0
    for c in range(n_chunks):
        carries.append(carry)
        carry = cum_decay[:, c, -1] * carry + local_h[:, c, -1]
    h = local_h + cum_decay * mx.stack(carries, axis=1)[:, :, None]
    return h.reshape(b, n_chunks * T, E, N)[:, :L], carry


def _scan_block(x, dt, A, B, C, D, h0, keep):
    decay, drive = _discretize(x, dt, A, B, keep)
    h, h_last = _two_level_scan(decay, drive, h0)
    y = (h @ C[..., None]).squeeze(-1) + D * x
    return y, h_last


_scan_block_recompute = mx.checkpoint(_scan_block)


def selective_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    h0: mx.array | None = None,
    reset: mx.array | None = None,
    block_size: int | None = None,
    recompute: bool = False,
) -> tuple[mx.array, mx.array]:
    """Scan ``x`` (b, L, E) with step sizes ``dt`` (b, L, E), ``A`` (E, N), ``B``/``C`` (b, L, N).

    ``reset`` (b, L) marks positions where a new packed segment starts: the state restarts from zero
    there. Returns ``y`` (b, L, E) and the final state (b, E, N).
    """
    b, L, E = x.shape
    N = A.shape[-1]
    if h0 is None:
        h0 = mx.zeros((b, E, N), dtype=x.dtype)
    keep = None if reset is None else 1.0 - reset.astype(x.dtype)
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // (b * E * N))
    block = _scan_block_recompute if recompute else _scan_block
    ys = []
    h = h0
    for start in range(0, L, block_size):
        sl = slice(start, start + block_size)
        k = None if keep is None else keep[:, sl]
        if recompute and k is None:
            k = mx.ones(x[:, sl].shape[:2], dtype=x.dtype)
        y, h = block(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, h, k)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)), h


def sequential_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
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
