"""The kernel cache is imported only when the library and its folder are private to the user."""

from __future__ import annotations

import logging
import shutil
import sys

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.quantization import cpu_kernels

import mlx.core as mx
import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or mx.default_device() != mx.cpu,
    reason="the kernels are built on Linux, for the CPU",
)


@pytest.fixture
def cached_copy(monkeypatch, tmp_path):
    """A kernel cache in tmp_path holding a copy of this machine's built library (no compiling)."""
    assert cpu_kernels.load() is not None, "the CPU kernels did not build (see test_cpu_kernels.py)"
    built = cpu_kernels.library_path(cpu_kernels._compiler())
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_kernels, "build", lambda compiler, path: pytest.fail("compiled again"))
    copy = cpu_kernels.library_path(cpu_kernels._compiler())
    copy.parent.mkdir(mode=0o700)
    shutil.copy(built, copy)
    copy.chmod(0o600)
    cpu_kernels.load.cache_clear()
    yield copy
    cpu_kernels.load.cache_clear()


def test_a_private_cache_loads(cached_copy):
    assert cpu_kernels.load() is not None


@pytest.mark.parametrize("which", ["file", "folder"])
def test_a_cache_others_can_write_is_refused_with_a_warning(cached_copy, which, caplog):
    item = cached_copy if which == "file" else cached_copy.parent
    item.chmod(0o666 if which == "file" else 0o777)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.load() is None
    assert "using MLX ops" in caplog.text and f"{item} is writable by other users" in caplog.text


def test_a_cache_of_another_user_is_refused(cached_copy, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels.os, "getuid", lambda: 12345)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.load() is None
    assert "belongs to another user" in caplog.text
