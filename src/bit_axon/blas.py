"""Load an optimized BLAS for MLX's Linux CPU backend.

MLX's Linux CPU wheel links a reference BLAS that reaches only a few GFLOP/s for float32 matmuls.
Preloading an OpenBLAS with global symbols before ``mlx.core`` is first imported makes MLX's
``cblas_*``/LAPACK calls resolve to it (many times faster: bench/README.md) without changing results beyond
float32 rounding. Opt out with ``BIT_AXON_BLAS=off``; force a library with ``BIT_AXON_BLAS=/path``
(read with the other backend settings, :mod:`bit_axon.backend`, which does not import MLX).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import site
import sys
import sysconfig
from pathlib import Path

from bit_axon.backend import Backend, settings

logger = logging.getLogger(__name__)

# The cmeel-openblas wheel is built for one x86 target (SkylakeX): it executes AVX-512
# instructions unconditionally and dies with SIGILL on CPUs without them.
_CMEEL_REQUIRED_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}

_loaded: str | None = None


def blas_in_use() -> str:
    """Describe the BLAS MLX uses in this process (a library path, or the wheel's default)."""
    return _loaded or "mlx-bundled"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def site_packages() -> list[str]:
    """This interpreter's absolute site-packages folders, in order, each once.

    Not ``sys.path``: its empty or relative entries would resolve against the current directory,
    and a library found there would be loaded and run by a plain ``import bit_axon``.
    """
    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    return [f for f in dict.fromkeys(folders) if os.path.isabs(f)]


def _cmeel_openblas() -> list[str]:
    if not _cpu_flags() >= _CMEEL_REQUIRED_FLAGS:
        return []
    found: list[str] = []
    for base in site_packages():
        found += sorted(glob.glob(os.path.join(base, "cmeel.prefix", "lib", "libopenblas.so.0")))
    return found


def _system_openblas() -> list[str]:
    names = [ctypes.util.find_library("openblas")]
    names += glob.glob("/usr/lib/*-linux-gnu/libopenblas.so.0") + glob.glob("/usr/lib64/libopenblas.so.0")
    return [n for n in names if n]


def candidates(backend: Backend | None = None) -> list[str]:
    """Libraries to try, best first, for ``backend``'s BLAS choice (default: this process's settings)."""
    choice = (backend or settings()).blas
    if choice == "off":
        return []
    if choice:
        return [choice]
    return _cmeel_openblas() + _system_openblas()


def load_fast_blas() -> str:
    """Preload the first usable optimized BLAS (Linux only); return what is in use."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return blas_in_use()
    if "mlx.core" in sys.modules:
        logger.debug("mlx.core was imported before bit_axon; MLX keeps its bundled BLAS")
        return blas_in_use()
    tried = []
    for path in candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            tried.append(f"{path}: {err}")
            continue
        _loaded = path
        logger.debug("BLAS in use: %s", path)
        return path
    if tried:
        logger.warning("No optimized BLAS could be loaded (%s); using MLX's slow bundled BLAS", "; ".join(tried))
    else:
        logger.debug("BLAS in use: mlx-bundled (set BIT_AXON_BLAS or install libopenblas0-pthread)")
    return blas_in_use()
