"""Prefill GEMM from bit-planes: ``y = x @ W_k^T`` for many tokens, reading only planes ``[lo, hi)`` (Sec. 4.3).

``W_k = s_k (Q_k - z_k + 1/2)`` and the plane-range contract (``[lo, hi)``, ``smul, zmul, zadd``,
one kernel for a prefix or a residual slice) are those of :mod:`cuda_numba.dequant`. Per group g
of row n the output is

    y[t, n] = sum_g s_eff (sum_{k in g} x[t, k] q[n, k]  -  z_eff sum_{k in g} x[t, k])

so the zero point enters once per group through ``sum x``.

Versions (``slice_gemm(..., version=V)``; ``slice_linear(kind="gemm", version=V)`` runs them
on routed tokens):

1. naive: one thread per output (t, n); per K-word the plane words are loaded once into
   registers and each of the 32 integers is rebuilt by shift-and-add. Every token's thread
   re-reads and re-decodes the weight row. (Also GEMV v1, :mod:`cuda_numba.slice_gemv`.)
2. 16 x 16 output tiles: per K-word the block stages x ``[16, 32]`` and the *dequantized*
   weights ``[16, 32]`` (each thread decodes 2) in padded shared memory, then every thread
   does 32 FMAs. A weight is decoded once per tile instead of once per output.
3. v2 with register blocking: a 64 x 64 tile per 16 x 16 threads, each thread a 4 x 4
   sub-tile, so 8 shared loads feed 16 FMAs instead of 2 loads per FMA.

Reference :func:`slice_gemm_ref`; dispatcher :func:`slice_gemm`; launchers ``LAUNCHERS``
(signature ``launch(args, tseg, N, block, stream)``, ``args`` as in :mod:`cuda_numba.dequant`).
"""

from __future__ import annotations

from numba import cuda, float32, int64, uint32

from ._common import cdiv
from .dequant import group_params, load_words, rebuild, run_uniform, uniform_ref
from .packing import MAX_BITS, WORD_BITS, PackedWeight

__all__ = ["LAUNCHERS", "VERSIONS", "slice_gemm", "slice_gemm_ref"]

TILE = 16  # v2: 16 x 16 output tile, 16 x 16 threads
ROW_PAD = WORD_BITS + 1  # a staged 32-element row (one K-word) + 1: conflict-free column reads
RB = 4  # v3: each thread computes RB x RB outputs
TILE3 = TILE * RB  # v3: 64 x 64 output tile
NAIVE_BLOCK = (32, 4)  # v1: threads along (N, tokens), clamped to the problem


def slice_gemm_ref(x, codes, scale, zero, slice_bits, k: int, group_size: int):
    """Reference: ``y = x @ W_k^T`` (float32 math, torch) -> [T, N] in x's dtype."""
    return uniform_ref(x, codes, scale, zero, slice_bits, k, group_size)


# ---------------------------------------------------------------------------------------
# Kernels


@cuda.jit
def gemm_kernel1(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v1: thread per (n, t); out[t0 + i, n] = sum_k x[t0 + i, k] * w[n, k]."""
    K = x.shape[1]
    N, W = planes.shape[1], planes.shape[2]
    G = scale.shape[1]
    n, i = cuda.grid(2)
    if n < N and i < tseg:
        t = t0 + i
        a = cuda.local.array(MAX_BITS, uint32)
        nb = hi - lo
        y = float32(0.0)
        for g in range(G):
            s_eff, z_eff = group_params(scale, zero, n, g, smul, zmul, zadd)
            acc = float32(0.0)  # sum x * q
            xs = float32(0.0)  # sum x (folds the zero point in once per group)
            for w in range(g * gw, min((g + 1) * gw, W)):
                load_words(planes, lo, hi, n, w, a)
                for j in range(min(WORD_BITS, K - w * WORD_BITS)):
                    xv = float32(x[t, w * WORD_BITS + j])
                    # shift-and-add written out (dequant.rebuild): a device call per weight costs
                    # nothing on a GPU but stalls Numba's CUDA simulator (measured: 0.15 s to minutes)
                    q = int64(0)
                    for p in range(nb):
                        q = (q << 1) | int64((a[p] >> uint32(j)) & uint32(1))
                    acc += xv * float32(q)
                    xs += xv
            y += s_eff * (acc - z_eff * xs)
        out[t, n] = y


@cuda.jit(device=True)
def _stage_weights(planes, lo, hi, scale, zero, smul, zmul, zadd, nr, w, g, a, ws, rr, j0, j1, jstep):
    """ws[rr, j] = dequantized w[nr, 32 w + j] for j in range(j0, j1, jstep); 0 for rows past N."""
    if nr < planes.shape[1]:
        s_eff, z_eff = group_params(scale, zero, nr, g, smul, zmul, zadd)
        load_words(planes, lo, hi, nr, w, a)
        for jj in range(j0, j1, jstep):
            ws[rr, jj] = s_eff * (float32(rebuild(a, hi - lo, jj)) - z_eff)
    else:
        for jj in range(j0, j1, jstep):
            ws[rr, jj] = float32(0.0)


@cuda.jit
def gemm_kernel2(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v2: TILE x TILE outputs per block; per K-word stage x and dequantized w in shared memory."""
    xs = cuda.shared.array((TILE, ROW_PAD), float32)  # [token, j]
    ws = cuda.shared.array((TILE, ROW_PAD), float32)  # [row, j]
    K = x.shape[1]
    N, W = planes.shape[1], planes.shape[2]
    tx = cuda.threadIdx.x  # output row within the tile, and element j (tx, tx + 16) when staging
    ty = cuda.threadIdx.y  # token within the tile, and weight row when staging
    n = cuda.blockIdx.x * TILE + tx
    i = cuda.blockIdx.y * TILE + ty
    a = cuda.local.array(MAX_BITS, uint32)
    acc = float32(0.0)
    for w in range(W):
        for jj in range(tx, WORD_BITS, TILE):
            kk = w * WORD_BITS + jj
            v = float32(0.0)
            if i < tseg and kk < K:
                v = float32(x[t0 + i, kk])
            xs[ty, jj] = v
        # this thread dequantizes row (block row ty), elements tx and tx + 16
        nr = cuda.blockIdx.x * TILE + ty
        _stage_weights(planes, lo, hi, scale, zero, smul, zmul, zadd, nr, w, w // gw, a, ws, ty, tx, WORD_BITS, TILE)
        cuda.syncthreads()
        for j in range(WORD_BITS):
            acc += xs[ty, j] * ws[tx, j]
        cuda.syncthreads()
    if n < N and i < tseg:
        out[t0 + i, n] = acc


@cuda.jit
def gemm_kernel3(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v3: TILE3 x TILE3 outputs per block of TILE x TILE threads; each thread an RB x RB sub-tile."""
    xs = cuda.shared.array((TILE3, ROW_PAD), float32)
    ws = cuda.shared.array((TILE3, ROW_PAD), float32)
    K = x.shape[1]
    N, W = planes.shape[1], planes.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TILE + tx
    a = cuda.local.array(MAX_BITS, uint32)
    acc = cuda.local.array((RB, RB), float32)  # acc[r, c]: token ty + r*TILE, row tx + c*TILE
    xr = cuda.local.array(RB, float32)
    wr = cuda.local.array(RB, float32)
    for r in range(RB):
        for c in range(RB):
            acc[r, c] = float32(0.0)
    for w in range(W):
        # stage x: TILE3 tokens x 32 elements, 256 threads, 8 loads each
        for e in range(tid, TILE3 * WORD_BITS, TILE * TILE):
            r = e // WORD_BITS
            jj = e % WORD_BITS
            ti = cuda.blockIdx.y * TILE3 + r
            kk = w * WORD_BITS + jj
            v = float32(0.0)
            if ti < tseg and kk < K:
                v = float32(x[t0 + ti, kk])
            xs[r, jj] = v
        # stage w: 4 threads per row (tid % 4 picks 8 elements), one word load per plane each
        for rr in range(tid // 4, TILE3, (TILE * TILE) // 4):
            j0 = (tid % 4) * 8
            nr = cuda.blockIdx.x * TILE3 + rr
            _stage_weights(planes, lo, hi, scale, zero, smul, zmul, zadd, nr, w, w // gw, a, ws, rr, j0, j0 + 8, 1)
        cuda.syncthreads()
        for j in range(WORD_BITS):
            for r in range(RB):
                xr[r] = xs[ty + r * TILE, j]
                wr[r] = ws[tx + r * TILE, j]
            for r in range(RB):
                for c in range(RB):
                    acc[r, c] += xr[r] * wr[c]
        cuda.syncthreads()
    for r in range(RB):
        i = cuda.blockIdx.y * TILE3 + ty + r * TILE
        for c in range(RB):
            n = cuda.blockIdx.x * TILE3 + tx + c * TILE
            if n < N and i < tseg:
                out[t0 + i, n] = acc[r, c]


# ---------------------------------------------------------------------------------------
# Launchers: one segment [t0, t0 + tseg) of x; the same geometry on a GPU and in the simulator


def launch_gemm1(args, tseg, N, block=None, stream=0):
    """v1: ``block`` = (threads along N, along tokens), default NAIVE_BLOCK, clamped to (N, tseg)."""
    bx, by = block or NAIVE_BLOCK
    bx, by = max(1, min(bx, N)), max(1, min(by, tseg))
    gemm_kernel1[(cdiv(N, bx), cdiv(tseg, by)), (bx, by), stream](*args)


def launch_gemm2(args, tseg, N, block=None, stream=0):
    """v2: TILE x TILE threads (fixed by the shared tiles)."""
    gemm_kernel2[(cdiv(N, TILE), cdiv(tseg, TILE)), (TILE, TILE), stream](*args)


def launch_gemm3(args, tseg, N, block=None, stream=0):
    """v3: TILE x TILE threads, TILE3 x TILE3 outputs per block."""
    gemm_kernel3[(cdiv(N, TILE3), cdiv(tseg, TILE3)), (TILE, TILE), stream](*args)


LAUNCHERS = {1: launch_gemm1, 2: launch_gemm2, 3: launch_gemm3}
VERSIONS = tuple(LAUNCHERS)
TOKENS_PER_LAUNCH = 0  # 0: the whole segment in one launch


def slice_gemm(x, w: PackedWeight, k: int, version: int = 3, block=None, out=None):
    """Prefill GEMM dispatcher: ``y = x @ W_k^T`` reading only planes ``[0, B_k)``.

    x [T, K] fp16/fp32, ``w`` a PackedWeight, one precision k in 1..E for every token ->
    y [T, N] in x's dtype. Host input -> NumPy, device input -> device array; ``out`` is
    written in place if given. ``block`` applies to v1 only (v2/v3 are fixed by their tiles).
    """
    if version not in LAUNCHERS:
        raise ValueError(f"unknown GEMM version {version}; have {list(VERSIONS)}")
    return run_uniform(LAUNCHERS[version], TOKENS_PER_LAUNCH, x, w, k, block, out)
