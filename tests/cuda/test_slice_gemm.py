"""Slice-aware GEMV/GEMM with fp16/fp32 activations (cuda_numba/slice_gemm.py), every version vs torch."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import assert_close, mobislice_weight, poisoned

from cuda_numba.packing import pack_mobislice
from cuda_numba.slice_gemm import (
    MAX_T,
    dequant_codes,
    dequant_residual,
    route_permutation,
    slice_gemm,
    slice_gemv,
    slice_linear,
    slice_linear_ref,
)

SB = (2, 2, 2, 2)
# (activation dtype, precision k, K): fp16 at 6 bits over 5 groups, fp32 at 2 bits over 3 groups
CASES = [(np.float16, 3, 160), (np.float32, 1, 96)]
CASE_IDS = ["fp16-k3-K160", "fp32-k1-K96"]


def _setup(rng, T, N, K, g=32, slice_bits=SB, dtype=np.float16):
    codes, scale, zero = mobislice_weight(rng, N, K, g, slice_bits)
    x = rng.standard_normal((T, K)).astype(dtype)
    return x, codes, scale, zero, pack_mobislice(codes, scale, zero, slice_bits, g)


# ---- the torch reference itself


def test_dequant_residual_sum_equals_prefix(rng):
    codes, scale, zero = mobislice_weight(rng, 6, 64, 32)
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


def test_dequant_matches_mbq_ref_mobislice(rng):
    """Our kernel reference dequantizes exactly like the package's MoBiSlice (same formula)."""
    from mbq_ref import mobislice
    w = torch.from_numpy(rng.standard_normal((7, 64)).astype(np.float32))
    sw = mobislice.SlicedWeight.from_float(w, SB, 32)
    zero = sw.zero.numpy()
    for k in (1, 2, 3, 4):
        ours = dequant_codes(sw.codes.numpy(), sw.scale.numpy(), zero, SB, k, 32)
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


# ---- uniform precision: GEMV (decode) and GEMM (prefill)


@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1_naive", "v2_block_per_row", "v3_rows_smem_x"])
@pytest.mark.parametrize("dtype,k,K", CASES, ids=CASE_IDS)
def test_gemv_versions(rng, version, dtype, k, K):
    T, N = 3, 37
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=dtype)
    out = poisoned((T, N), dtype)
    y = slice_gemv(x, w, k, version=version, out=out)
    assert y is out and y.dtype == dtype
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, k, 32).numpy(), dtype)


@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1_naive", "v2_smem_tiles", "v3_register_tiles"])
@pytest.mark.parametrize("dtype,k,K", [(np.float16, 4, 160), (np.float32, 2, 96)], ids=["fp16-k4-K160", "fp32-k2-K96"])
def test_gemm_versions(rng, version, dtype, k, K):
    T, N = 5, 37
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=dtype)
    y = slice_gemm(x, w, k, version=version, out=poisoned((T, N), dtype))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, k, 32).numpy(), dtype)


def test_gemv_more_tokens_than_max_t(rng):
    T, N, K = MAX_T + 3, 9, 64
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=np.float32)
    y = slice_gemv(x, w, 2, version=2, out=poisoned((T, N), np.float32))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, 2, 32).numpy(), np.float32)


@pytest.mark.parametrize("kind,version", [("gemv", 3), ("gemm", 2)])
def test_per_row_scale_ragged_k(rng, kind, version):
    """One group per row (G = 1) and K = 50, not a multiple of 32."""
    T, N, K = 3, 11, 50
    x, codes, scale, zero, w = _setup(rng, T, N, K, g=K, dtype=np.float32)
    assert w.n_groups == 1
    fn = slice_gemv if kind == "gemv" else slice_gemm
    y = fn(x, w, 4, version=version, out=poisoned((T, N), np.float32))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, 4, K).numpy(), np.float32)


# ---- mixed precision: tokens grouped by routed k_t, or base + residual slices on streams


@pytest.mark.parametrize(
    "method,kind,version",
    [
        ("grouped", "gemm", 2),
        ("grouped", "gemv", 3),
        ("streams", "gemm", 3),
        ("streams", "gemv", 2),
        ("streams", "gemm", 1),
    ],
)
def test_slice_linear_routed(rng, method, kind, version):
    T, N, K = 5, 15, 96
    x, codes, scale, zero, w = _setup(rng, T, N, K, dtype=np.float16)
    k_t = rng.permutation(np.array([1, 4, 2, 4, 3]))  # every precision, unsorted
    y = slice_linear(x, w, k_t, method=method, kind=kind, version=version, out=poisoned((T, N), np.float16))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, k_t, 32).numpy(), np.float16)


def test_slice_linear_streams_other_slice_bits(rng):
    """Slices 3,3,2 (B = 3, 6, 8): residual zero points 4, 4, 2 and a missing precision."""
    sb = (3, 3, 2)
    T, N, K = 4, 13, 64
    x, codes, scale, zero, w = _setup(rng, T, N, K, slice_bits=sb, dtype=np.float32)
    k_t = np.array([3, 1, 3, 1])  # nobody at k = 2
    for method in ("streams", "grouped"):
        y = slice_linear(x, w, k_t, method=method, kind="gemv", version=2, out=poisoned((T, N), np.float32))
        assert_close(y, slice_linear_ref(x, codes, scale, zero, sb, k_t, 32).numpy(), np.float32)


def test_route_permutation_example():
    perm, starts = route_permutation([3, 1, 4, 1, 2], 4)
    assert perm.tolist() == [1, 3, 4, 0, 2] and starts.tolist() == [0, 2, 3, 4, 5]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=40))
def test_property_route_permutation(k_t):
    k_t = np.array(k_t, dtype=np.int64)
    perm, starts = route_permutation(k_t, 4)
    assert sorted(perm.tolist()) == list(range(len(k_t)))  # a permutation
    ks = k_t[perm]
    assert (np.diff(ks) >= 0).all()  # sorted by precision
    for k in range(1, 5):  # segments, stable inside each
        seg = perm[starts[k - 1] : starts[k]]
        assert (k_t[seg] == k).all() and (np.diff(seg) > 0).all()
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    np.testing.assert_array_equal(ks[inv], k_t)  # the inverse permutation restores the order


def test_errors(rng):
    x, *_, w = _setup(rng, 2, 5, 64, dtype=np.float32)
    with pytest.raises(ValueError):
        slice_gemv(x, w, 5)
    with pytest.raises(ValueError):
        slice_gemm(x[:, :32], w, 1)
    with pytest.raises(ValueError):
        slice_linear(x, w, [1, 9])
    with pytest.raises(ValueError):
        slice_linear(x, w, [1, 2], method="magic")
    with pytest.raises(ValueError):
        slice_gemv(x, w, 1, out=np.zeros((2, 5), np.float16))


def test_kernels_match_mobilinear(rng):
    """The kernels compute what the package's MoBiLinear layer computes (Eq. 6), token by token."""
    from mbq_ref import mobilinear
    K, N, T = 64, 9, 4
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32)))
    layer = mobilinear.MoBiLinear(lin, SB, group_size=32).eval()
    sw = layer.freeze()
    k_t = np.array([3, 1, 4, 2])
    layer.token_slices = torch.as_tensor(k_t)
    x = rng.standard_normal((T, K)).astype(np.float32)
    with torch.no_grad():
        y_layer = layer(torch.from_numpy(x)).numpy()
    packed = pack_mobislice(sw.codes.numpy(), sw.scale.numpy(), sw.zero.numpy(), SB, 32)
    y = slice_linear(x, packed, k_t, method="streams", kind="gemv", version=2, out=poisoned((T, N), np.float32))
    assert_close(y, y_layer, np.float32)
