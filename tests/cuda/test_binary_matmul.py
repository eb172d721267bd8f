"""AND + popcount binary matmul (cuda_numba/binary_matmul.py): exact integers, every version."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kernel_helpers import INT_POISON, mobislice_weight, odd_shape, poisoned

from cuda_numba.binary_matmul import (
    binary_linear,
    binary_linear_ref,
    binary_matmul,
    binary_matmul_ref,
    popcount_matmul_ref,
    quantize_activations,
)
from cuda_numba.packing import pack_bitplanes_ref, pack_mobislice
from cuda_numba.slice_linear import slice_linear_ref

VERSIONS = [1, 2, 3]
IDS = ["v1_naive", "v2_sums_registers", "v3_shared_tiles"]


def test_popcount_identity_worked_example():
    x = np.array([[3, 1, 2]], dtype=np.uint8)  # 2-bit activations
    w = np.array([[1, 3, 2]], dtype=np.uint8)  # 2-bit weights
    xp, wp = pack_bitplanes_ref(x, 2), pack_bitplanes_ref(w, 2)
    assert [int(v) for v in xp[:, 0, 0]] == [0b101, 0b011]
    assert [int(v) for v in wp[:, 0, 0]] == [0b110, 0b011]
    assert popcount_matmul_ref(xp, wp)[0, 0] == 3 * 1 + 1 * 3 + 2 * 2 == 10


@settings(max_examples=50, deadline=None)
@given(bx=st.integers(1, 8), bw=st.integers(1, 8), data=st.data())
def test_property_popcount_identity(bx, bw, data):
    T, N, K = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 80))
    xq = data.draw(arrays(np.uint8, (T, K), elements=st.integers(0, 2**bx - 1)))
    wq = data.draw(arrays(np.uint8, (N, K), elements=st.integers(0, 2**bw - 1)))
    got = popcount_matmul_ref(pack_bitplanes_ref(xq, bx), pack_bitplanes_ref(wq, bw))
    np.testing.assert_array_equal(got, xq.astype(np.int64) @ wq.T.astype(np.int64))


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_binary_matmul_grouped_zero_points_exact(rng, version):
    T, N, K, g = odd_shape(rng, max_tokens=9)  # groups of 32, or one group per row with a ragged K
    xq = rng.integers(0, 256, (T, K), dtype=np.uint8)
    wq = rng.integers(0, 256, (N, K), dtype=np.uint8)
    xz = rng.integers(0, 256, T).astype(np.int32)
    wz = rng.integers(0, 256, (N, K // g)).astype(np.int32)
    out = poisoned((T, N), np.int64)
    got = binary_matmul(pack_bitplanes_ref(xq), pack_bitplanes_ref(wq), K, xz, wz, g, version=version, out=out)
    assert got is out and not (got == INT_POISON).any()
    np.testing.assert_array_equal(got, binary_matmul_ref(xq, wq, xz, wz, g))


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_binary_matmul_row_zero_ragged_k(rng, version):
    """K = 50 (not a multiple of 32), 3-bit activations x 2-bit weights, one zero per row."""
    T, N, K = 3, 19, 50
    xq = rng.integers(0, 8, (T, K), dtype=np.uint8)
    wq = rng.integers(0, 4, (N, K), dtype=np.uint8)
    xz = rng.integers(0, 8, T)
    wz = rng.integers(0, 4, (N, 1))
    got = binary_matmul(
        pack_bitplanes_ref(xq, 3),
        pack_bitplanes_ref(wq, 2),
        K,
        xz,
        wz,
        version=version,
        out=poisoned((T, N), np.int64),
    )
    np.testing.assert_array_equal(got, binary_matmul_ref(xq, wq, xz, wz))


def test_binary_matmul_no_zero_points_is_plain_int_matmul(rng):
    xq = rng.integers(0, 256, (2, 64), dtype=np.uint8)
    wq = rng.integers(0, 256, (9, 64), dtype=np.uint8)
    got = binary_matmul(pack_bitplanes_ref(xq), pack_bitplanes_ref(wq), 64)
    np.testing.assert_array_equal(got, xq.astype(np.int64) @ wq.T.astype(np.int64))


def test_binary_matmul_rejects_bad_shapes(rng):
    xp = pack_bitplanes_ref(rng.integers(0, 256, (2, 64), dtype=np.uint8))
    with pytest.raises(ValueError):
        binary_matmul(xp, xp, 96)  # K does not match the words
    with pytest.raises(ValueError):
        binary_matmul(xp, xp, 64, w_zero=np.zeros((2, 3)), group_size=20)


@pytest.mark.parametrize("asymmetric", [True, False], ids=["asym", "sym"])
def test_quantize_activations_error_bound(rng, asymmetric):
    x = rng.standard_normal((4, 50)).astype(np.float32) + (0.5 if asymmetric else 0.0)
    xq, s, z = quantize_activations(x, 8, asymmetric)
    assert xq.dtype == np.uint8 and s.shape == z.shape == (4,)
    err = np.abs(s[:, None] * (xq.astype(np.float32) - z[:, None]) - x)
    assert (err <= s[:, None] * 0.5 + 1e-6).all()
    if not asymmetric:
        assert (z == 128).all()


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_binary_linear_mobislice(rng, version):
    """8-bit activations x MoBiSlice weights at k slices: vs the int64 reference and the dequantized matmul."""
    T, N, K, g, k = 3, 21, 96, 32, 3
    codes, scale, zero = mobislice_weight(rng, N, K, g)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = pack_mobislice(codes, scale, zero, (2, 2, 2, 2), g)
    y = binary_linear(x, w, k, version=version, out=poisoned((T, N), np.float32))
    assert not np.isnan(y).any()
    ref = binary_linear_ref(x, codes, scale, zero, (2, 2, 2, 2), k, g)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # same thing through the float path: dequantized activations @ W_k^T (slice_linear's reference)
    xq, sx, zx = quantize_activations(x)
    x_hat = (sx[:, None] * (xq.astype(np.float32) - zx[:, None])).astype(np.float32)
    y_float = slice_linear_ref(torch.from_numpy(x_hat), codes, scale, zero, (2, 2, 2, 2), k, g).numpy()
    np.testing.assert_allclose(y, y_float, rtol=1e-4, atol=1e-4 * np.abs(y_float).max())
