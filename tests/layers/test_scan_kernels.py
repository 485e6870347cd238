"""The fused GPU scan against the plain recurrence. The kernel tests run wherever the default device
is a GPU (CUDA or Metal); a backend becomes the default only once these pass on it (VERIFIED_BACKENDS)."""

import bit_axon  # noqa: F401  (BLAS preload before mlx use)
import cuda_emulator
from bit_axon import BitAxonConfig, backend
from bit_axon.backend import Backend
from bit_axon.layers import scan as scan_module
from bit_axon.layers.scan import selective_scan, sequential_scan
from bit_axon.layers.scan_kernels import DEFAULT_CHUNK, THREADS, fused_scan, kernel_backend
from bit_axon.layers.ssm import AxonSSM

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

on_gpu = pytest.mark.skipif(kernel_backend() is None, reason="the fused scan needs a CUDA or Metal GPU")


def _inputs(b, L, E, N, seed=0):
    mx.random.seed(seed)
    x = mx.random.normal((b, L, E))
    dt = mx.log1p(mx.exp(mx.random.normal((b, L, E))))
    A = -mx.exp(mx.random.normal((E, N)))
    B = mx.random.normal((b, L, N))
    C = mx.random.normal((b, L, N))
    D = mx.random.normal((E,))
    h0 = mx.random.normal((b, E, N))
    reset = mx.random.uniform(shape=(b, L)) < 0.05
    return x, dt, A, B, C, D, h0, reset


def _keep(reset):
    return 1.0 - reset.astype(mx.float32)


# (b, L, E, N, chunk): lengths that are and are not multiples of the chunk, channel counts that do not
# fill the last block, every state size the kernel takes.
SHAPES = [
    (1, 1, 6, 4, 16),
    (2, 37, 6, 4, 16),
    (2, 100, 33, 16, 8),
    (1, 64, 130, 16, 32),
    (2, 45, 20, 32, 16),
    (1, 300, 64, 16, DEFAULT_CHUNK),
    (3, 19, 9, 1, 4),
    (2, 50, 40, 8, 16),
]


@on_gpu
@pytest.mark.parametrize("b, L, E, N, chunk", SHAPES)
def test_fused_forward_matches_sequential(b, L, E, N, chunk):
    x, dt, A, B, C, D, h0, reset = _inputs(b, L, E, N)
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D, h0=h0, reset=reset)
    y, h = fused_scan(x, dt, A, B, C, D, h0, _keep(reset), chunk=chunk)
    np.testing.assert_allclose(np.array(y), np.array(y_ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(h), np.array(h_ref), rtol=1e-4, atol=1e-4)


@on_gpu
@pytest.mark.parametrize("b, L, E, N, chunk", SHAPES)
def test_fused_gradients_match_sequential(b, L, E, N, chunk):
    x, dt, A, B, C, D, h0, reset = _inputs(b, L, E, N, seed=1)
    keep = _keep(reset)
    w_y = mx.random.normal((b, L, E))
    w_h = mx.random.normal((b, E, N))

    def loss(scan, *args):
        y, h = scan(*args)
        return (y * w_y).sum() + (h * h * w_h).sum()

    argnums = tuple(range(7))
    ref = mx.grad(lambda *a: loss(lambda *s: sequential_scan(*s, reset=reset), *a), argnums=argnums)(
        x, dt, A, B, C, D, h0
    )
    got = mx.grad(lambda *a: loss(lambda *s: fused_scan(*s, keep, chunk=chunk), *a), argnums=argnums)(
        x, dt, A, B, C, D, h0
    )
    for name, g, r in zip(["x", "dt", "A", "B", "C", "D", "h0"], got, ref, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=2e-3, atol=2e-3, err_msg=f"d{name}")


@on_gpu
def test_fused_scan_keeps_input_dtype_and_matches_float32():
    x, dt, A, B, C, D, h0, reset = _inputs(2, 40, 24, 16)
    keep = _keep(reset)
    args16 = [a.astype(mx.bfloat16) for a in (x, dt, A, B, C, D, h0)]
    y16, h16 = fused_scan(*args16, keep)
    y32, h32 = fused_scan(*(a.astype(mx.float32) for a in args16), keep)
    assert y16.dtype == mx.bfloat16 and h16.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(y16.astype(mx.float32)), np.array(y32.astype(mx.bfloat16).astype(mx.float32)))


@on_gpu
def test_ssm_layer_fused_matches_chunked_under_compile():
    config = BitAxonConfig.small(ssm_d_state=16)
    mx.random.seed(0)
    layer = AxonSSM(config)
    x = mx.random.normal((2, 48, config.hidden_dim))
    segment_ids = mx.concatenate([mx.zeros((2, 20), mx.int32), mx.ones((2, 28), mx.int32)], axis=1)

    def loss(x):
        return (layer(x, segment_ids=segment_ids) ** 2).mean()

    def run(method):
        original = scan_module.choose_scan_method
        scan_module.choose_scan_method = lambda *a: method
        try:
            step = mx.compile(nn.value_and_grad(layer, loss))
            value, grads = step(x)
            mx.eval(value, grads)
            return value, grads
        finally:
            scan_module.choose_scan_method = original

    v_fused, g_fused = run("fused")
    v_ref, g_ref = run("chunked")
    np.testing.assert_allclose(v_fused.item(), v_ref.item(), rtol=1e-5)
    for (name, g), (_, r) in zip(
        sorted(nn.utils.tree_flatten(g_fused)), sorted(nn.utils.tree_flatten(g_ref)), strict=True
    ):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=2e-3, atol=1e-5, err_msg=name)


def test_fused_scan_needs_a_gpu_and_says_so():
    if kernel_backend() is not None:
        pytest.skip("this machine's default device is a GPU")
    x, dt, A, B, C, D, h0, reset = _inputs(1, 5, 4, 4)
    with pytest.raises(RuntimeError, match="needs a GPU .* Use method='chunked' or 'stepwise'"):
        mx.eval(selective_scan(x, dt, A, B, C, D, h0=h0, method="fused"))
    assert scan_module.choose_scan_method(1, 4096, 16) != "fused"


def test_fused_scan_rejects_unsupported_sizes():
    x, dt, A, B, C, D, h0, reset = _inputs(1, 5, 4, 3)
    with pytest.raises(ValueError, match="d_state in 1, 2, 4, ..., 32, not 3"):
        fused_scan(x, dt, A, B, C, D, h0, _keep(reset))
    x, dt, A, B, C, D, h0, reset = _inputs(1, 5, 4, 32)
    with pytest.raises(ValueError, match="chunk 32 does not fit"):
        fused_scan(x, dt, A, B, C, D, h0, _keep(reset), chunk=32)


@pytest.mark.skipif(not cuda_emulator.available(), reason="the CUDA emulator needs g++")
@pytest.mark.parametrize("b, L, E, N, chunk", [(2, 37, 6, 4, 16), (1, 19, 9, 1, 4), (2, 21, 20, 32, 16)])
def test_cuda_kernel_source_emulated_on_cpu(b, L, E, N, chunk):
    """The exact CUDA bodies, run thread by thread on the CPU (tests/cuda_emulator.py): forward outputs
    and every gradient against the plain recurrence, across blocks, partial blocks and resets."""
    x, dt, A, B, C, D, h0, reset = _inputs(b, L, E, N, seed=2)
    keep = _keep(reset)
    lib = cuda_emulator.build(N, chunk)
    dims = np.array([b, L, E], dtype=np.int32)
    n_chunks, n_blocks = -(-L // chunk), -(-E // (THREADS // N))
    y, h, checkpoints = cuda_emulator.run(
        lib, "forward", N, [*map(np.array, (x, dt, A, B, C, D, h0, keep)), dims],
        [(b, L, E), (b, E, N), (b, n_chunks, E, N)],
    )
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D, h0=h0, reset=reset)
    np.testing.assert_allclose(y, np.array(y_ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h, np.array(h_ref), rtol=1e-4, atol=1e-4)

    w_y, w_h = mx.random.normal((b, L, E)), mx.random.normal((b, E, N))

    def loss(*args):
        y, h = sequential_scan(*args, reset=reset)
        return (y * w_y).sum() + (h * h * w_h).sum()

    ref = mx.grad(loss, argnums=tuple(range(7)))(x, dt, A, B, C, D, h0)
    dy, dh_last = np.array(w_y), np.array(2 * h_ref * w_h)
    dx, d_dt, dA_part, dB_part, dC_part, dh0 = cuda_emulator.run(
        lib, "backward", N, [*map(np.array, (x, dt, A, B, C, D, keep)), dy, dh_last, checkpoints, dims],
        [(b, L, E), (b, L, E), (b, E, N), (b, n_blocks, L, N), (b, n_blocks, L, N), (b, E, N)],
    )
    got = {"x": dx, "dt": d_dt, "A": dA_part.sum(0), "B": dB_part.sum(1), "C": dC_part.sum(1), "h0": dh0}
    for (name, g), r in zip(got.items(), [ref[0], ref[1], ref[2], ref[3], ref[4], ref[6]], strict=True):
        np.testing.assert_allclose(g, np.array(r), rtol=1e-3, atol=1e-4, err_msg=f"d{name}")


def test_fused_scan_setting():
    """BIT_AXON_FUSED_SCAN: 0 turns the kernel off on any backend, anything but auto/1/0 is an error,
    and without a GPU no setting turns it on."""
    with backend.using(Backend.from_env({"BIT_AXON_FUSED_SCAN": "0"})):
        assert scan_module.choose_scan_method(1, 64, 16) != "fused"
    with backend.using(Backend.from_env({"BIT_AXON_FUSED_SCAN": "1"})):
        assert (scan_module.choose_scan_method(1, 64, 16) == "fused") == (kernel_backend() is not None)
    with pytest.raises(ValueError, match="BIT_AXON_FUSED_SCAN must be auto, 1 or 0, not 'yes'"):
        Backend.from_env({"BIT_AXON_FUSED_SCAN": "yes"})
