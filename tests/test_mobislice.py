"""MoBiSlice invariants (paper Sec. 4.1, App. B): nested codes, error bounds, memory."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbq_ref.mobislice import (
    SlicedWeight,
    ZERO_GRIDS,
    SliceError,
    cumulative_bits,
    dequant_codes,
    floor_scale_zero,
    nested_code,
    slice_codes,
    slice_deltas,
    zero_at,
)
from mbq_ref.baselines import baseline_weights, relative_error
from helpers import ste_slices_reference

SLICES = [(2, 2, 2, 2), (3, 3), (4, 2, 2), (1, 1, 1, 1, 1, 1, 1, 1), (2, 3, 3)]


def _weight(seed, n, k, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale


def test_worked_example_from_docstring():
    w = torch.full((1, 4), 0.8)
    s, z = torch.ones(1, 1), torch.full((1, 1), 8.0)  # z_E = 8 on the 4-bit grid, z_1 = 2
    codes = slice_codes(w, s, z, (2, 2), group_size=4)
    assert codes[0, 0].item() == 0b1011
    assert dequant_codes(codes, s, z, (2, 2), k=1, group_size=4)[0, 0].item() == 0.5
    assert dequant_codes(codes, s, z, (2, 2), k=2, group_size=4)[0, 0].item() == 0.875


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    groups=st.integers(1, 3),
    gs=st.sampled_from([4, 8, 32]),
    bits=st.sampled_from(SLICES),
    scale=st.floats(1e-3, 1e3),
    zero_grid=st.sampled_from(ZERO_GRIDS),
)
def test_codes_nested_and_recursion_equals_integer_formula(seed, n, groups, gs, bits, scale, zero_grid):
    w = _weight(seed, n, groups * gs, scale)
    sw = SlicedWeight.from_float(w, bits, gs, zero_grid=zero_grid)
    deltas = slice_deltas(w.double(), sw.scale.double(), sw.zero.double(), bits, gs)
    cum = cumulative_bits(bits)
    acc = torch.zeros_like(w, dtype=torch.float64)
    for k in range(1, len(bits) + 1):
        # nested: Q_{k-1} == Q_k >> b_k (lower precision = top bits, never re-rounded)
        if k > 1:
            assert torch.equal(nested_code(sw.codes, bits, k - 1), nested_code(sw.codes, bits, k) >> bits[k - 1])
        assert int(nested_code(sw.codes, bits, k).max()) < 2 ** cum[k - 1]
        # the recursive residual sum equals the single-integer shift-and-add form
        acc = acc + deltas[k - 1]
        torch.testing.assert_close(sw.dequant(k, torch.float64), acc, rtol=1e-9, atol=1e-9 * scale)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from(SLICES), gs=st.sampled_from([8, 32]),
       scale=st.floats(1e-3, 1e3), shift=st.floats(-2, 2))
def test_finest_grid_clips_nothing_inside_min_max(seed, bits, gs, scale, shift):
    # min/max ranges (also groups that do not contain 0): every weight keeps |W - Ŵ_k| <= s_k / 2 at EVERY level
    w = (_weight(seed, 6, 2 * gs) + shift) * scale
    sw = SlicedWeight.from_float(w, bits, gs)
    cum = cumulative_bits(bits)
    s = sw.scale.repeat_interleave(gs, 1).double()
    assert torch.equal(sw.zero, sw.zero.round())  # z_E is an integer
    for k in range(1, len(bits) + 1):
        s_k = s / 2 ** (cum[k - 1] - cum[0])
        err = (w.double() - sw.dequant(k, torch.float64)).abs()
        assert (err <= s_k / 2 * (1 + 1e-5)).all(), f"clipped at k={k}"
    # equivalently, the stored code is one floor on the finest grid: Q_E = floor(W / s_E + z_E), never clamped
    s_fine = s / 2 ** (cum[-1] - cum[0])
    fine = w.double() / s_fine + sw.zero.repeat_interleave(gs, 1).double()
    assert fine.min() >= -1e-5 and fine.max() < 2 ** cum[-1] + 1e-5


def test_finest_rule_in_numbers():
    # the docstring's rule, by hand: s_E = (xmax - xmin) / (2^B_E - 1), z_E = ceil(-xmin / s_E), s = s_E 2^(B_E - B_1)
    s, z = floor_scale_zero(torch.tensor([[-1.0]]), torch.tensor([[2.0]]), (2, 2, 2, 2))
    s_fine = 3.0 / 255
    assert s.item() == pytest.approx(s_fine * 64) and z.item() == math.ceil(1.0 / s_fine) == 85
    assert zero_at(z, (2, 2, 2, 2), 1).item() == 85 / 64  # the base zero point may be fractional
    with pytest.raises(SliceError, match="zero_grid"):
        floor_scale_zero(torch.zeros(1, 1), torch.ones(1, 1), (2, 2), "coarse")


def _proj_weights(tiny_llama, limit=None):
    model, _ = tiny_llama
    ws = [m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return ws[:limit]


def _rel_err(ws, fn):
    num = sum(float((w.double() - fn(w).double()).pow(2).sum()) for w in ws)
    return math.sqrt(num / sum(float(w.double().pow(2).sum()) for w in ws))


@pytest.mark.slow
def test_8bit_error_matches_rtn_on_the_bundled_model(tiny_llama):
    ws = _proj_weights(tiny_llama)
    rtn8 = _rel_err(ws, lambda w: baseline_weights(w, "rtn", (8,), 128)[8])
    finest = _rel_err(ws, lambda w: SlicedWeight.from_float(w, (2, 2, 2, 2), 128).dequant(4))
    base = _rel_err(ws, lambda w: SlicedWeight.from_float(w, (2, 2, 2, 2), 128, zero_grid="base").dequant(4))
    assert finest <= 1.05 * rtn8
    # the old base-grid rule really clips (so chapter 2's comparison of the two rules is a real one)
    assert base > 2 * rtn8


def test_base_rule_clips_some_bundled_weights_at_every_precision(tiny_llama):
    w = _proj_weights(tiny_llama, 1)[0]
    for zero_grid, expect_clipped in (("base", True), ("finest", False)):
        sw = SlicedWeight.from_float(w, (2, 2, 2, 2), 128, zero_grid=zero_grid)
        s8 = sw.scale.repeat_interleave(128, 1).double() / 64
        clipped = (w.double() - sw.dequant(4, torch.float64)).abs() > s8 / 2 * (1 + 1e-5)
        assert bool(clipped.any()) == expect_clipped, zero_grid


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from(SLICES), gs=st.sampled_from([8, 16]))
def test_error_bound_inside_clip_range(seed, bits, gs):
    # with the base-grid rule, the bound holds inside the range its 2^b1 cells cover
    w = _weight(seed, 5, 2 * gs)
    sw = SlicedWeight.from_float(w, bits, gs, zero_grid="base")
    s = sw.scale.repeat_interleave(gs, 1).double()
    z = zero_at(sw.zero, bits, 1).repeat_interleave(gs, 1).double()
    # inside the base range covered by the 2^b1 cells: [-z s, (2^b1 - z) s)
    inside = (w >= -z * s) & (w < (2 ** bits[0] - z) * s)
    cum = cumulative_bits(bits)
    for k in range(1, len(bits) + 1):
        s_k = s / 2 ** (cum[k - 1] - cum[0])
        err = (w.double() - sw.dequant(k, torch.float64)).abs()
        assert (err[inside] <= s_k[inside] / 2 * (1 + 1e-9)).all()
    # the error bound shrinks geometrically, so more slices never hurt inside the range
    errs = [(w.double() - sw.dequant(k, torch.float64))[inside].abs().max() for k in range(1, len(bits) + 1)]
    assert all(a >= b for a, b in zip(errs, errs[1:]))


def test_clipped_weights_stay_clipped_at_every_precision():
    # the known tension: a value clipped by the base range is never recovered
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 10.0]])
    xmin, xmax = torch.tensor([[-1.0]]), torch.tensor([[2.0]])  # 10.0 lies outside
    sw = SlicedWeight.from_float(w, (2, 2, 2, 2), 8, xmin=xmin, xmax=xmax, zero_grid="base")
    s, z = sw.scale.item(), zero_at(sw.zero, (2, 2, 2, 2), 1).item()
    assert (s, z) == (0.75, 1.0)  # z_1 = round(1/0.75): the covered range [-0.75, 2.25) misses -1.0 too
    for k in range(1, 5):
        w_k = sw.dequant(k)[0]
        assert w_k[-1] < 2.25 and w_k[0] > -0.75  # both clipped values saturate at the range edge
        assert (w_k[1:7] - w[0, 1:7]).abs().max() <= s / 4 ** (k - 1) / 2 + 1e-6
    # the finest-grid rule covers the whole range [-1, 2]: only 10.0, outside it, is clipped
    sw = SlicedWeight.from_float(w, (2, 2, 2, 2), 8, xmin=xmin, xmax=xmax)
    for k in range(1, 5):
        s_k = sw.scale.item() / 4 ** (k - 1)
        assert (sw.dequant(k)[0, :7] - w[0, :7]).abs().max() <= s_k / 2 * (1 + 1e-5)


def test_memory_one_checkpoint_vs_separate():
    w = _weight(0, 64, 256)
    sw = SlicedWeight.from_float(w, (2, 2, 2, 2), 128)
    n_groups = 64 * 256 // 128
    assert sw.nbytes == 64 * 256 + n_groups * 3  # 8 bits/weight + one fp16 scale + int8 zero per group
    # separate 2/4/6/8-bit checkpoints: 20 bits per weight plus 4 sets of scales
    separate = sum(64 * 256 * b // 8 + n_groups * 3 for b in (2, 4, 6, 8))
    assert separate / sw.nbytes == pytest.approx(20 / 8, rel=0.05)


def test_ste_gradients_reach_scale():
    w = _weight(1, 4, 32)
    xmin, xmax = w.view(4, 1, 32).amin(-1).requires_grad_(), w.view(4, 1, 32).amax(-1).requires_grad_()
    s, z = floor_scale_zero(xmin, xmax, (2, 2))
    out = sum(slice_deltas(w, s, z, (2, 2), 32, ste=True))
    ((out - w) ** 2).sum().backward()
    assert xmin.grad is not None and torch.isfinite(xmin.grad).all() and xmin.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad, match",
    [((2, 0), "1..8"), ((9,), "1..8"), ((), "empty"), ((8, 8, 8), "at most 16")],
    ids=["zero-bit-slice", "nine-bit-slice", "empty", "too-many-bits"],
)
def test_bad_slice_bits(bad, match):
    with pytest.raises(SliceError, match=match):
        SlicedWeight.from_float(torch.randn(2, 8), bad, 8)


@pytest.mark.parametrize("bad", [(2.7, 2, 2, 2), (1.99,), (True, 2), ("2", 2), 5], ids=["2.7", "1.99", "bool", "str", "int"])
def test_fractional_slice_bits_refused(bad):
    """Non-integers were truncated (2.7 -> 2, 1.99 -> 1); now refused. A whole float (2.0) is still accepted."""
    from mbq_ref.mobislice import check_slice_bits

    with pytest.raises(SliceError, match="whole number|sequence"):
        check_slice_bits(bad)
    assert check_slice_bits((2.0, 2)) == (2, 2)


def test_bad_shapes_and_values():
    with pytest.raises(SliceError, match="does not divide"):
        SlicedWeight.from_float(torch.randn(2, 12), (2, 2), 8)
    with pytest.raises(SliceError, match="2-D"):
        SlicedWeight.from_float(torch.randn(2, 3, 8), (2, 2), 8)
    w = torch.randn(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(SliceError, match="NaN"):
        SlicedWeight.from_float(w, (2, 2), 8)
    sw = SlicedWeight.from_float(torch.randn(2, 8), (2, 2), 8)
    with pytest.raises(SliceError, match="k=3"):
        sw.dequant(3)


@pytest.mark.parametrize("gs", [64.0, "64", True, 0, None])
def test_from_float_group_size_type(gs):
    with pytest.raises(SliceError, match="group_size must be a positive integer"):
        SlicedWeight.from_float(torch.randn(2, 128), (2, 2, 2, 2), gs)


@settings(max_examples=20, deadline=None)
@given(value=st.floats(1e12, 3e38), sign=st.sampled_from([1.0, -1.0]))
def test_constant_huge_row_is_refused_or_exact(value, sign):
    """A constant 1e30 row used to dequantize to NaN silently: the result is finite and exact, or a SliceError."""
    w = torch.full((2, 128), sign * value)
    try:
        sw = SlicedWeight.from_float(w, (2, 2, 2, 2), 128)
    except SliceError as exc:
        assert "overflows" in str(exc)
        return
    assert torch.isfinite(sw.dequant()).all()


# --- closed-form straight-through slices (the calibrator's fast path) ------------------------------
@pytest.mark.parametrize("bits", [(2, 2, 2, 2), (3, 1, 2, 2), (4, 2, 2), (3, 3), (1, 1, 1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_ste_equals_recursion(bits, seed):
    """Values bit-identical to the straight-through recursion; gradients of w, s, z_E equal within float32 sums.

    Odd shapes, a clip range shrunk inside min/max (so some weights clamp at both ends),
    every prefix of slices, and a random upstream gradient for every slice.
    """
    gen = torch.Generator().manual_seed(seed)
    n, groups, gs = (7, 3, 5) if seed != 1 else (13, 1, 11)
    w0 = torch.randn(n, groups * gs, generator=gen)
    wg = w0.reshape(n, groups, gs)
    lo = wg.amin(-1) * (0.6 + 0.4 * torch.rand(n, groups, generator=gen))
    hi = wg.amax(-1) * (0.6 + 0.4 * torch.rand(n, groups, generator=gen))
    for k in range(1, len(bits) + 1):
        ups = [torch.randn(n, groups * gs, generator=gen) for _ in range(k)]
        outs, grads = [], []
        for fast in (False, True):
            w = w0.clone().requires_grad_(True)
            xmin, xmax = lo.clone().requires_grad_(True), hi.clone().requires_grad_(True)
            s, z = floor_scale_zero(xmin, xmax, bits)
            if fast:
                d = slice_deltas(w, s, z, bits, gs, ste=True, num_slices=k)
            else:
                d = ste_slices_reference(w, s, z, bits, gs, k)
            sum((di * u).sum() for di, u in zip(d, ups)).backward()
            outs.append(d)
            grads.append((w.grad, xmin.grad, xmax.grad))
        assert len(outs[1]) == k
        for a, b in zip(*outs):
            assert torch.equal(a, b)  # same float32 operations in the same order
        clamped = ~((w0 >= lo.repeat_interleave(gs, 1)) & (w0 <= hi.repeat_interleave(gs, 1)))
        assert clamped.any() and (~clamped).any()  # both branches of the gradient are exercised
        for ga, gb in zip(*grads):
            # the closed form sums the same terms in another order: a few float32 ulps of the terms' size
            tol = 64 * torch.finfo(torch.float32).eps * (1 + ga.abs().max())
            assert (ga - gb).abs().max() <= tol, (bits, k, (ga - gb).abs().max())


def test_closed_form_ste_only_some_slices_used():
    """Slices the loss does not read get no gradient (None upstream) and the rest is still exact."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(6, 24, generator=gen)
    bits = (2, 2, 2, 2)
    res = []
    for fast in (False, True):
        xmin = (w0.reshape(6, 3, 8).amin(-1) * 0.8).requires_grad_(True)
        xmax = (w0.reshape(6, 3, 8).amax(-1) * 0.8).requires_grad_(True)
        s, z = floor_scale_zero(xmin, xmax, bits)
        d = slice_deltas(w0, s, z, bits, 8, ste=True) if fast else ste_slices_reference(w0, s, z, bits, 8, 4)
        (d[0].sum() + 3 * d[2].sum()).backward()
        res.append((xmin.grad, xmax.grad))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_num_slices_checked():
    w = torch.randn(2, 8)
    s, z = floor_scale_zero(w.reshape(2, 1, 8).amin(-1), w.reshape(2, 1, 8).amax(-1))
    for bad in (0, 5, 1.0, True):
        with pytest.raises(SliceError, match="num_slices"):
            slice_deltas(w, s, z, (2, 2, 2, 2), 8, ste=True, num_slices=bad)
