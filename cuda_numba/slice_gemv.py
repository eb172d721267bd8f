"""Decode GEMV (T = 1..8 tokens) from bit-planes with look-up tables of activation sums (Sec. 4.3).

``y[t] = x[t] @ W_k^T`` with ``W_k = s_k (Q_k - z_k + 1/2)`` as in :mod:`cuda_numba.slice_gemm`
(same plane ranges ``[lo, hi)`` and offsets ``smul, zmul, zadd``, so these kernels also run
residual slices). What changes is the decode. GEMV v1-v3 rebuild every weight's integer by
shift-and-add: about 30 instructions per weight, so the 11-29 H200 run found them bound by
instructions at ~1 % of HBM bandwidth, with the same time at 2, 4 and 8 bits.

The plane decomposition removes the per-weight decode. For one K-word (32 weights) of a row
read at ``nb`` planes, MSB first,

    sum_j x_j q_j = sum_p 2^(nb-1-p) sum_j x_j bit_pj          (q_j = sum_p 2^(nb-1-p) bit_pj)

and a plane word's inner sum splits into its 4 bytes. For each 8 consecutive activations
build once a 256-entry **table of partial sums**, ``tab[v] = sum_{i<8} x_i bit_i(v)``
(Any-Precision-LLM / LUT-GEMM style; here the table holds activation sums, not centroids).
Then a plane byte is one shared-memory read:

    sum_j x_j bit_pj = tab_0[byte 0] + tab_1[byte 1] + tab_2[byte 2] + tab_3[byte 3]

so a 32-weight word costs ``4 nb`` table reads and ``nb`` multiply-adds per token: decode work
and bytes read both grow with ``nb``, which is what makes time fall with the bits read. A
table is built from two 16-entry nibble tables (``tab[v] = lo[v & 15] + hi[v >> 4]``: one add
per entry), once per block and K-chunk, and amortized over all the rows of the block.
``tab[255]`` is the sum of the 8 activations: the zero point comes in through ``sum x``.

Versions (appended to the numbered ladder of ``slice_gemm``; ``slice_linear(kind="gemv",
version=4|5)`` runs them):

4. LUT GEMV: a block of ``WC x RB`` threads owns ``RPT * RB`` rows and walks K in chunks of
   ``WC`` words (``32 WC`` activations). Per chunk it builds the ``tseg x 4 WC`` tables in
   shared memory (``tseg * WC <= 8``: 32 KB), then each thread reads the plane words of word
   slot ``tx`` of its ``RPT`` rows (threads of a row read consecutive words) and looks them up
   for every token. Each thread keeps one partial per (row, token); at the end the ``WC``
   slots of a row are summed through shared memory (no warp shuffles: runs in the simulator).
5. v4 + **split-K**: with one block per ``RPT * RB`` rows a 4096-row layer has only 32 blocks
   for 132 SMs. v5 adds ``S`` K-splits (grid ``(row blocks, S)``, ``S`` chosen for about two
   blocks per SM); each block writes its partial sums to a workspace, counts itself done with
   an atomic add on a per-row-block counter after a memory fence, and the **last** block of a
   row block sums the ``S`` partials and writes the output (and resets the counter, so the
   preallocated workspace needs no clearing). One launch, no second reduction kernel.

6. v5 + **per-token precision in one launch** (the decode call path, ``slice_linear(...,
   method="fused")``): the routed ``k_t`` stays on the device and each token's Horner sum
   stops at its own ``B_{k_t}`` planes, with its own ``s_k, z_k``; the block loads the planes
   of the largest precision among its tokens once. No sort, gather or scatter, no host round
   trip, no allocation per call (workspace and output buffers cached by shape): one kernel
   launch per 8 tokens, which is all a decode step's 30 us budget has room for (a Numba
   launch from Python costs ~20 us on the 11-29 H200).

Reference: :func:`slice_gemv_ref` (= ``slice_linear_ref`` with one k). Dispatcher:
:func:`gemv` (``version=4`` or ``5``). Launchers match ``slice_gemm.LAUNCHERS``' signature.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda, float32, int32, uint32

from ._common import cdiv
from .packing import MAX_BITS, WORD_BITS, PackedWeight

__all__ = ["GEMV_VERSIONS", "LAUNCHERS", "MAX_T", "gemv", "gemv_geometry", "gemv_routed", "slice_gemv_ref", "splits"]

MAX_T = 8  # tokens per launch (as slice_gemm.MAX_T)
TAB_ROWS = 32  # tables in shared memory: tseg * (4 * WC) <= 32 tables of 256 float32 = 32 KB
TAB_LEN = 256  # one entry per byte value
RPT = 4  # rows per thread
XSUM_LEN = TAB_ROWS // 4  # sum x per (token, word slot): tseg * WC <= 8
ACC_LEN = RPT * MAX_T  # partial sums per thread: (row slot, token)
_SIM = bool(numba.config.ENABLE_CUDASIM)
NTHREADS = 16 if _SIM else 256  # threads per block (WC * RB)
GEMV_VERSIONS = (4, 5, 6)


def slice_gemv_ref(x, codes, scale, zero, slice_bits, k: int, group_size: int):
    """Reference: ``y[t] = x[t] @ W_k^T`` (float32 math, torch) -> [T, N] in x's dtype."""
    from .slice_gemm import slice_linear_ref

    return slice_linear_ref(x, codes, scale, zero, slice_bits, k, group_size)


def gemv_geometry(tseg: int, nthreads: int = NTHREADS) -> tuple[int, int, int]:
    """(WC, RB, rows per block): WC words per chunk with ``tseg * WC <= 8`` (tables fit 32 KB)."""
    wc = 8
    while wc > 1 and tseg * wc > TAB_ROWS // 4:
        wc //= 2
    wc = min(wc, nthreads)
    rb = max(1, nthreads // wc)
    return wc, rb, rb * RPT


# ---------------------------------------------------------------------------------------
# Device helpers


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
            for p in range(lo, hi):
                a[p - lo] = uint32(planes[p, n, w])
            s_eff = float32(scale[n, g]) * float32(smul)
            z_eff = float32(zero[n, g]) * float32(zmul) + float32(zadd) - float32(0.5)
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
def _finish_split_k(acc, red, last, part, count, out, t0, tseg, nrow0, rb, wc, tx, ty, tid, nthr):
    """Split-K epilogue: write this block's partials, and if it is the last of its row block, sum all S.

    part float32 [S, MAX_T, N], count int32 [row blocks] (0 on entry and again on exit), last a
    shared int32 [1]. The fence makes the partials visible before the block counts itself done;
    the last block reads them with atomic adds of 0 (L2, coherent across SMs; the CUDA guide's
    version of this pattern uses ``volatile`` loads, which Numba does not have).
    """
    N = part.shape[2]
    S = cuda.gridDim.y
    for i in range(RPT):
        n = nrow0 + i * rb
        for t in range(tseg):
            s = _block_sum(acc, red, i, t, tx, ty, wc)
            if tx == 0 and n < N:
                part[cuda.blockIdx.y, t, n] = s
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


@cuda.jit
def gemv_kernel4(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v4: LUT GEMV; block (WC, RB) owns RPT * RB rows and all of K."""
    tab = cuda.shared.array((TAB_ROWS, TAB_LEN), float32)
    nib = cuda.shared.array((TAB_ROWS, 32), float32)
    xsum = cuda.shared.array(XSUM_LEN, float32)
    red = cuda.shared.array((NTHREADS, 8), float32)
    K = x.shape[1]
    W = planes.shape[2]
    wc, rb = cuda.blockDim.x, cuda.blockDim.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid, nthr = ty * wc + tx, wc * rb
    nrow0 = cuda.blockIdx.x * rb * RPT + ty
    acc = cuda.local.array(ACC_LEN, float32)
    for e in range(ACC_LEN):
        acc[e] = float32(0.0)
    for c0 in range(0, W, wc):
        _build_tables(x, t0, tseg, c0, K, wc, tab, nib, xsum, tid, nthr)
        _chunk_rows(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, tab, xsum, tseg, wc, c0 + tx, tx, nrow0, rb, acc)
        cuda.syncthreads()  # the next chunk overwrites the tables
    N = planes.shape[1]
    for i in range(RPT):
        n = nrow0 + i * rb
        for t in range(tseg):
            s = _block_sum(acc, red, i, t, tx, ty, wc)
            if tx == 0 and n < N:
                out[t0 + t, n] = s


@cuda.jit
def gemv_kernel5(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out, part, count):
    """v5: v4 + split-K over blockIdx.y; the last block of each row block sums the partials.

    part float32 [S, MAX_T, N] and count int32 [row blocks] are preallocated; count is back to
    0 when the kernel ends.
    """
    tab = cuda.shared.array((TAB_ROWS, TAB_LEN), float32)
    nib = cuda.shared.array((TAB_ROWS, 32), float32)
    xsum = cuda.shared.array(XSUM_LEN, float32)
    red = cuda.shared.array((NTHREADS, 8), float32)
    last = cuda.shared.array(1, int32)
    K = x.shape[1]
    W = planes.shape[2]
    S = cuda.gridDim.y
    wc, rb = cuda.blockDim.x, cuda.blockDim.y
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid, nthr = ty * wc + tx, wc * rb
    nrow0 = cuda.blockIdx.x * rb * RPT + ty
    acc = cuda.local.array(ACC_LEN, float32)
    for e in range(ACC_LEN):
        acc[e] = float32(0.0)
    n_chunks = (W + wc - 1) // wc
    per = (n_chunks + S - 1) // S  # chunks per split
    for c in range(cuda.blockIdx.y * per, min((cuda.blockIdx.y + 1) * per, n_chunks)):
        c0 = c * wc
        _build_tables(x, t0, tseg, c0, K, wc, tab, nib, xsum, tid, nthr)
        _chunk_rows(planes, lo, hi, scale, zero, smul, zmul, zadd, gw, tab, xsum, tseg, wc, c0 + tx, tx, nrow0, rb, acc)
        cuda.syncthreads()
    _finish_split_k(acc, red, last, part, count, out, t0, tseg, nrow0, rb, wc, tx, ty, tid, nthr)


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
    red = cuda.shared.array((NTHREADS, 8), float32)
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
    _finish_split_k(acc, red, last, part, count, out, t0, tseg, nrow0, rb, wc, tx, ty, tid, nthr)


# ---------------------------------------------------------------------------------------
# Launchers (signature of slice_gemm.LAUNCHERS) and workspaces


_WORKSPACES = {}  # (S, N, row blocks, stream key) -> (part, count): allocated once per shape


def _workspace(S, N, nrb, stream):
    key = (S, N, nrb, 0 if not stream else id(stream))
    if key not in _WORKSPACES:
        part = cuda.device_array((S, MAX_T, N), np.float32)
        count = cuda.to_device(np.zeros(nrb, np.int32))
        _WORKSPACES[key] = (part, count)
    return _WORKSPACES[key]


_SM_COUNT = []  # the current device's multiprocessor count, read once


def _n_sm() -> int:
    if not _SM_COUNT:
        try:
            _SM_COUNT.append(2 if _SIM else int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
        except Exception:  # noqa: BLE001
            _SM_COUNT.append(132)
    return _SM_COUNT[0]


def splits(N: int, W: int, tseg: int, nthreads: int = NTHREADS) -> int:
    """K-splits for v5: about two blocks per SM, at most one split per chunk."""
    wc, _, rows = gemv_geometry(tseg, nthreads)
    nrb = cdiv(N, rows)
    return max(1, min(cdiv(W, wc), cdiv(2 * _n_sm(), nrb)))


def _launch_gemv4(args, tseg, N, block=None, stream=0):
    wc, rb, rows = gemv_geometry(tseg, block or NTHREADS)
    gemv_kernel4[cdiv(N, rows), (wc, rb), stream](*args)


def _launch_gemv5(args, tseg, N, block=None, stream=0):
    nthr = block or NTHREADS
    wc, rb, rows = gemv_geometry(tseg, nthr)
    W = args[3].shape[2]
    S = splits(N, W, tseg, nthr)
    nrb = cdiv(N, rows)
    part, count = _workspace(S, N, nrb, stream)
    gemv_kernel5[(nrb, S), (wc, rb), stream](*args, part, count)


LAUNCHERS = {4: _launch_gemv4, 5: _launch_gemv5}


def gemv(x, w: PackedWeight, k: int, version: int = 5, block=None, out=None):
    """Decode GEMV ``y = x @ W_k^T`` with look-up tables (v4), split-K (v5), the routed kernel (v6).

    x [T, K] fp16/fp32 (processed 8 tokens per launch), ``w`` a PackedWeight, k in 1..E;
    ``block`` = threads per block (a power of two <= 256). Same contract as
    :func:`cuda_numba.slice_gemm.slice_gemv`, which this calls.
    """
    if version not in GEMV_VERSIONS:
        raise ValueError(f"unknown LUT GEMV version {version}; have {list(GEMV_VERSIONS)}")
    if block is not None and (block & (block - 1) or not 1 <= block <= NTHREADS):
        raise ValueError(f"block must be a power of two <= {NTHREADS}")
    if not 1 <= k <= len(w.slice_bits):
        raise ValueError(f"k={k} outside 1..{len(w.slice_bits)}")
    if version == 6:  # the routed kernel with every token at precision k
        return gemv_routed(x, w, np.full(x.shape[0], k, np.int32), block=block, out=out)
    from .slice_gemm import slice_gemv

    return slice_gemv(x, w, k, version=version, block=block, out=out)


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
    from ._common import finish, is_device_array, output_array, to_device

    nthr = block or NTHREADS
    if nthr & (nthr - 1) or not 1 <= nthr <= NTHREADS:
        raise ValueError(f"block must be a power of two <= {NTHREADS}")
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
    gw = dw.planes.shape[2] if dw.n_groups == 1 else dw.group_size // WORD_BITS
    res = None
    if out is None and torch_x:
        res = _new_output(x, (T, w.N), dx.dtype)
        dout = cuda.as_cuda_array(res)
    else:
        dout = output_array(out, (T, w.N), dx.dtype)
    W = dw.planes.shape[2]
    for s0 in range(0, T, MAX_T):
        tseg = min(MAX_T, T - s0)
        wc, rb, rows = gemv_geometry(tseg, nthr)
        S = splits(w.N, W, tseg, nthr)
        nrb = cdiv(w.N, rows)
        part, count = _workspace(S, w.N, nrb, stream)
        gemv_kernel6[(nrb, S), (wc, rb), stream](
            dx, s0, tseg, dk, _bk(w.slice_bits), dw.planes, dw.scale, dw.zero, gw, dout, part, count
        )
    if res is not None:
        return res
    return finish(dout, out, on_device)
