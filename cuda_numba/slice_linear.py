"""Mixed-precision linear: each token reads only the slices it was routed to (Eq. 6, Sec. 4.3).

MoBiRoute (Sec. 4.2) gives token t a slice count ``k_t``; the layer computes

    y[t] = x[t] @ W_{k_t}^T,      W_k = W_1 + dW_2 + ... + dW_k        (:mod:`cuda_numba.dequant`)

Sec. 4.3: "tokens are permuted so that tokens assigned to the same bit slice sit contiguously".
:func:`route_permutation` stable-sorts the tokens by ``k_t``; a gather kernel builds the sorted
activations, a ladder's kernel (:mod:`cuda_numba.slice_gemv` or :mod:`cuda_numba.slice_gemm`)
runs on contiguous segments, and a scatter kernel sums the partials and undoes the sort.
Three methods:

* ``grouped``: one launch per precision segment k, reading planes ``[0, B_k)``;
* ``streams``: ``x W_1^T`` for all tokens on stream 0 and ``x dW_e^T`` for the suffix of tokens
  with ``k_t >= e`` on stream e-1 (each slice's planes are read once; the launches may overlap
  on a GPU, in the simulator they run one after the other);
* ``fused`` (decode): GEMV v6 or v7, no sort at all, each token stops at its own planes in one
  launch (v7: one launch per 2 tokens, a :class:`~cuda_numba.slice_gemv.RoutedPlan` per layer).

``CASES`` names every (method, ladder, version) the benchmark times; :func:`run_kernels` runs
only the compute kernels of one case on inputs sorted beforehand. Reference: :func:`slice_linear_ref`.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import cuda, float32

from . import slice_gemm, slice_gemv
from ._common import cdiv, finish, output_array, to_host
from .dequant import dequant_codes, prefix_params, prepare, residual_params, run_segment
from .packing import PackedWeight

__all__ = ["CASES", "METHODS", "route_permutation", "run_kernels", "slice_linear", "slice_linear_ref"]

METHODS = ("grouped", "streams", "fused")
LADDERS = {"gemv": slice_gemv, "gemm": slice_gemm}
ROWS_BLOCK = (128, 2)  # gather / scatter: threads along (columns, tokens), clamped to the problem
COLS_PER_THREAD = 4  # gather / scatter: grid-stride columns per thread

# Benchmarkable cases: name -> (method, kind, version). The benchmark and the GPU tests use this
# list (and run_kernels), never the private helpers below.
CASES = {
    **{f"gemv{v}": ("grouped", "gemv", v) for v in (1, 2, 3, 4, 5, 7)},
    "fused-gemv6": ("fused", "gemv", 6),
    "fused-gemv7": ("fused", "gemv", 7),
    **{f"gemm{v}": ("grouped", "gemm", v) for v in slice_gemm.VERSIONS},
    "streams-gemv2": ("streams", "gemv", 2),
    "streams-gemv5": ("streams", "gemv", 5),
    "streams-gemm2": ("streams", "gemm", 2),
    "streams-gemm3": ("streams", "gemm", 3),
}


def slice_linear_ref(x, codes, scale, zero, slice_bits, k_t, group_size: int, weights=None) -> torch.Tensor:
    """Reference: ``y[t] = x[t] @ W_{k_t}^T`` (float32 math) -> [T, N] in x's dtype.

    x [T, K] fp16/fp32, k_t int [T] in 1..E (or one int for every token). ``weights``
    optionally caches ``{k: W_k}`` (float32 [N, K], on x's device) across calls.
    """
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(to_host(x))
    T = x.shape[0]
    k_t = np.broadcast_to(np.asarray(to_host(k_t), dtype=np.int64), (T,))
    y = torch.zeros(T, codes.shape[0], dtype=torch.float32, device=x.device)
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
# Kernels: the permutation


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


def _rows_geometry(n_cols: int, n_rows: int, block=ROWS_BLOCK):
    """(grid, block) of the gather / scatter kernels: the same on a GPU and in the simulator."""
    bx = max(1, min(block[0], n_cols))
    by = max(1, min(block[1], n_rows))
    return (cdiv(n_cols, bx * COLS_PER_THREAD), cdiv(n_rows, by)), (bx, by)


# ---------------------------------------------------------------------------------------
# Host side


def _ladder(kind: str, version: int):
    """(launcher, tokens per launch) of kernel (kind, version); ValueError if there is none."""
    mod = LADDERS.get(kind)
    if mod is None or version not in mod.LAUNCHERS:
        raise ValueError(f"unknown {kind} version {version}")
    return mod.LAUNCHERS[version], mod.TOKENS_PER_LAUNCH


def _run_grouped(kind, version, dxs, dw, starts, ybuf, block):
    """One launch per precision segment k (sorted tokens [starts[k-1], starts[k])), planes [0, B_k)."""
    launch, step = _ladder(kind, version)
    for k in range(1, len(dw.slice_bits) + 1):
        t0, t1 = int(starts[k - 1]), int(starts[k])
        if t1 > t0:
            run_segment(launch, step or (t1 - t0), dxs, t0, t1 - t0, dw, prefix_params(dw, k), ybuf[0], block)


def _run_streams(kind, version, dxs, dw, starts, ybuf, block, streams):
    """Base slice for all tokens on streams[0]; residual slice e on streams[e-1] for tokens k_t >= e."""
    launch, step = _ladder(kind, version)
    T = dxs.shape[0]
    s0 = streams[0]
    ready = cuda.event()
    ready.record(s0)  # the sorted activations exist once s0 reaches this point
    run_segment(launch, step or T, dxs, 0, T, dw, prefix_params(dw, 1), ybuf[0], block, s0)
    done = []
    for e in range(2, len(dw.slice_bits) + 1):
        t0 = int(starts[e - 1])  # tokens with k_t >= e form the suffix [t0, T)
        if t0 >= T:
            continue
        se = streams[e - 1]
        ready.wait(se)
        run_segment(launch, step or (T - t0), dxs, t0, T - t0, dw, residual_params(dw, e), ybuf[e - 1], block, se)
        ev = cuda.event()
        ev.record(se)
        done.append(ev)
    for ev in done:  # s0 waits for every residual stream before combining
        ev.wait(s0)


def run_kernels(case: str, dxs, w: PackedWeight, k_t, ybuf=None, streams=None, out=None, dk=None):
    """Only the compute kernels of one ``CASES`` entry, for timing (inputs prepared beforehand).

    grouped / streams: ``dxs`` are the activations already sorted by ``route_permutation(k_t)``,
    results go to ``ybuf`` float32 [E, T, N] (per slice for streams); fused: ``dxs`` is x
    unsorted, ``dk`` k_t on the device and the result goes to ``out``.
    """
    method, kind, version = CASES[case]
    if method == "fused":
        return slice_gemv.gemv_routed(dxs, w, dk if dk is not None else k_t, out=out, version=version)
    _, starts = route_permutation(k_t, len(w.slice_bits))
    if method == "streams":
        return _run_streams(kind, version, dxs, w, starts, ybuf, None, streams)
    return _run_grouped(kind, version, dxs, w, starts, ybuf, None)


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

    x [T, K] fp16/fp32, k_t int [T] in 1..E; ``method`` one of ``METHODS`` (module docstring),
    ``kind`` "gemv" / "gemm" and ``version`` pick the ladder's kernel. ``method="fused"`` needs
    ``kind="gemv", version=6`` or ``7``; there k_t may be a device array (not checked, clamped to 1..E),
    nothing goes back to the host, and nothing is allocated per call when x and ``out`` are on
    the device. Returns y [T, N] in x's dtype (NumPy for host x; ``out`` written in place if given).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "fused":
        if kind != "gemv" or version not in (6, 7):
            raise ValueError('method="fused" runs GEMV v6 or v7: pass kind="gemv", version=6 or 7')
        return slice_gemv.gemv_routed(x, w, k_t, block=block, out=out, version=version)
    _ladder(kind, version)  # raises ValueError for an unknown version
    on_device, dx, dw = prepare(x, w)
    T, K = dx.shape
    E = len(w.slice_bits)
    perm, starts = route_permutation(k_t, E)
    if perm.shape[0] != T:
        raise ValueError(f"k_t has {perm.shape[0]} entries for {T} tokens")
    if method == "streams":
        streams = list(streams) if streams is not None else [cuda.stream() for _ in range(E)]
    s0 = streams[0] if method == "streams" else 0
    dperm = cuda.to_device(perm, stream=s0)
    dxs = cuda.device_array_like(dx, stream=s0)
    grid, blk = _rows_geometry(K, T)
    gather_rows_kernel[grid, blk, s0](dx, dperm, dxs)
    ybuf = cuda.device_array((E if method == "streams" else 1, T, w.N), np.float32)
    if method == "grouped":
        _run_grouped(kind, version, dxs, dw, starts, ybuf, block)
        dstarts = cuda.to_device(np.zeros(1, np.int64))
    else:
        _run_streams(kind, version, dxs, dw, starts, ybuf, block, streams)
        dstarts = cuda.to_device(np.array([0] + [starts[e - 1] for e in range(2, E + 1)], np.int64), stream=s0)
    dout = output_array(out, (T, w.N), dx.dtype)
    grid, blk = _rows_geometry(w.N, T)
    combine_scatter_kernel[grid, blk, s0](ybuf, dstarts, dperm, dout)
    if method == "streams":
        s0.synchronize()
    return finish(dout, out, on_device)
