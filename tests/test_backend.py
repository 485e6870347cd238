"""Backend settings: one parser, read once, strategies that follow the settings."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import backend
from bit_axon.backend import Backend
from bit_axon.fast_math import pow2_exp
from bit_axon.layers.moe import expert_blocks

import mlx.core as mx
import pytest


def test_one_parser_for_switches():
    for off in ("0", "off", "False", " no ", "none"):
        assert backend.switch({"V": off}, "V") is False
    for on in ("1", "on", "yes", "true", "anything"):
        assert backend.switch({"V": on}, "V") is True
    assert backend.switch({}, "V") is True and backend.switch({"V": ""}, "V", default=False) is False


def test_settings_from_the_environment():
    assert Backend.from_env({}) == Backend()
    env = {"BIT_AXON_CPU_DEQUANT": "0", "BIT_AXON_CPU_KERNELS": "off", "BIT_AXON_FUSED_SCAN": "1",
           "BIT_AXON_BLAS": "MLX"}
    assert Backend.from_env(env) == Backend(cpu_dequant=False, cpu_kernels=False, fused_scan="1", blas="off")
    assert Backend.from_env({"BIT_AXON_BLAS": " /opt/libopenblas.so "}).blas == "/opt/libopenblas.so"
    with pytest.raises(ValueError, match="BIT_AXON_FUSED_SCAN must be auto, 1 or 0, not 'yes'"):
        Backend.from_env({"BIT_AXON_FUSED_SCAN": "yes"})


def test_settings_are_read_once_and_using_restores_them(monkeypatch):
    first = backend.settings()
    monkeypatch.setenv("BIT_AXON_CPU_DEQUANT", "0" if first.cpu_dequant else "1")
    assert backend.settings() is first  # not read again
    with backend.using(Backend(cpu_dequant=False)) as inner:
        assert backend.settings() is inner
    assert backend.settings() is first


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the expert blocks are a CPU layout")
def test_strategies_follow_the_settings():
    on, off = Backend(), Backend(cpu_dequant=False)
    assert on.dequantize_route(on.min_dequant_rows) and not on.dequantize_route(on.min_dequant_rows - 1)
    assert not off.dequantize_route(1000)
    with backend.using(off):
        assert expert_blocks(10_000, 8) == 0
    with backend.using(on):
        assert expert_blocks(10_000, 8) == on.expert_block
    assert Backend(expert_block=32).expert_block_rows(8 * 32, 8) == 32
    assert on.scan_method(on.stepwise_min_state, kernel_supported=True) == "stepwise"
    assert on.scan_method(on.stepwise_min_state - 1, kernel_supported=True) == "chunked"


def test_exp_choice_matches_mx_exp():
    exp = Backend().exp()
    assert (exp is pow2_exp) == (mx.default_device() == mx.cpu)
    x = mx.linspace(-20, 5, 101)
    assert mx.allclose(exp(x), mx.exp(x), rtol=1e-5, atol=1e-30).item()
