"""Routed precision (cuda_numba/slice_linear.py): the token permutation and every benchmark case vs torch."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import assert_close, poisoned, setup_layer

from cuda_numba import slice_linear as sl
from cuda_numba.packing import pack_mobislice

SB = (2, 2, 2, 2)


@pytest.mark.parametrize("case", list(sl.CASES))
def test_every_case_routed(rng, case):
    """Each benchmark case through slice_linear on unsorted tokens of every precision, odd N."""
    method, kind, version = sl.CASES[case]
    T, N = 5, int(rng.integers(4, 9)) * 2 + 1
    x, codes, scale, zero, w = setup_layer(rng, T, N, 96)
    k_t = rng.permutation(np.array([1, 4, 2, 4, 3]))
    y = sl.slice_linear(x, w, k_t, method=method, kind=kind, version=version, out=poisoned((T, N), np.float16))
    assert_close(y, sl.slice_linear_ref(x, codes, scale, zero, SB, k_t, 32).numpy(), np.float16)


@pytest.mark.parametrize("case", ["gemv3", "streams-gemm2", "fused-gemv6", "fused-gemv7"])
def test_run_kernels_matches_the_call(rng, case):
    """run_kernels (what the benchmark times) computes the same partials as the full call."""
    from numba import cuda

    T, N = 4, 11
    x, codes, scale, zero, w = setup_layer(rng, T, N, 64, dtype=np.float32)
    k_t = np.array([2, 1, 4, 2])
    ref = sl.slice_linear_ref(x, codes, scale, zero, SB, k_t, 32).numpy()
    dw = w.to_device()
    if sl.CASES[case][0] == "fused":
        out = cuda.to_device(poisoned((T, N), np.float32))
        sl.run_kernels(case, cuda.to_device(x), dw, k_t, out=out)
        assert_close(out.copy_to_host(), ref, np.float32)
        return
    perm, starts = sl.route_permutation(k_t, 4)
    ybuf = cuda.to_device(np.zeros((4, T, N), np.float32))
    sl.run_kernels(case, cuda.to_device(np.ascontiguousarray(x[perm])), dw, k_t, ybuf, [cuda.stream() for _ in SB])
    yb = ybuf.copy_to_host()
    y = np.zeros((T, N), np.float32)
    for i in range(T):  # what combine_scatter_kernel does
        y[perm[i]] = sum(yb[e, i] for e in range(4) if e == 0 or i >= starts[e])
    assert_close(y, ref, np.float32)


def test_streams_other_slice_bits(rng):
    """Slices 3,3,2 (B = 3, 6, 8): residual zero points 4, 4, 2 and a missing precision."""
    sb = (3, 3, 2)
    T, N, K = 4, 13, 64
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, slice_bits=sb, dtype=np.float32)
    k_t = np.array([3, 1, 3, 1])  # nobody at k = 2
    for method in ("streams", "grouped"):
        y = sl.slice_linear(x, w, k_t, method=method, kind="gemv", version=2, out=poisoned((T, N), np.float32))
        assert_close(y, sl.slice_linear_ref(x, codes, scale, zero, sb, k_t, 32).numpy(), np.float32)


def test_route_permutation_example():
    perm, starts = sl.route_permutation([3, 1, 4, 1, 2], 4)
    assert perm.tolist() == [1, 3, 4, 0, 2] and starts.tolist() == [0, 2, 3, 4, 5]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=40))
def test_property_route_permutation(k_t):
    k_t = np.array(k_t, dtype=np.int64)
    perm, starts = sl.route_permutation(k_t, 4)
    assert sorted(perm.tolist()) == list(range(len(k_t)))  # a permutation
    ks = k_t[perm]
    assert (np.diff(ks) >= 0).all()  # sorted by precision
    for k in range(1, 5):  # segments, stable inside each
        seg = perm[starts[k - 1] : starts[k]]
        assert (k_t[seg] == k).all() and (np.diff(seg) > 0).all()
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    np.testing.assert_array_equal(ks[inv], k_t)  # the inverse permutation restores the order


@pytest.mark.parametrize("version", [6, 7])
def test_fused_device_path_has_no_round_trip_or_allocation(rng, monkeypatch, version):
    """Device x, k_t (int64, as a router would produce) and out: after a first call (which caches
    the workspace), a call moves nothing between host and device and allocates nothing."""
    from numba import cuda

    T, N, K = 3, 13, 96
    x, codes, scale, zero, w = setup_layer(rng, T, N, K, slice_bits=(3, 3, 2))
    k_t = np.array([3, 1, 2])
    dw = w.to_device()
    dx, dk = cuda.to_device(x), cuda.to_device(k_t.astype(np.int64))
    dout = cuda.to_device(poisoned((T, N), np.float16))
    sl.slice_linear(dx, dw, dk, method="fused", kind="gemv", version=version, out=dout)

    def forbidden(*a, **k):
        raise AssertionError("host round trip or allocation in the device call path")

    dout2 = cuda.to_device(poisoned((T, N), np.float16))
    for name in ("to_device", "device_array", "device_array_like", "pinned_array"):
        monkeypatch.setattr(cuda, name, forbidden)
    monkeypatch.setattr(type(dx), "copy_to_host", forbidden)
    y = sl.slice_linear(dx, dw, dk, method="fused", kind="gemv", version=version, out=dout2)
    monkeypatch.undo()
    assert y is dout2
    assert_close(y.copy_to_host(), sl.slice_linear_ref(x, codes, scale, zero, (3, 3, 2), k_t, 32).numpy(), np.float16)


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
    y = sl.slice_linear(x, packed, k_t, method="streams", kind="gemv", version=2, out=poisoned((T, N), np.float32))
    assert_close(y, y_layer, np.float32)


def test_errors(rng):
    x, *_, w = setup_layer(rng, 2, 5, 64, dtype=np.float32)
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 9])
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 2], method="magic")
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 2], kind="gemv", version=9)
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 2, 3])
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 5], method="fused", kind="gemv", version=6)
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 2], method="fused", kind="gemv", version=5)
    with pytest.raises(ValueError):
        sl.slice_linear(x, w, [1, 2], method="fused", kind="gemv", version=7, block=9)
