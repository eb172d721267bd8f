"""Decode GEMV from bit-planes: ``y = x @ W_k^T`` for T = 1..8 tokens, reading only planes ``[lo, hi)`` (Sec. 4.3).

``W_k = s_k (Q_k - z_k + 1/2)`` and the plane-range contract (``[lo, hi)``, ``smul, zmul, zadd``,
one kernel for a prefix or a residual slice) are those of :mod:`cuda_numba.dequant`. A decode
step multiplies a few tokens by a whole layer, so every weight should be read and decoded once
for all tokens, and many threads must share a row.

Versions 1-3 rebuild each weight's integer by shift-and-add (about 30 instructions per weight;
the 11-29 H200 run found them bound by instructions at ~1 % of HBM bandwidth, at the same time
for 2, 4 and 8 bits). Versions 4-6 remove the rebuild with the plane decomposition: for one
K-word (32 weights) of a row read at ``nb`` planes, MSB first,

    sum_j x_j q_j = sum_p 2^(nb-1-p) sum_j x_j bit_pj                  (q_j = sum_p 2^(nb-1-p) bit_pj)

and for each 8 consecutive activations a 256-entry **table of partial sums**
``tab[v] = sum_{i<8} x_i bit_i(v)`` (Any-Precision-LLM / LUT-GEMM style; here the table holds
activation sums, not centroids) turns a plane byte into one shared-memory read:

    sum_j x_j bit_pj = tab_0[byte 0] + tab_1[byte 1] + tab_2[byte 2] + tab_3[byte 3]

so a 32-weight word costs ``4 nb`` table reads and ``nb`` multiply-adds per token: decode work
and bytes read both grow with ``nb``. A table is built from two 16-entry nibble tables
(``tab[v] = lo[v & 15] + hi[v >> 4]``, one add per entry), once per block and K-chunk.
``tab[255]`` is the sum of the 8 activations: the zero point comes in through ``sum x``.

Versions (``slice_gemv(..., version=V)``; ``slice_linear(kind="gemv", version=V)`` runs them on
routed tokens, 8 tokens per launch):

1. naive: one thread per output (t, n): GEMM v1 of :mod:`cuda_numba.slice_gemm`.
2. one block per output row, one thread per K-word; each weight is decoded once and used for
   all <= 8 tokens; shared-memory tree reduction over the block.
3. v2 with several rows per block and the activations staged in shared memory (coalesced
   loads, padded against bank conflicts), so a block reads x once for all its rows.
4. look-up tables instead of the rebuild: a block of ``WC x RB`` threads owns ``RPT * RB``
   rows and walks K in chunks of ``WC`` words; per chunk it builds the ``tseg x 4 WC``
   tables in shared memory (``tseg * WC <= 8``: 32 KB), then each thread looks up the plane
   words of word slot ``tx`` of its ``RPT`` rows for every token. The ``WC`` slots of a row
   are summed through shared memory (no warp shuffles: runs in the simulator).
5. v4 + **split-K**: ``S`` K-splits (grid ``(row blocks, S)``, about two blocks per SM); each
   block writes its partial sums to a workspace, fences, counts itself done with an atomic add
   per row block, and the **last** block sums the ``S`` partials, writes the output and resets
   the counter. One launch, no second reduction kernel.
6. v5 + **per-token precision in one launch** (the decode call path, ``slice_linear(...,
   method="fused")``): ``k_t`` stays on the device, each token's Horner sum stops at its own
   ``B_{k_t}`` planes with its own ``s_k, z_k``; the block loads the largest precision's planes
   once. No sort, gather, scatter, host round trip or allocation per call.

Launch geometry is the same on a GPU and in the simulator: block sizes are parameters with one
default each, clamped to the problem (a 37-row layer gets 10 row slots, not 32).
Reference :func:`slice_gemv_ref`; dispatcher :func:`slice_gemv`; launchers ``LAUNCHERS`` (v1-v5,
signature ``launch(args, tseg, N, block, stream)``); v6 :func:`gemv_routed`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32, uint32

from ._common import cdiv, finish, is_device_array, output_array, to_device
from .dequant import group_params, group_words, load_words, rebuild, run_uniform, uniform_ref
from .packing import MAX_BITS, WORD_BITS, PackedWeight
from .slice_gemm import launch_gemm1

__all__ = [
    "LAUNCHERS",
    "MAX_T",
    "VERSIONS",
    "gemv_geometry",
    "gemv_routed",
    "slice_gemv",
    "slice_gemv_ref",
    "splits",
    "workspace_counters_clear",
]

MAX_T = 8  # tokens per launch (decode); larger T is processed 8 at a time
MAX_THREADS = 256  # threads per block, at most (sizes the shared reduction buffers)
V2_THREADS = 128  # v2: threads per row (clamped to the words of K)
V3_BLOCK = (32, 8)  # v3: (K-words per chunk, rows per block), clamped to the problem
XS_PAD = V3_BLOCK[0] + 1  # v3: padded row of the staged-x tile (conflict-free shared memory)
TAB_ROWS = 32  # v4-v6: tables in shared memory, tseg * (4 * WC) <= 32 tables of 256 float32 = 32 KB
TAB_LEN = 256  # one entry per byte value
RPT = 4  # v4-v6: rows per thread
XSUM_LEN = TAB_ROWS // 4  # sum x per (token, word slot): tseg * WC <= 8
ACC_LEN = RPT * MAX_T  # partial sums per thread: (row slot, token)
LUT_THREADS = 256  # v4-v6: threads per block (WC * RB), before clamping the rows to N
DEFAULT_SMS = 132  # v5/v6 split count when the device does not report its SM count (simulator)


def slice_gemv_ref(x, codes, scale, zero, slice_bits, k: int, group_size: int):
    """Reference: ``y = x @ W_k^T`` (float32 math, torch) -> [T, N] in x's dtype."""
    return uniform_ref(x, codes, scale, zero, slice_bits, k, group_size)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def gemv_geometry(tseg: int, nthreads: int = LUT_THREADS, N: int | None = None) -> tuple[int, int, int]:
    """v4-v6 block ``(WC, RB)`` and rows per block: ``tseg * WC <= 8`` (tables fit 32 KB), RB clamped to N."""
    wc = 8
    while wc > 1 and tseg * wc > TAB_ROWS // 4:
        wc //= 2
    wc = min(wc, nthreads)
    rb = max(1, nthreads // wc)
    if N is not None:
        rb = max(1, min(rb, cdiv(N, RPT)))  # no idle row slots on a small layer
    return wc, rb, rb * RPT


# ---------------------------------------------------------------------------------------
# v2, v3: shift-and-add decode


@cuda.jit(device=True)
def _decode_word(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, K, n, w, a, qf):
    """qf[j] = q_j - z_eff for the 32 elements of word w of row n; returns (s_eff, valid elements)."""
    s_eff, z_eff = group_params(scale, zero, n, w // gw, smul, zmul, zadd)
    load_words(planes, lo, hi, n, w, a)
    jmax = min(WORD_BITS, K - w * WORD_BITS)
    for j in range(jmax):
        qf[j] = float32(rebuild(a, hi - lo, j)) - z_eff
    return s_eff, jmax


@cuda.jit(device=True)
def _tree_sum(part, red, tseg, tid, lane, width):
    """red[i, tid - lane] = sum over the ``width`` lanes of part[i] (a power of two), for i < tseg.

    Shared-memory tree reduction (no warp shuffles, so it runs in the simulator): after the
    step with stride s, lane l < s holds the sum of lanes l, l + s, l + 2s, ...
    """
    for i in range(tseg):
        red[i, tid] = part[i]
    cuda.syncthreads()
    stride = width // 2
    while stride > 0:
        if lane < stride:
            for i in range(tseg):
                red[i, tid] += red[i, tid + stride]
        cuda.syncthreads()
        stride //= 2


@cuda.jit
def gemv_kernel2(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v2: block per row n, thread per K-word (strided), all tseg <= MAX_T tokens per thread."""
    red = cuda.shared.array((MAX_T, MAX_THREADS), float32)
    K = x.shape[1]
    W = planes.shape[2]
    n = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthr = cuda.blockDim.x
    a = cuda.local.array(MAX_BITS, uint32)
    qf = cuda.local.array(WORD_BITS, float32)  # decoded (q - z_eff) of this word
    part = cuda.local.array(MAX_T, float32)
    for i in range(MAX_T):
        part[i] = float32(0.0)
    for w in range(tid, W, nthr):
        s_eff, jmax = _decode_word(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, K, n, w, a, qf)
        for i in range(tseg):  # weights decoded once, reused for every token
            acc = float32(0.0)
            for j in range(jmax):
                acc += float32(x[t0 + i, w * WORD_BITS + j]) * qf[j]
            part[i] += s_eff * acc
    _tree_sum(part, red, tseg, tid, tid, nthr)  # over all the block's words
    if tid == 0:
        for i in range(tseg):
            out[t0 + i, n] = red[i, 0]


@cuda.jit
def gemv_kernel3(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v3: block = (BX words) x (BY rows); x staged in shared memory once per chunk for all BY rows."""
    xs = cuda.shared.array((MAX_T, WORD_BITS, XS_PAD), float32)  # [token, j, word] (+1 pad)
    red = cuda.shared.array((MAX_T, MAX_THREADS), float32)
    K = x.shape[1]
    N, W = planes.shape[1], planes.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bx = cuda.blockDim.x
    nthr = bx * cuda.blockDim.y
    tid = ty * bx + tx
    n = cuda.blockIdx.x * cuda.blockDim.y + ty
    a = cuda.local.array(MAX_BITS, uint32)
    qf = cuda.local.array(WORD_BITS, float32)
    part = cuda.local.array(MAX_T, float32)
    for i in range(MAX_T):
        part[i] = float32(0.0)
    for c0 in range(0, W, bx):
        # stage x[t0:t0+tseg, c0*32 : (c0+bx)*32]: consecutive threads load consecutive elements
        for e in range(tid, tseg * bx * WORD_BITS, nthr):
            i = e // (bx * WORD_BITS)
            r = e % (bx * WORD_BITS)
            kk = c0 * WORD_BITS + r
            v = float32(0.0)
            if kk < K:
                v = float32(x[t0 + i, kk])
            xs[i, r % WORD_BITS, r // WORD_BITS] = v
        cuda.syncthreads()
        w = c0 + tx
        if n < N and w < W:
            s_eff, jmax = _decode_word(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, K, n, w, a, qf)
            for i in range(tseg):
                acc = float32(0.0)
                for j in range(jmax):
                    acc += xs[i, j, tx] * qf[j]
                part[i] += s_eff * acc
        cuda.syncthreads()
    _tree_sum(part, red, tseg, tid, tx, bx)  # over the words of each row (tx); rows stay apart
    if tx == 0 and n < N:
        for i in range(tseg):
            out[t0 + i, n] = red[i, tid]


# ---------------------------------------------------------------------------------------
# v4-v6: look-up tables of activation sums


@cuda.jit(device=True)
def _build_tables(x, t0, tseg, c0, K, wc, tab, nib, xsum, tid, nthr):
    """Tables of chunk c0 (first word): tab[t * 4wc + b, v] = sum_i x[t, 32 c0 + 8 b + i] bit_i(v).

    nib[t * 4wc + b, 0..15] / [16..31]: sums of the low / high 4 activations of byte b for each
    nibble; xsum[t * wc + u] = sum of the 32 activations of word slot u (for the zero point).
    Activations beyond K count as 0 (their plane bits are 0 too).
    """
    nbg = 4 * wc
    ntab = tseg * nbg
    for e in range(tid, ntab * 32, nthr):  # nibble tables: 32 entries per byte group
        r = e // 32
        h = (e % 32) // 16  # 0: low nibble (activations 0-3), 1: high (4-7)
        v = e % 16
        t = r // nbg
        kk0 = (c0 * WORD_BITS) + (r % nbg) * 8 + h * 4
        s = float32(0.0)
        for i in range(4):
            if (v >> i) & 1 and kk0 + i < K:
                s += float32(x[t0 + t, kk0 + i])
        nib[r, h * 16 + v] = s
    cuda.syncthreads()
    for e in range(tid, ntab * TAB_LEN, nthr):
        r = e // TAB_LEN
        v = e % TAB_LEN
        tab[r, v] = nib[r, v & 15] + nib[r, 16 + (v >> 4)]
    for e in range(tid, tseg * wc, nthr):  # sum x per word slot: 4 full-byte entries
        t = e // wc
        u = e % wc
        r = t * nbg + 4 * u
        xsum[e] = nib[r, 15] + nib[r, 31] + nib[r + 1, 15] + nib[r + 1, 31]
        xsum[e] += nib[r + 2, 15] + nib[r + 2, 31] + nib[r + 3, 15] + nib[r + 3, 31]
    cuda.syncthreads()


@cuda.jit(device=True)
def _lookup(a, nb, tab, r0):
    """sum_j x_j q_j of one word: Horner over planes (MSB first) of 4 byte look-ups per plane."""
    acc = float32(0.0)
    for p in range(nb):
        wd = a[p]
        s = tab[r0, wd & uint32(255)] + tab[r0 + 1, (wd >> uint32(8)) & uint32(255)]
        s += tab[r0 + 2, (wd >> uint32(16)) & uint32(255)] + tab[r0 + 3, wd >> uint32(24)]
        acc = float32(2.0) * acc + s
    return acc


@cuda.jit(device=True)
def _chunk_rows(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, tab, xsum, tseg, wc, w, tx, nrow0, rb, acc):
    """Accumulate word w (slot tx) of this thread's RPT rows into acc[i * MAX_T + t]."""
    N, W = planes.shape[1], planes.shape[2]
    if w >= W:
        return
    a = cuda.local.array(MAX_BITS, uint32)
    nb = hi - lo
    g = w // gw
    for i in range(RPT):
        n = nrow0 + i * rb
        if n < N:
            load_words(planes, lo, hi, n, w, a)
            s_eff, z_eff = group_params(scale, zero, n, g, smul, zmul, zadd)
            for t in range(tseg):
                xq = _lookup(a, nb, tab, t * 4 * wc + 4 * tx)
                acc[i * MAX_T + t] += s_eff * (xq - z_eff * xsum[t * wc + tx])


@cuda.jit(device=True)
def _block_sum(acc, red, i, t, tx, ty, wc):
    """Sum over the wc word slots of row slot (i, ty) for token t; valid in thread tx == 0."""
    red[ty, tx] = acc[i * MAX_T + t]
    cuda.syncthreads()
    s = float32(0.0)
    if tx == 0:
        for u in range(wc):
            s += red[ty, u]
    cuda.syncthreads()
    return s


@cuda.jit(device=True)
def _write_row_sums(acc, red, dst, toff, tseg):
    """dst[toff + t, n] = this block's sum over its word slots, for each of its rows n and tokens t < tseg."""
    wc, rb = cuda.blockDim.x, cuda.blockDim.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    nrow0 = cuda.blockIdx.x * rb * RPT + ty
    for i in range(RPT):
        n = nrow0 + i * rb
        for t in range(tseg):
            s = _block_sum(acc, red, i, t, tx, ty, wc)
            if tx == 0 and n < dst.shape[1]:
                dst[toff + t, n] = s


@cuda.jit(device=True)
def _finish_split_k(acc, red, last, part, count, out, t0, tseg):
    """Split-K epilogue: write this block's partials, and if it is the last of its row block, sum all S.

    part float32 [S, MAX_T, N], count int32 [row blocks] (0 on entry and again on exit), last a
    shared int32 [1]. The fence makes the partials visible before the block counts itself done;
    the last block reads them with atomic adds of 0 (L2, coherent across SMs; the CUDA guide's
    version of this pattern uses ``volatile`` loads, which Numba does not have).
    """
    N = part.shape[2]
    S = cuda.gridDim.y
    wc, rb = cuda.blockDim.x, cuda.blockDim.y
    tid, nthr = cuda.threadIdx.y * wc + cuda.threadIdx.x, wc * rb
    _write_row_sums(acc, red, part[cuda.blockIdx.y], 0, tseg)  # this split's partials [MAX_T, N]
    cuda.threadfence()  # partials visible to the block that finishes last
    cuda.syncthreads()
    if tid == 0:
        done = cuda.atomic.add(count, cuda.blockIdx.x, 1)
        last[0] = 1 if done == S - 1 else 0
    cuda.syncthreads()
    if last[0] == 1:
        for e in range(tid, RPT * rb * tseg, nthr):  # this row block's outputs
            r = e // tseg
            t = e % tseg
            n = cuda.blockIdx.x * rb * RPT + r
            if n < N:
                s = float32(0.0)
                for y in range(S):  # read through an atomic: served by L2, never by a stale L1 line
                    s += cuda.atomic.add(part, (y, t, n), float32(0.0))
                out[t0 + t, n] = s
        if tid == 0:
            count[cuda.blockIdx.x] = 0  # ready for the next launch


# ---------------------------------------------------------------------------------------
# Kernels


@cuda.jit(device=True)
def _lut_chunks(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, c_begin, c_end, tab, nib, xsum, acc):
    """v4/v5 main loop: chunks [c_begin, c_end) of WC words into acc[i * MAX_T + t] (this thread's rows)."""
    K = x.shape[1]
    wc, rb = cuda.blockDim.x, cuda.blockDim.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    nrow0 = cuda.blockIdx.x * rb * RPT + ty
    for e in range(ACC_LEN):
        acc[e] = float32(0.0)
    for c in range(c_begin, c_end):
        c0 = c * wc
        _build_tables(x, t0, tseg, c0, K, wc, tab, nib, xsum, ty * wc + tx, wc * rb)
        _chunk_rows(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, tab, xsum, tseg, wc, c0 + tx, tx, nrow0, rb, acc)
        cuda.syncthreads()  # the next chunk overwrites the tables


@cuda.jit
def gemv_kernel4(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v4: LUT GEMV; block (WC, RB) owns RPT * RB rows and all of K."""
    tab = cuda.shared.array((TAB_ROWS, TAB_LEN), float32)
    nib = cuda.shared.array((TAB_ROWS, 32), float32)
    xsum = cuda.shared.array(XSUM_LEN, float32)
    red = cuda.shared.array((MAX_THREADS, 8), float32)
    acc = cuda.local.array(ACC_LEN, float32)
    wc, W = cuda.blockDim.x, planes.shape[2]
    _lut_chunks(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, 0, (W + wc - 1) // wc, tab, nib, xsum, acc)
    _write_row_sums(acc, red, out, t0, tseg)


@cuda.jit
def gemv_kernel5(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out, part, count):
    """v5: v4 + split-K over blockIdx.y; the last block of each row block sums the partials.

    part float32 [S, MAX_T, N] and count int32 [row blocks] are preallocated; count is back to
    0 when the kernel ends.
    """
    tab = cuda.shared.array((TAB_ROWS, TAB_LEN), float32)
    nib = cuda.shared.array((TAB_ROWS, 32), float32)
    xsum = cuda.shared.array(XSUM_LEN, float32)
    red = cuda.shared.array((MAX_THREADS, 8), float32)
    last = cuda.shared.array(1, int32)
    acc = cuda.local.array(ACC_LEN, float32)
    n_chunks = (planes.shape[2] + cuda.blockDim.x - 1) // cuda.blockDim.x
    per = (n_chunks + cuda.gridDim.y - 1) // cuda.gridDim.y  # chunks per split
    c_begin = cuda.blockIdx.y * per
    c_end = min(c_begin + per, n_chunks)
    _lut_chunks(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, c_begin, c_end, tab, nib, xsum, acc)
    _finish_split_k(acc, red, last, part, count, out, t0, tseg)


@cuda.jit(device=True)
def _chunk_rows_routed(planes, scale, zero, gw, tab, xsum, tseg, tnb, tsm, tzm, nbmax, wc, w, tx, nrow0, rb, acc):
    """v6's _chunk_rows: token t reads planes [0, tnb[t]) with s_k = s tsm[t], z_k = z_E tzm[t]."""
    N, W = planes.shape[1], planes.shape[2]
    if w >= W:
        return
    a = cuda.local.array(MAX_BITS, uint32)
    g = w // gw
    for i in range(RPT):
        n = nrow0 + i * rb
        if n < N:
            for p in range(nbmax):  # the planes of the largest precision, loaded once for all tokens
                a[p] = uint32(planes[p, n, w])
            s = float32(scale[n, g])
            z = float32(zero[n, g])
            for t in range(tseg):
                xq = _lookup(a, tnb[t], tab, t * 4 * wc + 4 * tx)
                acc[i * MAX_T + t] += s * tsm[t] * (xq - (z * tzm[t] - float32(0.5)) * xsum[t * wc + tx])


@cuda.jit
def gemv_kernel6(x, t0, tseg, kt, bk, planes, scale, zero, gw, out, part, count):
    """v6: v5 with per-token precision k_t (device array); bk int32 [E + 1] = (0, B_1, ..., B_E).

    k_t outside 1..E is clamped (a device-side check would need a host round trip).
    """
    tab = cuda.shared.array((TAB_ROWS, TAB_LEN), float32)
    nib = cuda.shared.array((TAB_ROWS, 32), float32)
    xsum = cuda.shared.array(XSUM_LEN, float32)
    red = cuda.shared.array((MAX_THREADS, 8), float32)
    last = cuda.shared.array(1, int32)
    K = x.shape[1]
    W = planes.shape[2]
    E = bk.shape[0] - 1
    S = cuda.gridDim.y
    wc, rb = cuda.blockDim.x, cuda.blockDim.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid, nthr = ty * wc + tx, wc * rb
    nrow0 = cuda.blockIdx.x * rb * RPT + ty
    tnb = cuda.local.array(MAX_T, int32)  # per token: planes read, scale and zero multipliers
    tsm = cuda.local.array(MAX_T, float32)
    tzm = cuda.local.array(MAX_T, float32)
    nbmax = 0
    for t in range(tseg):
        k = min(max(int32(kt[t0 + t]), 1), E)
        tnb[t] = bk[k]
        tsm[t] = float32(1.0) / float32(1 << (bk[k] - bk[1]))  # s_k = s / 2^(B_k - b_1)
        tzm[t] = float32(1.0) / float32(1 << (bk[E] - bk[k]))  # z_k = z_E / 2^(B_E - B_k)
        nbmax = max(nbmax, bk[k])
    acc = cuda.local.array(ACC_LEN, float32)
    for e in range(ACC_LEN):
        acc[e] = float32(0.0)
    n_chunks = (W + wc - 1) // wc
    per = (n_chunks + S - 1) // S
    for c in range(cuda.blockIdx.y * per, min((cuda.blockIdx.y + 1) * per, n_chunks)):
        c0 = c * wc
        _build_tables(x, t0, tseg, c0, K, wc, tab, nib, xsum, tid, nthr)
        _chunk_rows_routed(
            planes, scale, zero, gw, tab, xsum, tseg, tnb, tsm, tzm, nbmax, wc, c0 + tx, tx, nrow0, rb, acc
        )
        cuda.syncthreads()
    _finish_split_k(acc, red, last, part, count, out, t0, tseg)


# ---------------------------------------------------------------------------------------
# Launchers: one segment [t0, t0 + tseg) of x; the same geometry on a GPU and in the simulator


def launch_gemv2(args, tseg, N, block=None, stream=0):
    """v2: N blocks of ``block`` threads (default V2_THREADS), clamped to the words of K (a power of two)."""
    W = args[3].shape[2]
    nthr = min(block or V2_THREADS, _pow2_at_least(W))
    if nthr & (nthr - 1) or nthr > MAX_THREADS:
        raise ValueError(f"GEMV v2 block must be a power of two <= {MAX_THREADS}")
    gemv_kernel2[N, nthr, stream](*args)


def launch_gemv3(args, tseg, N, block=None, stream=0):
    """v3: ``block`` = (words per chunk, rows per block), default V3_BLOCK, clamped to (W, N)."""
    W = args[3].shape[2]
    bx, by = block or V3_BLOCK
    bx, by = min(bx, _pow2_at_least(W)), max(1, min(by, N))
    if bx & (bx - 1) or bx > V3_BLOCK[0] or bx * by > MAX_THREADS:
        raise ValueError(f"GEMV v3 block (bx, by): bx a power of two <= {V3_BLOCK[0]}, bx*by <= {MAX_THREADS}")
    gemv_kernel3[cdiv(N, by), (bx, by), stream](*args)


def launch_gemv4(args, tseg, N, block=None, stream=0):
    """v4: ``block`` threads (default LUT_THREADS) as (WC, RB), one block per RPT * RB rows."""
    wc, rb, rows = gemv_geometry(tseg, block or LUT_THREADS, N)
    gemv_kernel4[cdiv(N, rows), (wc, rb), stream](*args)


def launch_gemv5(args, tseg, N, block=None, stream=0):
    """v5: v4's blocks times S K-splits (:func:`splits`), with a cached workspace."""
    nthr = block or LUT_THREADS
    wc, rb, rows = gemv_geometry(tseg, nthr, N)
    S = splits(N, args[3].shape[2], tseg, nthr)
    nrb = cdiv(N, rows)
    part, count = _workspace(S, N, nrb, stream)
    gemv_kernel5[(nrb, S), (wc, rb), stream](*args, part, count)


LAUNCHERS = {1: launch_gemm1, 2: launch_gemv2, 3: launch_gemv3, 4: launch_gemv4, 5: launch_gemv5}
VERSIONS = (*LAUNCHERS, 6)  # v6 runs through gemv_routed
TOKENS_PER_LAUNCH = MAX_T


_WORKSPACES = {}  # (S, N, row blocks, stream key) -> (part, count): allocated once per shape


def _workspace(S, N, nrb, stream):
    key = (S, N, nrb, 0 if not stream else id(stream))
    if key not in _WORKSPACES:
        part = cuda.device_array((S, MAX_T, N), np.float32)
        count = cuda.to_device(np.zeros(nrb, np.int32))
        _WORKSPACES[key] = (part, count)
    return _WORKSPACES[key]


def workspace_counters_clear() -> bool:
    """True when every split-K counter is back to 0 (each v5/v6 launch must reset its own)."""
    return all(not count.copy_to_host().any() for _, count in _WORKSPACES.values())


_SM_COUNT = []  # the current device's multiprocessor count, read once


def _n_sm() -> int:
    if not _SM_COUNT:
        try:
            _SM_COUNT.append(int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
        except Exception:  # noqa: BLE001 - the simulator's device has no attributes
            _SM_COUNT.append(DEFAULT_SMS)
    return _SM_COUNT[0]


def splits(N: int, W: int, tseg: int, nthreads: int = LUT_THREADS) -> int:
    """K-splits for v5/v6: about two blocks per SM, at most one split per chunk of WC words."""
    wc, _, rows = gemv_geometry(tseg, nthreads, N)
    return max(1, min(cdiv(W, wc), cdiv(2 * _n_sm(), cdiv(N, rows))))


def slice_gemv(x, w: PackedWeight, k: int, version: int = 5, block=None, out=None):
    """Decode GEMV dispatcher: ``y = x @ W_k^T`` reading only planes ``[0, B_k)`` (Sec. 4.3).

    x [T, K] fp16/fp32 (decode: 1-8 tokens; more are processed 8 per launch), ``w`` a
    PackedWeight, one precision k in 1..E for every token -> y [T, N] in x's dtype. Host input
    -> NumPy, device input -> device array; ``out`` is written in place if given. ``block``:
    v1 and v3 a pair (see the launchers), v2 and v4-v6 a thread count.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown GEMV version {version}; have {list(VERSIONS)}")
    if version >= 4 and block is not None and (block & (block - 1) or not 1 <= block <= MAX_THREADS):
        raise ValueError(f"block must be a power of two <= {MAX_THREADS}")
    if not 1 <= k <= len(w.slice_bits):
        raise ValueError(f"k={k} outside 1..{len(w.slice_bits)}")
    if version == 6:  # the routed kernel with every token at precision k
        return gemv_routed(x, w, np.full(x.shape[0], k, np.int32), block=block, out=out)
    return run_uniform(LAUNCHERS[version], TOKENS_PER_LAUNCH, x, w, k, block, out)


_BK = {}  # slice_bits -> device int32 [E + 1] = (0, B_1, ..., B_E)


def _bk(slice_bits) -> object:
    key = tuple(int(b) for b in slice_bits)
    if key not in _BK:
        _BK[key] = cuda.to_device(np.concatenate([[0], np.cumsum(key)]).astype(np.int32))
    return _BK[key]


def _new_output(x, shape, dtype):
    """Output buffer without a Numba allocation when x is a CUDA torch tensor (torch's caching allocator)."""
    if getattr(x, "is_cuda", False):
        import torch

        return torch.empty(shape, dtype=x.dtype, device=x.device)
    return cuda.device_array(shape, dtype=dtype)


def gemv_routed(x, w: PackedWeight, k_t, block=None, out=None, stream=0):
    """Mixed-precision decode ``y[t] = x[t] @ W_{k_t}^T`` in one launch per 8 tokens (GEMV v6).

    x [T, K] fp16/fp32 (NumPy, Numba device array or CUDA torch tensor), ``w`` a PackedWeight
    (device arrays are used as they are), k_t int [T] in 1..E (host or device; device k_t is
    not checked, out-of-range values are clamped). Returns y [T, N] in x's dtype: NumPy for
    host x, a CUDA torch tensor for torch x, else a Numba device array; ``out`` (device or
    host) is written in place. No host round trip and no Numba allocation when x, k_t and
    ``out`` are on the device (workspaces are cached by shape).
    """
    nthr = block or LUT_THREADS
    if nthr & (nthr - 1) or not 1 <= nthr <= MAX_THREADS:
        raise ValueError(f"block must be a power of two <= {MAX_THREADS}")
    on_device = is_device_array(x)
    torch_x = getattr(x, "is_cuda", False)
    dx = to_device(x)
    if dx.dtype not in (np.float16, np.float32):
        raise ValueError(f"x must be float16 or float32, got {dx.dtype}")
    T, K = dx.shape
    if K != w.K:
        raise ValueError(f"x has K={K}, weight has K={w.K}")
    E = len(w.slice_bits)
    if is_device_array(k_t):
        dk = to_device(k_t)
        if dk.shape != (T,):
            raise ValueError(f"k_t has shape {tuple(dk.shape)} for {T} tokens")
    else:
        kh = np.asarray(k_t, dtype=np.int32)
        kh = np.full(T, int(kh), np.int32) if kh.ndim == 0 else kh.reshape(-1)
        if kh.shape != (T,):
            raise ValueError(f"k_t has {kh.size} entries for {T} tokens")
        if kh.size and (kh.min() < 1 or kh.max() > E):
            raise ValueError(f"k_t must be in 1..{E}")
        dk = cuda.to_device(np.ascontiguousarray(kh), stream=stream)
    dw = w.to_device()
    gw = group_words(dw)
    res = None
    if out is None and torch_x:
        res = _new_output(x, (T, w.N), dx.dtype)
        dout = cuda.as_cuda_array(res)
    else:
        dout = output_array(out, (T, w.N), dx.dtype)
    W = dw.planes.shape[2]
    for s0 in range(0, T, MAX_T):
        tseg = min(MAX_T, T - s0)
        wc, rb, rows = gemv_geometry(tseg, nthr, w.N)
        S = splits(w.N, W, tseg, nthr)
        nrb = cdiv(w.N, rows)
        part, count = _workspace(S, w.N, nrb, stream)
        gemv_kernel6[(nrb, S), (wc, rb), stream](
            dx, s0, tseg, dk, _bk(w.slice_bits), dw.planes, dw.scale, dw.zero, gw, dout, part, count
        )
    if res is not None:
        return res
    return finish(dout, out, on_device)
