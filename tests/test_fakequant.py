"""QuantLinear and model surgery on tiny random Llama / Qwen2 / Mistral decoders (mbq_ref.fakequant)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import random_llama

from mbq_ref.fakequant import (
    QuantLinear,
    quant_linears,
    quantizable_linears,
    quantize_model,
    set_bits,
    set_token_bits,
    short_name,
)
from mbq_ref.quantizer import QuantError, rtn


pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": 16}}  # architecture: extra config fields


def tiny(arch: str, seed: int = 0):
    return random_llama(arch, seed=seed, max_position_embeddings=128, **ARCHS[arch])


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantizable_linears_finds_the_seven_projections(arch):
    model = tiny(arch)
    names = list(quantizable_linears(model))
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    assert all(isinstance(m, nn.Linear) for m in quantizable_linears(model).values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_model_swaps_in_place_and_keeps_head_fp(arch):
    model = tiny(arch)
    ref = model(IDS).logits
    head, embed = model.lm_head, model.model.embed_tokens
    out = quantize_model(model, bits=8, group_size=64)
    assert out is model and len(quant_linears(model)) == 14
    assert type(model.lm_head) is nn.Linear and model.lm_head is head and model.model.embed_tokens is embed
    logits8 = model(IDS).logits
    assert (logits8 - ref).abs().max() < 0.05  # 8 bits: close to full precision
    set_bits(model, 2)
    assert (model(IDS).logits - ref).abs().max() > 5 * (logits8 - ref).abs().max()


def test_qwen2_bias_is_kept():
    model = tiny("qwen2")
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.bias is not None
    q = QuantLinear(lin, bits=4, group_size=32)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(q(x), F.linear(x, rtn(lin.weight, 4, 32), lin.bias))


def test_rtn_forward_matches_functional_rtn():
    lin = nn.Linear(64, 16)
    q = QuantLinear(lin, bits=3, group_size=None)
    x = torch.randn(7, 64)
    torch.testing.assert_close(q(x), F.linear(x, rtn(lin.weight, 3, None), lin.bias))
    assert q.weight is lin.weight and not q.weight.requires_grad  # shared, frozen


def test_lwc_trains_only_the_clip():
    q = QuantLinear(nn.Linear(64, 16), bits=3, group_size=32, method="lwc")
    groups = q.calib_parameters("lwc")
    assert len(groups) == 1 and groups[0]["params"] == [q.clip.gamma, q.clip.beta]
    assert q.calib_loss("lwc") == 0.0
    q(torch.randn(4, 64)).pow(2).sum().backward()
    assert q.clip.gamma.grad is not None and q.weight.grad is None
    assert QuantLinear(nn.Linear(64, 16), method="rtn", group_size=32).calib_parameters("lwc") == []


def test_set_bits_keeps_the_learned_clip():
    model = quantize_model(tiny("llama"), bits=3, group_size=64, method="lwc")
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.clip.gamma.fill_(0.0)  # pretend calibration learned σ(γ) = 0.5
    rng3 = layer.clip_range()
    set_bits(model, 6)
    assert layer.bits == 6
    torch.testing.assert_close(layer.clip_range(), rng3)  # same range, finer grid
    xmin, xmax = rng3
    half_step = (xmax - xmin) / (2**6 - 1) / 2
    assert layer.qweight().max() <= (xmax + half_step).max() + 1e-6
    assert len(torch.unique(layer.qweight()[0, :64])) > len(torch.unique(layer.qweight(3)[0, :64]))


def test_token_bits_selects_rows_per_token():
    lin = nn.Linear(64, 8)
    q = QuantLinear(lin, bits=4, group_size=32)
    x = torch.randn(2, 6, 64)
    bits = torch.tensor([[3, 4, 4, 3, 4, 4], [4, 4, 4, 4, 4, 3]])
    q.token_bits = bits
    y = q(x)
    y3, y4 = F.linear(x, rtn(lin.weight, 3, 32), lin.bias), F.linear(x, rtn(lin.weight, 4, 32), lin.bias)
    torch.testing.assert_close(y, torch.where((bits == 3).unsqueeze(-1), y3, y4))
    q.token_bits = lambda layer, inp: torch.full(inp.shape[:-1], 3)  # a policy
    torch.testing.assert_close(q(x), y3)
    q.token_bits = torch.tensor([3, 4])
    with pytest.raises(QuantError, match="token_bits has shape"):
        q(x)


def test_set_token_bits_on_a_model():
    model = quantize_model(tiny("llama"), bits=4, group_size=64)
    ref4 = model(IDS).logits
    set_token_bits(model, lambda layer, x: torch.full(x.shape[:-1], 4))
    torch.testing.assert_close(model(IDS).logits, ref4)
    set_token_bits(model, None)
    assert all(m.token_bits is None for m in quant_linears(model).values())


def test_errors():
    model = quantize_model(tiny("llama"), bits=4, group_size=64)
    with pytest.raises(QuantError, match="already quantized"):
        quantize_model(model, 4, 64)
    with pytest.raises(QuantError, match="does not divide.*model.layers.0.self_attn.q_proj"):
        quantize_model(tiny("llama"), 4, group_size=96)
    with pytest.raises(QuantError, match="unknown method"):
        quantize_model(tiny("llama"), 4, 64, method="gptq")
    with pytest.raises(QuantError, match="bits"):
        set_bits(model, 9)
    with pytest.raises(QuantError, match="no QuantLinear"):
        set_bits(tiny("llama"), 4)
    with pytest.raises(QuantError, match="model.layers"):
        quantizable_linears(nn.Sequential(nn.Linear(4, 4)))
    bad = nn.Linear(32, 4)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN/inf.*'blk.fc'"):
        QuantLinear(bad, group_size=32, name="blk.fc")


def test_short_name_labels_every_projection_and_nothing_else():
    names = list(quantizable_linears(tiny("llama")))
    short = [short_name(n) for n in names]
    assert short[:7] == ["L0.q", "L0.k", "L0.v", "L0.o", "L0.gate", "L0.up", "L0.down"] and short[-1] == "L1.down"
    assert len(set(short)) == len(names)  # labels stay unique
    for other in ("lm_head", "model.embed_tokens", "model.layers.0.mlp.act_fn", "model.layers.0.self_attn.x_proj"):
        assert short_name(other) == other
