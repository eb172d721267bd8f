"""Decode GEMV ladder (cuda_numba/slice_gemv.py, v1-v6): every version vs the torch reference, fresh odd shapes."""

import numpy as np
import pytest
from kernel_helpers import assert_close, check_uniform_version, poisoned, setup_layer

from cuda_numba import slice_gemv as sv

SB = (2, 2, 2, 2)
IDS = {
    1: "v1_naive",
    2: "v2_block_per_row",
    3: "v3_rows_smem_x",
    4: "v4_lut",
    5: "v5_lut_splitk",
    6: "v6_lut_routed",
    7: "v7_lut_per_slice",
}


def test_every_version_has_an_id():
    assert set(sv.VERSIONS) == set(IDS)


@pytest.mark.parametrize("version", sv.VERSIONS, ids=IDS.get)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_gemv_versions(rng, version, dtype):
    check_uniform_version(rng, sv.slice_gemv, sv.slice_gemv_ref, version, dtype, slice_bits=SB)


@pytest.mark.parametrize("version", [2, 5], ids=[IDS[2], IDS[5]])
def test_more_tokens_than_max_t(rng, version):
    """T = 11: two launches (8 + 3 tokens)."""
    T, N, K = sv.MAX_T + 3, 9, 64
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, dtype=np.float32)
    y = sv.slice_gemv(x, w, 2, version=version, out=poisoned((T, N), np.float32))
    assert_close(y, sv.slice_gemv_ref(x, codes, scale, zero, SB, 2, 32).numpy(), np.float32)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_lut_every_token_count_and_bits(rng, T):
    """T = 1..8 changes the LUT chunk width (tables per token); every precision k; 9 words of K."""
    N, K = 21, 288
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, dtype=np.float32)
    for k in (1, 2, 4):
        ref = sv.slice_gemv_ref(x, codes, scale, zero, SB, k, 32).numpy()
        for version in (4, 5, 6, 7):
            assert_close(sv.slice_gemv(x, w, k, version=version, out=poisoned((T, N), np.float32)), ref, np.float32)


def test_split_k_really_splits_and_resets_its_counters(rng):
    """v5 with several K-splits; a second call on the same workspace agrees."""
    T, N, K = 1, 19, 800  # 25 words: 4 chunks of 8 words at T = 1
    assert sv.splits(N, 25, T) > 1
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, dtype=np.float32)
    ref = sv.slice_gemv_ref(x, codes, scale, zero, SB, 2, 32).numpy()
    for _ in range(2):
        assert_close(sv.slice_gemv(x, w, 2, version=5, out=poisoned((T, N), np.float32)), ref, np.float32)
    assert sv.workspace_counters_clear()


@pytest.mark.parametrize("version,block", [(1, (4, 2)), (2, 4), (3, (4, 2)), (4, 8), (5, 16), (6, 8), (7, 2)])
def test_block_sizes_are_parameters(rng, version, block):
    """Any allowed block gives the same numbers (the geometry is the same in the simulator and on a GPU)."""
    T, N, K = 2, 11, 50
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, g=K, dtype=np.float32)
    y = sv.slice_gemv(x, w, 4, version=version, block=block, out=poisoned((T, N), np.float32))
    assert_close(y, sv.slice_gemv_ref(x, codes, scale, zero, SB, 4, K).numpy(), np.float32)


def test_geometry_fits_the_tables():
    for T in range(1, sv.MAX_T + 1):
        wc, rb, rows = sv.gemv_geometry(T, 256)
        assert T * 4 * wc <= sv.TAB_ROWS and wc * rb == 256 and rows == rb * sv.RPT
        assert sv.gemv_geometry(T, 256, N=37)[1] == 10  # row slots clamped to ceil(37 / RPT)
    assert sv.gemv_geometry(1, 256)[0] == 8  # T = 1: 256 activations per table build


def test_errors(rng):
    x, *_, w = setup_layer(rng, 1, 5, 64, dtype=np.float32)
    with pytest.raises(ValueError):
        sv.slice_gemv(x, w, 1, version=8)
    with pytest.raises(ValueError):
        sv.slice_gemv(x, w, 1, version=5, block=6)
    with pytest.raises(ValueError):
        sv.slice_gemv(x, w, 5)
    with pytest.raises(ValueError):
        sv.gemv_routed(x, w, [5])
    with pytest.raises(ValueError):
        sv.gemv_routed(x, w, [1, 2])


def test_v7_split_k_blocks_and_workspace(rng):
    """v7 over several K-blocks (2 x 32 words each at T = 1) and row groups; twice on the same
    workspace (the last block of a row group zeroes it); T = 2 and 3 (2 + 1 tokens per launch)."""
    from cuda_numba.slice_gemv import v7_geometry

    N, K = 23, 32 * 32 * 2 + 96  # 67 words: 2 K-blocks at T = 1, 3 K-slices at T = 2
    assert v7_geometry(N, 67, 1)[0] == 2 and v7_geometry(N, 67, 2)[0] == 3
    for T in (1, 3):
        x, codes, scale, zero, w = setup_layer(rng, T, N, K, dtype=np.float32)
        ref = sv.slice_gemv_ref(x, codes, scale, zero, SB, 3, 32).numpy()
        for _ in range(2):
            assert_close(sv.slice_gemv(x, w, 3, version=7, out=poisoned((T, N), np.float32)), ref, np.float32)
    assert all(not ws.copy_to_host().any() and not c.copy_to_host().any() for ws, c in sv._V7_WS.values())


def test_v7_routed_plan(rng):
    """RoutedPlan (the decode launch of the packed backend): mixed k_t, more tokens than one launch takes."""
    from numba import cuda

    from cuda_numba.slice_linear import slice_linear_ref

    T, N, K = 3, 17, 96
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, dtype=np.float16)
    k_t = np.array([4, 1, 2])
    plan = sv.RoutedPlan(w, T)
    out = cuda.to_device(poisoned((T, N), np.float16))
    plan(cuda.to_device(x), cuda.to_device(k_t.astype(np.int64)), out)
    assert_close(out.copy_to_host(), slice_linear_ref(x, codes, scale, zero, SB, k_t, 32).numpy(), np.float16)


def test_v7_kernel_factory():
    """Bits and tokens are compile-time constants: one kernel per (T, bits, routed), cached."""
    assert sv.gemv7_kernel(1, 4) is sv.gemv7_kernel(1, 4)
    assert sv.gemv7_kernel(1, 4) is not sv.gemv7_kernel(1, 2)
    with pytest.raises(ValueError):
        sv.gemv7_kernel(sv.V7_MAX_T + 1, 4)
    with pytest.raises(ValueError):
        sv.v7_geometry(10, 3, 1, warps=sv.V7_WARPS + 1)
