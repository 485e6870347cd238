"""Backend settings: every platform-dependent choice, read once from the environment.

``settings()`` builds one frozen :class:`Backend` from the ``BIT_AXON_*`` variables the first time
it is asked (``bit_axon.blas`` asks at ``import bit_axon``, before MLX is loaded) and logs it once.
Model and quantization code ask it for a *strategy* (does the CPU dequantize route apply to an
input of this many rows, expert blocks for this many pairs, which scan, which ``exp``) and know
nothing about platforms: the device checks are here only. Tests and benchmarks build a
``Backend`` explicitly and run under it with :func:`using`.

The variables (README, "Installation" and "Fused SSM kernels"):

- ``BIT_AXON_CPU_DEQUANT`` (on): quantized matmuls on the CPU dequantize and multiply in float
  (BLAS); off restores MLX's native kernels, together with the other CPU fast paths (the MoE's
  blocked expert layout, the compiled dequantization kernels, NF4's 64-bit pair lookup).
- ``BIT_AXON_CPU_KERNELS`` (on): build and use the compiled CPU dequantization kernels.
- ``BIT_AXON_FUSED_SCAN`` (``auto``): ``auto`` uses the fused SSM scan kernel on a verified GPU
  backend, ``1`` on any GPU backend, ``0`` nowhere.
- ``BIT_AXON_BLAS`` (auto): ``off`` keeps MLX's bundled BLAS, a path forces that library.

This module does not import MLX at import time (``bit_axon.blas`` reads it before MLX is loaded).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CPU_DEQUANT_VAR = "BIT_AXON_CPU_DEQUANT"
CPU_KERNELS_VAR = "BIT_AXON_CPU_KERNELS"
FUSED_SCAN_VAR = "BIT_AXON_FUSED_SCAN"
BLAS_VAR = "BIT_AXON_BLAS"

FUSED_SCAN_CHOICES = ("auto", "1", "0")
_OFF = frozenset({"0", "off", "false", "no", "none"})
_BLAS_OFF = _OFF | {"mlx"}

# GPU backends whose fused scan kernel has been checked against the reference scan by
# tests/layers/test_scan_kernels.py on real hardware (see the README's "Fused SSM kernels").
VERIFIED_SCAN_BACKENDS: frozenset[str] = frozenset({"cuda"})


def switch(env: Mapping[str, str], name: str, default: bool = True) -> bool:
    """The one parser for on/off variables: unset or empty is ``default``; 0/off/false/no/none is off."""
    value = env.get(name, "").strip().lower()
    return default if not value else value not in _OFF


@dataclass(frozen=True)
class Backend:
    """The backend choices of this process (see the module docstring for the variables)."""

    cpu_dequant: bool = True
    cpu_kernels: bool = True
    fused_scan: str = "auto"
    blas: str = ""  # "" picks a library, "off" keeps MLX's bundled BLAS, else a library path

    # Below this many input rows the native quantized kernel wins: dequantizing costs about as much
    # as ~3 rows of the native CPU kernel (bench/README.md, "4-bit matmuls on the CPU"), so
    # one-token decoding stays native.
    min_dequant_rows: int = 4
    # Rows per expert block in the CPU layout: enough for BLAS to run well, few enough that padding
    # each expert's rows up to a whole block wastes little (at most num_experts * (block - 1) rows).
    # Half-size blocks from a few pairs per expert on average; below that one row per pair wins
    # (measurements in bench/README.md, "Expert blocks").
    expert_block: int = 16
    small_expert_block: int = 8
    small_block_pairs_per_expert: int = 4
    # Per-step state size (b * E * N) from which the stepwise scan beats the chunked one on the CPU:
    # below it, per-op overhead dominates the short steps; above it, the chunked scan's full-size
    # (L, E, N) passes through memory cost more than the cache-resident steps (bench/ssm_scan.py).
    stepwise_min_state: int = 8192

    def __post_init__(self) -> None:
        if self.fused_scan not in FUSED_SCAN_CHOICES:
            raise ValueError(f"{FUSED_SCAN_VAR} must be auto, 1 or 0, not {self.fused_scan!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Backend:
        env = os.environ if env is None else env
        blas = env.get(BLAS_VAR, "").strip()
        return cls(
            cpu_dequant=switch(env, CPU_DEQUANT_VAR),
            cpu_kernels=switch(env, CPU_KERNELS_VAR),
            fused_scan=env.get(FUSED_SCAN_VAR, "auto").strip().lower() or "auto",
            blas="off" if blas.lower() in _BLAS_OFF else blas,
        )

    # --- strategies ------------------------------------------------------------------------------

    def cpu_fast_path(self) -> bool:
        """Whether quantized matmuls built now take the dequantize-then-BLAS route (and the other
        CPU fast paths apply): on the CPU device unless ``BIT_AXON_CPU_DEQUANT`` is off."""
        if not on_cpu():
            return False
        if not self.cpu_dequant:
            _log_cpu_fast_path_off()
        return self.cpu_dequant

    def dequantize_route(self, rows: int, half_scales: bool = False) -> bool:
        """Whether ``x @ W.T`` for a quantized W and ``rows`` input rows dequantizes W first.

        ``half_scales`` (float16 scales): at any row count on x86, where MLX's CPU quantized
        kernels do float16 arithmetic in software, many times slower than dequantizing with the
        compiled kernel (bench/README.md, "SmolLM2-135M-Instruct" under training throughput).
        """
        if not self.cpu_fast_path():
            return False
        return rows >= self.min_dequant_rows or (half_scales and platform.machine().lower() in ("x86_64", "amd64"))

    def float_inference(self) -> bool:
        """Whether a frozen quantized model that only runs forward passes (a distillation teacher, a
        served model) is dequantized once and kept in float: on the CPU fast path, where each
        quantized matmul would dequantize its weight again at every pass (bench/README.md,
        "Distillation")."""
        return self.cpu_fast_path()

    def expert_block_rows(self, num_pairs: int, num_experts: int) -> int:
        """Rows per block for the blocked expert layout, or 0 for one gathered matmul row per pair.

        MLX's CPU ``gather_mm`` runs one small matmul per batch entry; grouping each expert's rows
        into blocks lets every call be a real BLAS matmul. GPUs keep the row layout and their sorted
        gather kernels; so do inputs with few pairs per expert (decoding), where padding would dominate.
        """
        if not self.cpu_fast_path():
            return 0
        if num_pairs >= num_experts * self.expert_block:
            return self.expert_block
        if num_pairs >= num_experts * self.small_block_pairs_per_expert:
            return self.small_expert_block
        return 0

    def use_fused_scan(self, kernel_supported: bool) -> bool:
        """Whether the SSM scan takes the fused GPU kernel (``kernel_supported``: for this d_state)."""
        backend = kernel_backend()
        if backend is None or not kernel_supported or self.fused_scan == "0":
            return False
        if backend in VERIFIED_SCAN_BACKENDS:
            return True
        if self.fused_scan == "1":
            _warn_unverified_scan(backend)
        return self.fused_scan == "1"

    def scan_method(self, state_size: int, kernel_supported: bool) -> str:
        """"fused", "stepwise" or "chunked" for a scan with ``state_size`` (b * E * N) state values a step."""
        if self.use_fused_scan(kernel_supported):
            return "fused"
        return "stepwise" if on_cpu() and state_size >= self.stepwise_min_state else "chunked"

    def exp(self) -> Callable:
        """The ``exp`` for hot loops (SSM decays, the vocabulary softmax) on the current device:
        ``power(2, x log2 e)`` on the CPU, where it is faster at the same accuracy, else ``mx.exp``."""
        from bit_axon.fast_math import pow2_exp

        import mlx.core as mx

        return pow2_exp if on_cpu() else mx.exp


def on_cpu() -> bool:
    """Whether MLX's default device is the CPU."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def kernel_backend() -> str | None:
    """"cuda" or "metal" when the default device is a GPU with that backend, else None."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@functools.cache
def _log_cpu_fast_path_off() -> None:
    logger.info(
        "%s=0: CPU quantized matmuls and MoE experts use MLX's native kernels (slow for long inputs)",
        CPU_DEQUANT_VAR,
    )


@functools.cache
def _warn_unverified_scan(backend: str) -> None:
    logger.warning(
        "%s=1: using the fused scan kernel on %s, where no test has checked it yet "
        "(sh scripts/gpu-check.sh runs those tests)", FUSED_SCAN_VAR, backend,
    )


_active: Backend | None = None


def settings() -> Backend:
    """This process's backend settings: read from the environment once, logged once."""
    global _active
    if _active is None:
        _active = Backend.from_env()
        logger.debug("Backend settings: %s", _active)
    return _active


@contextlib.contextmanager
def using(backend: Backend) -> Iterator[Backend]:
    """Run with ``backend`` in place of the environment's settings (tests and benchmarks)."""
    global _active
    previous = settings()
    _active = backend
    try:
        yield backend
    finally:
        _active = previous
