"""Helpers for the kernel tests (``from kernel_helpers import ...``)."""

import numpy as np


def real_gpu() -> bool:
    """A real CUDA device is usable (not the simulator)."""
    import numba
    from numba import cuda

    return (not numba.config.ENABLE_CUDASIM) and cuda.is_available()


# Sentinels written into outputs before a kernel runs: an element the kernel skips keeps it.
INT_POISON = np.iinfo(np.int64).min
U32_POISON = np.uint32(0xDEADBEEF)


def poisoned(shape, dtype):
    """An output buffer filled with NaN (floats) or a sentinel (integers)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.full(shape, np.nan, dtype=dtype)
    if dtype == np.uint32:
        return np.full(shape, U32_POISON, dtype=dtype)
    if dtype == np.uint8:
        return np.full(shape, 0xA5, dtype=dtype)
    return np.full(shape, np.iinfo(dtype).min, dtype=dtype)


def mobislice_weight(rng, N, K, group_size, slice_bits=(2, 2, 2, 2)):
    """Random MoBiSlice tensors: codes uint8 [N, K] (Q_E), scale float32 [N, G], zero int32 [N, G] (z_E).

    z_E is an integer on the finest (B_E-bit) grid, drawn from [0, 2^B_E): at coarser precisions
    ``z_k = z_E / 2^(B_E - B_k)`` is then a fraction (odd z_E -> z_1 has all B_E - b_1 fraction bits).
    """
    G = 1 if group_size >= K else K // group_size
    codes = rng.integers(0, 2 ** sum(slice_bits), (N, K), dtype=np.uint8)
    scale = (rng.random((N, G)) * 0.05 + 0.005).astype(np.float32)
    zero = rng.integers(0, 2 ** sum(slice_bits), (N, G)).astype(np.int32)
    return codes, scale, zero


def assert_close(y, ref, dtype):
    """fp16: a few half-precision ulps of the output scale; fp32: float32 rounding."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert not np.isnan(y).any(), "some outputs were never written (NaN poison survived)"
    tol = 4e-3 if dtype == np.float16 else 2e-5
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


def odd_shape(rng, max_tokens=7):
    """Fresh small odd sizes (T, N, K, group_size): T odd <= max_tokens, N odd, and either K a
    multiple of 32 with groups of 32 or an odd K (not a word multiple) with one group per row."""
    T = int(rng.choice(np.arange(1, max_tokens + 1, 2)))
    N = int(rng.integers(4, 20)) * 2 + 1  # 9..39
    if rng.random() < 0.5:
        K = 32 * int(rng.integers(2, 6))  # 2..5 groups
        return T, N, K, 32
    K = int(rng.integers(16, 60)) * 2 + 1  # 33..119: a ragged last word
    return T, N, K, K


def setup_layer(rng, T, N, K, g=32, slice_bits=(2, 2, 2, 2), dtype=np.float16):
    """Activations x [T, K] and one random MoBiSlice layer, raw and packed: (x, codes, scale, zero, packed)."""
    from cuda_numba.packing import pack_mobislice

    codes, scale, zero = mobislice_weight(rng, N, K, g, slice_bits)
    x = rng.standard_normal((T, K)).astype(dtype)
    return x, codes, scale, zero, pack_mobislice(codes, scale, zero, slice_bits, g)


def check_uniform_version(rng, dispatch, reference, version, dtype, max_tokens=7, slice_bits=(2, 2, 2, 2)):
    """One ladder version at one precision k for every token, on a fresh odd shape, against its reference.

    ``dispatch(x, w, k, version=, out=)`` must write into the poisoned ``out`` it is given and
    return it in ``dtype``; ``reference(x, codes, scale, zero, slice_bits, k, g)`` is the torch oracle.
    """
    T, N, K, g = odd_shape(rng, max_tokens=max_tokens)
    k = int(rng.integers(1, len(slice_bits) + 1))
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, g, slice_bits, dtype=dtype)
    out = poisoned((T, N), dtype)
    y = dispatch(x, w, k, version=version, out=out)
    assert y is out and y.dtype == dtype
    assert_close(y, reference(x, codes, scale, zero, slice_bits, k, g).numpy(), dtype)
