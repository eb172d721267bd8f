"""Uniform asymmetric quantization, RTN and learnable weight clipping (mbq_ref.quantizer)."""

import math

import hypothesis.extra.numpy as hnp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import fake_quant_reference

from mbq_ref.quantizer import (
    LearnableClip,
    QuantError,
    check_weight,
    dequantize,
    fake_quant,
    group_minmax,
    quantize,
    rtn,
    scale_zero,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _grid_weight(n, k, g, bits, seed=0):
    """A weight whose every group lies exactly on its own RTN grid (both grid ends present)."""
    gen = torch.Generator().manual_seed(seed)
    qmax = 2**bits - 1
    q = torch.randint(0, qmax + 1, (n, k // g, g), generator=gen).float()
    q[..., 0], q[..., 1] = 0, qmax  # min and max codes in every group, so min/max = grid ends
    s = 2.0 ** torch.randint(-6, -2, (n, k // g, 1), generator=gen).float()  # powers of 2: exact arithmetic
    z = torch.randint(0, qmax + 1, (n, k // g, 1), generator=gen).float()
    return ((q - z) * s).reshape(n, k)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, None], ids=["g32", "per-channel"])
def test_rtn_of_grid_aligned_weight_is_exact(bits, group_size):
    g = 32 if group_size else 64
    w = _grid_weight(6, 64, g, bits)
    torch.testing.assert_close(rtn(w, bits, group_size), w, rtol=0, atol=1e-6)


def test_scale_zero_known_answer():
    s, z = scale_zero(torch.tensor([[-1.0]]), torch.tensor([[2.0]]), bits=2)
    assert s.item() == 1.0 and z.item() == 1.0
    s, z = scale_zero(torch.tensor([[-0.5]]), torch.tensor([[1.0]]), bits=4)
    assert s.item() == pytest.approx(0.1) and z.item() == 5.0


def test_group_minmax_shape_and_values():
    w = torch.arange(24.0).reshape(2, 12)
    wmin, wmax = group_minmax(w, 4)
    assert wmin.shape == wmax.shape == (2, 3)
    assert wmin[1].tolist() == [12.0, 16.0, 20.0] and wmax[0].tolist() == [3.0, 7.0, 11.0]
    wmin, wmax = group_minmax(w, -1)
    assert wmin.shape == (2, 1) and wmax[:, 0].tolist() == [11.0, 23.0]


def test_error_decreases_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = [(rtn(w, b, 128) - w).pow(2).mean().item() for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # each extra bit roughly quarters the MSE at high precision (uniform noise s^2/12)
    assert 2.5 < errs[-2] / errs[-1] < 6


def test_groups_beat_per_channel_when_rows_have_mixed_scales():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    w[:, :128] *= 10  # one half of every row is 10x larger
    small = slice(128, None)  # per-channel spends the small half's grid on the large half's range
    assert (rtn(w, 3, 128) - w)[:, small].abs().mean() < 0.4 * (rtn(w, 3, None) - w)[:, small].abs().mean()


def test_quantize_dequantize_matches_fake_quant():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    wmin, wmax = group_minmax(w, 16)
    s, z = scale_zero(wmin, wmax, 3)
    q = quantize(w, s, z, 3, 16)
    assert q.dtype == torch.uint8 and int(q.max()) <= 7
    torch.testing.assert_close(dequantize(q, s, z, 16), fake_quant(w, wmin, wmax, 3, 16))


def test_fake_quant_keeps_dtype():
    w = torch.randn(4, 32).half()
    assert rtn(w, 4, 16).dtype == torch.float16


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays("float32", (3, 32), elements=st.floats(-100, 100, width=32)),
    bits=st.integers(1, 8),
    group_size=st.sampled_from([8, 16, 32, None]),
)
def test_rtn_error_at_most_half_step(w, bits, group_size):
    w = torch.from_numpy(w)
    wmin, wmax = group_minmax(w, group_size)
    s, _ = scale_zero(wmin, wmax, bits)
    g = group_size or 32
    step = s.repeat_interleave(g, dim=1)  # [N, K]
    err = (rtn(w, bits, group_size) - w).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-5).all()


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays("float32", (2, 16), elements=st.floats(-10, 10, width=32)),
    bits=st.integers(2, 8),
    lo=st.floats(0.05, 1.0),
    hi=st.floats(0.05, 1.0),
)
def test_clipped_range_bounds(w, bits, lo, hi):
    """Inside [x_min, x_max] the error is <= s/2; outside, Ŵ saturates within s/2 of the range ends."""
    w = torch.from_numpy(w)
    # LWC shrinks min and max towards zero, which narrows the range only for groups
    # that straddle zero (every real group of 128 weights does): make sure they do
    w[:, ::8], w[:, 1::8] = -w[:, ::8].abs() - 0.01, w[:, 1::8].abs() + 0.01
    wmin, wmax = group_minmax(w, 8)
    xmin, xmax = wmin * lo, wmax * hi
    s, _ = scale_zero(xmin, xmax, bits)
    wq = fake_quant(w, xmin, xmax, bits, 8)
    rep = lambda t: t.repeat_interleave(8, dim=1)  # noqa: E731
    s, xmin, xmax = rep(s), rep(xmin), rep(xmax)
    tol = s / 2 * (1 + 1e-4) + 1e-5
    inside = (w >= xmin) & (w <= xmax)
    assert ((wq - w).abs() <= tol)[inside].all()
    assert ((wq >= xmin - tol) & (wq <= xmax + tol)).all()


def test_straight_through_gradients():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    clip = LearnableClip.for_weight(w.detach(), 16)
    xmin, xmax = clip(w.detach())
    fake_quant(w, xmin, xmax, 3, 16).sum().backward()
    inside = (w.detach() > xmin.repeat_interleave(16, 1)) & (w.detach() < xmax.repeat_interleave(16, 1))
    assert torch.equal(w.grad[inside], torch.ones(int(inside.sum())))  # identity through round
    assert clip.gamma.grad.abs().sum() > 0 and clip.beta.grad.abs().sum() > 0


def test_learnable_clip_init_is_close_to_rtn():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    clip = LearnableClip.for_weight(w, 128)
    lo, hi = clip.factors()
    assert torch.allclose(lo, torch.full_like(lo, 1 / (1 + math.exp(-4))))
    xmin, xmax = clip(w)
    wmin, wmax = group_minmax(w, 128)
    torch.testing.assert_close(xmax, wmax * hi)
    e_lwc = (fake_quant(w, xmin, xmax, 4, 128) - w).pow(2).mean()
    e_rtn = (rtn(w, 4, 128) - w).pow(2).mean()
    assert abs(e_lwc / e_rtn - 1) < 0.15
    # with no clipping at all (σ -> 1) LWC is RTN exactly
    wide = LearnableClip.for_weight(w, 128, init=40.0)
    torch.testing.assert_close(fake_quant(w, *wide(w), 4, 128), rtn(w, 4, 128))


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(QuantError, match="bits"):
        rtn(torch.randn(4, 32), bits, 16)


def test_group_size_must_divide():
    with pytest.raises(QuantError, match="does not divide"):
        rtn(torch.randn(4, 96), 4, 64)
    with pytest.raises(QuantError, match="group_size"):
        rtn(torch.randn(4, 96), 4, 0)


def test_nan_weight_names_the_layer():
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(QuantError, match="model.layers.2.mlp.up_proj"):
        rtn(w, 4, 16, name="model.layers.2.mlp.up_proj")
    w[1, 3] = float("inf")
    with pytest.raises(QuantError, match="NaN/inf"):
        check_weight(w, 16)


@pytest.mark.parametrize("shape", [(32,), (2, 4, 32)])
def test_wrong_ndim(shape):
    with pytest.raises(QuantError, match="2-D"):
        rtn(torch.randn(shape), 4, 16)
    with pytest.raises(QuantError, match="2-D"):
        group_minmax(torch.randn(shape), 16)


def test_clip_rejects_other_shapes():
    clip = LearnableClip(4, 32, 16)
    with pytest.raises(QuantError, match="built for"):
        clip(torch.randn(4, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_weights_raise_instead_of_returning_inf(dtype):
    """Weights near +-3e38: the group range overflows float32, which must be an error, not a non-finite result."""
    w = torch.randn(4, 128, dtype=dtype)
    w[0, 0], w[0, 1] = 3e38, -3e38
    with pytest.raises(QuantError, match="too large"):
        rtn(w, 4, 128, name="blk.up_proj")
    w[0, 0], w[0, 1] = 1.5e38, -1.5e38  # still representable: quantized, and finite
    assert torch.isfinite(rtn(w, 4, 128)).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(7, 3, 5), (13, 1, 11), (4, 6, 16)])
def test_fake_quant_closed_form_gradient_equals_autograd(bits, shape):
    """fake_quant's closed-form backward (GridSTE) equals autograd through round_ste, values bit-identical."""
    n, groups, g = shape
    gen = torch.Generator().manual_seed(bits * 100 + n)
    w0 = torch.randn(n, groups * g, generator=gen)
    lo = w0.reshape(n, groups, g).amin(-1) * (0.5 + 0.5 * torch.rand(n, groups, generator=gen))
    hi = w0.reshape(n, groups, g).amax(-1) * (0.5 + 0.5 * torch.rand(n, groups, generator=gen))
    up = torch.randn(n, groups * g, generator=gen)
    res = []
    for fn in (fake_quant_reference, lambda *a: fake_quant(*a)):
        w, xmin, xmax = (t.clone().requires_grad_(True) for t in (w0, lo, hi))
        out = fn(w, xmin, xmax, bits, g)
        (out * up).sum().backward()
        res.append((out.detach(), w.grad, xmin.grad, xmax.grad))
    assert torch.equal(res[0][0], res[1][0])
    for a, b in zip(res[0][1:], res[1][1:]):
        tol = 64 * torch.finfo(torch.float32).eps * (1 + a.abs().max())
        assert (a - b).abs().max() <= tol


def test_learnable_clip_caches_the_weight_range_and_notices_changes():
    """The group min/max is computed once for a frozen weight; γ/β steps and in-place weight edits are seen."""
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    clip = LearnableClip.for_weight(w, 16)

    def fresh():
        wmin, wmax = group_minmax(w, 16)
        lo, hi = clip.factors()
        return lo * wmin, hi * wmax

    assert clip.group_range(w)[0] is clip.group_range(w)[0]  # cached
    # a training step on the logits changes the range at the next call
    opt = torch.optim.SGD(clip.parameters(), lr=10.0)
    sum(t.sum() for t in clip(w)).backward()
    opt.step()
    for a, b in zip(clip(w), fresh()):
        assert torch.equal(a, b)
    # in-place edits of the weight (no_grad mul_, copy_) and a swapped storage are noticed
    with torch.no_grad():
        w.mul_(3.0)
    for a, b in zip(clip(w), fresh()):
        assert torch.equal(a, b)
    w.copy_(torch.randn(6, 32))
    for a, b in zip(clip(w), fresh()):
        assert torch.equal(a, b)
    other = w.clone() * -2
    lo, hi = clip.factors()
    omin, omax = group_minmax(other, 16)
    for a, b in zip(clip(other), (lo * omin, hi * omax)):
        assert torch.equal(a, b)
    # a weight that needs a gradient keeps its min/max in the graph
    wg = w.clone().requires_grad_(True)
    sum(t.sum() for t in clip(wg)).backward()
    assert wg.grad is not None and wg.grad.abs().sum() > 0
