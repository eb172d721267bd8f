"""Bit-major packing of MoBiSlice codes into unsigned 32-bit bit-planes (paper Sec. 4.3).

MoBiSlice (Sec. 4.1, App. B; ``docs/design.md``) stores one integer per weight, ``Q_E``:
8 bits for slices ``2,2,2,2``. Precision ``k`` (``B_k = b_1 + ... + b_k`` bits) reads the
*top* ``B_k`` bits: ``Q_k = Q_E >> (B_E - B_k)``. The paper stores weights "bit-major" so a
kernel fetches only the bits it needs. Our layout:

    codes  uint8  [N, K]              one Q_E per weight
    planes uint32 [B_E, N, W]         W = ceil(K / 32), plane 0 = most significant bit

    planes[p, n, w] bit j  =  bit (B_E - 1 - p) of codes[n, 32*w + j]   (0 where 32*w+j >= K)

Plane 0 is the MSB, so the first ``B_k`` planes *are* ``Q_k`` and form one contiguous slab
``planes[:B_k]``; slice ``e`` is ``planes[B_{e-1}:B_e]``. Each plane row is contiguous along
K, so threads reading consecutive words of one row are coalesced. Example, K = 3, B_E = 8:

    codes[n] = [0b10110100, 0b01100001, 0b11111111]       (k = 0, 1, 2)
    plane 0 (bit 7) word 0 = 0b...00101   <- bit j holds element j; bits 3..31 are padding
    plane 1 (bit 6) word 0 = 0b...00110
    plane 7 (bit 0) word 0 = 0b...00110
    precision k = 1 of slices 2,2,2,2 reads planes 0, 1 only -> Q_1 = [0b10, 0b01, 0b11]

Versions (``pack_bitplanes(..., version=V)``):

1. one thread per output word ``(p, n, w)``: reads its 32 codes and keeps bit ``p``
   (naive: every code byte is read ``B_E`` times).
2. one thread per ``(n, w)``: reads its 32 codes once and builds all ``B_E`` words in
   registers (a local array), then writes them.

``unpack_bitplanes(..., version=1)``: one thread per element, shift-and-add over planes.
Packing is an offline step; the inference kernels live in ``slice_gemv.py`` (decode) and
``slice_gemm.py`` (prefill), routed by ``slice_linear.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import cuda, int64, uint32

from ._common import cdiv, finish, is_device_array, output_array, to_device, to_host

__all__ = [
    "CASES",
    "LAUNCHERS",
    "MAX_BITS",
    "WORD_BITS",
    "PackedWeight",
    "n_words",
    "pack_bitplanes",
    "pack_bitplanes_ref",
    "pack_mobislice",
    "prefix_planes",
    "slice_plane_range",
    "slice_planes",
    "unpack_bitplanes",
    "unpack_bitplanes_ref",
]

WORD_BITS = 32  # K-elements per uint32 word
MAX_BITS = 8  # codes are uint8: at most 8 planes


def n_words(K: int) -> int:
    """Words per plane row: ``ceil(K / 32)``."""
    return cdiv(K, WORD_BITS)


def slice_plane_range(slice_bits, e: int) -> tuple[int, int]:
    """Planes ``[B_{e-1}, B_e)`` holding slice ``e`` (1-based), e.g. ``(2, 4)`` for e=2 of 2,2,2,2."""
    if not 1 <= e <= len(slice_bits):
        raise ValueError(f"slice {e} outside 1..{len(slice_bits)}")
    lo = int(sum(slice_bits[: e - 1]))
    return lo, lo + int(slice_bits[e - 1])


def slice_planes(planes, slice_bits, e: int):
    """View of the planes of slice ``e`` (1-based): ``planes[B_{e-1}:B_e]``, shape [b_e, N, W]."""
    lo, hi = slice_plane_range(slice_bits, e)
    return planes[lo:hi]


def prefix_planes(planes, slice_bits, k: int):
    """View of the planes read at precision ``k``: ``planes[:B_k]`` (contiguous), shape [B_k, N, W]."""
    return planes[: slice_plane_range(slice_bits, k)[1]]


# ---------------------------------------------------------------------------------------
# NumPy reference


def pack_bitplanes_ref(codes: np.ndarray, bits: int = 8) -> np.ndarray:
    """Reference packing: ``codes uint8 [N, K]`` -> ``planes uint32 [bits, N, ceil(K/32)]``, MSB first.

    ``bits`` is the code width ``B_E`` (8 for slices 2,2,2,2); codes must be ``< 2**bits``.
    Example, bits = 2, K = 3 (element j goes to bit j of the word)::

        codes [[2, 1, 3]] = [[0b10, 0b01, 0b11]]
        plane 0 (MSBs 1,0,1) word = 0b101
        plane 1 (LSBs 0,1,1) word = 0b110
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}")
    N, K = codes.shape
    W = n_words(K)
    c = np.zeros((N, W * WORD_BITS), dtype=np.uint32)  # zero padding up to a word boundary
    c[:, :K] = codes
    if (c >> bits).any():
        raise ValueError(f"codes do not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)  # plane p holds bit (bits-1-p)
    b = (c[None, :, :] >> shifts[:, None, None]) & np.uint32(1)  # [bits, N, W*32]
    b = b.reshape(bits, N, W, WORD_BITS)
    place = np.uint32(1) << np.arange(WORD_BITS, dtype=np.uint32)  # element j -> bit j
    return (b * place).sum(axis=-1, dtype=np.uint32)  # [bits, N, W]


def unpack_bitplanes_ref(planes: np.ndarray, K: int) -> np.ndarray:
    """Reference unpacking: ``planes uint32 [nb, N, W]`` -> ``uint8 [N, K]``.

    Unpacking the first ``B_k`` planes gives ``Q_k = Q_E >> (B_E - B_k)`` directly::

        planes [[[0b101]], [[0b110]]], K = 3  ->  [[2, 1, 3]]      (element j: bit j of each plane)
        planes [[[0b101]]] (MSB plane only)   ->  [[1, 0, 1]]      (= codes >> 1)
    """
    planes = np.asarray(planes)
    nb, N, W = planes.shape
    if K > W * WORD_BITS:
        raise ValueError(f"K={K} does not fit in {W} words")
    j = np.arange(WORD_BITS, dtype=np.uint32)
    b = (planes[..., None] >> j) & np.uint32(1)  # [nb, N, W, 32]
    b = b.reshape(nb, N, W * WORD_BITS)[:, :, :K]
    weights = (np.uint32(1) << np.arange(nb - 1, -1, -1, dtype=np.uint32))[:, None, None]
    return (b * weights).sum(axis=0).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Kernels


@cuda.jit
def pack_kernel1(codes, planes):
    """v1: one thread per output word (p, n, w); grid is 1-D over nb*N*W."""
    nb, N, W = planes.shape
    K = codes.shape[1]
    idx = cuda.grid(1)
    if idx < nb * N * W:
        w = idx % W
        n = (idx // W) % N
        p = idx // (W * N)
        shift = nb - 1 - p  # plane p holds bit (nb-1-p)
        word = uint32(0)
        for j in range(WORD_BITS):
            k = w * WORD_BITS + j
            if k < K:
                bit = (uint32(codes[n, k]) >> uint32(shift)) & uint32(1)
                word = word | (bit << uint32(j))
        planes[p, n, w] = word


@cuda.jit
def pack_kernel2(codes, planes):
    """v2: one thread per (n, w) builds all nb words from one read of its 32 codes."""
    nb, N, W = planes.shape
    K = codes.shape[1]
    w, n = cuda.grid(2)
    if w < W and n < N:
        acc = cuda.local.array(MAX_BITS, uint32)
        for p in range(nb):
            acc[p] = uint32(0)
        for j in range(WORD_BITS):
            k = w * WORD_BITS + j
            if k < K:
                c = uint32(codes[n, k])
                for p in range(nb):
                    bit = (c >> uint32(nb - 1 - p)) & uint32(1)
                    acc[p] = acc[p] | (bit << uint32(j))
        for p in range(nb):
            planes[p, n, w] = acc[p]


@cuda.jit
def unpack_kernel1(planes, codes):
    """v1: one thread per element (n, k): shift-and-add of its bit over the nb planes."""
    nb, N, _ = planes.shape
    K = codes.shape[1]
    k, n = cuda.grid(2)
    if k < K and n < N:
        w = k // WORD_BITS
        j = uint32(k % WORD_BITS)
        q = int64(0)
        for p in range(nb):
            bit = (uint32(planes[p, n, w]) >> j) & uint32(1)
            q = (q << 1) | int64(bit)  # MSB plane first: shift the partial code up, add the bit
        codes[n, k] = q


# ---------------------------------------------------------------------------------------
# Launchers: device arrays in, device arrays out


def _grid_2d(nx: int, ny: int, block_size: int):
    """(grid, block) over an nx x ny index space: up to 32 threads along x, ``block_size`` in all."""
    bx = min(block_size, 32, nx)
    by = max(1, min(block_size // bx, ny))
    return (cdiv(nx, bx), cdiv(ny, by)), (bx, by)


def pack_bitplanes_v1(d_codes, d_planes, block_size: int = 128, stream=0):
    """Launch v1 (thread per output word)."""
    total = d_planes.shape[0] * d_planes.shape[1] * d_planes.shape[2]
    pack_kernel1[cdiv(total, block_size), block_size, stream](d_codes, d_planes)


def pack_bitplanes_v2(d_codes, d_planes, block_size: int = 128, stream=0):
    """Launch v2 (thread per (row, word)); blocks of (bx <= 32 words) x (block_size // bx rows)."""
    _, N, W = d_planes.shape
    grid, block = _grid_2d(W, N, block_size)
    pack_kernel2[grid, block, stream](d_codes, d_planes)


def unpack_bitplanes_v1(d_planes, d_codes, block_size: int = 128, stream=0):
    """Launch the unpacking kernel (thread per element)."""
    N, K = d_codes.shape
    grid, block = _grid_2d(K, N, block_size)
    unpack_kernel1[grid, block, stream](d_planes, d_codes)


LAUNCHERS = {1: pack_bitplanes_v1, 2: pack_bitplanes_v2}
UNPACK_LAUNCHERS = {1: unpack_bitplanes_v1}
# Benchmarkable cases: name -> launcher ``launch(d_codes, d_planes)`` on device arrays.
CASES = {f"pack{v}": launch for v, launch in LAUNCHERS.items()}


def pack_bitplanes(codes, bits: int = 8, version: int = 2, block_size: int = 128, out=None):
    """Pack ``codes uint8 [N, K]`` into ``planes uint32 [bits, N, ceil(K/32)]`` with kernel ``version``.

    Returns NumPy for host input, a device array for device input; ``out`` (NumPy or device,
    uint32 [bits, N, W]) is written in place when given.
    """
    if version not in LAUNCHERS:
        raise ValueError(f"unknown pack version {version}; have {sorted(LAUNCHERS)}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}")
    on_device = is_device_array(codes)
    d_codes = to_device(codes, np.uint8)
    N, K = d_codes.shape
    d_planes = output_array(out, (bits, N, n_words(K)), np.uint32)
    LAUNCHERS[version](d_codes, d_planes, block_size)
    return finish(d_planes, out, on_device)


def unpack_bitplanes(planes, K: int, version: int = 1, block_size: int = 128, out=None):
    """Unpack ``planes uint32 [nb, N, W]`` into ``uint8 [N, K]`` (``Q_k`` when given ``planes[:B_k]``)."""
    if version not in UNPACK_LAUNCHERS:
        raise ValueError(f"unknown unpack version {version}; have {sorted(UNPACK_LAUNCHERS)}")
    on_device = is_device_array(planes)
    d_planes = to_device(planes, np.uint32)
    N = d_planes.shape[1]
    if K > d_planes.shape[2] * WORD_BITS:
        raise ValueError(f"K={K} does not fit in {d_planes.shape[2]} words")
    d_codes = output_array(out, (N, K), np.uint8)
    UNPACK_LAUNCHERS[version](d_planes, d_codes, block_size)
    return finish(d_codes, out, on_device)


# ---------------------------------------------------------------------------------------
# A packed MoBiSlice weight: what the slice kernels consume


@dataclass
class PackedWeight:
    """A MoBiSlice linear weight in bit-plane form (Sec. 4.1 + 4.3).

    planes  uint32 [B_E, N, W]   bit-planes of Q_E, MSB first (see module docstring)
    scale   float32 [N, G]       base-slice scale ``s`` per group of ``group_size`` inputs
    zero    int32 [N, G]         integer zero point ``z_E`` on the finest (B_E-bit) grid
    Precision k dequantizes to ``s_k (Q_k - z_k + 1/2)``, ``s_k = s / 2^(B_k-b_1)``,
    ``z_k = z_E / 2^(B_E-B_k)`` (a dyadic fraction, exact in float32). Arrays are NumPy or
    Numba device arrays (``.to_device()``).
    """

    planes: object
    scale: object
    zero: object
    slice_bits: tuple
    group_size: int
    K: int

    @property
    def N(self) -> int:
        return int(self.planes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    def bits_at(self, k: int) -> int:
        """``B_k``: bits read at precision ``k``."""
        return int(sum(self.slice_bits[:k]))

    def to_device(self) -> PackedWeight:
        return PackedWeight(
            to_device(self.planes, np.uint32),
            to_device(self.scale, np.float32),
            to_device(self.zero, np.int32),
            tuple(self.slice_bits),
            self.group_size,
            self.K,
        )

    def to_host(self) -> PackedWeight:
        return PackedWeight(
            to_host(self.planes),
            to_host(self.scale),
            to_host(self.zero),
            tuple(self.slice_bits),
            self.group_size,
            self.K,
        )

    def nbytes(self, k: int) -> int:
        """Bytes a kernel must read at precision ``k``: ``B_k`` planes + scales + zero points."""
        W = int(self.planes.shape[2])
        return self.bits_at(k) * self.N * W * 4 + self.N * self.n_groups * (4 + 4)


def check_groups(K: int, group_size: int, n_groups: int) -> None:
    """Groups must be whole words (``group_size % 32 == 0``) unless there is a single group."""
    if n_groups == 1:
        return
    if group_size % WORD_BITS or K % group_size or K // group_size != n_groups:
        raise ValueError(
            f"need group_size % 32 == 0 and K % group_size == 0 with K/group_size groups "
            f"(K={K}, group_size={group_size}, groups={n_groups}), or a single group"
        )


def pack_mobislice(
    codes, scale, zero, slice_bits=(2, 2, 2, 2), group_size: int = 128, version: int = 2
) -> PackedWeight:
    """Pack MoBiSlice ``codes uint8 [N, K]`` (Q_E), ``scale [N, K/g]``, ``zero [N, K/g]`` (z_E) into a :class:`PackedWeight`."""
    codes_h = to_host(codes)
    N, K = codes_h.shape
    scale_h = np.ascontiguousarray(to_host(scale), dtype=np.float32)
    zero_h = np.ascontiguousarray(to_host(zero), dtype=np.int32)
    if scale_h.shape != zero_h.shape or scale_h.shape[0] != N:
        raise ValueError(f"scale {scale_h.shape} / zero {zero_h.shape} do not match codes {codes_h.shape}")
    check_groups(K, group_size, scale_h.shape[1])
    bits = int(sum(slice_bits))
    planes = pack_bitplanes(np.ascontiguousarray(codes_h, dtype=np.uint8), bits=bits, version=version)
    return PackedWeight(planes, scale_h, zero_h, tuple(int(b) for b in slice_bits), int(group_size), int(K))
