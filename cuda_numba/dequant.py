"""MoBiSlice dequantization shared by the slice kernels: the torch reference and the device helpers.

The paper's weight-only setting (Sec. 4.3, activations stay fp16) multiplies ``x [T, K]`` by
the weight at precision k (``docs/design.md``):

    W_k = s_k (Q_k - z_k + 1/2),   Q_k = Q_E >> (B_E - B_k),
    s_k = s / 2^(B_k - b_1),       z_k = z_E / 2^(B_E - B_k)

``z_E`` is an integer zero point on the finest (B_E-bit) grid, so ``z_k`` is a dyadic fraction,
exact in float32. A residual slice e >= 2 is ``dW_e = s_e (q_e - 2^(b_e-1) + 1/2)`` with ``q_e``
bits ``[B_{e-1}, B_e)`` of ``Q_E`` and ``W_k = W_1 + dW_2 + ... + dW_k`` exactly.

Weights arrive as a :class:`~cuda_numba.packing.PackedWeight` (bit-planes, MSB first). Every
slice kernel (``slice_gemv.py``, ``slice_gemm.py``) reads a plane range ``[lo, hi)`` and
dequantizes with three numbers, so one kernel serves both uses:

    w = s * smul * (q - (z_E * zmul + zadd) + 1/2)

* prefix, precision k:   planes ``[0, B_k)``,        ``smul = 2^-(B_k-b_1)``, ``zmul = 2^-(B_E-B_k)``, ``zadd = 0``
* residual slice e > 1:  planes ``[B_{e-1}, B_e)``,  ``smul = 2^-(B_e-b_1)``, ``zmul = 0``, ``zadd = 2^(b_e-1)``

and rebuilds ``q`` from the plane words by shift-and-add, element j of a word, MSB plane first::

    plane lo   bit j = 1  ->  q = 1
    plane lo+1 bit j = 0  ->  q = (q << 1) | 0 = 0b10
    plane lo+2 bit j = 1  ->  q = (q << 1) | 1 = 0b101

Every slice kernel has one signature (a *segment* of tokens ``[t0, t0 + tseg)`` of ``x``):
``kernel(x, t0, tseg, planes, lo, hi, scale, zero, smul, zmul, zadd, gw, out)`` with ``gw``
words per scale group, and every launcher ``launch(args, tseg, N, block, stream)``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import cuda, float32, int64, uint32

from ._common import finish, is_device_array, output_array, to_device, to_host
from .packing import WORD_BITS, PackedWeight, check_groups, n_words

__all__ = [
    "dequant_codes",
    "dequant_residual",
    "group_params",
    "group_words",
    "load_words",
    "prefix_params",
    "prepare",
    "rebuild",
    "residual_params",
    "run_segment",
    "run_uniform",
    "uniform_ref",
]


# ---------------------------------------------------------------------------------------
# torch reference


def _tensor(a, dtype) -> torch.Tensor:
    """torch tensors stay on their device; NumPy / device arrays become CPU tensors."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(to_host(a))
    return t.to(dtype)


def _per_element(v: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """Per-group values [N, G] -> per-element [N, K] (G = 1: one value per row)."""
    g = K if v.shape[1] == 1 else group_size
    return v.repeat_interleave(g, dim=1)[:, :K]


def dequant_codes(codes, scale, zero, slice_bits, k: int, group_size: int) -> torch.Tensor:
    """``W_k = s_k (Q_k - z_k + 1/2)`` from MoBiSlice codes (Sec. 4.1, design.md) -> float32 [N, K].

    codes uint8 [N, K] (Q_E, ``B_E = sum(slice_bits)`` bits), scale float [N, G], zero int
    [N, G] (z_E, on the B_E-bit grid), one (s, z_E) per group of ``group_size`` inputs (G = 1:
    per row). Torch inputs stay on their device (the benchmark dequantizes on the GPU).
    """
    codes, scale, zero = _tensor(codes, torch.int64), _tensor(scale, torch.float32), _tensor(zero, torch.int64)
    K = codes.shape[1]
    if not 1 <= k <= len(slice_bits):
        raise ValueError(f"k={k} outside 1..{len(slice_bits)}")
    BE, Bk, b1 = int(sum(slice_bits)), int(sum(slice_bits[:k])), int(slice_bits[0])
    Qk = codes >> (BE - Bk)  # [N, K]
    s_k = _per_element(scale / 2.0 ** (Bk - b1), K, group_size)  # [N, K]
    z_k = _per_element(zero.to(torch.float32) / 2.0 ** (BE - Bk), K, group_size)  # [N, K], exact dyadic
    return s_k * ((Qk.to(torch.float32) - z_k) + 0.5)


def dequant_residual(codes, scale, slice_bits, e: int, group_size: int) -> torch.Tensor:
    """Residual slice ``dW_e = s_e (q_e - 2^(b_e-1) + 1/2)`` for e >= 2 -> float32 [N, K]."""
    codes, scale = _tensor(codes, torch.int64), _tensor(scale, torch.float32)
    K = codes.shape[1]
    if not 2 <= e <= len(slice_bits):
        raise ValueError(f"residual slice e={e} outside 2..{len(slice_bits)}")
    BE, Be, be, b1 = int(sum(slice_bits)), int(sum(slice_bits[:e])), int(slice_bits[e - 1]), int(slice_bits[0])
    q_e = (codes >> (BE - Be)) & (2**be - 1)  # [N, K]: bits [B_{e-1}, B_e) of Q_E
    s_e = _per_element(scale / 2.0 ** (Be - b1), K, group_size)
    return s_e * ((q_e - 2 ** (be - 1)).to(torch.float32) + 0.5)


def uniform_ref(x, codes, scale, zero, slice_bits, k: int, group_size: int) -> torch.Tensor:
    """Reference of a one-precision call: ``y = x @ W_k^T`` in float32 math -> [T, N] in x's dtype."""
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(to_host(x))
    W_k = dequant_codes(codes, scale, zero, slice_bits, k, group_size).to(x.device)  # [N, K]
    return (x.to(torch.float32) @ W_k.T).to(x.dtype)


# ---------------------------------------------------------------------------------------
# Plane ranges and offsets of one launch


def prefix_params(w: PackedWeight, k: int):
    """(lo, hi, smul, zmul, zadd) for precision k: planes [0, B_k), s_k, z_k = z_E 2^-(B_E-B_k)."""
    Bk, b1, BE = w.bits_at(k), int(w.slice_bits[0]), w.bits_at(len(w.slice_bits))
    return 0, Bk, 2.0 ** -(Bk - b1), 2.0 ** -(BE - Bk), 0


def residual_params(w: PackedWeight, e: int):
    """(lo, hi, smul, zmul, zadd) for residual slice e >= 2: planes [B_{e-1}, B_e), s_e, 2^(b_e-1)."""
    lo, hi, b1, be = w.bits_at(e - 1), w.bits_at(e), int(w.slice_bits[0]), int(w.slice_bits[e - 1])
    return lo, hi, 2.0 ** -(hi - b1), 0.0, 2 ** (be - 1)


def group_words(w: PackedWeight) -> int:
    """K-words per scale group (``gw``): all of them for one group per row."""
    return int(w.planes.shape[2]) if w.n_groups == 1 else w.group_size // WORD_BITS


# ---------------------------------------------------------------------------------------
# Device helpers


@cuda.jit(device=True)
def load_words(planes, lo, hi, n, w, a):
    """a[p - lo] = planes[p, n, w] for p in [lo, hi) (one load per plane per K-word)."""
    for p in range(lo, hi):
        a[p - lo] = uint32(planes[p, n, w])


@cuda.jit(device=True)
def rebuild(a, nb, j):
    """Shift-and-add: the nb-bit integer of element j from its plane words a[0..nb) (MSB first).

    a = [0b101, 0b110], j = 1: bits (0, 1) -> q = (0 << 1) | 1 = 0b01 = 1.
    """
    q = int64(0)
    for p in range(nb):
        q = (q << 1) | int64((a[p] >> uint32(j)) & uint32(1))
    return q


@cuda.jit(device=True)
def group_params(scale, zero, n, g, smul, zmul, zadd):
    """(s * smul, z_E * zmul + zadd - 1/2): the effective scale and offset of group g of row n.

    zmul is a power of two (2^-(B_E-B_k)) or 0, so ``z_E * zmul`` is exact in float32.
    """
    s_eff = float32(scale[n, g]) * float32(smul)
    z_eff = float32(zero[n, g]) * float32(zmul) + float32(zadd) - float32(0.5)
    return s_eff, z_eff


# ---------------------------------------------------------------------------------------
# Host side: inputs, segments, one-precision calls


def prepare(x, w: PackedWeight):
    """(x on the host?, x as a float16/32 device array, w on the device), shapes checked."""
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


def run_segment(launch, step, dx, t0, tseg, dw: PackedWeight, params, dout, block=None, stream=0):
    """Launch ``launch`` on tokens [t0, t0 + tseg) of dx, ``step`` tokens per launch, planes/offsets ``params``.

    params = (lo, hi, smul, zmul, zadd) from :func:`prefix_params` or :func:`residual_params`.
    """
    lo, hi, smul, zmul, zadd = params
    gw = group_words(dw)
    for s in range(t0, t0 + tseg, max(1, step)):
        n_tok = min(step, t0 + tseg - s)
        args = (dx, s, n_tok, dw.planes, lo, hi, dw.scale, dw.zero, np.float32(smul), np.float32(zmul), zadd, gw, dout)
        launch(args, n_tok, dw.N, block, stream)


def run_uniform(launch, step, x, w: PackedWeight, k: int, block=None, out=None):
    """``y = x @ W_k^T`` for every token through one ladder's launcher (the dispatchers' common body)."""
    if not 1 <= k <= len(w.slice_bits):
        raise ValueError(f"k={k} outside 1..{len(w.slice_bits)}")
    on_device, dx, dw = prepare(x, w)
    T = dx.shape[0]
    dout = output_array(out, (T, w.N), dx.dtype)
    run_segment(launch, step or T, dx, 0, T, dw, prefix_params(w, k), dout, block)
    return finish(dout, out, on_device)
