"""DoRALinear: magnitude init, the re-normalised forward, its gradient convention, and fusing."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.quantization import dense_weight
from bit_axon.training.dora import DoRALinear
from toy import LINEAR_IN as IN
from toy import LINEAR_OUT as OUT

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

KINDS = ["float", "affine", "nf4"]


def train_randomly(layer: DoRALinear, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layer.lora_a = layer.lora_a + mx.array(rng.normal(0, 0.05, layer.lora_a.shape).astype(np.float32))
    layer.lora_b = mx.array(rng.normal(0, 0.01, layer.lora_b.shape).astype(np.float32))
    layer.m = layer.m * mx.array(rng.uniform(0.8, 1.2, layer.m.shape).astype(np.float32))


def reference_forward(layer: DoRALinear, x: mx.array) -> mx.array:
    """The guide's formula, written directly: (m / ||W + s B^T A^T||) (W x + s (x A) B)."""
    w = dense_weight(layer.linear)
    adapted = w + layer.scale * layer.lora_b.T @ layer.lora_a.T
    norm = mx.linalg.norm(adapted, axis=1)
    return (layer.m / norm) * (x @ w.T + layer.scale * (x @ layer.lora_a) @ layer.lora_b)


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_starts_at_base_row_norms(kind, make_base):
    base = make_base(kind)
    layer = DoRALinear.from_base(base, r=8)
    assert layer.m.shape == (OUT,) and layer.m.dtype == mx.float32
    np.testing.assert_allclose(layer.m, mx.linalg.norm(dense_weight(base), axis=1), rtol=1e-6)
    assert layer.lora_a.shape == (IN, 8) and layer.lora_b.shape == (8, OUT) and layer.scale == 20.0


@pytest.mark.parametrize("kind", KINDS)
def test_init_reproduces_the_base_output_exactly(kind, make_base, inputs):
    base = make_base(kind)
    x = inputs()
    y = base(x)
    assert mx.array_equal(DoRALinear.from_base(base, r=8)(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_the_formula(kind, make_base, inputs):
    layer = DoRALinear.from_base(make_base(kind), r=8)
    train_randomly(layer)
    x = inputs(1)
    np.testing.assert_allclose(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    # The cheap norm expansion equals the norm of the explicitly adapted weight.
    direct = mx.linalg.norm(dense_weight(layer.linear) + layer.delta(), axis=1)
    np.testing.assert_allclose(layer.adapted_norm(), direct, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fuse_matches_unfused_forward(kind, make_base, inputs):
    layer = DoRALinear.from_base(make_base(kind), r=8)
    train_randomly(layer)
    x = inputs(2)
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    adapted = dense_weight(layer.linear) + layer.delta()
    expected_w = (layer.m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted
    np.testing.assert_allclose(fused.weight, expected_w, rtol=1e-5, atol=1e-7)
    # The fused rows have exactly the learned magnitudes.
    np.testing.assert_allclose(mx.linalg.norm(fused.weight, axis=1), layer.m, rtol=1e-5)
    y = layer(x)
    assert mx.abs(fused(x) - y).max().item() <= 1e-5 * mx.abs(y).max().item()


@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_fuse_requantize_within_quantization_error(kind, make_base, inputs):
    layer = DoRALinear.from_base(make_base(kind), r=8)
    train_randomly(layer)
    x = inputs(3)
    fused = layer.fuse(requantize=True)
    assert type(fused) is type(layer.linear) and fused.group_size == 64
    y = layer(x)
    assert (mx.linalg.norm(fused(x) - y) / mx.linalg.norm(y)).item() < 0.15


def test_bias_is_added_after_renormalisation(make_base, inputs):
    layer = DoRALinear.from_base(make_base("float", bias=True), r=4)
    train_randomly(layer)
    x = inputs(4)
    np.testing.assert_allclose(layer(x), reference_forward(layer, x) + layer.linear.bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.fuse()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_norm_is_a_constant_in_the_backward_pass(make_base, inputs):
    """As in the DoRA paper (Sec. 4.3): gradients do not flow through ||W + delta||."""
    layer = DoRALinear.from_base(make_base("float"), r=4)
    train_randomly(layer)
    x = inputs(5)
    w = dense_weight(layer.linear)

    def reference(params, detach: bool):
        a, b, m = params["lora_a"], params["lora_b"], params["m"]
        norm = mx.linalg.norm(w + layer.scale * b.T @ a.T, axis=1)
        if detach:
            norm = mx.stop_gradient(norm)
        out = (m / norm) * (x @ w.T + layer.scale * (x @ a) @ b)
        return (out**2).sum()

    def loss(model, x):
        return (model(x) ** 2).sum()

    _, grads = nn.value_and_grad(layer, loss)(layer, x)
    params = dict(tree_flatten(layer.trainable_parameters()))
    detached = mx.grad(reference)(params, True)
    attached = mx.grad(reference)(params, False)
    for name in ("lora_a", "lora_b", "m"):
        np.testing.assert_allclose(grads[name], detached[name], rtol=1e-4, atol=1e-6)
    assert not np.allclose(grads["lora_b"], attached["lora_b"], rtol=1e-3, atol=0)


def test_trainable_parameters_are_the_adapter_and_magnitude(make_base):
    layer = DoRALinear.from_base(make_base("nf4"), r=4)
    assert sorted(k for k, _ in tree_flatten(layer.trainable_parameters())) == ["lora_a", "lora_b", "m"]
