"""Fused selective-scan kernels for GPUs: ``mx.fast.cuda_kernel`` on NVIDIA, ``mx.fast.metal_kernel``
on Apple silicon, one algorithm in both.

One GPU thread owns one (batch, channel, state) triple and walks the sequence keeping its state in a
register, so the (L, E, d_state) state history never exists. The forward kernel writes ``y``, the
final state and the state at the start of every ``CHUNK`` steps (1/CHUNK of the history). The
backward kernel walks the chunks in reverse: it recomputes a chunk's states from its checkpoint into
registers, then runs the adjoint recurrence ``g_t = a_{t+1} g_{t+1} + dy_t C_t`` over them. Sums over
the state index (``y``, and the gradients of ``x`` and ``dt``) are warp shuffles; sums over channels
(the gradients of ``B`` and ``C``) are reduced inside each block and written once per block, to be
added up by MLX; gradients of ``A`` are summed per thread over time.

A kernel is used by default only on a backend where a test has compared it with the pure-MLX scan
(``VERIFIED_BACKENDS``); elsewhere ``selective_scan(method="fused")`` or ``BIT_AXON_FUSED_SCAN=1``
runs it on request, and ``BIT_AXON_FUSED_SCAN=0`` turns it off everywhere.
"""

from __future__ import annotations

import functools

from bit_axon.backend import VERIFIED_SCAN_BACKENDS, kernel_backend, settings

import mlx.core as mx

# Backends whose kernel has been checked against the reference scan (the backend's list).
VERIFIED_BACKENDS = VERIFIED_SCAN_BACKENDS

THREADS = 256  # threads per block: THREADS // N channels, each with N state lanes


def supports_fused_scan(d_state: int) -> bool:
    """The kernels reduce over the state with shuffles inside a 32-lane warp / SIMD group."""
    return d_state in (1, 2, 4, 8, 16, 32)


def use_fused_scan(d_state: int) -> bool:
    """Whether ``selective_scan`` picks the kernel by default: on a verified GPU backend, unless
    ``BIT_AXON_FUSED_SCAN`` says otherwise ("1" also enables an unverified backend, "0" disables)."""
    return settings().use_fused_scan(supports_fused_scan(d_state))


# Steps between forward checkpoints. The backward kernel keeps a chunk's states in registers, so
# longer chunks store fewer checkpoints (1/CHUNK of the history) but need more registers per thread,
# and its shared memory holds CHUNK x warps x N partial sums for B and C (at most 48 KB).
DEFAULT_CHUNK = 8  # fastest of 8/16/32 on an H200 (bench/ssm_kernel.py): 64 registers, 4 blocks an SM


def _check_chunk(chunk: int, d_state: int) -> None:
    if chunk < 1 or chunk * d_state * (THREADS // 32) * 8 > 48 * 1024:
        raise ValueError(f"chunk {chunk} does not fit the backward kernel's shared memory for d_state {d_state}")


# The bodies below are shared by both backends; a few macros map the dialects:
#   EXP(v)          float exponential
#   SHFL_XOR(v, o)  warp / SIMD-group butterfly exchange
#   SYNC()          block / threadgroup barrier
#   SHARED          shared / threadgroup address space
#   TID, BLK, BATCH thread index in the block, block index along channels, batch index
_FORWARD_BODY = """
    const int L = dims[1], E = dims[2];
    const int n_chunks = (L + CHUNK - 1) / CHUNK;
    const int tid = TID, n = tid % N;
    const int e = BLK * CH + tid / N;
    if (BLK * CH >= E) return;
    const bool valid = e < E;
    const int ee = valid ? e : E - 1;  // idle lanes still take part in the shuffles
    const long b = BATCH;
    const float A_en = A[ee * N + n];
    const float D_e = D[ee];
    float h = h0[(b * E + ee) * N + n];
    for (int t = 0; t < L; ++t) {
        if (t % CHUNK == 0 && valid) {
            checkpoints[((b * n_chunks + t / CHUNK) * E + e) * N + n] = h;
        }
        const long bt = b * L + t;
        const float dt_t = dt[bt * E + ee];
        const float x_t = x[bt * E + ee];
        const float a = EXP(dt_t * A_en) * keep[bt];
        h = a * h + dt_t * x_t * Bm[bt * N + n];
        float yv = h * Cm[bt * N + n];
        for (int off = N / 2; off > 0; off /= 2) yv += SHFL_XOR(yv, off);
        if (n == 0 && valid) y[bt * E + e] = yv + D_e * x_t;
    }
    if (valid) h_last[(b * E + e) * N + n] = h;
"""

_BACKWARD_BODY = """
    constexpr int WARPS = CH * N / 32;
    SHARED float red_B[CHUNK][WARPS][N];
    SHARED float red_C[CHUNK][WARPS][N];
    const int L = dims[1], E = dims[2];
    const int n_chunks = (L + CHUNK - 1) / CHUNK;
    const int n_blocks = (E + CH - 1) / CH;
    const int tid = TID, n = tid % N, lane = tid % 32, warp = tid / 32;
    const int e = BLK * CH + tid / N;
    if (BLK * CH >= E) return;
    const bool valid = e < E;
    const int ee = valid ? e : E - 1;
    const long b = BATCH;
    const float A_en = A[ee * N + n];
    const float D_e = D[ee];
    float g = valid ? dh_last[(b * E + e) * N + n] : 0.0f;  // dLoss/dh_t, carried back in time
    float dA_acc = 0.0f;
    float hs[CHUNK + 1];
    float as[CHUNK];
    for (int c = n_chunks - 1; c >= 0; --c) {
        const int start = c * CHUNK;
        const int len = L - start < CHUNK ? L - start : CHUNK;
        hs[0] = checkpoints[((b * n_chunks + c) * E + ee) * N + n];
        #pragma unroll
        for (int i = 0; i < CHUNK; ++i) {
            if (i < len) {
                const long bt = b * L + start + i;
                const float dt_t = dt[bt * E + ee];
                as[i] = EXP(dt_t * A_en) * keep[bt];
                hs[i + 1] = as[i] * hs[i] + dt_t * x[bt * E + ee] * Bm[bt * N + n];
            }
        }
        #pragma unroll
        for (int i = CHUNK - 1; i >= 0; --i) {
            if (i < len) {
                const long bt = b * L + start + i;
                const float dy_t = valid ? dy[bt * E + e] : 0.0f;
                const float dt_t = dt[bt * E + ee];
                const float x_t = x[bt * E + ee];
                g += dy_t * Cm[bt * N + n];
                float vC = dy_t * hs[i + 1];
                float vB = g * dt_t * x_t;
                float drive = g * Bm[bt * N + n];
                const float d_exp = g * hs[i] * as[i];
                float d_decay = d_exp * A_en;
                dA_acc += d_exp * dt_t;
                g = as[i] * g;
                for (int off = N / 2; off > 0; off /= 2) {
                    drive += SHFL_XOR(drive, off);
                    d_decay += SHFL_XOR(d_decay, off);
                }
                if (n == 0 && valid) {
                    dx[bt * E + e] = dy_t * D_e + drive * dt_t;
                    d_dt[bt * E + e] = d_decay + drive * x_t;
                }
                for (int off = N; off < 32; off *= 2) {
                    vB += SHFL_XOR(vB, off);
                    vC += SHFL_XOR(vC, off);
                }
                if (lane < N) {
                    red_B[i][warp][n] = vB;
                    red_C[i][warp][n] = vC;
                }
            }
        }
        SYNC();
        for (int j = tid; j < len * N; j += CH * N) {
            const int i = j / N, k = j % N;
            float sB = 0.0f, sC = 0.0f;
            for (int w = 0; w < WARPS; ++w) {
                sB += red_B[i][w][k];
                sC += red_C[i][w][k];
            }
            const long out = ((b * n_blocks + BLK) * L + start + i) * N + k;
            dB_part[out] = sB;
            dC_part[out] = sC;
        }
        SYNC();
    }
    if (valid) {
        dA_part[(b * E + e) * N + n] = dA_acc;
        dh0[(b * E + e) * N + n] = g;
    }
"""

_CUDA_HEADER = """
#define EXP(v) expf(v)
#define SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#define SYNC() __syncthreads()
#define SHARED __shared__
#define TID ((int)threadIdx.x)
#define BLK ((int)blockIdx.x)
#define BATCH ((long)blockIdx.y)
"""

_METAL_HEADER = """
#define EXP(v) metal::exp(v)
#define SHFL_XOR(v, o) simd_shuffle_xor((v), (ushort)(o))
#define SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define SHARED threadgroup
#define TID ((int)thread_position_in_threadgroup.x)
#define BLK ((int)threadgroup_position_in_grid.x)
#define BATCH ((long)threadgroup_position_in_grid.y)
"""

_FORWARD_INPUTS = ["x", "dt", "A", "Bm", "Cm", "D", "h0", "keep", "dims"]
_FORWARD_OUTPUTS = ["y", "h_last", "checkpoints"]
_BACKWARD_INPUTS = ["x", "dt", "A", "Bm", "Cm", "D", "keep", "dy", "dh_last", "checkpoints", "dims"]
_BACKWARD_OUTPUTS = ["dx", "d_dt", "dA_part", "dB_part", "dC_part", "dh0"]

_kernels: dict[tuple[str, str], object] = {}


def _kernel(backend: str, direction: str):
    key = (backend, direction)
    if key not in _kernels:
        body, inputs, outputs = (
            (_FORWARD_BODY, _FORWARD_INPUTS, _FORWARD_OUTPUTS)
            if direction == "forward"
            else (_BACKWARD_BODY, _BACKWARD_INPUTS, _BACKWARD_OUTPUTS)
        )
        name = f"bit_axon_scan_{direction}"
        if backend == "cuda":
            _kernels[key] = mx.fast.cuda_kernel(
                name=name, input_names=inputs, output_names=outputs, source=body, header=_CUDA_HEADER
            )
        else:
            # Metal references these attributes by name in the generated signature.
            body = (
                "(void)thread_position_in_threadgroup; (void)threadgroup_position_in_grid;\n" + body
            )
            _kernels[key] = mx.fast.metal_kernel(
                name=name, input_names=inputs, output_names=outputs, source=body, header=_METAL_HEADER
            )
    return _kernels[key]


def _launch_shape(b: int, E: int, N: int) -> tuple[int, tuple[int, int, int], tuple[int, int, int]]:
    channels = THREADS // N
    n_blocks = -(-E // channels)
    return n_blocks, (n_blocks * THREADS, b, 1), (THREADS, 1, 1)


def _backend_or_raise() -> str:
    backend = kernel_backend()
    if backend is None:
        raise RuntimeError(
            "The fused selective scan needs a GPU (CUDA or Metal) as the default device; "
            f"the default device is {mx.default_device()}. Use method='chunked' or 'stepwise'."
        )
    return backend


@functools.cache
def _fused_scan_function(chunk: int):
    """The scan as a custom function whose backward pass restarts from every ``chunk``-th state."""

    @mx.custom_function
    def scan(x, dt, A, B, C, D, h0, keep):
        b, L, E = x.shape
        N = A.shape[-1]
        _, grid, threadgroup = _launch_shape(b, E, N)
        return _kernel(_backend_or_raise(), "forward")(
            inputs=[x, dt, A, B, C, D, h0, keep, mx.array([b, L, E], dtype=mx.int32)],
            template=[("N", N), ("CH", THREADS // N), ("CHUNK", chunk)],
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=[(b, L, E), (b, E, N), (b, -(-L // chunk), E, N)],
            output_dtypes=[mx.float32] * 3,
        )

    @scan.vjp
    def scan_vjp(primals, cotangents, outputs):
        x, dt, A, B, C, D, h0, keep = primals
        dy, dh_last = cotangents[0], cotangents[1]
        b, L, E = x.shape
        N = A.shape[-1]
        n_blocks, grid, threadgroup = _launch_shape(b, E, N)
        dx, d_dt, dA_part, dB_part, dC_part, dh0 = _kernel(_backend_or_raise(), "backward")(
            inputs=[x, dt, A, B, C, D, keep, dy, dh_last, outputs[2], mx.array([b, L, E], dtype=mx.int32)],
            template=[("N", N), ("CH", THREADS // N), ("CHUNK", chunk)],
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=[(b, L, E), (b, L, E), (b, E, N), (b, n_blocks, L, N), (b, n_blocks, L, N), (b, E, N)],
            output_dtypes=[mx.float32] * 6,
        )
        dD = (dy * x).sum(axis=(0, 1))
        return dx, d_dt, dA_part.sum(0), dB_part.sum(1), dC_part.sum(1), dD, dh0, mx.zeros_like(keep)

    return scan


def fused_scan(
    x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, D: mx.array,
    h0: mx.array,
    keep: mx.array,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[mx.array, mx.array]:
    """The selective scan in one GPU kernel per direction; float32 inside, results in ``x.dtype``."""
    N = A.shape[-1]
    if not supports_fused_scan(N):
        raise ValueError(f"The fused scan supports d_state in 1, 2, 4, ..., 32, not {N}")
    _check_chunk(chunk, N)
    dtype = x.dtype
    y, h, _ = _fused_scan_function(chunk)(*(a.astype(mx.float32) for a in (x, dt, A, B, C, D, h0, keep)))
    return y.astype(dtype), h.astype(dtype)
