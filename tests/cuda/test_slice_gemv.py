"""LUT decode GEMV (cuda_numba/slice_gemv.py, versions 4-5) vs the torch reference, in the simulator."""

import numpy as np
import pytest
from kernel_helpers import assert_close, mobislice_weight, poisoned

from cuda_numba import slice_gemv as sv
from cuda_numba.packing import pack_mobislice
from cuda_numba.slice_gemm import slice_linear, slice_linear_ref

SB = (2, 2, 2, 2)
VERSIONS = [4, 5]
IDS = ["v4_lut", "v5_lut_splitk"]


def _setup(rng, T, N, K, g=32, slice_bits=SB, dtype=np.float16):
    codes, scale, zero = mobislice_weight(rng, N, K, g, slice_bits)
    x = rng.standard_normal((T, K)).astype(dtype)
    return x, codes, scale, zero, pack_mobislice(codes, scale, zero, slice_bits, g)


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
@pytest.mark.parametrize("dtype,k,K", [(np.float16, 3, 160), (np.float32, 1, 96)], ids=["fp16-k3-K160", "fp32-k1-K96"])
def test_lut_gemv_versions(rng, version, dtype, k, K):
    T, N = 3, 37
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=dtype)
    out = poisoned((T, N), dtype)
    y = sv.gemv(x, w, k, version=version, out=out)
    assert y is out
    assert_close(y, sv.slice_gemv_ref(x, codes, scale, zero, SB, k, 32).numpy(), dtype)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_lut_gemv_every_token_count_and_bits(rng, T):
    """T = 1..8 changes the chunk width (tables per token); every precision k; 9 words of K."""
    N, K = 21, 288
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=np.float32)
    for k in (1, 2, 4):
        ref = sv.slice_gemv_ref(x, codes, scale, zero, SB, k, 32).numpy()
        for version in VERSIONS:
            assert_close(sv.gemv(x, w, k, version=version, out=poisoned((T, N), np.float32)), ref, np.float32)


def test_split_k_really_splits_and_resets_its_counters(rng):
    """v5 with several K-splits and row blocks; a second call on the same workspace agrees."""
    T, N, K = 1, 19, 800  # 25 words: 4 chunks of 8 words at T = 1
    assert sv.splits(N, 25, T) > 1
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=np.float32)
    ref = sv.slice_gemv_ref(x, codes, scale, zero, SB, 2, 32).numpy()
    for _ in range(2):
        assert_close(sv.gemv(x, w, 2, version=5, out=poisoned((T, N), np.float32)), ref, np.float32)
    for _, count in sv._WORKSPACES.values():
        assert not count.copy_to_host().any()


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_lut_gemv_ragged_k_one_group_per_row(rng, version):
    T, N, K = 2, 11, 50
    x, codes, scale, zero, w = _setup(rng, T, N, K, g=K, dtype=np.float32)
    y = sv.gemv(x, w, 4, version=version, block=8, out=poisoned((T, N), np.float32))
    assert_close(y, sv.slice_gemv_ref(x, codes, scale, zero, SB, 4, K).numpy(), np.float32)


@pytest.mark.parametrize("method", ["grouped", "streams"])
@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_lut_gemv_routed_and_residual_slices(rng, method, version):
    """Per-token precisions: grouped runs prefixes, streams runs residual slices through the same kernels."""
    T, N, K = 5, 15, 96
    x, codes, scale, zero, w = _setup(rng, T, N, K)
    k_t = rng.permutation(np.array([1, 4, 2, 4, 3]))
    y = slice_linear(x, w, k_t, method=method, kind="gemv", version=version, out=poisoned((T, N), np.float16))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, k_t, 32).numpy(), np.float16)


def test_geometry_fits_the_tables():
    for T in range(1, sv.MAX_T + 1):
        wc, rb, rows = sv.gemv_geometry(T, 256)
        assert T * 4 * wc <= sv.TAB_ROWS and wc * rb == 256 and rows == rb * sv.RPT
    assert sv.gemv_geometry(1, 256)[0] == 8  # T = 1: 256 activations per table build


def test_errors(rng):
    x, *_, w = _setup(rng, 1, 5, 64, dtype=np.float32)
    with pytest.raises(ValueError):
        sv.gemv(x, w, 1, version=3)
    with pytest.raises(ValueError):
        sv.gemv(x, w, 1, block=6)
    with pytest.raises(ValueError):
        slice_linear(x, w, [1], kind="gemv", version=9)


# ---- v6: per-token precision in one launch (slice_linear(method="fused")), the decode call path


@pytest.mark.parametrize("T", [1, 4, 11])
def test_fused_routed_gemv_matches_reference(rng, T):
    """Host inputs; T = 11 runs two launches (8 + 3 tokens); every precision present for T >= 4."""
    N, K = 17, 160
    x, codes, scale, zero, w = _setup(rng, T, N, K)
    k_t = rng.permutation(np.resize(np.array([1, 2, 3, 4]), T)) if T >= 4 else rng.integers(1, 5, T)
    y = slice_linear(x, w, k_t, method="fused", kind="gemv", version=6, out=poisoned((T, N), np.float16))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, k_t, 32).numpy(), np.float16)


def test_fused_uniform_precision_is_version_6(rng):
    x, codes, scale, zero, w = _setup(rng, 2, 9, 64, dtype=np.float32)
    y = sv.gemv(x, w, 3, version=6, out=poisoned((2, 9), np.float32))
    assert_close(y, sv.slice_gemv_ref(x, codes, scale, zero, SB, 3, 32).numpy(), np.float32)


def test_fused_device_path_has_no_round_trip_or_allocation(rng, monkeypatch):
    """Device x, k_t (int64, as a router would produce) and out: after a first call (which caches
    the workspace), a call moves nothing between host and device and allocates nothing."""
    from numba import cuda

    T, N, K = 3, 13, 96
    x, codes, scale, zero, w = _setup(rng, T, N, K, slice_bits=(3, 3, 2))
    k_t = np.array([3, 1, 2])
    dw = w.to_device()
    dx, dk = cuda.to_device(x), cuda.to_device(k_t.astype(np.int64))
    dout = cuda.to_device(poisoned((T, N), np.float16))
    slice_linear(dx, dw, dk, method="fused", kind="gemv", version=6, out=dout)

    def forbidden(*a, **k):
        raise AssertionError("host round trip or allocation in the device call path")

    dout2 = cuda.to_device(poisoned((T, N), np.float16))
    for name in ("to_device", "device_array", "device_array_like", "pinned_array"):
        monkeypatch.setattr(cuda, name, forbidden)
    monkeypatch.setattr(type(dx), "copy_to_host", forbidden)
    y = slice_linear(dx, dw, dk, method="fused", kind="gemv", version=6, out=dout2)
    monkeypatch.undo()
    assert y is dout2
    assert_close(y.copy_to_host(), slice_linear_ref(x, codes, scale, zero, (3, 3, 2), k_t, 32).numpy(), np.float16)


def test_fused_errors(rng):
    x, *_, w = _setup(rng, 2, 5, 64, dtype=np.float32)
    with pytest.raises(ValueError):
        slice_linear(x, w, [1, 5], method="fused", kind="gemv", version=6)
    with pytest.raises(ValueError):
        slice_linear(x, w, [1, 2], method="fused", kind="gemv", version=5)
    with pytest.raises(ValueError):
        slice_linear(x, w, [1, 2, 3], method="fused", kind="gemv", version=6)
