"""The torch reference every slice kernel is checked against (cuda_numba/dequant.py)."""

import numpy as np
import pytest
import torch
from kernel_helpers import assert_close, mobislice_weight

from cuda_numba.dequant import dequant_codes, dequant_residual, uniform_ref
from cuda_numba.packing import pack_mobislice
from cuda_numba.slice_linear import slice_linear

SB = (2, 2, 2, 2)


def test_dequant_residual_sum_equals_prefix(rng):
    codes, scale, zero = mobislice_weight(rng, 7, 64, 32)
    W = dequant_codes(codes, scale, zero, SB, 1, 32)
    for k in (2, 3, 4):
        W = W + dequant_residual(codes, scale, SB, k, 32)  # W_k = W_1 + dW_2 + ... + dW_k
        torch.testing.assert_close(W, dequant_codes(codes, scale, zero, SB, k, 32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("z_E,w1,w2", [(8, 0.5, 0.875), (9, 0.25, 0.625)])
def test_dequant_known_answer(z_E, w1, w2):
    # design.md example: s = 1, codes q_1 = 2, q_2 = 3 -> Q_2 = 0b1011 = 11, slices (2, 2), B_E = 4.
    # z_E = 8: z_1 = 8/4 = 2, W_1 = 1 (2 - 2 + 1/2) = 0.5, W_2 = 1/4 (11 - 8 + 1/2) = 0.875;
    # z_E = 9: z_1 = 9/4 (a fraction), W_1 = 2 - 2.25 + 0.5 = 0.25, W_2 = 1/4 (11 - 9 + 1/2) = 0.625.
    codes = np.array([[0b1011]], dtype=np.uint8)
    one, z = np.ones((1, 1), np.float32), np.array([[z_E]])
    assert dequant_codes(codes, one, z, (2, 2), 2, 1).item() == w2
    assert dequant_codes(codes, one, z, (2, 2), 1, 1).item() == w1


def test_uniform_ref_is_x_times_w_transposed(rng):
    codes, scale, zero = mobislice_weight(rng, 5, 64, 32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    W = dequant_codes(codes, scale, zero, SB, 2, 32).numpy()
    np.testing.assert_allclose(uniform_ref(x, codes, scale, zero, SB, 2, 32).numpy(), x @ W.T, rtol=1e-5, atol=1e-5)


def test_dequant_matches_mbq_ref_mobislice(rng):
    """Our kernel reference dequantizes exactly like the package's MoBiSlice (same formula)."""
    from mbq_ref import mobislice

    w = torch.from_numpy(rng.standard_normal((7, 64)).astype(np.float32))
    sw = mobislice.SlicedWeight.from_float(w, SB, 32)
    for k in (1, 2, 3, 4):
        ours = dequant_codes(sw.codes.numpy(), sw.scale.numpy(), sw.zero.numpy(), SB, k, 32)
        assert torch.equal(ours, sw.dequant(k))


def test_kernels_on_mobislice_weights(rng):
    """End to end from a float weight: MoBiSlice codes -> bit-planes -> kernel == the package's W_k."""
    from mbq_ref import mobislice

    w = torch.from_numpy(rng.standard_normal((13, 64)).astype(np.float32))
    sw = mobislice.SlicedWeight.from_float(w, SB, 32)
    packed = pack_mobislice(sw.codes.numpy(), sw.scale.numpy(), sw.zero.numpy(), SB, 32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    k_t = np.array([4, 2])
    y = slice_linear(x, packed, k_t, kind="gemv", version=2)
    ref = np.stack([x[t] @ sw.dequant(int(k_t[t])).numpy().T for t in range(2)])
    assert_close(y, ref, np.float32)


def test_reference_errors(rng):
    codes, scale, zero = mobislice_weight(rng, 2, 32, 32)
    with pytest.raises(ValueError):
        dequant_codes(codes, scale, zero, SB, 5, 32)
    with pytest.raises(ValueError):
        dequant_residual(codes, scale, SB, 1, 32)
