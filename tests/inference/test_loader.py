"""``in_float_for_speed``: the adapter folded in and the base dequantized compute what the quantized
base with its adapter on top computed."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.inference.loader import in_float_for_speed
from bit_axon.quantization import base_quantization, quantize_model
from bit_axon.training.lora import adapter_layers, apply_lora_to_model
from toy import small_model

import mlx.core as mx
import numpy as np
import pytest

IDS = mx.array([[11, 22, 33, 44, 55, 66]])


@pytest.mark.parametrize(("mode", "use_dora"), [("affine", False), ("nf4", True)])
def test_folded_float_model_computes_the_same(mode, use_dora, set_backend):
    set_backend(cpu_dequant=True)
    model = small_model()
    quantize_model(model, mode=mode)
    apply_lora_to_model(model, rank=4, use_dora=use_dora, scale=10.0)
    rng = np.random.default_rng(0)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.array(rng.normal(0, 0.02, layer.lora_b.shape).astype(np.float32))
    model.eval()
    before, _ = model(IDS)
    assert in_float_for_speed(model)
    after, _ = model(IDS)
    assert not adapter_layers(model) and base_quantization(model) is None
    assert mx.allclose(after, before, atol=2e-4, rtol=1e-4).item()


def test_nothing_changes_off_the_cpu_fast_path(set_backend):
    set_backend(cpu_dequant=False)
    model = small_model()
    quantize_model(model, mode="affine")
    assert not in_float_for_speed(model)
    assert base_quantization(model) is not None
