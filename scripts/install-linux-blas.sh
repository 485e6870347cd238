#!/bin/sh
# MLX's Linux CPU wheel ships a reference BLAS (~3 GFLOP/s here). bit_axon loads an optimized
# OpenBLAS at import time when one is present (see src/bit_axon/blas.py). This installs Debian's
# runtime-dispatching OpenBLAS when we may (root with apt); otherwise it only says how.
[ "$(uname -s)" = "Linux" ] || exit 0
if ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing libopenblas0-pthread (fast CPU matmuls for MLX)..."
    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; }) \
        || echo "Could not install libopenblas0-pthread; CPU training will be slow." >&2
else
    echo "Tip: 'sudo apt-get install libopenblas0-pthread' makes CPU training ~40x faster." >&2
fi
exit 0
