"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a truncated file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx


def _atomic(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda p: p.write_text(text))


def atomic_save_safetensors(
    path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    _atomic(Path(path), lambda p: mx.save_safetensors(str(p), arrays, metadata=metadata or {}), ".safetensors")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda p: p.write_bytes(data))
