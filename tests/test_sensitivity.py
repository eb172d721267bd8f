"""Per-token sensitivity, overlap statistics, mismatch matrix and retain oracle (mbq_ref.sensitivity)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mbq_ref.calibrate import CalibConfig
from mbq_ref.fakequant import QuantLinear, quant_linears
from mbq_ref.quantizer import QuantError
from mbq_ref.sensitivity import (
    BITS,
    OutlierTokenPolicy,
    RandomTokenPolicy,
    capture_linear_inputs,
    jaccard,
    mismatch_matrix,
    overlap,
    paired_gap,
    retain_experiment,
    sensitivity_report,
    spearman,
    token_errors,
    topk_mask,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_planted_outlier_token_is_top_at_every_bit_width():
    lin = nn.Linear(128, 64)
    x = torch.randn(64, 128, generator=_gen())
    x[7] *= 30
    err = token_errors(x, lin, BITS, group_size=64)
    assert err.abs.shape == err.rel.shape == (len(BITS), 64)
    assert (err.abs.argmax(dim=1) == 7).all()
    # relative error is scale-free: scaling a token does not change it
    torch.testing.assert_close(err.rel[:, 7], token_errors(x[7:8] / 30, lin, BITS, 64).rel[:, 0])


def test_planted_outlier_channel_tokens_are_found():
    """Tokens that light up an input channel whose weight column is large dominate the error."""
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight[:, 5] = 0.9 * lin.weight.abs().max() * torch.sign(torch.randn(64, generator=_gen(1)))
    x = torch.randn(100, 128, generator=_gen(2))
    hot = torch.tensor([3, 17, 42, 55, 61, 80, 88, 90, 93, 99])
    x[hot, 5] = 40.0
    err = token_errors(x, lin, BITS, group_size=64)
    for row in err.abs:
        assert set(topk_mask(row, 0.1).nonzero().flatten().tolist()) == set(hot.tolist())


def test_error_decreases_with_bits():
    x = torch.randn(32, 128, generator=_gen(3))
    err = token_errors(x, torch.randn(48, 128, generator=_gen(4)), BITS, group_size=128)
    means = err.abs.mean(dim=1).tolist()
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_quantlinear_uses_its_own_clip():
    lin = nn.Linear(128, 32)
    q = QuantLinear(lin, bits=3, group_size=64, method="lwc", clip_init=40.0)  # σ ≈ 1: same as RTN
    x = torch.randn(16, 128, generator=_gen(5))
    torch.testing.assert_close(token_errors(x, q, (3,)).abs, token_errors(x, lin, (3,), 64).abs)
    with torch.no_grad():
        q.clip.gamma.fill_(-1.0)
    assert not torch.allclose(token_errors(x, q, (3,)).abs, token_errors(x, lin, (3,), 64).abs)


def test_topk_jaccard_spearman_known_answers():
    v = torch.tensor([0.1, 5.0, 0.3, 9.0, 0.2, 0.0, 0.4, 0.5, 0.6, 0.7])
    assert topk_mask(v, 0.2).nonzero().flatten().tolist() == [1, 3]
    assert topk_mask(v, 0.01).sum() == 1  # at least one token
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    assert jaccard(a, torch.tensor([1, 0, 1, 0], dtype=torch.bool)) == pytest.approx(1 / 3)
    r = torch.arange(10.0)
    assert spearman(r, r**3) == pytest.approx(1.0)
    assert spearman(r, -r) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="frac"):
        topk_mask(v, 0.0)


def test_overlap_matrix_is_symmetric_with_unit_diagonal():
    err = torch.rand(5, 200, generator=_gen(6))
    jac, rho = overlap(err, 0.1)
    assert jac.shape == rho.shape == (5, 5)
    torch.testing.assert_close(jac, jac.T)
    torch.testing.assert_close(torch.diag(rho), torch.ones(5, dtype=rho.dtype))
    assert (jac[~torch.eye(5, dtype=torch.bool)] < 0.5).all()  # independent rows overlap little


def test_capture_and_report_on_a_model():
    model = tiny()
    ids = torch.randint(0, 256, (2, 40), generator=_gen(7))
    inputs = capture_linear_inputs(model, ids)
    assert len(inputs) == 14 and inputs["model.layers.0.self_attn.q_proj"].shape == (80, 128)
    assert inputs["model.layers.1.mlp.down_proj"].shape == (80, 256)
    # q, k and v read the same normalised hidden state
    torch.testing.assert_close(inputs["model.layers.0.self_attn.q_proj"], inputs["model.layers.0.self_attn.v_proj"])
    rep = sensitivity_report(model, ids, group_size=64)
    assert rep.abs.shape == (14, len(BITS), 80)
    jac, rho = rep.overlap("rel")
    assert jac.shape == (14, len(BITS), len(BITS))
    j34, r34 = rep.pair(3, 4)
    assert j34.shape == (14,) and ((0 <= j34) & (j34 <= 1)).all()
    heat, labels = rep.heatmap(tokens=32)
    assert heat.shape == (14 * len(BITS), 32) and labels[0] == "0.self_attn.q_proj @2b"
    torch.testing.assert_close(heat.mean(-1), torch.zeros(len(heat)), atol=1e-5, rtol=0)  # z-scored rows
    torch.testing.assert_close(heat.std(-1), torch.ones(len(heat)))
    assert rep.random_jaccard == pytest.approx(0.1 / 1.9)


def test_policies():
    q = QuantLinear(nn.Linear(128, 32), bits=4, group_size=64)
    x = torch.randn(2, 20, 128, generator=_gen(8))
    x[0, 4] *= 50
    x[1, 11] *= 50
    bits = OutlierTokenPolicy(frac=0.1, low=3, high=4)(q, x)
    assert bits.shape == (2, 20) and (bits == 3).sum(dim=1).tolist() == [2, 2]
    assert bits[0, 4] == 3 and bits[1, 11] == 3
    rnd = RandomTokenPolicy(frac=0.25, low=2, high=6, seed=0)(q, x)
    assert sorted(torch.unique(rnd).tolist()) == [2, 6] and (rnd == 2).sum() == 10


def test_mismatch_matrix_and_retain_experiment():
    model = tiny()
    calib = torch.randint(0, 256, (4, 32), generator=_gen(9))
    stream = torch.randint(0, 256, (400,), generator=_gen(10))
    cfg = CalibConfig(nsamples=4, seqlen=32, epochs=1, batch_size=2, lwc_lr=0.1)
    res = mismatch_matrix(
        model, calib, stream, calib_bits=(2, 3), eval_bits=(3, 4), cfg=cfg, group_size=64,
        seqlen=32, max_windows=3, keep_models=True, progress=False,
    )  # fmt: skip
    assert res.ppl.shape == (2, 2) and torch.isfinite(res.ppl).all() and len(res.rtn) == 2
    assert not quant_linears(model)  # the FP model is left alone
    assert res.at(3, 4) == res.ppl[1, 1]
    assert res.window_nll.shape == (2, 2, 3) and res.rtn_window_nll.shape == (2, 3)
    assert res.nll(3, 4).exp().mean() > 1 and res.nll(3, 4).mean().exp().item() == pytest.approx(res.at(3, 4))
    md = res.to_markdown()
    assert "| LWC 3-bit |" in md and f"**{res.ppl[1, 0]:.2f}**" in md and "RTN" in md
    m3 = res.models[3]
    assert all(m.bits == 3 for m in quant_linears(m3).values())
    out = retain_experiment(m3, stream, frac=0.1, low=3, high=4, seqlen=32, max_windows=3)
    assert list(out.ppl) == ["all 4-bit", "top-10% 3-bit outliers at 3-bit", "random 10% at 3-bit", "all 3-bit"]
    assert out.window_nll["all 3-bit"].shape == (3,)
    assert out["all 4-bit"] == pytest.approx(res.at(3, 4)) and out["all 3-bit"] == pytest.approx(res.at(3, 3))
    assert all(m.token_bits is None for m in quant_linears(m3).values())
    with pytest.raises(QuantError, match="quantized"):
        retain_experiment(model, stream, seqlen=32, max_windows=1)


def test_paired_gap():
    a = torch.tensor([3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    mean, se = paired_gap(a + torch.tensor([0.1, 0.3, 0.1, 0.3], dtype=torch.float64), a)
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.1 * (4 / 3) ** 0.5 / 2)  # sample std / sqrt(n)
    assert paired_gap(a, a) == (0.0, 0.0)
