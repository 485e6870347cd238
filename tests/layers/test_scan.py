import bit_axon  # noqa: F401  (BLAS preload before mlx use)
from bit_axon.layers.scan import selective_scan, sequential_scan

import mlx.core as mx
import numpy as np
import pytest


def _inputs(b=2, L=37, E=6, N=4, seed=0):
    mx.random.seed(seed)
    x = mx.random.normal((b, L, E))
    dt = mx.log1p(mx.exp(mx.random.normal((b, L, E))))  # softplus: positive steps, some large
    A = -mx.exp(mx.random.normal((E, N)))
    B = mx.random.normal((b, L, N))
    C = mx.random.normal((b, L, N))
    D = mx.random.normal((E,))
    h0 = mx.random.normal((b, E, N))
    return x, dt, A, B, C, D, h0


METHODS = [("chunked", None), ("chunked", 5), ("chunked", 16), ("stepwise", None)]


@pytest.mark.parametrize("L", [1, 7, 37, 64])
@pytest.mark.parametrize("method, block_size", METHODS)
def test_scan_matches_sequential_recurrence(L, method, block_size):
    x, dt, A, B, C, D, h0 = _inputs(L=L)
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D, h0=h0)
    y, h = selective_scan(x, dt, A, B, C, D, h0=h0, block_size=block_size, method=method)
    np.testing.assert_allclose(np.array(y), np.array(y_ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(h), np.array(h_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["chunked", "stepwise"])
def test_scan_restarts_state_at_resets(method):
    x, dt, A, B, C, D, h0 = _inputs(L=23)
    reset = mx.zeros((2, 23), dtype=mx.bool_)
    reset[:, 0] = True
    reset[0, 9] = True
    reset[1, 17] = True
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D, h0=h0, reset=reset)
    y, h = selective_scan(x, dt, A, B, C, D, h0=h0, reset=reset, block_size=8, method=method)
    np.testing.assert_allclose(np.array(y), np.array(y_ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(h), np.array(h_ref), rtol=1e-4, atol=1e-5)
    # After a reset the output no longer depends on anything before it.
    y_tail, _ = sequential_scan(x[:1, 9:], dt[:1, 9:], A, B[:1, 9:], C[:1, 9:], D)
    np.testing.assert_allclose(np.array(y[:1, 9:]), np.array(y_tail), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["chunked", "stepwise"])
def test_initial_state_gradient_matches_sequential(method):
    x, dt, A, B, C, D, h0 = _inputs(L=11)

    def loss(scan, h0):
        y, h = scan(x, dt, A, B, C, D, h0=h0)
        return (y * y).sum() + h.sum()

    ref = mx.grad(lambda h: loss(sequential_scan, h))(h0)
    got = mx.grad(lambda h: loss(lambda *a, **k: selective_scan(*a, block_size=4, method=method, **k), h))(h0)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method, block_size", [("chunked", None), ("chunked", 6), ("stepwise", None)])
@pytest.mark.parametrize("with_reset", [False, True])
def test_scan_gradients_match_sequential(method, block_size, with_reset):
    x, dt, A, B, C, D, h0 = _inputs(L=19)
    reset = None
    if with_reset:
        reset = mx.zeros((2, 19), dtype=mx.bool_)
        reset[0, 7] = True
        reset[1, 13] = True

    def loss(scan, x, dt, A, B, C, D, **kw):
        y, h = scan(x, dt, A, B, C, D, h0=h0, reset=reset, **kw)
        return (y * y).sum() + (h * h).sum()

    args = (x, dt, A, B, C, D)
    ref = mx.grad(lambda *a: loss(sequential_scan, *a), argnums=tuple(range(6)))(*args)
    got = mx.grad(lambda *a: loss(selective_scan, *a, block_size=block_size, method=method), argnums=tuple(range(6)))(*args)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-3, atol=1e-4)


def test_method_choice_and_unknown_method():
    from bit_axon.layers.scan import choose_scan_method
    from bit_axon.layers.scan_kernels import use_fused_scan

    if mx.default_device() == mx.cpu:
        assert choose_scan_method(1, 2048, 16) == "stepwise"
    if use_fused_scan(4):
        assert choose_scan_method(1, 64, 4) == "fused"
        assert choose_scan_method(1, 64, 3) == "chunked"  # no kernel for a d_state that is not 2^k
    else:
        assert choose_scan_method(1, 64, 4) == "chunked"
    x, dt, A, B, C, D, h0 = _inputs(L=3)
    with pytest.raises(ValueError, match="Unknown scan method"):
        selective_scan(x, dt, A, B, C, D, method="magic")
