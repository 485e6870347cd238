"""Opt-in (``BIT_AXON_MALLOC=keep``): keep the memory MLX frees inside the process on Linux (glibc),
so new CPU arrays reuse warm pages instead of faulting in fresh ones.

MLX's CPU backend takes every op's output from ``malloc`` and frees it when the array dies. glibc
serves large requests (always above 32 MB) with fresh ``mmap`` pages and gives them back to the
kernel on ``free``, so every large intermediate pays one page fault per 4 KB page when first
written: ~4 us a fault on this VM, ~3.5 ns per float32 element, more than the arithmetic of most
elementwise ops (an 8M-element add: 3.9 ns/element, 0.9 without the faults). ``keep`` tells malloc
to serve everything from its heap and not to shrink it.

Measured trade-off (bench/README.md): a full-width 3-layer QLoRA step at 512 tokens took 54.8 s
against 59.8 and 64.9 s without it (within this VM's run-to-run spread), while the process's peak
resident memory grew 2.96 -> 4.31 GB (freed blocks stay with the process and fragment); small-model
training is not measurably faster. Hence off by default: ``BIT_AXON_MALLOC=system`` (the default)
keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Free memory at the top of the heap beyond this is still returned (mallopt takes a C int).
_TRIM_THRESHOLD = 2**31 - 1

_applied = False


def keeps_freed_memory() -> bool:
    """Whether this process's malloc was set up by :func:`keep_freed_memory`."""
    return _applied


def keep_freed_memory() -> bool:
    """With ``BIT_AXON_MALLOC=keep``, set glibc's malloc to reuse freed memory instead of returning
    it to the kernel; True if it is set."""
    global _applied
    setting = os.environ.get("BIT_AXON_MALLOC", "system").strip().lower()
    if setting not in ("keep", "system"):
        raise ValueError(f"BIT_AXON_MALLOC must be 'keep' or 'system', not {setting!r}")
    if _applied or setting == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _applied
    libc = ctypes.CDLL(None)
    # All requests from one heap (no per-thread arenas, no mmap'd chunks), and no trimming of it.
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    )
    if not ok:
        logger.warning("glibc's mallopt refused a setting; CPU arrays may page-fault on every allocation")
        return False
    _applied = True
    logger.info("BIT_AXON_MALLOC=keep: malloc keeps freed memory for reuse (faster, higher resident memory)")
    return True
