"""Compiled CPU dequantization kernels (NF4 and affine 2/4/8-bit), built on first use.

MLX's CPU backend has no fused table lookup: NF4's codebook lookup through ``mx.take`` pays per
gathered element, and even affine's compiled unpacking is several times slower than one write per
weight, while the dequantize-then-BLAS route (``fast_path``) spends most of a MoE layer's time
there (bench/README.md, "Measurements behind code choices"). These are two small MLX primitives in
C++ (``cpu_kernels.cpp``) that write each weight once, with the same values as the MLX-op versions
of :mod:`~bit_axon.quantization.codes`: the same dtype and the same roundings.

The extension is compiled once per (source, MLX, nanobind, Python) into the user's cache
(``$BIT_AXON_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/bit-axon/kernels`` or
``~/.cache/bit-axon/kernels``; about 20 s with g++), the way MLX itself compiles its fused CPU kernels
with the system compiler. It links against MLX and binds with nanobind in MLX's domain, so the
nanobind version must speak MLX's ABI (a dependency pin). After loading, both kernels are checked
against the MLX ops on a small input, bit for bit. Importing a library runs its code, so a cached
one is imported only when it and its folder belong to the user and nobody else can write them
(:func:`check_trusted`); the cache folder is created private. Linux only (the platform they were verified
on); elsewhere, with ``BIT_AXON_CPU_KERNELS=0`` (``Backend.cpu_kernels``), without a C++ compiler, or when the build or the
check fails, :func:`load` returns None, says why once, and callers keep the MLX-op versions: the
results are the same, only slower.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

from bit_axon.backend import CPU_KERNELS_VAR, settings
from bit_axon.quantization.codes import affine_dequantize_ops, nf4_dequantize_ops, nf4_quantize

import mlx.core as mx

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "BIT_AXON_KERNEL_CACHE"
MODULE_NAME = "_bit_axon_cpu_kernels"  # NB_MODULE's name in the source
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


class KernelBuildError(RuntimeError):
    """The extension could not be compiled or loaded."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bit-axon" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _mlx_package() -> Path:
    # The folder of the mlx.core that is loaded, not ``mlx.__path__[0]``: ``mlx`` is a namespace
    # package, and MLX's own kernel cache (/tmp/mlx/) becomes its first portion for a script in /tmp.
    return Path(mx.__file__).parent


def library_path(compiler: str) -> Path:
    """Where the extension built from this source, MLX install, nanobind and Python is (or will be) cached."""
    import nanobind

    key = hashlib.sha256()
    parts = (SOURCE.read_bytes(), mx.__version__, str(_mlx_package()), nanobind.__version__, sys.version, compiler)
    for part in parts:
        key.update(part if isinstance(part, bytes) else part.encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return cache_dir() / f"{MODULE_NAME}-{key.hexdigest()[:16]}{suffix}"


def compile_command(compiler: str, output: Path) -> list[str]:
    """The compiler call that builds the extension into ``output`` (one step: ours and nanobind's sources)."""
    import nanobind

    mlx_dir = _mlx_package()
    nb_dir = Path(nanobind.include_dir()).parent
    return [
        compiler, "-std=c++20", "-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-DNDEBUG",
        # MLX's Python bindings are nanobind types in the "mlx" domain: ours must share it to
        # accept and return mx.array objects.
        "-DNB_DOMAIN=mlx",
        f"-I{nanobind.include_dir()}", f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}",
        str(SOURCE), str(Path(nanobind.source_dir()) / "nb_combined.cpp"),
        f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}",
        "-o", str(output),
    ]  # fmt: skip


def build(compiler: str, path: Path) -> None:
    """Compile the extension into ``path``, atomically (concurrent builders each write a temporary)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=path.suffix)
    os.close(fd)
    logger.info("Compiling the CPU dequantization kernels once (about 20 s) into %s", path)
    start = time.perf_counter()
    try:
        done = subprocess.run(compile_command(compiler, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise KernelBuildError(f"{compiler} exited with {done.returncode}:\n{tail}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("Built the CPU dequantization kernels in %.0f s", time.perf_counter() - start)


def check_trusted(path: Path) -> None:
    """Raise ``KernelBuildError`` unless ``path`` and its folder are the user's and not group/other-writable.

    Another user who could write either could swap in a library whose code runs on import, before
    the bit-for-bit check.
    """
    for item in (path.parent, path):
        info = item.stat()
        if info.st_uid != os.getuid():
            raise KernelBuildError(f"not loading {path}: {item} belongs to another user (uid {info.st_uid})")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise KernelBuildError(
                f"not loading {path}: {item} is writable by other users (chmod go-w {item} if you trust it)"
            )


def _import(path: Path) -> ModuleType:
    check_trusted(path)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def output_dtype(dtype: mx.Dtype | None, scales: mx.array) -> mx.Dtype | None:
    """The kernels' ``dtype`` argument for a wanted output dtype: it when they write it (the scales'
    dtype or float32, the same values widened), else None (the caller casts the result)."""
    return dtype if dtype is not None and dtype in (mx.float32, scales.dtype) else None


def _dtypes(scales: mx.Dtype, out: mx.Dtype | None) -> str:
    return str(scales) if out is None else f"{scales}, written as {out}"


def _same(got: mx.array, expected: mx.array) -> bool:
    return got.dtype == expected.dtype and mx.array_equal(got, expected).item()


def self_check(module: ModuleType) -> None:
    """Both kernels against the MLX ops, bit for bit, on strided inputs in each float dtype, with
    the output in the scales' dtype and in float32, in groups of 32 and 64."""
    with mx.stream(mx.cpu):
        w = mx.random.normal((3, 8, 128), key=mx.random.key(0))
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            for group_size in (32, 64):
                packed, scales = nf4_quantize(w.astype(dtype), group_size)
                packed, scales = packed[:, 2:7], scales[:, 2:7]  # a strided slice, as the tiles are
                expected = nf4_dequantize_ops(packed, scales)
                for out in (None, mx.float32):
                    got = module.nf4_dequantize(packed, scales, dtype=out)
                    if not _same(got, expected if out is None else expected.astype(out)):
                        raise KernelBuildError(f"the NF4 kernel differs from the MLX ops ({_dtypes(dtype, out)})")
                for bits in (2, 4, 8):
                    q = mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)
                    q = [a[:, 2:7] for a in q]
                    expected = affine_dequantize_ops(*q, group_size, bits)
                    for out in (None, mx.float32):
                        got = module.affine_dequantize(*q, bits, dtype=out)
                        if not _same(got, expected if out is None else expected.astype(out)):
                            raise KernelBuildError(
                                f"the {bits}-bit affine kernel differs from the MLX ops ({_dtypes(dtype, out)})"
                            )


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (built if not cached), or None with one log line saying why."""
    if not settings().cpu_kernels:
        logger.info("%s=0: CPU dequantization uses MLX ops", CPU_KERNELS_VAR)
        return None
    if not sys.platform.startswith("linux"):
        logger.debug("CPU dequantization kernels are built on Linux only; using MLX ops")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("No C++ compiler (c++/g++, or $CXX) found: CPU dequantization uses MLX ops (slower)")
        return None
    try:
        path = library_path(compiler)
        if not path.exists():
            build(compiler, path)
        module = _import(path)
        self_check(module)
    # (nanobind raises TypeError for arrays of an MLX built against another nanobind ABI.)
    except (RuntimeError, ImportError, OSError, TypeError, ValueError) as error:
        logger.warning("CPU dequantization kernels unavailable, using MLX ops (slower): %s", error)
        return None
    return module
