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
routed tokens, 8 tokens per launch, v7 2):

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
6. v5 + **per-token precision in one launch** (``slice_linear(..., method="fused",
   version=6)``): ``k_t`` stays on the device, each token's Horner sum stops at its own
   ``B_{k_t}`` planes with its own ``s_k, z_k``; the block loads the largest precision's planes
   once. No sort, gather, scatter, host round trip or allocation per call.

7. the instruction budget of v4-v6 rebuilt (:func:`gemv7_kernel`, a kernel factory: bits and
   tokens are compile-time constants, so every plane and nibble loop unrolls): 16-entry nibble
   tables built once per K-slice and reused by all rows of a block; lane l of a warp reads word
   slot l, so it only reads column l of the tables (``[value][slot]``: bank l, no conflicts);
   unsigned index arithmetic with shifts and masks; a row's lane partials summed by warp
   shuffles (a shared-memory sum of the same values in the simulator, which has no shuffles)
   and added with fire-and-forget atomics, split-K closed by the last block as in v5. At most
   2 tokens per launch (tables: 16 KB per token and K-slice). Routed: :class:`RoutedPlan`.
   ``python -m cuda_numba.sass`` reads its machine code (``benchmarks/NOTES.md``).

Launch geometry is the same on a GPU and in the simulator: block sizes are parameters with one
default each, clamped to the problem (a 37-row layer gets 10 row slots, not 32).
Reference :func:`slice_gemv_ref`; dispatcher :func:`slice_gemv`; launchers ``LAUNCHERS`` (v1-v5
and v7, signature ``launch(args, tseg, N, block, stream)``); routed v6 / v7 :func:`gemv_routed`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32, uint32, uint64

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
    "RoutedPlan",
    "gemv7_kernel",
    "v7_geometry",
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
VERSIONS = (1, 2, 3, 4, 5, 6, 7)  # v6 runs through gemv_routed; v7's launcher is added below its kernel
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
    if 4 <= version <= 6 and block is not None and (block & (block - 1) or not 1 <= block <= MAX_THREADS):
        raise ValueError(f"block must be a power of two <= {MAX_THREADS}")
    if not 1 <= k <= len(w.slice_bits):
        raise ValueError(f"k={k} outside 1..{len(w.slice_bits)}")
    if version == 6:  # the routed kernel with every token at precision k
        return gemv_routed(x, w, np.full(x.shape[0], k, np.int32), block=block, out=out, version=6)
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


def gemv_routed(x, w: PackedWeight, k_t, block=None, out=None, stream=0, version: int = 7):
    """Mixed-precision decode ``y[t] = x[t] @ W_{k_t}^T`` in one launch per 8 tokens (v6) or 2 tokens (v7).

    x [T, K] fp16/fp32 (NumPy, Numba device array or CUDA torch tensor), ``w`` a PackedWeight
    (device arrays are used as they are), k_t int [T] in 1..E (host or device; device k_t is
    not checked, out-of-range values are clamped). Returns y [T, N] in x's dtype: NumPy for
    host x, a CUDA torch tensor for torch x, else a Numba device array; ``out`` (device or
    host) is written in place. No host round trip and no Numba allocation when x, k_t and
    ``out`` are on the device (workspaces are cached by shape). ``version`` 6 or 7 (v7: a
    :class:`RoutedPlan` cached per weight and token count; ``block`` = warps per block).
    """
    if version not in (6, 7):
        raise ValueError(f"the routed GEMV is version 6 or 7, not {version}")
    nthr = block or (LUT_THREADS if version == 6 else V7_WARPS)
    if version == 6 and (nthr & (nthr - 1) or not 1 <= nthr <= MAX_THREADS):
        raise ValueError(f"block must be a power of two <= {MAX_THREADS}")
    if version == 7 and not 1 <= nthr <= V7_WARPS:
        raise ValueError(f"v7 block (warps per block) must be in 1..{V7_WARPS}")
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
    if version == 7 and T:
        _plan(dw, T, nthr)(dx, dk, dout, stream)
    for s0 in range(0, T if version == 6 else 0, MAX_T):
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


_PLANS = {}  # (id of the device planes, T, warps) -> (planes, RoutedPlan): the planes kept alive with it


def _plan(dw: PackedWeight, T: int, warps: int) -> RoutedPlan:
    key = (id(dw.planes), int(T), int(warps))
    if key not in _PLANS:
        _PLANS[key] = (dw.planes, RoutedPlan(dw, T, warps))
    return _PLANS[key][1]


# ---------------------------------------------------------------------------------------
# v7: tables built once per K-slice, bits and tokens compile-time, lane = word slot

V7_SLOTS = 32  # K-words per K-slice: lane l of every warp reads word slot l (1024 activations)
V7_NIBS = 8  # 4-activation groups (nibbles) per word
V7_TAB = V7_NIBS * 16 * V7_SLOTS  # float32 table entries per token, [nibble][value][slot]: 16 KB
V7_MAX_T = 2  # tokens per launch: T tables of 16 KB stay under the 48 KB of static shared memory
V7_WARPS = 8  # warps per block by default (clamped to the rows of a small layer)
V7_BLOCKS_PER_SM = 4  # grid target: about this many blocks per SM
V7_MIN_ROWS_PER_WARP = 16  # ... but at least this many rows per warp, to amortise the table build
FULL_MASK = 0xFFFFFFFF

_V7 = {}  # (T, NB, routed, simulator) -> compiled kernel


def _simulator() -> bool:
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


@cuda.jit(device=True, inline=True)
def _lookup7(tab0, tab1, tab2, tab3, tab4, tab5, tab6, tab7, a, lane4):
    """sum_j x_j bit_j(a) over the 32 weights of plane word a: one table read per nibble (bits 4i..4i+3).

    ``tab<i>`` holds nibble position i; entry (value v, slot l) is float ``32 v + l``, i.e. byte
    ``128 v + 4 l``: the nibble is shifted straight
    to its byte offset and masked, the lane's ``4 l`` ORed in (``lane4``), and the ``>> 2``
    cancels against the 4 bytes per float: one shift and one logic op per read.
    """
    m = uint32(0x780)
    s = tab0[((((a << uint32(7)) & m) | lane4) >> uint32(2))]
    s += tab1[((((a << uint32(3)) & m) | lane4) >> uint32(2))]
    s += tab2[((((a >> uint32(1)) & m) | lane4) >> uint32(2))]
    s += tab3[((((a >> uint32(5)) & m) | lane4) >> uint32(2))]
    s += tab4[((((a >> uint32(9)) & m) | lane4) >> uint32(2))]
    s += tab5[((((a >> uint32(13)) & m) | lane4) >> uint32(2))]
    s += tab6[((((a >> uint32(17)) & m) | lane4) >> uint32(2))]
    s += tab7[((((a >> uint32(21)) & m) | lane4) >> uint32(2))]
    return s


@cuda.jit(device=True, inline=True)
def _load7(planes, plane_off, off, NP, nbmax, q):
    """q[p] = plane word p at element ``plane_off[p] + off`` (unsigned 64-bit: no negative-index fix-ups)."""
    for p in range(NP):
        if p < nbmax:  # routed: only the planes some token needs
            q[p] = planes[plane_off[p] + off]


@cuda.jit(device=True, inline=True)
def _horner7(tab0, tab1, tab2, tab3, tab4, tab5, tab6, tab7, a, NP, nb, lane4):
    """sum_j x_j q_j of one word from its plane words a[0..nb) (MSB first): Horner over table sums."""
    acc = _lookup7(tab0, tab1, tab2, tab3, tab4, tab5, tab6, tab7, a[0], lane4)
    for p in range(1, NP):
        if p < nb:  # always true unless routed (nb = this token's B_k)
            acc = float32(2.0) * acc + _lookup7(tab0, tab1, tab2, tab3, tab4, tab5, tab6, tab7, a[p], lane4)
    return acc


@cuda.jit(device=True, inline=True)
def _fill16(tab, b, x0, x1, x2, x3):
    """tab[b + 32 v] = sum_{j<4} x_j bit_j(v) for the 16 nibble values v: one add each."""
    x01 = x0 + x1
    x23 = x2 + x3
    tab[b] = float32(0.0)
    tab[b + uint32(32)] = x0
    tab[b + uint32(64)] = x1
    tab[b + uint32(96)] = x01
    tab[b + uint32(128)] = x2
    tab[b + uint32(160)] = x0 + x2
    tab[b + uint32(192)] = x1 + x2
    tab[b + uint32(224)] = x01 + x2
    tab[b + uint32(256)] = x3
    tab[b + uint32(288)] = x0 + x3
    tab[b + uint32(320)] = x1 + x3
    tab[b + uint32(352)] = x01 + x3
    tab[b + uint32(384)] = x23
    tab[b + uint32(416)] = x0 + x23
    tab[b + uint32(448)] = x1 + x23
    tab[b + uint32(480)] = x01 + x23


@cuda.jit(device=True, inline=True)
def _xval(x, t, k, K):
    return float32(x[uint64(t), uint64(k)]) if k < K else float32(0.0)  # unsigned: no negative-index fix-ups


@cuda.jit(device=True, inline=True)
def _fill_nibble(x, t, k0, K, tab, b):
    _fill16(tab, b, _xval(x, t, k0, K), _xval(x, t, k0 + uint32(1), K), _xval(x, t, k0 + uint32(2), K),
            _xval(x, t, k0 + uint32(3), K))  # fmt: skip


@cuda.jit(device=True, inline=True)
def _build7(x, t0, s, t, K, tab0, tab1, tab2, tab3, tab4, tab5, tab6, tab7, tid, nthr):
    """Tables of K-slice s for token t: thread l < 32 fills the 8 x 16 entries of word 32 s + l.

    Consecutive threads fill consecutive slots, so their stores hit consecutive banks.
    Activations beyond K count as 0 (their plane bits are 0 too).
    """
    if tid < V7_SLOTS:
        lane = uint32(tid)
        k0 = (uint32(s) * uint32(V7_SLOTS) + lane) << uint32(5)  # first activation of the word
        b = lane  # entry v at b + 32 v
        tx = t0 + t
        _fill_nibble(x, tx, k0, K, tab0, b)
        _fill_nibble(x, tx, k0 + uint32(4), K, tab1, b)
        _fill_nibble(x, tx, k0 + uint32(8), K, tab2, b)
        _fill_nibble(x, tx, k0 + uint32(12), K, tab3, b)
        _fill_nibble(x, tx, k0 + uint32(16), K, tab4, b)
        _fill_nibble(x, tx, k0 + uint32(20), K, tab5, b)
        _fill_nibble(x, tx, k0 + uint32(24), K, tab6, b)
        _fill_nibble(x, tx, k0 + uint32(28), K, tab7, b)


def gemv7_kernel(T: int, NB: int, routed: bool = False, sim: bool | None = None):
    """The v7 kernel for ``T`` tokens and ``NB`` planes, both compile-time constants (a kernel factory).

    Grid ``(K-slices, row groups)``: block (s, r) owns K-slice s (32 words) and ``rows`` rows.
    It builds the tables of its slice once, for every token,

        tab[t][i][v][l] = sum_{j<4} x[t, 32 (32 s + l) + 4 i + j] bit_j(v)     (16 KB per token)

    and reuses them for all its rows: lane l of each warp reads word slot l of one row per
    iteration, so a lane only reads column l of the tables (address ``32 v + l``: bank l, free
    of bank conflicts whatever the plane bits). Index arithmetic is unsigned 32-bit (shifts and
    masks, no negative-index fix-ups); planes, scales and zero points come flattened. A row's
    32 lane partials are summed with warp shuffles and added to a float32 workspace with an
    atomic whose result is unused (fire-and-forget); the last block of a row group (split-K
    counter, as v5) writes ``out`` in its dtype and zeroes the workspace for the next launch.

    ``sim=True`` (default: when Numba's simulator is on) replaces the shuffles, which the
    simulator lacks, by a sum over the same 32 lane values through shared memory: the same
    result up to the order of the float additions. ``routed``: token t reads planes
    ``[0, B_{k_t})`` with ``k_t`` from the device (``NB = B_E``) and v6's ``s_k, z_k``.

    Arguments: ``(x, t0, kt, bk, planes, plane0, NW, W, scale, zero, G, gw, smul, zmul, zadd,
    rows, ws, count, out)``; ``planes`` uint32 [B_E * N * W] (plane p, row n, word w at
    ``plane0 + p NW + n W + w``, ``NW = N W``), ``scale``/``zero`` [N * G], ``ws`` float32
    [V7_MAX_T * N] and ``count`` int32 [row groups] zero on entry and on exit.
    """
    sim = _simulator() if sim is None else bool(sim)
    key = (int(T), int(NB), bool(routed), sim)
    if key in _V7:
        return _V7[key]
    if not 1 <= T <= V7_MAX_T or not 1 <= NB <= MAX_BITS:
        raise ValueError(f"v7 needs 1 <= T <= {V7_MAX_T} and 1 <= NB <= {MAX_BITS}")
    TT, NP, ROUTED, SIM = int(T), int(NB), bool(routed), sim
    SPB = V7_MAX_T // TT  # K-slices per block: as many as the 32 KB of tables hold (2 at T = 1)
    TAB_LEN7 = 16 * V7_SLOTS  # one nibble position of one table set: [value][slot], 2 KB
    RED_LEN = V7_WARPS * 32 * TT if SIM else 1
    XS_LEN = SPB * TT

    @cuda.jit
    def kernel7(x, t0, kt, bk, planes, plane0, NW, W, scale, zero, G, gw, smul, zmul, zadd, rows, ws, count, out):
        # two sets of tables (c = sl * TT + t: slice 0 and 1 at T = 1, token 0 and 1 at T = 2), one
        # array per nibble position: every table read is [register + constant base] (see _lookup7)
        a0 = cuda.shared.array(TAB_LEN7, float32)
        a1 = cuda.shared.array(TAB_LEN7, float32)
        a2 = cuda.shared.array(TAB_LEN7, float32)
        a3 = cuda.shared.array(TAB_LEN7, float32)
        a4 = cuda.shared.array(TAB_LEN7, float32)
        a5 = cuda.shared.array(TAB_LEN7, float32)
        a6 = cuda.shared.array(TAB_LEN7, float32)
        a7 = cuda.shared.array(TAB_LEN7, float32)
        b0 = cuda.shared.array(TAB_LEN7, float32)
        b1 = cuda.shared.array(TAB_LEN7, float32)
        b2 = cuda.shared.array(TAB_LEN7, float32)
        b3 = cuda.shared.array(TAB_LEN7, float32)
        b4 = cuda.shared.array(TAB_LEN7, float32)
        b5 = cuda.shared.array(TAB_LEN7, float32)
        b6 = cuda.shared.array(TAB_LEN7, float32)
        b7 = cuda.shared.array(TAB_LEN7, float32)
        red = cuda.shared.array(RED_LEN, float32)  # simulator only: the warp sums
        last = cuda.shared.array(1, int32)
        K = uint32(x.shape[1])
        N = uint32(out.shape[1])
        tid = uint32(cuda.threadIdx.x)
        nthr = uint32(cuda.blockDim.x)
        lane = tid & uint32(31)
        warp = tid >> uint32(5)
        nwarp = nthr >> uint32(5)
        lane4 = lane << uint32(2)
        s0 = uint32(cuda.blockIdx.x) * uint32(SPB)
        if SPB == 2:  # T = 1: slices s0 and s0 + 1, token 0
            _build7(x, t0, s0, 0, K, a0, a1, a2, a3, a4, a5, a6, a7, tid, nthr)
            _build7(x, t0, s0 + uint32(1), 0, K, b0, b1, b2, b3, b4, b5, b6, b7, tid, nthr)
        else:  # T = 2: slice s0, tokens 0 and 1
            _build7(x, t0, s0, 0, K, a0, a1, a2, a3, a4, a5, a6, a7, tid, nthr)
            _build7(x, t0, s0, 1, K, b0, b1, b2, b3, b4, b5, b6, b7, tid, nthr)
        # per token: planes read, scale and zero-point multipliers (uniform across the block)
        tnb = cuda.local.array(TT, int32)
        tsm = cuda.local.array(TT, float32)
        tzm = cuda.local.array(TT, float32)
        nbmax = 0
        for t in range(TT):
            if ROUTED:
                E = bk.shape[0] - 1
                k = min(max(int32(kt[t0 + t]), 1), E)
                tnb[t] = bk[k]
                tsm[t] = float32(1.0) / float32(1 << (bk[k] - bk[1]))  # s_k = s / 2^(B_k - b_1)
                tzm[t] = float32(1.0) / float32(1 << (bk[E] - bk[k]))  # z_k = z_E / 2^(B_E - B_k)
            else:
                tnb[t] = NP
                tsm[t] = smul
                tzm[t] = zmul
            nbmax = max(nbmax, tnb[t])
        cuda.syncthreads()
        # this lane's words: wa in table set a, and (T = 1) wb in set b; their groups and activation sums
        wa = s0 * uint32(V7_SLOTS) + lane
        wb = wa + uint32(V7_SLOTS) if SPB == 2 else wa
        ga = wa // uint32(gw)  # one division per block
        gb = wb // uint32(gw)
        e = uint32(15 * 32) + lane  # entry v = 15: the sum of all 4 activations of a nibble
        xsa = a0[e] + a1[e] + a2[e] + a3[e] + a4[e] + a5[e] + a6[e] + a7[e]
        xsb = b0[e] + b1[e] + b2[e] + b3[e] + b4[e] + b5[e] + b6[e] + b7[e]
        qa = cuda.local.array(NP, uint32)  # plane words (registers: NP is a constant)
        qb = cuda.local.array(NP, uint32)
        part = cuda.local.array(TT, float32)
        plane_off = cuda.local.array(NP, uint64)  # where plane p starts
        for p in range(NP):
            plane_off[p] = uint64(plane0) + uint64(p) * uint64(NW)
        row0 = uint32(cuda.blockIdx.y) * uint32(rows)
        row_end = min(N, uint32(row0 + uint32(rows)))
        # every warp makes the same number of trips (the simulator's reduction syncs the block)
        row_stop = uint32(row0 + uint32((uint32(rows) + nwarp - uint32(1)) // nwarp) * nwarp)
        n = uint32(row0 + warp)
        zs = zadd - float32(0.5)
        # running element offsets of this lane's words and scale groups in row n (strength-reduced)
        offa = uint64(n) * uint64(W) + uint64(wa)
        sga = uint64(n) * uint64(G) + uint64(ga)
        dgb = uint64(gb - ga)
        step_w = uint64(nwarp) * uint64(W)
        step_g = uint64(nwarp) * uint64(G)
        oka = wa < uint32(W)
        okb = SPB == 2 and wb < uint32(W)
        while n < row_stop:
            for t in range(TT):
                part[t] = float32(0.0)
            live = n < row_end
            if live and oka:
                _load7(planes, plane_off, offa, NP, nbmax, qa)
                sc, ze = scale[sga], float32(zero[sga])
                acc = _horner7(a0, a1, a2, a3, a4, a5, a6, a7, qa, NP, tnb[0], lane4)
                part[0] = sc * tsm[0] * (acc - (ze * tzm[0] + zs) * xsa)
                if SPB == 1:  # T = 2: token 1 reads the same plane words through table set b
                    acc = _horner7(b0, b1, b2, b3, b4, b5, b6, b7, qa, NP, tnb[TT - 1], lane4)
                    part[TT - 1] = sc * tsm[TT - 1] * (acc - (ze * tzm[TT - 1] + zs) * xsb)
            if live and okb:  # T = 1: the block's second K-slice, 32 words further
                _load7(planes, plane_off, offa + uint64(V7_SLOTS), NP, nbmax, qb)
                sc, ze = scale[sga + dgb], float32(zero[sga + dgb])
                acc = _horner7(b0, b1, b2, b3, b4, b5, b6, b7, qb, NP, tnb[0], lane4)
                part[0] += sc * tsm[0] * (acc - (ze * tzm[0] + zs) * xsb)
            offa += step_w
            sga += step_g
            for t in range(TT):
                v = part[t]
                if SIM:  # the simulator has no shuffles: the same 32 values summed through shared memory
                    r0 = uint32((warp * uint32(TT) + uint32(t)) * uint32(32))
                    red[r0 + lane] = v
                    cuda.syncthreads()
                    if lane == 0:
                        v = float32(0.0)
                        for u in range(32):
                            v += red[r0 + uint32(u)]
                    cuda.syncthreads()
                else:
                    v += cuda.shfl_down_sync(FULL_MASK, v, 16)
                    v += cuda.shfl_down_sync(FULL_MASK, v, 8)
                    v += cuda.shfl_down_sync(FULL_MASK, v, 4)
                    v += cuda.shfl_down_sync(FULL_MASK, v, 2)
                    v += cuda.shfl_down_sync(FULL_MASK, v, 1)
                if lane == 0 and n < row_end:
                    cuda.atomic.add(ws, uint64(t) * uint64(N) + uint64(n), v)  # result unused: a fire-and-forget RED
            n = uint32(n + nwarp)
        # split-K: the last block of this row group to finish writes the sums (as v5)
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            done = cuda.atomic.add(count, cuda.blockIdx.y, 1)
            last[0] = 1 if done == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:
            n = uint32(row0 + tid)
            while n < row_end:  # this row group's outputs, every token
                for t in range(TT):
                    i = uint64(t) * uint64(N) + uint64(n)
                    out[t0 + t, n] = cuda.atomic.add(ws, i, float32(0.0))  # through L2, never a stale L1 line
                    ws[i] = float32(0.0)
                n = uint32(n + nthr)
            if tid == 0:
                count[cuda.blockIdx.y] = 0

    _V7[key] = kernel7
    return kernel7


def v7_geometry(N: int, W: int, T: int = 1, warps: int = V7_WARPS, sms: int | None = None) -> tuple[int, int, int, int]:
    """(K-blocks, row groups, rows per group, warps per block) of a v7 launch; the same on a GPU and in the simulator.

    A K-block is ``V7_MAX_T // T`` K-slices of 32 words (2 at T = 1). About ``V7_BLOCKS_PER_SM``
    blocks per SM (``sms``: the device's count by default), with at least
    ``V7_MIN_ROWS_PER_WARP`` rows per warp so the table build (once per block) stays small.
    """
    if not 1 <= warps <= V7_WARPS:
        raise ValueError(f"v7 warps per block must be in 1..{V7_WARPS}")
    n_slices = cdiv(W, V7_SLOTS * (V7_MAX_T // max(1, min(T, V7_MAX_T))))  # blocks along K
    warps = max(1, min(warps, cdiv(N, V7_MIN_ROWS_PER_WARP)))
    sms = sms or _n_sm()
    groups = max(1, min(cdiv(V7_BLOCKS_PER_SM * sms, n_slices), cdiv(N, V7_MIN_ROWS_PER_WARP * warps)))
    rows = cdiv(N, groups)
    return n_slices, cdiv(N, rows), rows, warps


_V7_WS = {}  # (N, row groups, stream key) -> (ws, count), zero between launches


def _v7_workspace(N, groups, stream):
    key = (N, groups, 0 if not stream else id(stream))
    if key not in _V7_WS:
        _V7_WS[key] = (cuda.to_device(np.zeros(V7_MAX_T * N, np.float32)), cuda.to_device(np.zeros(groups, np.int32)))
    return _V7_WS[key]


def _flat(a):
    """A C-contiguous device array as 1-D (a view)."""
    return a.reshape(a.size) if a.ndim != 1 else a


_DUMMY = {}


def _dummy_i32():
    if "i32" not in _DUMMY:
        _DUMMY["i32"] = cuda.to_device(np.zeros(2, np.int32))
    return _DUMMY["i32"]


def launch_gemv7(args, tseg, N, block=None, stream=0):
    """v7: ``block`` = warps per block (default V7_WARPS); ``V7_MAX_T`` tokens per launch."""
    x, t0, _, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out = args
    W = planes.shape[2]
    nsl, groups, rows, warps = v7_geometry(N, W, min(tseg, V7_MAX_T), block or V7_WARPS)
    ws, count = _v7_workspace(N, groups, stream)
    flat = (_flat(planes), int(lo) * N * W, N * W, W, _flat(scale), _flat(zero), scale.shape[1], gw)
    dummy = _dummy_i32()
    for s0 in range(t0, t0 + tseg, V7_MAX_T):
        n_tok = min(V7_MAX_T, t0 + tseg - s0)
        kern = gemv7_kernel(n_tok, hi - lo)
        kern[(nsl, groups), 32 * warps, stream](
            x, s0, dummy, dummy, flat[0], flat[1], flat[2], flat[3], flat[4], flat[5], flat[6], flat[7],
            np.float32(smul), np.float32(zmul), np.float32(zadd), rows, ws, count, out,
        )  # fmt: skip


LAUNCHERS[7] = launch_gemv7


class RoutedPlan:
    """A routed decode launch (GEMV v7, ``routed=True``) prepared once per layer and token count.

    Holds the flattened weight views, ``(0, B_1, ..., B_E)`` on the device, the compiled kernel,
    the grid and the split-K workspace, so a call is only the kernel launch(es): no allocation,
    no host-device copy, no synchronisation. ``plan(x, kt, out, stream)`` with device arrays
    x [T, K] (fp16/fp32), kt int [T] (values outside 1..E are clamped), out [T, N]; ``stream``
    a Numba stream (e.g. ``cuda.external_stream(torch.cuda.current_stream().cuda_stream)``).
    """

    def __init__(self, w: PackedWeight, T: int, warps: int = V7_WARPS):
        if not 1 <= T:
            raise ValueError("a plan needs at least one token")
        dw = w.to_device()
        self.T, self.N, self.K = int(T), w.N, w.K
        W = int(dw.planes.shape[2])
        self.planes, self.scale, self.zero = _flat(dw.planes), _flat(dw.scale), _flat(dw.zero)
        self.W, self.NW, self.G, self.gw = W, w.N * W, int(dw.scale.shape[1]), group_words(dw)
        self.bk = _bk(w.slice_bits)
        nb = int(sum(w.slice_bits))
        self.launches = []  # (first token, kernel, grid, rows, threads)
        for s0 in range(0, self.T, V7_MAX_T):
            n_tok = min(V7_MAX_T, self.T - s0)
            nsl, groups, rows, wp = v7_geometry(w.N, W, n_tok, warps)
            self.launches.append((s0, gemv7_kernel(n_tok, nb, routed=True), (nsl, groups), rows, 32 * wp))
        self.groups = max(g for _, _, (_, g), _, _ in self.launches)
        self._ws = {}

    def workspace(self, stream=0):
        key = 0 if not stream else getattr(stream, "handle", id(stream))
        key = getattr(key, "value", key)
        if key not in self._ws:  # zeroed once; every launch leaves it zero again
            self._ws[key] = (cuda.to_device(np.zeros(V7_MAX_T * self.N, np.float32)),
                             cuda.to_device(np.zeros(self.groups, np.int32)))  # fmt: skip
        return self._ws[key]

    def __call__(self, x, kt, out, stream=0, workspace=None):
        ws, count = workspace or self.workspace(stream)
        for s0, kern, grid, rows, nthr in self.launches:
            kern[grid, nthr, stream](
                x, s0, kt, self.bk, self.planes, 0, self.NW, self.W, self.scale, self.zero, self.G, self.gw,
                np.float32(1.0), np.float32(1.0), np.float32(0.0), rows, ws, count, out,
            )  # fmt: skip
        return out
