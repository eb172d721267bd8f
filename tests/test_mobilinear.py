"""MoBiLinear: routed slices, gather/scatter, freezing, modes, calibration contract, errors (mbq_ref.mobilinear)."""

import pytest
import torch
from torch import nn

from mbq_ref.mobilinear import MoBiError, MoBiLinear, sliced_matmul
from mbq_ref.mobiroute import RouterBudget, slice_counts, threshold_for_bits
from mbq_ref.quantizer import QuantError

K, N, G = 256, 96, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(seed=0, bias=True, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    return MoBiLinear(lin, group_size=G, name="blk.proj", **kw), lin


def _x(seed=1, shape=(3, 40)):
    return torch.randn(*shape, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_fixed_k_equals_dense_dequant(k):
    layer, lin = _layer()
    x = _x()
    layer.fixed_k = k
    y = layer(x)
    ref = x @ layer.sliced.dequant(k).T + lin.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert layer.avg_bits == 2 * k
    assert layer.stats.hist.tolist() == [120 if j == k - 1 else 0 for j in range(4)]


def test_all_slices_on_is_the_8bit_dequant():
    layer, lin = _layer()
    layer.tau = 0.0  # every gate above τ
    x = _x()
    torch.testing.assert_close(layer(x), x @ layer.sliced.dequant(4).T + lin.bias, rtol=1e-5, atol=1e-5)
    assert layer.avg_bits == 8.0
    # the 8-bit reading is the code Q_4 itself: 256 levels per group
    assert layer.sliced.codes.dtype == torch.uint8


def test_gather_scatter_equals_masked_dense():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, K, generator=gen)
    deltas = [torch.randn(N, K, generator=gen) for _ in range(4)]
    for trial in range(3):
        counts = torch.randint(1, 5, (200,), generator=gen)
        if trial == 2:
            counts[:] = 1  # no token reads a residual slice
        dense = sum((counts >= e + 1).float()[:, None] * (x @ deltas[e].T) for e in range(4))
        torch.testing.assert_close(sliced_matmul(x, deltas, counts), dense, rtol=1e-4, atol=1e-3)


def test_slice_deltas_sum_to_each_reading():
    layer, _ = _layer()
    layer.freeze()
    acc = torch.zeros(N, K, dtype=torch.float64)
    for k in range(1, 5):
        acc = acc + layer._deltas[k - 1]
        torch.testing.assert_close(acc.float(), layer.dequant(k), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", ["base", "joint"])
def test_calibration_forward_equals_inference_after_freeze(stage):
    layer, _ = _layer(router_init_bias=0.0, routing="per_slice")
    x = _x()
    with torch.no_grad():
        layer.router.fc2.weight.normal_(std=1.0)  # spread the scores: a real mix of slice counts
    layer.calib_stage = stage
    with torch.no_grad():
        y_cal = layer(x)
    layer.calib_stage = None
    if stage == "base":
        layer.fixed_k = 1  # stage "base" reads the base slice for every token
    y_inf = layer(x)
    torch.testing.assert_close(y_inf, y_cal, rtol=1e-5, atol=1e-5)
    if stage == "joint":
        hist = layer.stats.hist
        assert (hist > 0).sum() >= 2, f"expected a mix of slice counts, got {hist.tolist()}"


def test_token_slices_override_and_bits():
    layer, lin = _layer()
    x = _x(shape=(2, 5))
    ks = torch.tensor([[1, 2, 3, 4, 1], [4, 4, 2, 1, 3]])
    layer.token_slices = ks
    y = layer(x)
    for b in range(2):
        for t in range(5):
            ref = x[b, t] @ layer.sliced.dequant(int(ks[b, t])).T + lin.bias
            torch.testing.assert_close(y[b, t], ref, rtol=1e-5, atol=1e-5)
    assert layer.avg_bits == pytest.approx(2 * ks.float().mean().item())
    layer.reset_stats()
    layer.token_slices = lambda mod, inp: torch.full(inp.shape[:-1], 2)  # a policy works too
    layer(x)
    assert layer.avg_bits == 4.0 and layer.stats.tokens == 10
    layer.token_slices = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(MoBiError, match="token_slices has shape"):
        layer(x)
    layer.token_slices = torch.full((2, 5), 5)
    with pytest.raises(MoBiError, match="1..4"):
        layer(x)


def test_router_gets_gradient_from_output_and_budget():
    layer, _ = _layer(budget=RouterBudget(train_bits=2.0, weight=1.0, dual_step=6.0), routing="per_slice")
    layer.calib_stage = "joint"
    x = _x()
    y = layer(x)
    (y.pow(2).mean() + layer.calib_loss("joint")).backward()
    assert layer.router.offset.grad.abs().sum() > 0 and layer.router.fc1.weight.grad.abs().sum() > 0
    assert layer.clip.gamma.grad.abs().sum() > 0
    # the first joint forward started the router on budget (target 2 = base slice only)
    assert layer._last == {} and layer.router.score_std.min() > 0
    # budget alone, every token pushed up to 8 bits: it pulls every score down
    with torch.no_grad():
        layer.router.offset.fill_(6.0)
    layer.zero_grad()
    layer(x)
    layer.calib_loss("joint").backward()
    assert (layer.router.offset.grad > 0).all()
    assert layer.budget.multiplier > 0  # and the dual step raised the multiplier


@pytest.mark.parametrize("bits", [2.0, 2.5, 3.0, 4.7, 6.25, 8.0])
def test_ladder_joint_step_meets_its_budget_and_equals_eq6(bits):
    """A ladder's joint forward at budget b: two adjacent slice counts, mean bits b (one token's
    granularity), output = Eq. 6 at those counts (the frozen inference path with the same counts)."""
    layer, _ = _layer(router_init_bias=0.0)
    x = _x()
    with torch.no_grad():
        layer.router.fc2.weight.normal_(std=1.0)
    layer.calib_stage = "joint"
    layer.step_bits = bits
    with torch.no_grad():
        y_cal = layer(x)
        r = layer.router(x.reshape(-1, K))  # same batch statistics as the forward
    counts = slice_counts(r, threshold_for_bits(r, layer.slice_bits, bits))
    assert counts.max() - counts.min() <= 1
    t = counts.numel()
    assert abs(2.0 * counts.double().mean().item() - bits) <= 2.0 / t + 1e-9
    assert abs(float(layer._last["bits"]) - bits) <= 2.0 / t + 1e-6
    layer.calib_stage = None
    layer.token_slices = counts.reshape(x.shape[:-1])
    torch.testing.assert_close(layer(x), y_cal, rtol=1e-5, atol=1e-5)


def test_ladder_router_learns_from_the_output_only():
    layer, _ = _layer()
    layer.calib_stage = "joint"
    layer.step_bits = 3.0
    y = layer(_x())
    assert layer.calib_loss("joint") == 0.0  # the quantile threshold meets the budget: no budget loss
    y.pow(2).mean().backward()
    assert layer.router.fc1.weight.grad.abs().sum() > 0 and layer.clip.gamma.grad.abs().sum() > 0
    assert layer.router.offset.grad is None  # not trained: the threshold sets the level
    names = {id(p) for g in layer.calib_parameters("joint") for p in g["params"]}
    assert id(layer.router.offset) not in names


def test_unknown_routing_is_refused():
    with pytest.raises(MoBiError, match="unknown routing 'mix'"):
        _layer(routing="mix")


def test_calib_parameters_per_stage():
    layer, _ = _layer()
    base = layer.calib_parameters("base")
    joint = layer.calib_parameters("joint")
    assert [g["name"] for g in base] == ["lwc"] and [g["name"] for g in joint] == ["lwc", "router"]
    assert sum(p.numel() for g in base for p in g["params"]) == 2 * N * (K // G)
    assert layer.calib_loss("base") == 0.0
    assert not layer.weight.requires_grad
    with pytest.raises(MoBiError, match="stage"):
        layer.calib_parameters("lwc")
    with pytest.raises(MoBiError, match="stage"):
        layer.calib_stage = "warmup"


def test_setting_a_stage_drops_the_frozen_codes():
    layer, _ = _layer()
    layer.fixed_k = 1
    layer(_x())
    codes = layer.sliced.codes.clone()
    layer.calib_stage = "base"
    assert layer.sliced is None
    with torch.no_grad():
        layer.clip.gamma.fill_(-1.0)  # shrink the clip range a lot
    layer.calib_stage = None
    layer(_x())
    assert not torch.equal(codes, layer.sliced.codes)


def test_fixed_k_reconstruction_term():
    layer, _ = _layer(fixed_k_weight=1.0, budget=RouterBudget(weight=0.0), routing="per_slice")
    layer.calib_stage = "joint"
    layer(_x())
    loss = layer.calib_loss("joint")
    # first step: every e_k / e_k^0 = 1
    assert loss.item() == pytest.approx(layer.budget.ref, rel=1e-5)
    loss.backward()
    assert layer.clip.gamma.grad.abs().sum() > 0


def test_errors_name_the_layer():
    layer, lin = _layer()
    with pytest.raises(MoBiError, match="blk.proj.*expects 256"):
        layer(torch.randn(4, K + 1))
    bad = _x()
    bad[0, 3, 7] = float("nan")
    with pytest.raises(MoBiError, match="blk.proj.*NaN"):
        layer(bad)
    layer.calib_stage = "joint"
    bad[0, 3, 7] = float("inf")
    with pytest.raises(MoBiError, match="NaN/inf"):
        layer(bad)
    for k in (0, 5, 2.0, True):
        with pytest.raises(MoBiError, match="k must be"):
            layer.check_k(k)
    with pytest.raises(MoBiError, match=r"\[0, 1\]"):
        layer.tau = 2.0
    w = nn.Linear(K, N)
    with torch.no_grad():
        w.weight[1, 2] = float("inf")
    with pytest.raises(QuantError, match="NaN/inf.*lin.bad"):
        MoBiLinear(w, group_size=G, name="lin.bad")
    with pytest.raises(MoBiError, match="1..8 bits"):
        MoBiLinear(lin, slice_bits=(2, 9), group_size=G, name="x")
    with pytest.raises(MoBiError, match="at least 2 slices"):
        MoBiLinear(lin, slice_bits=(4,), group_size=G, name="x")
    with pytest.raises(MoBiError, match="empty"):
        MoBiLinear(lin, slice_bits=(), group_size=G, name="x")
    with pytest.raises(QuantError, match="does not divide"):
        MoBiLinear(lin, group_size=100, name="x")
    with pytest.raises(MoBiError, match="train_bits"):
        MoBiLinear(lin, group_size=G, budget=RouterBudget(train_bits=9.0), name="x")


def test_no_bias_and_fp16_inputs():
    layer, _ = _layer(bias=False)
    layer.fixed_k = 2
    x = _x().half()
    y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), x.float() @ layer.sliced.dequant(2).T, rtol=1e-2, atol=1e-2)


def test_token_errors_known_answer():
    layer, lin = _layer()
    x = _x(shape=(2, 7))
    err = layer.token_errors(x)  # [4, 14]
    y_fp = x.reshape(-1, K) @ lin.weight.T
    for k in range(1, 5):
        ref = ((y_fp - x.reshape(-1, K) @ layer.dequant(k).T) ** 2).sum(-1)
        torch.testing.assert_close(err[k - 1], ref, rtol=1e-4, atol=1e-6)
    assert (err[1:] < err[:-1]).float().mean() > 0.9  # each slice cuts almost every token's error


def test_set_sliced_serves_given_codes():
    src, _ = _layer(seed=0)
    dst, _ = _layer(seed=5)  # another weight: serving src's codes must reproduce src
    dst.set_sliced(src.freeze())
    dst.fixed_k = src.fixed_k = 3
    x = _x()
    torch.testing.assert_close(dst(x) - dst.bias, src(x) - src.bias)
    other = MoBiLinear(nn.Linear(K, 2 * N), group_size=G, name="wide")
    with pytest.raises(MoBiError, match="does not fit layer 'wide'"):
        other.set_sliced(src.sliced)


def test_bf16_forward_keeps_the_float32_slices():
    """A bfloat16 call (even one that fails on the bias dtype) must not replace the cached float32 readings."""
    layer, _ = _layer()
    x = _x()
    layer.fixed_k = 4
    with torch.no_grad():
        before = layer(x)
        try:
            layer(x.to(torch.bfloat16))  # the float32 bias makes this raise; it must leave no trace
        except RuntimeError:
            pass
        layer.bias = None
        layer(x.to(torch.bfloat16))  # a bf16 call that succeeds
        layer.bias = _layer()[0].bias
        after = layer(x)
    assert torch.equal(before, after)
    assert all(d.dtype != torch.bfloat16 for d in layer._deltas)
