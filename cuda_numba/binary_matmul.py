"""Binary matrix multiplication on bit-planes: AND + popcount (paper Sec. 4.3, "BMMA").

Both operands are unsigned integers split into bit-planes (``packing.py`` layout, MSB
plane first, 32 K-elements per uint32 word, element j at bit j):

    xq uint8 [T, K] -> x_planes uint32 [bx, T, W]      activations, quantized per token
    wq uint8 [N, K] -> w_planes uint32 [bw, N, W]      weights (MoBiSlice codes, first B_k planes)

With ``xq = sum_i 2^(bx-1-i) X_i`` and ``wq = sum_j 2^(bw-1-j) W_j`` ({0,1} planes) the
integer dot product of a token row and a weight row is (the popcount identity)

    <xq[t], wq[n]> = sum_i sum_j 2^((bx-1-i) + (bw-1-j)) * popc(X_i[t] AND W_j[n])

where each popc over one 32-bit word does 32 one-bit multiply-adds. Worked example
(K = 3, 2-bit operands): x = [3, 1, 2], w = [1, 3, 2] -> planes (element j at bit j)
X_0 = 0b101 (MSBs of x), X_1 = 0b011 (LSBs), W_0 = 0b110, W_1 = 0b011:

    2^2 popc(101 & 110) + 2^1 popc(101 & 011) + 2^1 popc(011 & 110) + 2^0 popc(011 & 011)
  = 4*1 + 2*1 + 2*1 + 1*2 = 10 = 3*1 + 1*3 + 2*2

Zero points (asymmetric quantization) are folded in with row/column sums, which are
themselves popcounts (``sum_k xq = sum_i 2^(bx-1-i) popc(X_i)``). Per weight group g:

    sum_k (xq - zx)(wq - zw_g) = <xq, wq>_g - zw_g * Sx_g - zx * Sw_g + zx * zw_g * cnt_g

``binary_matmul`` returns these integers exactly (int64 [T, N]), checked against an int64
NumPy matmul. ``binary_linear`` applies it to a MoBiSlice weight at precision k
(``W_k = s_k (Q_k - z_k + 1/2)``, weights-only paper setting *plus* 8-bit per-token
activations, an optional mode). ``z_k = z_E / 2^(B_E - B_k)`` is a dyadic fraction; with
``D = 2^(B_E - B_k + 1)`` and the integer offset ``c = D (z_k - 1/2) = 2 z_E - D/2`` everything
stays integer,

    y[t, n] = sx[t] * sum_g (s_k[n, g] / D) * sum_{k in g} (xq - zx)(D Q_k - c)

Versions (``binary_matmul(..., version=V)`` and ``binary_linear(..., version=V)``):

1. one thread per output (t, n); row/column sums recomputed in every thread.
2. row/column sums precomputed once by a small kernel; the thread loads the ``bx``
   activation words and ``bw`` weight words of a K-word once into local arrays.
3. shared-memory tiles: a block of TILE_T x TILE_N outputs stages TILE_W words of every
   plane of its tokens and rows, so each plane word is read from global memory once per block.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int64, uint32

from ._common import cdiv, finish, is_device_array, output_array, to_device, to_host
from .packing import MAX_BITS, WORD_BITS, PackedWeight, check_groups, n_words, pack_bitplanes

__all__ = [
    "CASES",
    "LAUNCHERS",
    "binary_linear",
    "binary_linear_ref",
    "binary_matmul",
    "binary_matmul_ref",
    "popcount_matmul_ref",
    "quantize_activations",
]

TILE_T = 8  # v3 block: tokens
TILE_N = 16  # v3 block: output rows
TILE_W = 4  # v3 words staged per step (128 K-elements)


# ---------------------------------------------------------------------------------------
# NumPy references


def quantize_activations(x, bits: int = 8, asymmetric: bool = True):
    """Per-token uniform quantization of activations to unsigned ``bits``-bit integers.

    x [T, K] float -> (xq uint8 [T, K], scale float32 [T], zero int32 [T]) with
    ``x ~= scale * (xq - zero)``. ``asymmetric=True`` maps [min, max] to [0, 2^bits - 1]
    (min/max include 0 so that 0 is exact); ``asymmetric=False`` is symmetric with the
    fixed zero point ``2^(bits-1)`` (offset binary), so the planes stay unsigned.
    """
    x = np.asarray(to_host(x), dtype=np.float32)
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}")
    qmax = 2**bits - 1
    if asymmetric:
        lo = np.minimum(x.min(axis=1), 0.0)
        hi = np.maximum(x.max(axis=1), 0.0)
        scale = np.maximum(hi - lo, 1e-8) / qmax  # [T]
        zero = np.rint(-lo / scale)
    else:
        half = 2 ** (bits - 1)
        scale = np.maximum(np.abs(x).max(axis=1), 1e-8) / max(half - 1, 1)
        zero = np.full(x.shape[0], half, dtype=np.float64)
    xq = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, qmax)
    return xq.astype(np.uint8), scale.astype(np.float32), zero.astype(np.int32)


def _expand_zero(w_zero, N, K, group_size):
    """Per-group weight zero points [N, G] -> per-element [N, K] (int64); None -> 0."""
    if w_zero is None:
        return np.zeros((N, K), dtype=np.int64)
    w_zero = np.asarray(w_zero, dtype=np.int64)
    g = K if w_zero.shape[1] == 1 else group_size
    return np.repeat(w_zero, g, axis=1)[:, :K]


def binary_matmul_ref(xq, wq, x_zero=None, w_zero=None, group_size=None) -> np.ndarray:
    """Integer reference: ``(xq - zx) @ (wq - zw)^T`` in int64.

    xq [T, K] and wq [N, K] unsigned ints; x_zero [T] (per token) and w_zero [N, G]
    (per group of ``group_size`` along K; G = 1 means per row), both optional.
    Returns int64 [T, N].
    """
    xq = np.asarray(xq).astype(np.int64)
    wq = np.asarray(wq).astype(np.int64)
    K = xq.shape[1]
    N = wq.shape[0]
    if x_zero is not None:
        xq = xq - np.asarray(x_zero, dtype=np.int64)[:, None]
    wq = wq - _expand_zero(w_zero, N, K, group_size)
    return xq @ wq.T


def popcount_matmul_ref(x_planes, w_planes) -> np.ndarray:
    """The popcount identity in NumPy: ``sum_ij 2^(i'+j') popc(X_i AND W_j)`` -> int64 [T, N].

    x_planes uint32 [bx, T, W], w_planes uint32 [bw, N, W] (MSB plane first). Equals
    ``xq @ wq.T`` for the unpacked operands.
    """
    x_planes = np.asarray(x_planes, dtype=np.uint32)
    w_planes = np.asarray(w_planes, dtype=np.uint32)
    bx, bw = x_planes.shape[0], w_planes.shape[0]
    out = np.zeros((x_planes.shape[1], w_planes.shape[1]), dtype=np.int64)
    for i in range(bx):
        for j in range(bw):
            both = x_planes[i][:, None, :] & w_planes[j][None, :, :]  # [T, N, W]
            out += np.bitwise_count(both).sum(axis=-1, dtype=np.int64) << ((bx - 1 - i) + (bw - 1 - j))
    return out


def binary_linear_ref(x, codes, scale, zero, slice_bits, k: int, group_size: int, act_bits=8, asymmetric=True):
    """Reference for :func:`binary_linear`: quantize x per token, then integers in int64, scales in float64.

    x [T, K] float, codes uint8 [N, K] (Q_E), scale [N, G], zero [N, G] -> float64 [T, N].
    """
    xq, sx, zx = quantize_activations(x, act_bits, asymmetric)
    codes = np.asarray(to_host(codes))
    N, K = codes.shape
    scale = np.asarray(to_host(scale), dtype=np.float64)
    zero = np.asarray(to_host(zero), dtype=np.int64)
    G = scale.shape[1]
    g = K if G == 1 else group_size
    BE, Bk, b1 = int(sum(slice_bits)), int(sum(slice_bits[:k])), int(slice_bits[0])
    Qk = codes.astype(np.int64) >> (BE - Bk)  # [N, K] top B_k bits
    D = 2 ** (BE - Bk + 1)  # D z_k = 2 z_E is an integer
    c = 2 * zero - D // 2  # integer offset D (z_k - 1/2), [N, G]
    X = xq.astype(np.int64) - zx[:, None].astype(np.int64)  # [T, K]
    Wd = D * Qk - np.repeat(c, g, axis=1)[:, :K]  # [N, K] = D (Q_k - z_k + 1/2)
    y = np.zeros((X.shape[0], N), dtype=np.float64)
    for gi in range(G):
        sl = slice(gi * g, min((gi + 1) * g, K))
        y += (X[:, sl] @ Wd[:, sl].T) * (scale[:, gi] / 2 ** (Bk - b1) / D)[None, :]
    return y * sx.astype(np.float64)[:, None]


# ---------------------------------------------------------------------------------------
# Device helpers


@cuda.jit(device=True)
def _group_count(K, g, group_words):
    """Number of real (unpadded) K-elements in group g."""
    lo = int64(g) * int64(group_words) * WORD_BITS
    return min(int64(K) - lo, int64(group_words) * WORD_BITS)


@cuda.jit(device=True)
def _zp_dot(dot, sx, sw, zx, zw, cnt):
    """``sum_g (xq - zx)(wq - zw)`` from ``<xq, wq>_g``, ``sum xq``, ``sum wq`` and the group's count."""
    return dot - zw * sx - zx * sw + zx * zw * cnt


@cuda.jit(device=True)
def _group_span(g, group_words, W):
    """Words [w0, w1) of group g."""
    w0 = g * group_words
    return w0, min(w0 + group_words, W)


@cuda.jit(device=True)
def _dot_and_sums(xp, nbx, t, wp, nbw, n, w0, w1):
    """Over words [w0, w1): (<xq, wq>, sum xq, sum wq) by AND + popcount."""
    dot = int64(0)
    sx = int64(0)
    sw = int64(0)
    for w in range(w0, w1):
        for i in range(nbx):
            a = uint32(xp[i, t, w])
            sx += int64(cuda.popc(a)) << (nbx - 1 - i)
            for j in range(nbw):
                b = uint32(wp[j, n, w])
                dot += int64(cuda.popc(a & b)) << ((nbx - 1 - i) + (nbw - 1 - j))
        for j in range(nbw):
            sw += int64(cuda.popc(uint32(wp[j, n, w]))) << (nbw - 1 - j)
    return dot, sx, sw


@cuda.jit(device=True)
def _dot_cached(xp, nbx, t, wp, nbw, n, w0, w1):
    """<xq, wq> over words [w0, w1), loading each plane word once into registers."""
    xa = cuda.local.array(MAX_BITS, uint32)
    wa = cuda.local.array(MAX_BITS, uint32)
    dot = int64(0)
    for w in range(w0, w1):
        for i in range(nbx):
            xa[i] = uint32(xp[i, t, w])
        for j in range(nbw):
            wa[j] = uint32(wp[j, n, w])
        for i in range(nbx):
            row = int64(0)  # sum_j 2^(bw-1-j) popc(X_i & W_j), then one shift for plane i
            for j in range(nbw):
                row += int64(cuda.popc(xa[i] & wa[j])) << (nbw - 1 - j)
            dot += row << (nbx - 1 - i)
    return dot


# ---------------------------------------------------------------------------------------
# Kernels: integer binary matmul, out int64 [T, N]


@cuda.jit
def bmm_kernel1(xp, wp, x_zero, w_zero, K, group_words, out):
    """v1: thread per (n, t); dot product and both sums by popcount in-thread."""
    nbx, T, W = xp.shape
    nbw, N, _ = wp.shape
    G = w_zero.shape[1]
    n, t = cuda.grid(2)
    if n < N and t < T:
        zx = int64(x_zero[t])
        acc = int64(0)
        for g in range(G):
            w0, w1 = _group_span(g, group_words, W)
            dot, sx, sw = _dot_and_sums(xp, nbx, t, wp, nbw, n, w0, w1)
            acc += _zp_dot(dot, sx, sw, zx, int64(w_zero[n, g]), _group_count(K, g, group_words))
        out[t, n] = acc


@cuda.jit
def group_sums_kernel(planes, nb, group_words, sums):
    """sums[r, g] = sum of the nb-bit integers of row r in group g (popcount per plane)."""
    _, R, W = planes.shape
    G = sums.shape[1]
    g, r = cuda.grid(2)
    if g < G and r < R:
        s = int64(0)
        for w in range(g * group_words, min((g + 1) * group_words, W)):
            for p in range(nb):
                s += int64(cuda.popc(uint32(planes[p, r, w]))) << (nb - 1 - p)
        sums[r, g] = s


@cuda.jit
def bmm_kernel2(xp, wp, x_zero, w_zero, x_sums, w_sums, K, group_words, out):
    """v2: thread per (n, t); precomputed sums, words cached in registers."""
    nbx, T, W = xp.shape
    nbw, N, _ = wp.shape
    G = w_zero.shape[1]
    n, t = cuda.grid(2)
    if n < N and t < T:
        zx = int64(x_zero[t])
        acc = int64(0)
        for g in range(G):
            w0, w1 = _group_span(g, group_words, W)
            dot = _dot_cached(xp, nbx, t, wp, nbw, n, w0, w1)
            cnt = _group_count(K, g, group_words)
            acc += _zp_dot(dot, x_sums[t, g], w_sums[n, g], zx, int64(w_zero[n, g]), cnt)
        out[t, n] = acc


@cuda.jit
def bmm_kernel3(xp, wp, x_zero, w_zero, x_sums, w_sums, K, group_words, out):
    """v3: block = TILE_N x TILE_T outputs; plane words staged in shared memory TILE_W at a time."""
    xs = cuda.shared.array((MAX_BITS, TILE_T, TILE_W), uint32)
    ws = cuda.shared.array((MAX_BITS, TILE_N, TILE_W), uint32)
    nbx, T, W = xp.shape
    nbw, N, _ = wp.shape
    tx = cuda.threadIdx.x  # along N
    ty = cuda.threadIdx.y  # along T
    n = cuda.blockIdx.x * TILE_N + tx
    t = cuda.blockIdx.y * TILE_T + ty
    tid = ty * TILE_N + tx
    acc = int64(0)
    dot = int64(0)
    zx = int64(0)
    if t < T:
        zx = int64(x_zero[t])
    for w0 in range(0, W, TILE_W):
        # cooperative loads: tid walks the staged words; out-of-range words read as 0
        for e in range(tid, nbx * TILE_T * TILE_W, TILE_T * TILE_N):
            i = e // (TILE_T * TILE_W)
            r = (e // TILE_W) % TILE_T
            c = e % TILE_W
            tt = cuda.blockIdx.y * TILE_T + r
            v = uint32(0)
            if tt < T and w0 + c < W:
                v = uint32(xp[i, tt, w0 + c])
            xs[i, r, c] = v
        for e in range(tid, nbw * TILE_N * TILE_W, TILE_T * TILE_N):
            j = e // (TILE_N * TILE_W)
            r = (e // TILE_W) % TILE_N
            c = e % TILE_W
            nn = cuda.blockIdx.x * TILE_N + r
            v = uint32(0)
            if nn < N and w0 + c < W:
                v = uint32(wp[j, nn, w0 + c])
            ws[j, r, c] = v
        cuda.syncthreads()
        for c in range(TILE_W):
            w = w0 + c
            if w < W:
                for i in range(nbx):
                    row = int64(0)
                    for j in range(nbw):
                        row += int64(cuda.popc(xs[i, ty, c] & ws[j, tx, c])) << (nbw - 1 - j)
                    dot += row << (nbx - 1 - i)
                # last word of a group: fold in the zero-point corrections of group g
                if (w + 1) % group_words == 0 or w + 1 == W:
                    g = w // group_words
                    if n < N and t < T:
                        cnt = _group_count(K, g, group_words)
                        acc += _zp_dot(dot, x_sums[t, g], w_sums[n, g], zx, int64(w_zero[n, g]), cnt)
                    dot = int64(0)
        cuda.syncthreads()
    if n < N and t < T:
        out[t, n] = acc


# ---------------------------------------------------------------------------------------
# Launchers (device arrays)


def _sums(d_planes, nb, group_words, G, stream=0):
    R = d_planes.shape[1]
    d = cuda.device_array((R, G), dtype=np.int64, stream=stream)
    bx = min(G, 8)
    by = max(1, min(R, 64 // bx))
    group_sums_kernel[(cdiv(G, bx), cdiv(R, by)), (bx, by), stream](d_planes, nb, group_words, d)
    return d


def binary_matmul_v1(dxp, dwp, dxz, dwz, K, group_words, dout, block=(16, 8), stream=0):
    """Launch v1: grid over (N, T)."""
    T, N = dout.shape
    bmm_kernel1[(cdiv(N, block[0]), cdiv(T, block[1])), block, stream](dxp, dwp, dxz, dwz, K, group_words, dout)


def binary_matmul_v2(dxp, dwp, dxz, dwz, K, group_words, dout, block=(16, 8), stream=0):
    """Launch v2: sums kernel for X and W, then the main kernel over (N, T)."""
    T, N = dout.shape
    G = dwz.shape[1]
    dxs = _sums(dxp, dxp.shape[0], group_words, G, stream)
    dws = _sums(dwp, dwp.shape[0], group_words, G, stream)
    grid = (cdiv(N, block[0]), cdiv(T, block[1]))
    bmm_kernel2[grid, block, stream](dxp, dwp, dxz, dwz, dxs, dws, K, group_words, dout)


def binary_matmul_v3(dxp, dwp, dxz, dwz, K, group_words, dout, block=None, stream=0):
    """Launch v3: (TILE_N, TILE_T) thread blocks (block size fixed by the shared tiles)."""
    T, N = dout.shape
    G = dwz.shape[1]
    dxs = _sums(dxp, dxp.shape[0], group_words, G, stream)
    dws = _sums(dwp, dwp.shape[0], group_words, G, stream)
    grid = (cdiv(N, TILE_N), cdiv(T, TILE_T))
    bmm_kernel3[grid, (TILE_N, TILE_T), stream](dxp, dwp, dxz, dwz, dxs, dws, K, group_words, dout)


LAUNCHERS = {1: binary_matmul_v1, 2: binary_matmul_v2, 3: binary_matmul_v3}
# Benchmarkable cases: name -> launcher ``launch(dxp, dwp, dxz, dwz, K, group_words, dout, block)``.
CASES = {f"bmm{v}": launch for v, launch in LAUNCHERS.items()}


def _group_words(K, W, group_size, G):
    if G == 1:
        return W
    check_groups(K, group_size, G)
    return group_size // WORD_BITS


def binary_matmul(
    x_planes, w_planes, K: int, x_zero=None, w_zero=None, group_size=None, version: int = 2, block=None, out=None
):
    """Exact ``(xq - zx) @ (wq - zw)^T`` from bit-planes by AND + popcount -> int64 [T, N].

    x_planes uint32 [bx, T, W], w_planes uint32 [bw, N, W] (``pack_bitplanes`` layout, any
    number of planes <= 8 each), K the true inner size, x_zero int [T], w_zero int [N, G]
    with ``group_size`` (G = 1: one zero per row). ``block`` (threads along N, T) applies to
    versions 1-2; v3's block is fixed by its tiles. Host input -> NumPy, device -> device;
    ``out`` (int64 [T, N]) is written in place when given.
    """
    if version not in LAUNCHERS:
        raise ValueError(f"unknown binary_matmul version {version}; have {sorted(LAUNCHERS)}")
    on_device = is_device_array(x_planes)
    dxp = to_device(x_planes, np.uint32)
    dwp = to_device(w_planes, np.uint32)
    _, T, W = dxp.shape
    N = dwp.shape[1]
    if dwp.shape[2] != W or W != n_words(K):
        raise ValueError(f"planes have {W} and {dwp.shape[2]} words, K={K} needs {n_words(K)}")
    dxz = to_device(np.zeros(T, np.int32) if x_zero is None else x_zero, np.int32)
    dwz = to_device(np.zeros((N, 1), np.int32) if w_zero is None else w_zero, np.int32)
    gw = _group_words(K, W, group_size, dwz.shape[1])
    dout = output_array(out, (T, N), np.int64)
    LAUNCHERS[version](dxp, dwp, dxz, dwz, K, gw, dout, block=block or (16, 8))
    return finish(dout, out, on_device)


# ---------------------------------------------------------------------------------------
# MoBiSlice weights x quantized activations: float output


@cuda.jit
def blinear_kernel1(xp, x_scale, x_zero, wp, nbw, w_scale, w_zero, K, group_words, smul, dmul, out):
    """v1: thread per (n, t); reads the first nbw (= B_k) weight planes; float32 out [T, N]."""
    nbx, T, W = xp.shape
    N = wp.shape[1]
    G = w_zero.shape[1]
    n, t = cuda.grid(2)
    if n < N and t < T:
        zx = int64(x_zero[t])
        y = float32(0.0)
        for g in range(G):
            w0, w1 = _group_span(g, group_words, W)
            dot, sx, sw = _dot_and_sums(xp, nbx, t, wp, nbw, n, w0, w1)
            c = 2 * int64(w_zero[n, g]) - int64(dmul) // 2  # D (z_k - 1/2), D = dmul
            # sum (xq - zx)(D Q_k - c): the integer dot product with D wq and zero point c
            d = _zp_dot(int64(dmul) * dot, sx, int64(dmul) * sw, zx, c, _group_count(K, g, group_words))
            y += float32(w_scale[n, g]) * float32(smul) * float32(d)
        out[t, n] = float32(x_scale[t]) * y


@cuda.jit
def blinear_kernel2(xp, x_scale, x_zero, x_sums, wp, nbw, w_scale, w_zero, w_sums, K, group_words, smul, dmul, out):
    """v2: thread per (n, t); precomputed per-group sums, words cached in registers."""
    nbx, T, W = xp.shape
    N = wp.shape[1]
    G = w_zero.shape[1]
    n, t = cuda.grid(2)
    if n < N and t < T:
        zx = int64(x_zero[t])
        y = float32(0.0)
        for g in range(G):
            w0, w1 = _group_span(g, group_words, W)
            dot = _dot_cached(xp, nbx, t, wp, nbw, n, w0, w1)
            c = 2 * int64(w_zero[n, g]) - int64(dmul) // 2  # D (z_k - 1/2)
            cnt = _group_count(K, g, group_words)
            d = _zp_dot(int64(dmul) * dot, x_sums[t, g], int64(dmul) * w_sums[n, g], zx, c, cnt)
            y += float32(w_scale[n, g]) * float32(smul) * float32(d)
        out[t, n] = float32(x_scale[t]) * y


def binary_linear(
    x, w: PackedWeight, k: int, act_bits: int = 8, asymmetric: bool = True, version: int = 2, block=(16, 8), out=None
):
    """``y = quant(x) @ W_k^T`` with 8-bit per-token activations and AND + popcount (Sec. 4.3).

    x [T, K] float (host), ``w`` a :class:`~cuda_numba.packing.PackedWeight`, k in
    1..len(slice_bits): reads only the first ``B_k`` planes. Returns float32 [T, N]
    (NumPy, or ``out`` filled in place). Versions 1-2 as in the module docstring.
    """
    if version not in (1, 2):
        raise ValueError(f"unknown binary_linear version {version}; have [1, 2]")
    xq, sx, zx = quantize_activations(x, act_bits, asymmetric)
    T, K = xq.shape
    if K != w.K:
        raise ValueError(f"x has K={K}, weight has K={w.K}")
    dw = w.to_device()
    Bk, b1 = w.bits_at(k), int(w.slice_bits[0])
    G = w.n_groups
    gw = _group_words(K, n_words(K), w.group_size, G)
    dxp = to_device(pack_bitplanes(xq, bits=act_bits), np.uint32)
    dxs, dxz = to_device(sx, np.float32), to_device(zx, np.int32)
    dwp = dw.planes  # the kernel reads planes [0, B_k) only
    dmul = 2 ** (w.bits_at(len(w.slice_bits)) - Bk + 1)  # D: D z_k = 2 z_E, z_k = z_E / 2^(B_E - B_k)
    smul = np.float32(2.0 ** -(Bk - b1) / dmul)  # s_k / D, s_k = s / 2^(B_k - b_1)
    dout = output_array(out, (T, w.N), np.float32)
    grid = (cdiv(w.N, block[0]), cdiv(T, block[1]))
    if version == 1:
        blinear_kernel1[grid, block](dxp, dxs, dxz, dwp, Bk, dw.scale, dw.zero, K, gw, smul, dmul, dout)
    else:
        dxsum = _sums(dxp, act_bits, gw, G)
        dwsum = _sums(dwp, Bk, gw, G)
        blinear_kernel2[grid, block](dxp, dxs, dxz, dxsum, dwp, Bk, dw.scale, dw.zero, dwsum, K, gw, smul, dmul, dout)
    return finish(dout, out, False)
