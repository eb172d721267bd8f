"""Bit-plane packing (cuda_numba/packing.py): exact round trips, every kernel version vs the NumPy reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kernel_helpers import poisoned

from cuda_numba.packing import (
    n_words,
    pack_bitplanes,
    pack_bitplanes_ref,
    pack_mobislice,
    prefix_planes,
    slice_plane_range,
    slice_planes,
    unpack_bitplanes,
    unpack_bitplanes_ref,
)


def test_known_answer_docstring_example():
    codes = np.array([[0b10110100, 0b01100001, 0b11111111]], dtype=np.uint8)
    planes = pack_bitplanes_ref(codes)
    assert planes.shape == (8, 1, 1) and planes.dtype == np.uint32
    # plane p holds bit (7 - p); element j sits at bit j of the word
    assert [int(w) for w in planes[:, 0, 0]] == [0b101, 0b110, 0b111, 0b101, 0b100, 0b101, 0b100, 0b110]
    q1 = unpack_bitplanes_ref(prefix_planes(planes, (2, 2, 2, 2), 1), 3)
    assert q1.tolist() == [[0b10, 0b01, 0b11]]
    # the 2-bit example of pack_bitplanes_ref / unpack_bitplanes_ref
    two = pack_bitplanes_ref(np.array([[2, 1, 3]], np.uint8), bits=2)
    assert two[:, 0, 0].tolist() == [0b101, 0b110]
    assert unpack_bitplanes_ref(two, 3).tolist() == [[2, 1, 3]]
    assert unpack_bitplanes_ref(two[:1], 3).tolist() == [[1, 0, 1]]


@pytest.mark.parametrize("version", [1, 2], ids=["v1_thread_per_word", "v2_thread_per_row_word"])
@pytest.mark.parametrize("draw", [0, 1], ids=["odd-shape-a", "odd-shape-b"])
def test_pack_kernels_match_reference(rng, version, draw):
    N, K = int(rng.integers(2, 20)) * 2 + 1, int(rng.integers(16, 60)) * 2 + 1  # fresh odd sizes, K ragged
    codes = rng.integers(0, 256, (N, K), dtype=np.uint8)
    out = poisoned((8, N, n_words(K)), np.uint32)
    planes = pack_bitplanes(codes, bits=8, version=version, out=out)
    np.testing.assert_array_equal(planes, pack_bitplanes_ref(codes))
    assert planes is out


def test_pack_fewer_bits_and_padding_is_zero(rng):
    codes = rng.integers(0, 8, (3, 45), dtype=np.uint8)  # 3-bit codes, K = 45 (13 padding bits)
    planes = pack_bitplanes(codes, bits=3, version=2)
    np.testing.assert_array_equal(planes, pack_bitplanes_ref(codes, bits=3))
    assert not (planes[:, :, 1] >> np.uint32(13)).any()


def test_unpack_kernel_round_trip_and_prefix(rng):
    N, K = 5, 33
    codes = rng.integers(0, 256, (N, K), dtype=np.uint8)
    planes = pack_bitplanes_ref(codes)
    np.testing.assert_array_equal(unpack_bitplanes(planes, K, out=poisoned((N, K), np.uint8)), codes)
    # the first B_k planes are Q_k = Q_E >> (8 - B_k)
    np.testing.assert_array_equal(unpack_bitplanes(prefix_planes(planes, (2, 2, 2, 2), 3), K), codes >> 2)


def test_slice_views_are_contiguous_plane_ranges(rng):
    bits = (2, 2, 2, 2)
    planes = pack_bitplanes_ref(rng.integers(0, 256, (4, 40), dtype=np.uint8))
    assert [slice_plane_range(bits, e) for e in (1, 2, 3, 4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for k in (1, 2, 3, 4):
        view = prefix_planes(planes, bits, k)
        assert view.shape[0] == 2 * k and view.flags.c_contiguous and np.shares_memory(view, planes)
    np.testing.assert_array_equal(slice_planes(planes, bits, 3), planes[4:6])
    assert slice_plane_range((3, 3, 2), 2) == (3, 6)
    with pytest.raises(ValueError):
        slice_plane_range(bits, 5)


def test_slice_planes_decode_residual_codes(rng):
    codes = rng.integers(0, 256, (3, 70), dtype=np.uint8)
    planes = pack_bitplanes_ref(codes)
    for e in (1, 2, 3, 4):  # slice e's planes alone decode to its 2-bit code q_e
        q_e = unpack_bitplanes_ref(slice_planes(planes, (2, 2, 2, 2), e), 70)
        np.testing.assert_array_equal(q_e, (codes >> (8 - 2 * e)) & 3)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="fit"):
        pack_bitplanes_ref(np.full((1, 4), 8, np.uint8), bits=3)
    with pytest.raises(ValueError):
        pack_bitplanes_ref(np.zeros(5, np.uint8))
    with pytest.raises(ValueError):
        pack_bitplanes(np.zeros((2, 3), np.uint8), version=7)


def test_pack_mobislice_checks_groups(rng):
    codes = rng.integers(0, 256, (3, 96), dtype=np.uint8)
    w = pack_mobislice(codes, np.ones((3, 3), np.float32), np.zeros((3, 3)), (2, 2, 2, 2), 32)
    assert w.planes.shape == (8, 3, 3) and w.zero.dtype == np.int32 and w.bits_at(3) == 6
    assert w.nbytes(1) == 2 * 3 * 3 * 4 + 3 * 3 * 8
    with pytest.raises(ValueError, match="group_size"):
        pack_mobislice(codes, np.ones((3, 2), np.float32), np.zeros((3, 2)), (2, 2, 2, 2), 48)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    data=st.data(),
)
def test_property_pack_unpack_round_trip(bits, data):
    shape = data.draw(st.tuples(st.integers(1, 5), st.integers(1, 100)))
    codes = data.draw(arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    planes = pack_bitplanes_ref(codes, bits)
    assert planes.shape == (bits, shape[0], n_words(shape[1])) and planes.dtype == np.uint32
    np.testing.assert_array_equal(unpack_bitplanes_ref(planes, shape[1]), codes)
    for nb in range(1, bits + 1):  # any prefix of planes = the top nb bits
        np.testing.assert_array_equal(unpack_bitplanes_ref(planes[:nb], shape[1]), codes >> (bits - nb))
