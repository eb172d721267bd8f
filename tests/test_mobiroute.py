"""MoBiRoute: nested masks, straight-through gates, bits accounting, budget loss, threshold search (mbq_ref.mobiroute)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbq_ref.mobiroute import (
    BitStats,
    MoBiRouter,
    RouteError,
    budget_loss,
    dual_step,
    counts_to_bits,
    logit_to_tau,
    mask_bits,
    nested_masks,
    slice_counts,
    soft_masks,
    ste_masks,
    surrogate_saturation,
    tau_to_logit,
    threshold_for_bits,
    warmup_weight,
)

SLICES = (2, 2, 2, 2)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_forced_logits_known_answer():
    # token 1: every score high -> 4 slices; token 2: slice 2 on, slice 3 off -> 2 slices
    # (slice 4 stays off although its score is high: nesting); token 3: slice 2 off -> base only
    r = torch.tensor([[5.0, 5.0, 5.0], [5.0, -5.0, 5.0], [-5.0, 5.0, 5.0]])
    assert slice_counts(r, tau_to_logit(0.5)).tolist() == [4, 2, 1]
    assert counts_to_bits(slice_counts(r, 0.0), SLICES).tolist() == [8.0, 4.0, 2.0]
    assert nested_masks(r, 0.0).tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    # τ = 0 switches every slice on, τ = 1 none, whatever the scores
    assert slice_counts(r, tau_to_logit(0.0)).tolist() == [4, 4, 4]
    assert slice_counts(r, tau_to_logit(1.0)).tolist() == [1, 1, 1]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    e=st.integers(2, 6),
    taus=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2),
    scale=st.floats(0.1, 30.0),
)
def test_masks_nested_and_monotone_in_tau(seed, e, taus, scale):
    r = torch.randn(40, e - 1, generator=torch.Generator().manual_seed(seed)) * scale
    lo, hi = sorted(taus)
    m_lo, m_hi = nested_masks(r, tau_to_logit(lo)), nested_masks(r, tau_to_logit(hi))
    for m in (m_lo, m_hi):
        # nested: slice e+1 on implies slice e on
        assert not (m[:, 1:] & ~m[:, :-1]).any()
    # raising τ never switches a slice on
    assert not (m_hi & ~m_lo).any()
    assert (slice_counts(r, tau_to_logit(hi)) <= slice_counts(r, tau_to_logit(lo))).all()


def test_ste_masks_forward_hard_backward_soft():
    r = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -0.1]], requires_grad=True)
    m = ste_masks(r, 0.0)
    assert torch.equal(m.detach(), nested_masks(r, 0.0).float())
    (m * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    r2 = r.detach().clone().requires_grad_(True)
    (torch.sigmoid(r2).cumprod(-1) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(r.grad, r2.grad)


def test_bits_from_masks_and_counts_agree():
    r = torch.randn(100, 3, generator=torch.Generator().manual_seed(1))
    u = 0.2
    torch.testing.assert_close(
        mask_bits(nested_masks(r, u).float(), SLICES), counts_to_bits(slice_counts(r, u), SLICES)
    )
    assert counts_to_bits(torch.tensor([1, 2, 3]), (4, 2, 2)).tolist() == [4.0, 6.0, 8.0]
    with pytest.raises(RouteError, match="1..4"):
        counts_to_bits(torch.tensor([0, 2]), SLICES)
    with pytest.raises(RouteError, match="E-1"):
        mask_bits(torch.ones(3, 2), SLICES)


def test_tau_logit_round_trip_and_errors():
    for t in (0.0, 1e-6, 0.3, 0.5, 0.9, 1 - 1e-9, 1.0):
        assert logit_to_tau(tau_to_logit(t)) == pytest.approx(t, rel=1e-9, abs=1e-15)
    assert tau_to_logit(0.5) == 0.0
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(RouteError, match=r"\[0, 1\]"):
            tau_to_logit(bad)


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.2, 5.9, 8.0])
def test_threshold_for_bits_hits_target(target):
    r = torch.randn(1000, 3, generator=torch.Generator().manual_seed(2))
    u = threshold_for_bits(r, SLICES, target)
    bits = counts_to_bits(slice_counts(r, u), SLICES).mean().item()
    # 1000 tokens: one token moves the mean by at most 6/1000 bits
    assert abs(bits - target) <= 0.006 + 1e-9
    # and it survives the round trip through τ (what set_threshold stores)
    assert counts_to_bits(slice_counts(r, tau_to_logit(logit_to_tau(u))), SLICES).mean().item() == pytest.approx(bits)


def test_threshold_for_bits_errors():
    with pytest.raises(RouteError, match="reachable"):
        threshold_for_bits(torch.zeros(4, 3), SLICES, 9.0)
    with pytest.raises(RouteError, match="shape"):
        threshold_for_bits(torch.zeros(4, 0), SLICES, 3.0)


def test_budget_loss_and_warmup():
    b = torch.tensor(5.0, requires_grad=True)
    loss = budget_loss(b, 3.0, SLICES, weight=2.0, ref=0.5)
    assert loss.item() == pytest.approx(2.0 * 0.5 * (2.0 / 6.0) ** 2)
    loss.backward()
    assert b.grad > 0  # above target: the gradient pushes the bits down
    assert budget_loss(torch.tensor(3.0), 3.0, SLICES, 1.0).item() == 0.0
    with pytest.raises(RouteError, match="reachable"):
        budget_loss(b, 1.0, SLICES, 1.0)
    assert [warmup_weight(s, 4, 2.0) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert warmup_weight(0, 0, 2.0) == 2.0


def test_router_shapes_and_input_scale():
    torch.manual_seed(0)
    router = MoBiRouter(64, 3, hidden=16, init_bias=1.0)
    x = torch.randn(2, 5, 64) * 100
    assert router(x).shape == (2, 5, 3)
    router.set_input_scale(x.reshape(-1, 64))
    assert router.in_scale.item() == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-5)
    # with c set, the router reads x / c: the same scores as an unscaled twin fed x / c
    twin = MoBiRouter(64, 3, hidden=16)
    twin.load_state_dict({k: v for k, v in router.state_dict().items() if k != "in_scale"}, strict=False)
    torch.testing.assert_close(router(x), twin(x / router.in_scale))
    with pytest.raises(RouteError):
        MoBiRouter(64, 0)


def test_bit_stats_accounting():
    st_ = BitStats(4)
    counts = torch.tensor([1, 1, 2, 4, 4, 4])
    st_.update(counts, counts_to_bits(counts, SLICES))
    assert st_.tokens == 6 and st_.hist.tolist() == [2, 1, 0, 3]
    assert st_.avg_bits == pytest.approx((2 + 2 + 4 + 8 + 8 + 8) / 6)
    torch.testing.assert_close(st_.fractions(), torch.tensor([2, 1, 0, 3], dtype=torch.float64) / 6)
    st_.reset()
    assert st_.tokens == 0 and math.isnan(st_.avg_bits) and st_.hist.sum() == 0


def test_soft_masks_centred_on_threshold_and_saturation():
    u = 1.5
    r = torch.tensor([[u, u + 30.0, u]], requires_grad=True)
    soft_masks(r, u, temperature=2.0)[..., 0].sum().backward()
    # at r = u the gradient is the peak σ'(0) / T = 1 / (4T)
    assert r.grad[0, 0].item() == pytest.approx(0.25 / 2.0)
    far = torch.tensor([[u + 30.0, u, u]])
    assert surrogate_saturation(far, u, 2.0) == pytest.approx(1 / 3)  # |z| = 15: flat
    assert surrogate_saturation(torch.full((4, 3), u), u, 2.0) == 0.0
    # a bounded score at its bound has no gradient through the tanh either
    assert surrogate_saturation(torch.tensor([[4.0, 0.0, 0.0]]), 0.0, 1.0, score_bound=4.0) == pytest.approx(1 / 3)
    with pytest.raises(RouteError):
        soft_masks(r, math.inf)


def test_dual_step_raises_the_multiplier_over_budget():
    assert dual_step(0.0, 5.0, 3.0, SLICES, 6.0) == pytest.approx(2.0)  # (5 - 3) / 6 * 6
    assert dual_step(1.0, 2.0, 3.0, SLICES, 6.0) == pytest.approx(0.0)
    b = torch.tensor(5.0, requires_grad=True)
    budget_loss(b, 3.0, SLICES, weight=0.0, ref=2.0, multiplier=3.0).backward()
    assert b.grad.item() == pytest.approx(2.0 * 3.0 / 6.0)  # the Lagrangian term's gradient


@pytest.mark.parametrize("target", [2.5, 3.0, 5.0])
def test_router_init_from_data_starts_on_budget(target):
    torch.manual_seed(0)
    router = MoBiRouter(64, 3, hidden=16, score_bound=8.0, spread=1.0)
    x = torch.randn(512, 64)
    assert torch.equal(router(x), 8.0 * torch.tanh(router.raw_scores(x) / 8.0))  # not calibrated yet: raw scores
    router.init_from_data(x, 0.0, SLICES, target)
    r = router(x)  # running statistics (inference)
    assert counts_to_bits(slice_counts(r, 0.0), SLICES).mean().item() == pytest.approx(target, abs=0.02)
    n = router._normalise(router.raw_scores(x)) - router.offset
    torch.testing.assert_close(n.std(0), torch.ones(3), rtol=1e-3, atol=1e-3)  # spread 1 over the tokens
    assert r.abs().max() < 8.0 and surrogate_saturation(r, 0.0, 1.0, 8.0) < 0.01
    # batch statistics while training: the spread cannot run away, whatever the weights do
    router.batch_stats = True
    with torch.no_grad():
        router.fc2.weight.mul_(100.0)
    n = router(x) - router.offset
    assert n.std(0).max() < 1.01 and surrogate_saturation(router(x), 0.0, 1.0, 8.0) < 0.01


@pytest.mark.parametrize("target,tau", [(3.0, 0.5), (2.5, 0.3), (5.25, 0.8)])
def test_settle_offset_hits_target_and_keeps_ranking(target, tau):
    """One offset shift per layer: mean bits at logit(τ) = target, every token's score order unchanged."""
    torch.manual_seed(0)
    router = MoBiRouter(24, 3, hidden=16)
    x = torch.randn(2001, 24)
    router.init_from_data(x, tau_to_logit(tau), SLICES, 6.0)  # trained for another budget
    with torch.no_grad():
        router.fc2.weight.mul_(3)  # the MLP moved since its statistics were taken
        before, n_before = router(x), router._normalise(router.raw_scores(x))
    shift = router.settle_offset(before, tau_to_logit(tau), SLICES, target)
    with torch.no_grad():
        after, n_after = router(x), router._normalise(router.raw_scores(x))
    bits = counts_to_bits(slice_counts(after, tau_to_logit(tau)), SLICES).double().mean()
    assert abs(float(bits) - target) <= 2 * 2 / 2001 + 1e-9  # one token at most on either side
    assert abs(shift) > 0.1
    # every token moved by the same shift (before the monotone bound): the learned ranking is kept
    torch.testing.assert_close(n_after - n_before, torch.full_like(n_before, shift), rtol=0, atol=1e-4)


# --- ladder router (one score per token; docs/design.md) -------------------------------------
def _ladder(seed=0, num_scores=3, k=24):
    torch.manual_seed(seed)
    r = MoBiRouter(k, num_scores, hidden=8, ladder=True)
    x = torch.randn(500, k, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        r.fc2.weight.normal_(std=1.0)
    r.init_from_data(x, 0.0, (2,) * (num_scores + 1), 3.0)
    return r, x


def test_ladder_scores_are_rungs_of_one_score():
    r, x = _ladder()
    s = r(x)
    assert s.shape == (500, 3)
    rung = r.rung
    assert rung > 2 * float(r.score_bound)
    torch.testing.assert_close(s[:, 1:] - s[:, :-1], torch.full((500, 2), -rung), rtol=0, atol=1e-4)
    lo, hi = r.score_limits()
    assert lo < s.min() and s.max() < hi
    assert r.fc2.out_features == 1 and not r.offset.requires_grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ladder_two_adjacent_counts_and_nested_in_the_target(seed):
    """Whatever the target, a layer's tokens read k or k+1 slices; raising the target never
    lowers any token's slice count (nestedness), and the mean bits meet the target."""
    r, x = _ladder(seed)
    scores = r(x)
    prev = None
    for target in [2.0, 2.3, 3.0, 3.9, 4.0, 5.5, 6.0, 7.2, 8.0]:
        u = threshold_for_bits(scores, (2, 2, 2, 2), target)
        k = slice_counts(scores, u)
        assert int(k.max() - k.min()) <= 1, f"target {target}: counts {k.unique().tolist()}"
        assert abs(2.0 * k.double().mean().item() - target) <= 2.0 / len(k) + 1e-9
        if prev is not None:
            assert bool((k >= prev).all()), f"a token lost slices when the target rose to {target}"
        prev = k


def test_per_slice_router_has_no_rungs():
    r = MoBiRouter(8, 3, hidden=4)
    assert r.score_limits() == (-8.0, 8.0) and r.fc2.out_features == 3
    with pytest.raises(RouteError, match="finite score bound"):
        MoBiRouter(8, 3, hidden=4, score_bound=math.inf, ladder=True)
