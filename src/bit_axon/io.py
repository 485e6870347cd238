"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a truncated file behind.

The data goes to a hidden temporary file in the same folder (``.NAME.XXXX.tmp``), is synced, then
renamed over ``path``. The temporary name never ends in the file's own suffix (``.safetensors``,
``.json``, ...), so a loader globbing for those never picks up a half-written file that a kill left.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx

TEMP_SUFFIX = ".tmp"


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    # Given a file object, mx.save_safetensors writes to it as it is (given a name, it would append
    # ".safetensors" to one that lacks it).
    _atomic(Path(path), lambda f: mx.save_safetensors(f, arrays, metadata=metadata or {}))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))
