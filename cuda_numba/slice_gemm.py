"""Slice-aware matmul with fp16/fp32 activations: read only the slices a token needs (Sec. 4.3).

The paper's weight-only setting (activations stay fp16): output ``y[t] = x[t] @ W_{k_t}^T``
where token t was routed to precision ``k_t`` (MoBiRoute, Sec. 4.2) and

    W_k = s_k (Q_k - z_k + 1/2),  Q_k = top B_k bits of Q_E,
    s_k = s / 2^(B_k - b_1),      z_k = z_E / 2^(B_E - B_k)          (docs/design.md)

``z_E`` is an integer zero point on the finest (B_E-bit) grid; ``z_k`` is a dyadic fraction,
exact in float32. Weights arrive as a :class:`~cuda_numba.packing.PackedWeight`
(``planes uint32 [B_E, N, W]``, MSB plane first, ``scale float32 [N, G]``, ``zero int32 [N, G]``
holding z_E). A kernel reading planes
``[lo, hi)`` rebuilds the integer of those bits by shift-and-add, per element j of a word:

    word of plane lo   ..1..   ->  q = 1
    word of plane lo+1 ..0..   ->  q = (q << 1) | 0 = 0b10
    word of plane lo+2 ..1..   ->  q = (q << 1) | 1 = 0b101      (and so on up to hi)

and dequantizes ``w = s * smul * (q - (z_E * zmul + zadd) + 1/2)``. Two uses of one kernel:

* prefix, precision k: planes ``[0, B_k)``, ``smul = 2^-(B_k-b_1)``, ``zmul = 2^-(B_E-B_k)``, ``zadd = 0``;
* residual slice e > 1 (design.md: ``dW_e = s_e (q_e - 2^(b_e-1) + 1/2)``): planes
  ``[B_{e-1}, B_e)``, ``smul = 2^-(B_e-b_1)``, ``zmul = 0``, ``zadd = 2^(b_e-1)``;
  ``W_k = W_1 + dW_2 + ... + dW_k`` exactly.

Routing (Sec. 4.3, "tokens are permuted so that tokens assigned to the same bit slice sit
contiguously"): ``route_permutation`` stable-sorts tokens by k_t; a gather kernel builds
the sorted activations, the kernels run on contiguous segments, a scatter kernel applies
the inverse permutation.

Kernel versions (every kernel works on a segment ``[t0, t0 + Tseg)`` of sorted tokens):

1. naive: one thread per output (t, n); the plane words of a K-word are loaded once
   into registers, Q rebuilt per element, zero point folded in with ``sum x``.
2. GEMV (decode, <= 8 tokens): one block per output row, one thread per K-word; each weight
   is decoded once and used for all tokens; shared-memory tree reduction over the block.
3. GEMV: v2 with ``ROWS`` rows per block and the activations staged in shared memory
   (coalesced loads, padded to avoid bank conflicts), so a block reads x once for all its rows.
2g. GEMM (prefill): 16 x 16 output tiles; per K-word the block stages x [16, 32] and the
   dequantized weights [16, 32] in shared memory, then every thread does 32 FMAs.
3g. GEMM: v2g with register blocking, each thread computes a 4 x 4 sub-tile of a 64 x 64 tile.

Entry points: ``slice_gemv`` / ``slice_gemm`` (one k for every token), ``slice_linear``
(per-token k_t; ``method="grouped"`` one launch per precision segment reading only its
B_k planes; ``method="streams"`` the base slice for all tokens on one CUDA stream and each
residual slice, for the tokens that need it, on its own stream). On the simulator streams
run one after the other; whether they overlap is a question for a real GPU (bench.py).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import cuda, float32, int64, uint32

from ._common import cdiv, finish, is_device_array, output_array, to_device, to_host
from .packing import MAX_BITS, WORD_BITS, PackedWeight, check_groups, n_words

__all__ = [
    "CASES",
    "MAX_T",
    "dequant_codes",
    "dequant_residual",
    "route_permutation",
    "run_kernels",
    "slice_gemm",
    "slice_gemv",
    "slice_linear",
    "slice_linear_ref",
]

MAX_T = 8  # GEMV v2/v3: tokens per launch (decode); larger T is split into chunks of 8
GEMV_MAX_THREADS = 256  # GEMV v2/v3: at most this many threads per block (a power of two)
GEMV3_MAX_BX = 32  # GEMV v3: at most this many K-words per staged chunk (blockDim.x)
XS_PAD = GEMV3_MAX_BX + 1  # GEMV v3: padded row of the staged-x tile (conflict-free shared memory)
TILE = 16  # GEMM v2g: 16 x 16 output tile, 16 x 16 threads
ROW_PAD = 32 + 1  # GEMM: padded 32-element row of a staged tile (one K-word)
RB = 4  # GEMM v3g: each thread computes RB x RB outputs
TILE3 = TILE * RB  # GEMM v3g: 64 x 64 output tile
_SIM = bool(numba.config.ENABLE_CUDASIM)


# ---------------------------------------------------------------------------------------
# torch reference


def _group_len(K: int, G: int, group_size: int) -> int:
    return K if G == 1 else group_size


def _tensor(a, dtype) -> torch.Tensor:
    """torch tensors stay on their device; NumPy / device arrays become CPU tensors."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(to_host(a))
    return t.to(dtype)


def dequant_codes(codes, scale, zero, slice_bits, k: int, group_size: int) -> torch.Tensor:
    """``W_k = s_k (Q_k - z_k + 1/2)`` from MoBiSlice codes (Sec. 4.1, design.md) -> float32 [N, K].

    codes uint8 [N, K] (Q_E, ``B_E = sum(slice_bits)`` bits), scale float [N, G], zero int
    [N, G] (z_E, on the B_E-bit grid), one (s, z_E) per group of ``group_size`` inputs (G = 1:
    per row). Precision k reads ``Q_k = Q_E >> (B_E - B_k)``; ``s_k = s / 2^(B_k - b_1)``,
    ``z_k = z_E / 2^(B_E - B_k)`` (a dyadic fraction: exact in float32).
    Torch inputs stay on their device (the benchmark dequantizes on the GPU).
    """
    codes, scale, zero = _tensor(codes, torch.int64), _tensor(scale, torch.float32), _tensor(zero, torch.int64)
    K = codes.shape[1]
    E = len(slice_bits)
    if not 1 <= k <= E:
        raise ValueError(f"k={k} outside 1..{E}")
    BE, Bk, b1 = int(sum(slice_bits)), int(sum(slice_bits[:k])), int(slice_bits[0])
    g = _group_len(K, scale.shape[1], group_size)
    Qk = codes >> (BE - Bk)  # [N, K]
    s_k = (scale / 2.0 ** (Bk - b1)).repeat_interleave(g, dim=1)[:, :K]  # [N, K]
    z_k = (zero.to(torch.float32) / 2.0 ** (BE - Bk)).repeat_interleave(g, dim=1)[:, :K]  # [N, K]
    return s_k * ((Qk.to(torch.float32) - z_k) + 0.5)


def dequant_residual(codes, scale, slice_bits, e: int, group_size: int) -> torch.Tensor:
    """Residual slice ``dW_e = s_e (q_e - 2^(b_e-1) + 1/2)`` for e >= 2 -> float32 [N, K].

    ``q_e`` is bits ``[B_{e-1}, B_e)`` of Q_E (from the MSB); ``W_k = W_1 + sum_{e<=k} dW_e``.
    """
    codes, scale = _tensor(codes, torch.int64), _tensor(scale, torch.float32)
    K = codes.shape[1]
    if not 2 <= e <= len(slice_bits):
        raise ValueError(f"residual slice e={e} outside 2..{len(slice_bits)}")
    BE, Be, be, b1 = int(sum(slice_bits)), int(sum(slice_bits[:e])), int(slice_bits[e - 1]), int(slice_bits[0])
    g = _group_len(K, scale.shape[1], group_size)
    q_e = (codes >> (BE - Be)) & (2**be - 1)  # [N, K]
    s_e = (scale / 2.0 ** (Be - b1)).repeat_interleave(g, dim=1)[:, :K]
    return s_e * ((q_e - 2 ** (be - 1)).to(torch.float32) + 0.5)


def slice_linear_ref(x, codes, scale, zero, slice_bits, k_t, group_size: int, weights=None) -> torch.Tensor:
    """Reference: ``y[t] = x[t] @ W_{k_t}^T`` (float32 math) -> [T, N] in x's dtype.

    x [T, K] fp16/fp32, k_t int [T] in 1..E (or one int for every token). ``weights``
    optionally caches ``{k: W_k}`` (float32 [N, K], on x's device) across calls.
    """
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(to_host(x))
    T = x.shape[0]
    k_t = np.broadcast_to(np.asarray(to_host(k_t), dtype=np.int64), (T,))
    N = codes.shape[0]
    y = torch.zeros(T, N, dtype=torch.float32, device=x.device)
    for k in np.unique(k_t):
        idx = torch.as_tensor(np.nonzero(k_t == k)[0], device=x.device)
        if weights is not None and int(k) in weights:
            W_k = weights[int(k)]
        else:
            W_k = dequant_codes(codes, scale, zero, slice_bits, int(k), group_size).to(x.device)  # [N, K]
            if weights is not None:
                weights[int(k)] = W_k
        y[idx] = x[idx].to(torch.float32) @ W_k.T
    return y.to(x.dtype)


def route_permutation(k_t, E: int):
    """Stable sort of tokens by routed precision (Sec. 4.3 token permutation).

    k_t int [T] in 1..E -> (perm int64 [T], starts int64 [E + 1]): sorted position i holds
    token ``perm[i]``; precision-k tokens occupy ``[starts[k-1], starts[k])``, so the tokens
    that need slice e (k_t >= e) are the suffix ``[starts[e-1], T)``.
    """
    k_t = np.asarray(to_host(k_t), dtype=np.int64).reshape(-1)
    if k_t.size and (k_t.min() < 1 or k_t.max() > E):
        raise ValueError(f"k_t must be in 1..{E}")
    perm = np.argsort(k_t, kind="stable").astype(np.int64)
    counts = np.bincount(k_t, minlength=E + 1)[1:]  # tokens per precision 1..E
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return perm, starts


# ---------------------------------------------------------------------------------------
# Device helpers


@cuda.jit(device=True)
def _load_words(planes, lo, hi, n, w, a):
    """a[p - lo] = planes[p, n, w] for p in [lo, hi) (one load per plane per K-word)."""
    for p in range(lo, hi):
        a[p - lo] = uint32(planes[p, n, w])


@cuda.jit(device=True)
def _rebuild(a, nb, j):
    """Shift-and-add: the nb-bit integer of element j from its plane words a[0..nb) (MSB first).

    a = [0b101, 0b110], j = 1: bits (0, 1) -> q = (0 << 1) | 1 = 0b01 = 1.
    """
    q = int64(0)
    for p in range(nb):
        q = (q << 1) | int64((a[p] >> uint32(j)) & uint32(1))
    return q


@cuda.jit(device=True)
def _group_params(scale, zero, n, g, smul, zmul, zadd):
    """(s * smul, z_E * zmul + zadd - 1/2): the effective scale and offset of group g of row n.

    zmul is a power of two (2^-(B_E-B_k)) or 0, so ``z_E * zmul`` is exact in float32.
    """
    s_eff = float32(scale[n, g]) * float32(smul)
    z_eff = float32(zero[n, g]) * float32(zmul) + float32(zadd) - float32(0.5)
    return s_eff, z_eff


# ---------------------------------------------------------------------------------------
# Kernels


@cuda.jit
def slice_kernel1(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
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
            s_eff, z_eff = _group_params(scale, zero, n, g, smul, zmul, zadd)
            acc = float32(0.0)  # sum x * q
            xs = float32(0.0)  # sum x (folds the zero point in once per group)
            for w in range(g * gw, min((g + 1) * gw, W)):
                _load_words(planes, lo, hi, n, w, a)
                for j in range(min(WORD_BITS, K - w * WORD_BITS)):
                    xv = float32(x[t, w * WORD_BITS + j])
                    acc += xv * float32(_rebuild(a, nb, j))
                    xs += xv
            y += s_eff * (acc - z_eff * xs)
        out[t, n] = y


@cuda.jit
def gemv_kernel2(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v2: block per row n, thread per K-word (strided), all tseg <= MAX_T tokens per thread."""
    red = cuda.shared.array((MAX_T, GEMV_MAX_THREADS), float32)
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
    nb = hi - lo
    for w in range(tid, W, nthr):
        g = w // gw
        s_eff, z_eff = _group_params(scale, zero, n, g, smul, zmul, zadd)
        _load_words(planes, lo, hi, n, w, a)
        jmax = min(WORD_BITS, K - w * WORD_BITS)
        for j in range(jmax):
            qf[j] = float32(_rebuild(a, nb, j)) - z_eff
        for i in range(tseg):  # weights decoded once, reused for every token
            acc = float32(0.0)
            for j in range(jmax):
                acc += float32(x[t0 + i, w * WORD_BITS + j]) * qf[j]
            part[i] += s_eff * acc
    for i in range(tseg):
        red[i, tid] = part[i]
    cuda.syncthreads()
    stride = nthr // 2  # tree reduction in shared memory (no warp shuffles: runs in the simulator)
    while stride > 0:
        if tid < stride:
            for i in range(tseg):
                red[i, tid] += red[i, tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        for i in range(tseg):
            out[t0 + i, n] = red[i, 0]


@cuda.jit
def gemv_kernel3(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v3: block = (BX words) x (BY rows); x staged in shared memory once per chunk for all BY rows."""
    xs = cuda.shared.array((MAX_T, WORD_BITS, XS_PAD), float32)  # [token, j, word] (+1 pad)
    red = cuda.shared.array((MAX_T, GEMV_MAX_THREADS), float32)
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
    nb = hi - lo
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
            g = w // gw
            s_eff, z_eff = _group_params(scale, zero, n, g, smul, zmul, zadd)
            _load_words(planes, lo, hi, n, w, a)
            jmax = min(WORD_BITS, K - w * WORD_BITS)
            for j in range(jmax):
                qf[j] = float32(_rebuild(a, nb, j)) - z_eff
            for i in range(tseg):
                acc = float32(0.0)
                for j in range(jmax):
                    acc += xs[i, j, tx] * qf[j]
                part[i] += s_eff * acc
        cuda.syncthreads()
    for i in range(tseg):
        red[i, tid] = part[i]
    cuda.syncthreads()
    stride = bx // 2  # reduce over the words of each row (tx), rows stay apart
    while stride > 0:
        if tx < stride:
            for i in range(tseg):
                red[i, tid] += red[i, tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tx == 0 and n < N:
        for i in range(tseg):
            out[t0 + i, n] = red[i, tid]


@cuda.jit
def gemm_kernel2(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v2g: TILE x TILE outputs per block; per K-word stage x and dequantized w in shared memory."""
    xs = cuda.shared.array((TILE, ROW_PAD), float32)  # [token, j]
    ws = cuda.shared.array((TILE, ROW_PAD), float32)  # [row, j] (+1: conflict-free column reads)
    K = x.shape[1]
    N, W = planes.shape[1], planes.shape[2]
    tx = cuda.threadIdx.x  # output row within the tile, and element j (tx, tx + 16) when staging
    ty = cuda.threadIdx.y  # token within the tile, and weight row when staging
    n = cuda.blockIdx.x * TILE + tx
    i = cuda.blockIdx.y * TILE + ty
    a = cuda.local.array(MAX_BITS, uint32)
    nb = hi - lo
    acc = float32(0.0)
    for w in range(W):
        g = w // gw
        for jj in range(tx, WORD_BITS, TILE):
            kk = w * WORD_BITS + jj
            ti = cuda.blockIdx.y * TILE + ty
            v = float32(0.0)
            if ti < tseg and kk < K:
                v = float32(x[t0 + ti, kk])
            xs[ty, jj] = v
        nr = cuda.blockIdx.x * TILE + ty  # this thread dequantizes row nr, elements tx and tx + 16
        if nr < N:
            s_eff, z_eff = _group_params(scale, zero, nr, g, smul, zmul, zadd)
            _load_words(planes, lo, hi, nr, w, a)
            for jj in range(tx, WORD_BITS, TILE):
                ws[ty, jj] = s_eff * (float32(_rebuild(a, nb, jj)) - z_eff)
        else:
            for jj in range(tx, WORD_BITS, TILE):
                ws[ty, jj] = float32(0.0)
        cuda.syncthreads()
        for j in range(WORD_BITS):
            acc += xs[ty, j] * ws[tx, j]
        cuda.syncthreads()
    if n < N and i < tseg:
        out[t0 + i, n] = acc


@cuda.jit
def gemm_kernel3(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out):
    """v3g: TILE3 x TILE3 outputs per block of TILE x TILE threads; each thread an RB x RB sub-tile."""
    xs = cuda.shared.array((TILE3, ROW_PAD), float32)
    ws = cuda.shared.array((TILE3, ROW_PAD), float32)
    K = x.shape[1]
    N, W = planes.shape[1], planes.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TILE + tx
    a = cuda.local.array(MAX_BITS, uint32)
    acc = cuda.local.array((RB, RB), float32)  # acc[token r, row c]: token ty + r*TILE, row tx + c*TILE
    xr = cuda.local.array(RB, float32)
    wr = cuda.local.array(RB, float32)
    for r in range(RB):
        for c in range(RB):
            acc[r, c] = float32(0.0)
    nb = hi - lo
    for w in range(W):
        g = w // gw
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
            nr = cuda.blockIdx.x * TILE3 + rr
            j0 = (tid % 4) * 8
            if nr < N:
                s_eff, z_eff = _group_params(scale, zero, nr, g, smul, zmul, zadd)
                _load_words(planes, lo, hi, nr, w, a)
                for jj in range(j0, j0 + 8):
                    ws[rr, jj] = s_eff * (float32(_rebuild(a, nb, jj)) - z_eff)
            else:
                for jj in range(j0, j0 + 8):
                    ws[rr, jj] = float32(0.0)
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


@cuda.jit
def gather_rows_kernel(x, perm, xs):
    """xs[i, :] = x[perm[i], :] (grid-stride in both dimensions)."""
    T, K = x.shape
    k0, i0 = cuda.grid(2)
    sk, si = cuda.gridsize(2)
    for i in range(i0, T, si):
        src = perm[i]
        for k in range(k0, K, sk):
            xs[i, k] = x[src, k]


@cuda.jit
def combine_scatter_kernel(ybuf, starts, perm, out):
    """out[perm[i], n] = sum_e [i >= starts[e]] ybuf[e, i, n]: sum the slice partials, undo the sort."""
    E, T, N = ybuf.shape
    n0, i0 = cuda.grid(2)
    sn, si = cuda.gridsize(2)
    for i in range(i0, T, si):
        dst = perm[i]
        for n in range(n0, N, sn):
            y = float32(0.0)
            for e in range(E):
                if i >= starts[e]:
                    y += ybuf[e, i, n]
            out[dst, n] = y


# ---------------------------------------------------------------------------------------
# Launchers: one segment [t0, t0 + tseg) of x, planes [lo, hi), output rows t0.. of out


def _launch1(args, tseg, N, block=None, stream=0):
    bx, by = block or ((8, 4) if _SIM else (32, 4))
    slice_kernel1[(cdiv(N, bx), cdiv(tseg, by)), (bx, by), stream](*args)


def _launch_gemv2(args, tseg, N, block=None, stream=0):
    W = args[3].shape[2]
    nthr = block or (4 if _SIM else 128)
    nthr = min(nthr, 1 << max(0, (W - 1).bit_length()))  # no more threads than words (power of 2)
    if nthr & (nthr - 1) or nthr > GEMV_MAX_THREADS:
        raise ValueError(f"GEMV v2 block must be a power of two <= {GEMV_MAX_THREADS}")
    gemv_kernel2[N, nthr, stream](*args)


def _launch_gemv3(args, tseg, N, block=None, stream=0):
    W = args[3].shape[2]
    bx, by = block or ((4, 2) if _SIM else (32, 8))
    bx = min(bx, 1 << max(0, (W - 1).bit_length()))
    if bx & (bx - 1) or bx > GEMV3_MAX_BX or bx * by > GEMV_MAX_THREADS:
        raise ValueError(f"GEMV v3 block (bx, by): bx a power of two <= {GEMV3_MAX_BX}, bx*by <= {GEMV_MAX_THREADS}")
    gemv_kernel3[cdiv(N, by), (bx, by), stream](*args)


def _launch_gemm2(args, tseg, N, block=None, stream=0):
    gemm_kernel2[(cdiv(N, TILE), cdiv(tseg, TILE)), (TILE, TILE), stream](*args)


def _launch_gemm3(args, tseg, N, block=None, stream=0):
    gemm_kernel3[(cdiv(N, TILE3), cdiv(tseg, TILE3)), (TILE, TILE), stream](*args)


# (kind, version) -> launcher; "gemv" v1 and "gemm" v1 are the same naive kernel. GEMV v4+ (look-up
# tables, split-K) live in slice_gemv.py and are found by _launcher.
LAUNCHERS = {
    ("gemv", 1): _launch1,
    ("gemv", 2): _launch_gemv2,
    ("gemv", 3): _launch_gemv3,
    ("gemm", 1): _launch1,
    ("gemm", 2): _launch_gemm2,
    ("gemm", 3): _launch_gemm3,
}


def _launcher(kind: str, version: int):
    """The launcher of kernel (kind, version); GEMV v4+ come from :mod:`cuda_numba.slice_gemv`."""
    if (kind, version) in LAUNCHERS:
        return LAUNCHERS[(kind, version)]
    if kind == "gemv":
        from . import slice_gemv  # imported lazily: it imports this module's reference

        if version in slice_gemv.LAUNCHERS:
            return slice_gemv.LAUNCHERS[version]
    raise ValueError(f"unknown {kind} version {version}")


def _run_segment(kind, version, dx, t0, tseg, dw: PackedWeight, lo, hi, smul, zmul, zadd, dout, block=None, stream=0):
    """Launch kernel (kind, version) on sorted tokens [t0, t0 + tseg) and planes [lo, hi)."""
    if tseg <= 0:
        return
    gw = dw.planes.shape[2] if dw.n_groups == 1 else dw.group_size // WORD_BITS
    launch = _launcher(kind, version)
    step = MAX_T if (kind == "gemv" and version > 1) else tseg  # GEMV v2/v3: 8 tokens per launch
    for s in range(t0, t0 + tseg, step):
        n_tok = min(step, t0 + tseg - s)
        args = (dx, s, n_tok, dw.planes, lo, hi, dw.scale, dw.zero, np.float32(smul), np.float32(zmul), zadd, gw, dout)
        launch(args, n_tok, dw.N, block, stream)


def _prefix_params(w: PackedWeight, k: int):
    """(lo, hi, smul, zmul, zadd) for precision k: planes [0, B_k), s_k, z_k = z_E 2^-(B_E-B_k)."""
    Bk, b1, BE = w.bits_at(k), int(w.slice_bits[0]), w.bits_at(len(w.slice_bits))
    return 0, Bk, 2.0 ** -(Bk - b1), 2.0 ** -(BE - Bk), 0


def _residual_params(w: PackedWeight, e: int):
    """(lo, hi, smul, zmul, zadd) for residual slice e >= 2: planes [B_{e-1}, B_e), s_e, 2^(b_e-1)."""
    lo, hi, b1, be = w.bits_at(e - 1), w.bits_at(e), int(w.slice_bits[0]), int(w.slice_bits[e - 1])
    return lo, hi, 2.0 ** -(hi - b1), 0.0, 2 ** (be - 1)


def _prepare(x, w: PackedWeight):
    on_device = is_device_array(x)
    dx = to_device(x)
    if dx.dtype not in (np.float16, np.float32):
        dx = to_device(to_host(dx), np.float32)
    K = dx.shape[1]
    if K != w.K:
        raise ValueError(f"x has K={K}, weight has K={w.K}")
    check_groups(w.K, w.group_size, w.n_groups)
    if w.planes.shape[2] != n_words(K):
        raise ValueError("planes do not match K")
    return on_device, dx, w.to_device()


def _scratch(shape):
    """float32 scratch buffer; NaN-filled in the simulator so a read of an unwritten row shows."""
    if _SIM:
        return cuda.to_device(np.full(shape, np.nan, dtype=np.float32))
    return cuda.device_array(shape, dtype=np.float32)


def _uniform(kind, x, w, k, version, block, out):
    if not 1 <= k <= len(w.slice_bits):
        raise ValueError(f"k={k} outside 1..{len(w.slice_bits)}")
    _launcher(kind, version)  # raises ValueError for an unknown version
    on_device, dx, dw = _prepare(x, w)
    T = dx.shape[0]
    dout = output_array(out, (T, w.N), dx.dtype)
    _run_segment(kind, version, dx, 0, T, dw, *_prefix_params(w, k), dout, block)
    return finish(dout, out, on_device)


def slice_gemv(x, w: PackedWeight, k: int, version: int = 2, block=None, out=None):
    """Decode GEMV: ``y = x @ W_k^T`` reading only planes ``[0, B_k)`` (Sec. 4.3).

    x [T, K] fp16/fp32 (T small, decode: 1-8 tokens; more are processed 8 at a time),
    ``w`` a PackedWeight, one precision k for every token -> y [T, N] in x's dtype.
    Host input -> NumPy, device input -> device array; ``out`` is written in place if given.
    """
    return _uniform("gemv", x, w, k, version, block, out)


def slice_gemm(x, w: PackedWeight, k: int, version: int = 2, block=None, out=None):
    """Prefill GEMM: ``y = x @ W_k^T`` for many tokens, reading only planes ``[0, B_k)``.

    Same contract as :func:`slice_gemv`; versions 1 (naive), 2 (smem tiles), 3 (register tiles).
    """
    return _uniform("gemm", x, w, k, version, block, out)


# Benchmarkable cases of slice_linear: name -> (method, kind, version). The bench (and anyone
# timing the kernels) uses this list and run_kernels, not the private helpers below.
CASES = {
    **{f"{kind}{v}": ("grouped", kind, v) for kind in ("gemv", "gemm") for v in (1, 2, 3)},
    "gemv4": ("grouped", "gemv", 4),
    "gemv5": ("grouped", "gemv", 5),
    "streams-gemv2": ("streams", "gemv", 2),
    "streams-gemv5": ("streams", "gemv", 5),
    "streams-gemm2": ("streams", "gemm", 2),
    "streams-gemm3": ("streams", "gemm", 3),
    "fused-gemv6": ("fused", "gemv", 6),
}


def run_kernels(method, kind, version, dxs, w: PackedWeight, k_t, ybuf=None, streams=None, out=None, dk=None):
    """Only the compute kernels of one ``slice_linear`` call, for timing (inputs prepared beforehand).

    grouped / streams: ``dxs`` are the activations already sorted by ``route_permutation(k_t)``,
    results go to ``ybuf`` float32 [E, T, N] (per slice for streams); fused: ``dxs`` is x
    unsorted, ``dk`` k_t on the device and the result goes to ``out``.
    """
    if method == "fused":
        from .slice_gemv import gemv_routed

        return gemv_routed(dxs, w, dk if dk is not None else k_t, out=out)
    _, starts = route_permutation(k_t, len(w.slice_bits))
    if method == "streams":
        return _run_streams(kind, version, dxs, w, starts, ybuf, None, streams)
    return _run_grouped(kind, version, dxs, w, starts, ybuf, None)


def _run_grouped(kind, version, dxs, dw, starts, ybuf, block):
    for k in range(1, len(dw.slice_bits) + 1):  # one launch per precision segment, B_k planes each
        t0, t1 = int(starts[k - 1]), int(starts[k])
        _run_segment(kind, version, dxs, t0, t1 - t0, dw, *_prefix_params(dw, k), ybuf[0], block)


def _run_streams(kind, version, dxs, dw, starts, ybuf, block, streams):
    """Base slice for all tokens on streams[0]; residual slice e on streams[e-1] for tokens k_t >= e."""
    E = len(dw.slice_bits)
    T = dxs.shape[0]
    s0 = streams[0]
    ready = cuda.event()
    ready.record(s0)  # the sorted activations exist once s0 reaches this point
    _run_segment(kind, version, dxs, 0, T, dw, *_prefix_params(dw, 1), ybuf[0], block, s0)
    done = []
    for e in range(2, E + 1):
        t0 = int(starts[e - 1])  # tokens with k_t >= e form the suffix [t0, T)
        if t0 >= T:
            continue
        se = streams[e - 1]
        ready.wait(se)
        _run_segment(kind, version, dxs, t0, T - t0, dw, *_residual_params(dw, e), ybuf[e - 1], block, se)
        ev = cuda.event()
        ev.record(se)
        done.append(ev)
    for ev in done:  # s0 waits for every residual stream before combining
        ev.wait(s0)


def slice_linear(
    x,
    w: PackedWeight,
    k_t,
    method: str = "grouped",
    kind: str = "gemm",
    version: int = 2,
    block=None,
    streams=None,
    out=None,
):
    """Mixed-precision linear: ``y[t] = x[t] @ W_{k_t}^T`` with per-token routed k_t (Eq. 6, Sec. 4.3).

    x [T, K] fp16/fp32, k_t int [T] in 1..E. Tokens are stable-sorted by k_t (gather kernel),
    then

    * ``method="grouped"``: one launch of kernel (``kind`` "gemv"/"gemm", ``version``) per
      precision segment, each reading planes ``[0, B_k)`` only;
    * ``method="streams"``: ``x W_1^T`` for all tokens on stream 0 and ``x dW_e^T`` for the
      suffix of tokens with k_t >= e on stream e-1 (each slice's planes are read once);

    and a scatter kernel sums the partials and applies the inverse permutation.

    * ``method="fused"`` (decode, ``kind="gemv"``, ``version=6``): no sort at all; one launch
      per 8 tokens in which each token reads its own ``B_{k_t}`` planes
      (:func:`cuda_numba.slice_gemv.gemv_routed`). k_t may be a device array (not checked, clamped
      to 1..E); nothing goes back to the host, and nothing is allocated per call when x and
      ``out`` are on the device.
    Returns y [T, N] in x's dtype (NumPy for host x; ``out`` written in place if given).
    """
    if method not in ("grouped", "streams", "fused"):
        raise ValueError(f"unknown method {method!r}")
    if method == "fused":
        if (kind, version) != ("gemv", 6):
            raise ValueError('method="fused" runs GEMV v6 only: pass kind="gemv", version=6')
        from .slice_gemv import gemv_routed

        return gemv_routed(x, w, k_t, block=block, out=out)
    _launcher(kind, version)  # raises ValueError for an unknown version
    on_device, dx, dw = _prepare(x, w)
    T, K = dx.shape
    E = len(w.slice_bits)
    perm, starts = route_permutation(k_t, E)
    if perm.shape[0] != T:
        raise ValueError(f"k_t has {perm.shape[0]} entries for {T} tokens")
    if method == "streams":
        streams = list(streams) if streams is not None else [cuda.stream() for _ in range(E)]
        s0 = streams[0]
    else:
        s0 = 0
    dperm = cuda.to_device(perm, stream=s0)
    dxs = cuda.device_array_like(dx, stream=s0)
    blk = (32, 1) if _SIM else (128, 2)
    grid = (1 if _SIM else cdiv(K, blk[0] * 4), cdiv(T, blk[1]))
    gather_rows_kernel[grid, blk, s0](dx, dperm, dxs)
    n_buf = E if method == "streams" else 1
    ybuf = _scratch((n_buf, T, w.N))
    if method == "grouped":
        _run_grouped(kind, version, dxs, dw, starts, ybuf, block)
        dstarts = cuda.to_device(np.zeros(1, np.int64))
    else:
        _run_streams(kind, version, dxs, dw, starts, ybuf, block, streams)
        dstarts = cuda.to_device(np.array([0] + [starts[e - 1] for e in range(2, E + 1)], np.int64), stream=s0)
    dout = output_array(out, (T, w.N), dx.dtype)
    grid = (1 if _SIM else cdiv(w.N, blk[0] * 4), cdiv(T, blk[1]))
    combine_scatter_kernel[grid, blk, s0](ybuf, dstarts, dperm, dout)
    if method == "streams":
        s0.synchronize()
    return finish(dout, out, on_device)
