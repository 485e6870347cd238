"""The compiled CPU dequantization kernels: the MLX ops' values bit for bit, in graphs and gradients,
clear errors, a build cached once, and a logged fallback to the MLX ops when they cannot be built."""

from __future__ import annotations

import logging
import subprocess
import sys

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.quantization import cpu_kernels, nf4_dequantize, nf4_quantize
from bit_axon.quantization.affine import affine_dequantize
from bit_axon.quantization.codes import affine_dequantize_ops, nf4_dequantize_ops

import mlx.core as mx
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or mx.default_device() != mx.cpu,
    reason="the kernels are built on Linux, for the CPU",
)

DTYPES = [mx.float32, mx.bfloat16, mx.float16]


@pytest.fixture
def kernels():
    module = cpu_kernels.load()
    # On Linux with a C++ compiler (the test machines have g++) the kernels must build and pass
    # their check: a fallback here would hide a broken build behind slower, equal results.
    assert module is not None, "the CPU dequantization kernels did not build or load (see the log)"
    return module


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """``load`` as in a new process, with an empty kernel cache."""
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path / "kernels"))
    cpu_kernels.load.cache_clear()
    yield cpu_kernels.load
    cpu_kernels.load.cache_clear()


def _gaussian(shape, seed):
    return mx.array(np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32))


def _equal(a: mx.array, b: mx.array) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_nf4_kernel_is_the_mlx_ops_bit_for_bit(kernels, dtype, group_size):
    packed, scales = nf4_quantize(_gaussian((3, 10, 256), seed=1).astype(dtype), group_size)
    _equal(kernels.nf4_dequantize(packed, scales), nf4_dequantize_ops(packed, scales))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_affine_kernel_is_the_mlx_ops_and_mx_dequantize_bit_for_bit(kernels, dtype, bits):
    q = mx.quantize(_gaussian((3, 10, 256), seed=2).astype(dtype), 64, bits)
    out = kernels.affine_dequantize(*q, bits)
    _equal(out, affine_dequantize_ops(*q, 64, bits))
    _equal(out, mx.dequantize(*q, 64, bits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_kernels_write_float32_directly_with_the_same_values(kernels, dtype, bits, group_size):
    """``dtype=mx.float32``: the values of the scales' dtype, widened (float16 scales take the
    vectorised F16C loop on x86; extreme scales check its roundings and subnormals)."""
    w = _gaussian((5, 9, 256), seed=11) * mx.array([1e-6, 1e-3, 1.0, 30.0, 2000.0])[:, None, None]
    q = [a[:, 1:8] for a in mx.quantize(w.astype(dtype), group_size, bits)]
    expected = affine_dequantize_ops(*q, group_size, bits)
    _equal(kernels.affine_dequantize(*q, bits), expected)
    _equal(kernels.affine_dequantize(*q, bits, dtype=mx.float32), expected.astype(mx.float32))
    _equal(affine_dequantize(*q, group_size, bits, dtype=mx.float32), expected.astype(mx.float32))
    packed, scales = nf4_quantize(w.astype(dtype), group_size)
    expected = nf4_dequantize_ops(packed, scales)
    _equal(kernels.nf4_dequantize(packed, scales, dtype=mx.float32), expected.astype(mx.float32))
    _equal(nf4_dequantize(packed, scales, dtype=mx.float32), expected.astype(mx.float32))
    with pytest.raises(ValueError, match="the scales' dtype or float32"):
        kernels.nf4_dequantize(packed, scales, dtype=mx.int32)


def test_kernels_read_strided_and_broadcast_inputs(kernels):
    """Tiles are slices of output rows across a stack of experts (not contiguous); transposes and
    broadcasts are strided too."""
    packed, scales = nf4_quantize(_gaussian((4, 12, 128), seed=3))
    q = mx.quantize(_gaussian((4, 12, 128), seed=4), 64, 4)
    views = [
        lambda a: a[:, 3:9],
        lambda a: a.swapaxes(0, 1),
        lambda a: a[::2, ::3],
        lambda a: mx.broadcast_to(a[:1], a.shape),
    ]
    for view in views:
        _equal(kernels.nf4_dequantize(view(packed), view(scales)), nf4_dequantize_ops(view(packed), view(scales)))
        _equal(kernels.affine_dequantize(*map(view, q), 4), affine_dequantize_ops(*map(view, q), 64, 4))


def test_library_functions_take_the_kernels_on_the_cpu_fast_path(kernels, monkeypatch, set_backend):
    packed, scales = nf4_quantize(_gaussian((8, 64), seed=5))
    q = mx.quantize(_gaussian((8, 64), seed=6), 64, 4)
    calls = []
    monkeypatch.setattr(kernels, "nf4_dequantize", lambda *a, **_: calls.append("nf4") or nf4_dequantize_ops(*a))
    monkeypatch.setattr(kernels, "affine_dequantize", lambda *a, **_: calls.append("affine") or mx.dequantize(*a[:3]))
    nf4_dequantize(packed, scales)
    affine_dequantize(*q, 64, 4)
    assert calls == ["nf4", "affine"]
    set_backend(cpu_dequant=False)  # BIT_AXON_CPU_DEQUANT=0: MLX ops throughout
    nf4_dequantize(packed, scales)
    affine_dequantize(*q, 64, 4)
    assert calls == ["nf4", "affine"]


def test_kernels_inside_compile_and_on_other_cpu_streams(kernels):
    packed, scales = nf4_quantize(_gaussian((16, 128), seed=7))
    x = _gaussian((5, 128), seed=8)
    reference = x @ nf4_dequantize_ops(packed, scales).T
    compiled = mx.compile(lambda x, p, s: x @ kernels.nf4_dequantize(p, s).T)
    _equal(compiled(x, packed, scales), reference)
    with mx.stream(mx.new_stream(mx.cpu)):
        _equal(kernels.nf4_dequantize(packed, scales), nf4_dequantize_ops(packed, scales))


@pytest.mark.parametrize("kind", ["nf4", "affine"])
def test_kernel_gradients_match_the_mlx_ops(kernels, kind):
    w = _gaussian((6, 128), seed=9)
    cotangent = _gaussian((6, 128), seed=10)
    if kind == "nf4":
        packed, scales = nf4_quantize(w)
        params = (scales,)

        def with_kernel(s):
            return kernels.nf4_dequantize(packed, s)

        def with_ops(s):
            return nf4_dequantize_ops(packed, s)
    else:
        packed, scales, biases = mx.quantize(w, 64, 4)
        params = (scales, biases)

        def with_kernel(s, b):
            return kernels.affine_dequantize(packed, s, b, 4)

        def with_ops(s, b):
            return affine_dequantize_ops(packed, s, b, 64, 4)

    argnums = tuple(range(len(params)))
    grads = mx.grad(lambda *p: (with_kernel(*p) * cotangent).sum(), argnums)(*params)
    expected = mx.grad(lambda *p: (with_ops(*p) * cotangent).sum(), argnums)(*params)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(e), rtol=1e-5, atol=1e-5)


def test_kernels_reject_bad_inputs_clearly(kernels):
    packed, scales = nf4_quantize(_gaussian((4, 128), seed=11))
    with pytest.raises(ValueError, match="packed weights must be a uint32 array"):
        kernels.nf4_dequantize(packed.astype(mx.int32), scales)
    with pytest.raises(ValueError, match="scales must match the packed weights' leading shape"):
        kernels.nf4_dequantize(packed, scales[:3])
    with pytest.raises(ValueError, match="the number of groups must divide the packed words"):
        kernels.nf4_dequantize(packed[:, :15], scales)
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        kernels.affine_dequantize(packed, scales, scales, 3)
    with pytest.raises(ValueError, match="scales and biases must share a dtype"):
        kernels.affine_dequantize(packed, scales, scales.astype(mx.float16), 4)
    with pytest.raises(ValueError, match="scales must be float32, bfloat16 or float16"):
        kernels.nf4_dequantize(packed, scales.astype(mx.int32))


def test_a_cached_build_is_reused_without_compiling(kernels, monkeypatch):
    assert cpu_kernels.library_path(cpu_kernels._compiler()).exists()
    cpu_kernels.load.cache_clear()

    def no_compiling(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    try:
        assert cpu_kernels.load() is not None
    finally:
        cpu_kernels.load.cache_clear()


def test_a_failed_build_falls_back_to_the_mlx_ops_and_says_why(fresh_load, monkeypatch, caplog, tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'fatal error: mlx/mlx.h: No such file or directory' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "CPU dequantization kernels unavailable, using MLX ops (slower)" in caplog.text
    assert f"{compiler} exited with 1" in caplog.text and "mlx/mlx.h: No such file" in caplog.text
    assert not list((cpu_kernels.cache_dir()).glob("*"))  # no half-written library left behind
    packed, scales = nf4_quantize(_gaussian((4, 64), seed=12))
    _equal(nf4_dequantize(packed, scales), nf4_dequantize_ops(packed, scales))


def test_no_compiler_or_switched_off_means_mlx_ops(fresh_load, monkeypatch, caplog, set_backend):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "No C++ compiler" in caplog.text
    cpu_kernels.load.cache_clear()
    set_backend(cpu_kernels=False)
    assert fresh_load() is None


def test_a_kernel_failing_its_check_is_not_used(kernels, fresh_load, monkeypatch, caplog):
    """The check runs on every load: a library whose values differ from the MLX ops is refused."""
    monkeypatch.setattr(cpu_kernels, "build", lambda compiler, path: None)
    monkeypatch.setattr(cpu_kernels, "_import", lambda path: _Tampered(kernels))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "the NF4 kernel differs from the MLX ops (mlx.core.float32)" in caplog.text


class _Tampered:
    """The kernels, with NF4 values off in the last bits."""

    def __init__(self, module):
        self.affine_dequantize = module.affine_dequantize
        self._nf4 = module.nf4_dequantize

    def nf4_dequantize(self, packed, scales, dtype=None):
        return self._nf4(packed, scales, dtype=dtype) * 1.0001


def test_the_build_uses_the_loaded_mlx_even_when_a_folder_named_mlx_comes_first(tmp_path, monkeypatch):
    # MLX caches its own kernels in /tmp/mlx/, so a script run from /tmp sees that folder as the
    # first portion of the ``mlx`` namespace package; its headers are not there.
    import importlib

    import mlx

    (tmp_path / "mlx").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert list(mlx.__path__)[0] == str(tmp_path / "mlx")
    assert (cpu_kernels._mlx_package() / "include" / "mlx" / "backend" / "cpu").is_dir()
