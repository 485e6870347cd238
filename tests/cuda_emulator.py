"""Runs the fused-scan CUDA kernel bodies on the CPU: each GPU thread of a block is an OS thread, and
warp shuffles and block barriers are std::barrier rendezvous. Slow, but it executes the very source
MLX hands to NVRTC (same body, same template constants), so indexing and reduction bugs show up on a
machine without a GPU."""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from bit_axon.layers import scan_kernels as k

import numpy as np

_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

struct Dim3 { unsigned x, y, z; };
static thread_local Dim3 threadIdx, blockIdx;
static std::barrier<>* block_barrier;
static float* exchange;

// Every lane publishes its value, then reads its partner's: two rendezvous per shuffle.
static float shfl_xor_emulated(float v, int o) {
    const unsigned me = threadIdx.x;
    exchange[me] = v;
    block_barrier->arrive_and_wait();
    const unsigned partner = (me & ~31u) | ((me & 31u) ^ (unsigned)o);
    const float out = exchange[partner];
    block_barrier->arrive_and_wait();
    return out;
}
#define __shfl_xor_sync(mask, v, o) shfl_xor_emulated((v), (o))
#define __syncthreads() block_barrier->arrive_and_wait()
#define __shared__ static
"""


def _kernel_function(name: str, body: str, inputs: list[str], outputs: list[str], consts: dict[str, int]) -> str:
    params = [f"const {'int32_t' if i == 'dims' else 'float'}* {i}" for i in inputs]
    params += [f"float* {o}" for o in outputs]
    constants = "".join(f"    constexpr int {c} = {v};\n" for c, v in consts.items())
    args = ", ".join([*inputs, *outputs])
    return f"""
static void {name}_thread({", ".join(params)}) {{
{constants}{body}
}}

extern "C" void {name}(unsigned blocks_x, unsigned blocks_y, unsigned threads, {", ".join(params)}) {{
    std::vector<float> slots(threads);
    exchange = slots.data();
    for (unsigned by = 0; by < blocks_y; ++by) {{
        for (unsigned bx = 0; bx < blocks_x; ++bx) {{
            std::barrier<> barrier(threads);
            block_barrier = &barrier;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t) {{
                pool.emplace_back([=] {{
                    threadIdx = {{t, 0, 0}};
                    blockIdx = {{bx, by, 0}};
                    {name}_thread({args});
                    // A thread that is done keeps answering rendezvous for the others (early return).
                    block_barrier->arrive_and_drop();
                }});
            }}
            for (auto& th : pool) th.join();
        }}
    }}
}}
"""


def available() -> bool:
    return shutil.which("g++") is not None


def build(N: int, chunk: int) -> ctypes.CDLL:
    consts = {"N": N, "CH": k.THREADS // N, "CHUNK": chunk}
    source = _PRELUDE + k._CUDA_HEADER + "".join(
        _kernel_function(name, body, inputs, outputs, consts)
        for name, body, inputs, outputs in (
            ("scan_forward", k._FORWARD_BODY, k._FORWARD_INPUTS, k._FORWARD_OUTPUTS),
            ("scan_backward", k._BACKWARD_BODY, k._BACKWARD_INPUTS, k._BACKWARD_OUTPUTS),
        )
    )
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    build_dir = Path(tempfile.gettempdir()) / "bit_axon_cuda_emulator"
    build_dir.mkdir(exist_ok=True)
    library = build_dir / f"scan_{digest}.so"
    if not library.exists():
        src = build_dir / f"scan_{digest}.cpp"
        src.write_text(source)
        partial = library.with_suffix(".tmp.so")
        subprocess.run(
            ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
             "-o", str(partial), str(src)],
            check=True, capture_output=True, text=True,
        )
        partial.replace(library)
    return ctypes.CDLL(str(library))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def run(lib: ctypes.CDLL, direction: str, N: int, inputs: list[np.ndarray], output_shapes: list[tuple]):
    """Launch like ``scan_kernels`` does: grid (n_blocks, b), THREADS threads a block."""
    b, _, E = inputs[0].shape
    n_blocks = -(-E // (k.THREADS // N))
    arrays = [np.ascontiguousarray(a, dtype=np.int32 if a.dtype.kind == "i" else np.float32) for a in inputs]
    outputs = [np.full(shape, np.nan, dtype=np.float32) for shape in output_shapes]
    fn = getattr(lib, f"scan_{direction}")
    fn(ctypes.c_uint(n_blocks), ctypes.c_uint(b), ctypes.c_uint(k.THREADS), *map(_ptr, arrays + outputs))
    return outputs
