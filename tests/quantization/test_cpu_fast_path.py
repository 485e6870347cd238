"""The CPU fast path for quantized matmuls: same results as MLX's native kernels, actually taken on the
CPU, and no float copy of the weights kept for the backward pass."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.backend import Backend
from bit_axon.layers.moe import SwitchGLU, SwitchLinear, expert_blocks
from bit_axon.quantization import (
    NF4Embedding,
    NF4Linear,
    NF4SwitchLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedSwitchLinear,
    fast_path,
    nf4_dequantize,
)
from bit_axon.quantization.affine import affine_dequantize
from bit_axon.quantization.fast_path import dequantized_gather_matmul
from bit_axon.quantization.nf4 import nf4_gather_matmul
from bit_axon.training.dora import DoRALinear
from toy import peak_memory

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the fast path is CPU-only")

EXPERT_BLOCK = Backend.expert_block
SMALL_EXPERT_BLOCK = Backend.small_expert_block
SMALL_BLOCK_PAIRS_PER_EXPERT = Backend.small_block_pairs_per_expert


@pytest.fixture
def no_fast_path(set_backend):
    set_backend(cpu_dequant=False)


def _gaussian(shape, seed, std=1.0):
    return mx.array(np.random.default_rng(seed).normal(0, std, shape).astype(np.float32))


def _value_and_input_grad(f, x):
    out = f(x)
    grad = mx.grad(lambda x: (f(x) * out).sum())(x)  # a fixed, non-trivial cotangent: the output itself
    mx.eval(out, grad)
    return np.array(out), np.array(grad)


def _with_and_without(set_backend, f, x):
    fast = _value_and_input_grad(f, x)
    set_backend(cpu_dequant=False)
    native = _value_and_input_grad(f, x)
    set_backend(cpu_dequant=True)
    return fast, native


def _assert_close(a, b):
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * np.abs(v).max())


def _affine_linear(seed=0, i=256, o=96, bias=False):
    mx.random.seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(i, o, bias=bias), group_size=64, bits=4)


@pytest.mark.parametrize("bias", [False, True])
def test_affine_linear_matches_native_kernel(bias, set_backend):
    layer = _affine_linear(bias=bias)
    x = _gaussian((3, 7, 256), seed=1)
    before = fast_path.calls["affine"]
    fast, native = _with_and_without(set_backend, layer, x)
    assert fast_path.calls["affine"] > before  # taken with the switch on, not with it off
    _assert_close(fast, native)


def test_affine_linear_inside_compile():
    layer = _affine_linear()
    x = _gaussian((16, 256), seed=2)
    compiled = mx.compile(lambda x: layer(x))
    np.testing.assert_allclose(np.array(compiled(x)), np.array(layer(x)), rtol=1e-6, atol=1e-6)


def test_few_rows_keep_the_native_kernel():
    layer = _affine_linear()
    before = fast_path.calls["affine"]
    mx.eval(layer(_gaussian((1, Backend.min_dequant_rows - 1, 256), seed=3)))
    assert fast_path.calls["affine"] == before


def test_affine_dequantize_matches_mlx():
    w = _gaussian((40, 256), seed=4)
    for bits in (2, 4, 8):
        q, s, b = mx.quantize(w, 64, bits)
        np.testing.assert_array_equal(
            np.array(affine_dequantize(q, s, b, 64, bits)), np.array(mx.dequantize(q, s, b, 64, bits))
        )


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_nf4_pair_lookup_gives_the_byte_table_values(dtype, set_backend):
    packed = mx.array(np.random.default_rng(14).integers(0, 2**32, (3, 6, 16), dtype=np.uint64).astype(np.uint32))
    scales = _gaussian((3, 6, 2), seed=15).astype(dtype)
    fast = nf4_dequantize(packed, scales)
    set_backend(cpu_dequant=False)
    reference = nf4_dequantize(packed, scales)
    assert fast.dtype == reference.dtype == dtype and fast.shape == reference.shape == (3, 6, 128)
    np.testing.assert_array_equal(np.array(fast.astype(mx.float32)), np.array(reference.astype(mx.float32)))


def test_affine_embedding_as_linear_matches_native(set_backend):
    mx.random.seed(0)
    emb = QuantizedEmbedding.from_embedding(nn.Embedding(300, 128), group_size=64, bits=4)
    h = _gaussian((2, 9, 128), seed=5)
    before = fast_path.calls["affine"]
    fast, native = _with_and_without(set_backend, emb.as_linear, h)
    assert fast_path.calls["affine"] > before
    _assert_close(fast, native)


def test_nf4_linear_and_embedding_head_match_the_float_weights():
    mx.random.seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    emb = NF4Embedding.from_embedding(nn.Embedding(200, 128))
    x = _gaussian((5, 128), seed=6)
    for f, w in ((layer, layer.dequantize()), (emb.as_linear, emb.dequantize())):
        _assert_close(_value_and_input_grad(f, x), _value_and_input_grad(lambda x, w=w: x @ w.T, x))


def _glu(kind: str, seed: int = 0) -> SwitchGLU:
    mx.random.seed(seed)
    glu = SwitchGLU(64, 128, 4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        base = getattr(glu, name)
        if kind == "nf4":
            setattr(glu, name, NF4SwitchLinear.from_switch_linear(base))
        elif kind == "affine":
            setattr(glu, name, QuantizedSwitchLinear.from_switch_linear(base, group_size=64, bits=4))
    mx.eval(glu.parameters())
    return glu


@pytest.mark.parametrize("block", [EXPERT_BLOCK, SMALL_EXPERT_BLOCK])
@pytest.mark.parametrize("kind", ["float", "nf4", "affine"])
def test_blocked_experts_match_the_row_layout_and_native_kernels(kind, block, set_backend):
    glu = _glu(kind)
    # Enough (token, expert) pairs over 4 experts for blocks of this size.
    pairs = 4 * (EXPERT_BLOCK if block == EXPERT_BLOCK else SMALL_BLOCK_PAIRS_PER_EXPERT) + 2
    x = _gaussian((1, pairs // 2, 64), seed=7)
    indices = mx.array(np.random.default_rng(8).integers(0, 4, (1, pairs // 2, 2)).astype(np.int32))
    assert expert_blocks(indices.size, 4) == block
    before = fast_path.calls["affine_gather"]
    fast, native = _with_and_without(set_backend, lambda x: glu(x, indices), x)
    assert (fast_path.calls["affine_gather"] > before) == (kind == "affine")
    _assert_close(fast, native)


def test_expert_blocks_only_on_the_cpu_fast_path_with_enough_pairs(no_fast_path):
    assert expert_blocks(10_000, 8) == 0


def test_expert_blocks_need_enough_pairs():
    assert expert_blocks(8 * SMALL_BLOCK_PAIRS_PER_EXPERT - 1, 8) == 0
    assert expert_blocks(8 * SMALL_BLOCK_PAIRS_PER_EXPERT, 8) == SMALL_EXPERT_BLOCK
    assert expert_blocks(8 * EXPERT_BLOCK - 1, 8) == SMALL_EXPERT_BLOCK
    assert expert_blocks(8 * EXPERT_BLOCK, 8) == EXPERT_BLOCK


def test_blocked_layout_gives_weight_gradients_to_the_chosen_experts_only():
    glu = _glu("float")
    x = _gaussian((1, 70, 64), seed=9)
    indices = mx.array(np.random.default_rng(9).choice([0, 2], (1, 70, 2)).astype(np.int32))

    def grads(block):
        def loss(params):
            glu.update(params)
            return (glu(x, indices, block=block) ** 2).sum()

        return mx.grad(loss)(glu.trainable_parameters())

    blocked, rows = grads(8), grads(0)
    g = np.array(blocked["up_proj"]["weight"])
    assert np.abs(g[[1, 3]]).max() == 0 and np.abs(g[[0, 2]]).min(axis=(1, 2)).max() > 0
    np.testing.assert_allclose(g, np.array(rows["up_proj"]["weight"]), rtol=1e-4, atol=1e-6)


def test_nf4_decoding_dequantizes_only_the_chosen_experts():
    mx.random.seed(0)
    layer = NF4SwitchLinear.from_switch_linear(SwitchLinear(64, 32, 8))
    x = _gaussian((3, 1, 64), seed=10)
    indices = mx.array([5, 1, 5])
    selected = _value_and_input_grad(lambda x: nf4_gather_matmul(x, layer.weight, layer.scales, indices), x)
    everything = _value_and_input_grad(
        lambda x: dequantized_gather_matmul(nf4_dequantize, False)(x, layer.weight, layer.scales, indices), x
    )
    _assert_close(selected, everything)


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_dora_shared_dequantization_matches_native(request, tiled, set_backend):
    if tiled:  # the backward pass rebuilds the weight in tiles (the forward shares the whole one)
        request.getfixturevalue("small_tiles")
    layer = DoRALinear.from_base(_affine_linear(seed=3), r=4, scale=2.0)
    layer.lora_b = _gaussian(layer.lora_b.shape, seed=11, std=0.1)
    x = _gaussian((12, 256), seed=12)
    before = fast_path.calls["shared_dense"]

    def grads():
        def loss(params, x):
            layer.update(params)
            return (layer(x) ** 2).sum()

        value, (gp, gx) = mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
        mx.eval(value, gp, gx)
        return [np.array(value), np.array(gx)] + [np.array(gp[k]) for k in ("lora_a", "lora_b", "m")]

    fast = grads()
    assert fast_path.calls["shared_dense"] > before
    set_backend(cpu_dequant=False)
    _assert_close(fast, grads())


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 1,000 float values: the test layers below are rebuilt in several tiles, the last
    one short (96 rows of 256 values: 3 rows a tile; 4 experts x 64 inputs: 3 rows a tile)."""
    monkeypatch.setattr(fast_path, "TILE_VALUES", 1000)
    monkeypatch.setattr(fast_path, "MIN_TILE_ROWS", 1)


def test_weight_tiles_cover_the_rows_once(small_tiles):
    assert fast_path.weight_tiles(10, 300, 16) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert fast_path.weight_tiles(2, 5000, 16) == [(0, 1), (1, 2)]  # a row larger than a tile: one row each


def test_tiles_keep_a_minimum_width(small_tiles, monkeypatch):
    monkeypatch.setattr(fast_path, "MIN_TILE_ROWS", 4)
    assert fast_path.weight_tiles(10, 300, 16) == [(0, 4), (4, 8), (8, 10)]


def test_no_tiles_when_the_product_outgrows_the_weight(small_tiles):
    # Concatenating the tiles' outputs would hold the product twice (a vocabulary head's logits).
    assert fast_path.weight_tiles(10, 300, 300) == [(0, 10)]


@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_tiled_dense_layers_match_untiled_and_native(monkeypatch, small_tiles, kind, set_backend):
    layer = _affine_linear(bias=True) if kind == "affine" else NF4Linear.from_linear(nn.Linear(256, 96))
    x = _gaussian((2, 5, 256), seed=16)
    tiled = _value_and_input_grad(layer, x)
    monkeypatch.setattr(fast_path, "TILE_VALUES", 1 << 30)
    whole = _value_and_input_grad(layer, x)
    # Output rows split, dot products whole: equal up to the BLAS kernel's summation order.
    for a, b in zip(tiled, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    if kind == "affine":
        set_backend(cpu_dequant=False)
        _assert_close(tiled, _value_and_input_grad(layer, x))


@pytest.mark.parametrize("kind", ["nf4", "affine"])
def test_tiled_experts_match_native_kernels(small_tiles, kind, set_backend):
    glu = _glu(kind)
    x = _gaussian((1, 40, 64), seed=17)
    indices = mx.array(np.random.default_rng(17).integers(0, 4, (1, 40, 2)).astype(np.int32))
    compiled = mx.compile(lambda x: glu(x, indices))
    fast, native = _with_and_without(set_backend, lambda x: glu(x, indices), x)
    _assert_close(fast, native)
    _assert_close(_value_and_input_grad(compiled, x), native)


# --- memory ----------------------------------------------------------------------------------


@pytest.fixture
def throttled():
    """Keep MLX from allocating far ahead of the computation (its CPU backend allocates outputs when
    it queues an op, so a long chain can hold many transients at once); with a low memory limit it
    waits for queued work instead, and what remains is what the graph really keeps alive."""
    previous = mx.set_memory_limit(mx.get_active_memory() + (4 << 20))
    yield
    mx.set_memory_limit(previous)


def _chain_peak(layers, x, compiled: bool) -> int:
    """Peak memory above the starting point of a forward and input-gradient pass through ``layers``."""

    def f(x):
        for layer in layers:
            x = layer(x)
        return (x * x).sum()

    grad = mx.compile(mx.grad(f)) if compiled else mx.grad(f)
    mx.eval(grad(x))  # compile outside the measurement
    return peak_memory(lambda: grad(x))[1]


class _KeepFloat(nn.Module):
    """Dequantize, then MLX's own matmul: autodiff keeps every float weight for the backward pass."""

    def __init__(self, layer: NF4Linear):
        super().__init__()
        self.layer = layer

    def __call__(self, x):
        return x @ nf4_dequantize(self.layer["weight"], self.layer["scales"]).T


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_backward_does_not_keep_a_float_copy_per_layer(monkeypatch, throttled, kind, compiled, tiled):
    # mx.compile merges identical subgraphs: without care, the backward pass's dequantization is
    # merged with the forward's and every layer's float weight lives from forward to backward.
    n_layers, dims = 24, 1024
    mx.random.seed(0)
    floats = [nn.Linear(dims, dims, bias=False) for _ in range(n_layers)]
    if kind == "nf4":
        layers = [NF4Linear.from_linear(f) for f in floats]
    else:
        layers = [QuantizedLinear.from_linear(f, group_size=64, bits=4) for f in floats]
    mx.eval([layer.parameters() for layer in layers])
    del floats
    x = _gaussian((16, dims), seed=13)
    weight_bytes = dims * dims * 4
    if tiled:  # four tiles a layer, rebuilt on two streams taking turns
        monkeypatch.setattr(fast_path, "TILE_VALUES", dims * dims // 4)
        monkeypatch.setattr(fast_path, "MIN_TILE_ROWS", 1)
    peak = _chain_peak(layers, x, compiled)
    # Tiled, less than one layer's float weight plus a tile or two (whole layers, compiled: ~2 layers).
    assert peak < (1.5 if tiled else n_layers / 3) * weight_bytes, f"peak {peak / 2**20:.1f} MiB"
    if kind == "nf4":  # the bound does catch a graph that keeps the float weights
        kept = _chain_peak([_KeepFloat(layer) for layer in layers], x, compiled)
        assert kept > 0.9 * n_layers * weight_bytes
