"""The BLAS preload looks only in absolute site-packages folders, never in the current directory."""

from __future__ import annotations

import sys

from bit_axon import blas


def test_a_library_in_the_current_directory_is_never_a_candidate(tmp_path, monkeypatch):
    planted = tmp_path / "cmeel.prefix" / "lib" / "libopenblas.so.0"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"not a library")
    monkeypatch.chdir(tmp_path)
    # `python -c` and an interactive interpreter put "" (the current directory) first in sys.path.
    monkeypatch.setattr(sys, "path", ["", "cmeel-relative", *sys.path])
    monkeypatch.setattr(blas, "_cpu_flags", lambda: set(blas._CMEEL_REQUIRED_FLAGS))
    found = blas._cmeel_openblas()
    assert all(not p.startswith(str(tmp_path)) and p.startswith("/") for p in found), found
    assert "cmeel.prefix/lib/libopenblas.so.0" not in found
    assert all(folder.startswith("/") for folder in blas.site_packages())
