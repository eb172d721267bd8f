"""Block-wise calibration (mbq_ref.calibrate) on tiny random Llama / Qwen2 / Mistral decoders."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import random_llama

from mbq_ref.calibrate import (
    CalibConfig,
    CalibrationError,
    calibrate_blocks,
    calibrate_static,
    capture_block_inputs,
    full_precision,
)
from mbq_ref.fakequant import QuantLinear, quant_linears, quantize_model


pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {  # case: (architecture, extra config fields)
    "llama": ("llama", {}),
    "llama-eager": ("llama", {"attn_implementation": "eager"}),  # explicit mask tensor
    # layer 1 uses a sliding window, layer 0 full attention: one mask per layer
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "mistral": ("mistral", {"sliding_window": 8}),
}
CFG = CalibConfig(nsamples=8, seqlen=32, epochs=3, batch_size=2, lwc_lr=0.2)  # 12 steps per block
IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def tiny(arch: str = "llama", seed: int = 0, heavy_tails: bool = False):
    base, extra = ARCHS[arch]
    model = random_llama(base, seed=seed, max_position_embeddings=128, **extra)
    if heavy_tails:  # a few large weights per group, as in trained LLMs: clipping pays off
        with torch.no_grad():
            for lin in model.modules():
                if isinstance(lin, nn.Linear) and lin is not model.lm_head:
                    mask = torch.rand(lin.weight.shape) < 0.01
                    lin.weight[mask] *= 8
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_captured_inputs_replay_the_model(arch):
    """Layer 0's captured input plus each layer's captured kwargs reproduce the model's hidden states."""
    model = tiny(arch)
    x, kwargs = capture_block_inputs(model, IDS, batch_size=3)
    assert x.shape == (8, 32, 128) and len(kwargs) == 2 and "position_embeddings" in kwargs[0]
    ref = model.model(IDS, output_hidden_states=True)
    with torch.no_grad():
        torch.testing.assert_close(x, ref.hidden_states[0])
        for i, layer in enumerate(model.model.layers):
            x = layer(x, **kwargs[i])
        torch.testing.assert_close(model.model.norm(x), ref.last_hidden_state, rtol=1e-4, atol=1e-4)
        # the first layer's output too (hidden_states[-1] is after the final norm)
        torch.testing.assert_close(model.model.layers[0](ref.hidden_states[0], **kwargs[0]), ref.hidden_states[1])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_calibration_lowers_block_mse_vs_rtn(arch):
    model = tiny(arch, heavy_tails=True)
    rtn = quantize_model(copy.deepcopy(model), 3, 64, method="rtn")
    rtn_log = calibrate_blocks(rtn, IDS, CFG, progress=False)  # nothing to train: measures RTN's MSE
    assert all(e.n_params == 0 and e.init_loss == e.final_loss for e in rtn_log.entries)
    _, log = calibrate_static(model, IDS, 3, CFG, group_size=64, progress=False)
    assert all(isinstance(m, QuantLinear) and m.method == "lwc" for m in quant_linears(model).values())
    for e, r in zip(log.entries, rtn_log.entries):
        assert e.final_loss < e.init_loss
        assert e.final_loss < 0.9 * r.final_loss, (e, r)
    assert len(log.entries[0].epoch_losses) == CFG.epochs
    assert "| 1 | lwc |" in log.table()


def test_same_seed_is_bit_identical():
    base = tiny(heavy_tails=True)
    cfg = CalibConfig(**{**CFG.__dict__, "epochs": 1})
    a, b = (quantize_model(copy.deepcopy(base), 3, 64, method="lwc") for _ in range(2))
    log_a, log_b = (calibrate_blocks(m, IDS, cfg, progress=False) for m in (a, b))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert [e.epoch_losses for e in log_a.entries] == [e.epoch_losses for e in log_b.entries]
    c = quantize_model(copy.deepcopy(base), 3, 64, method="lwc")
    calibrate_blocks(c, IDS, CalibConfig(**{**cfg.__dict__, "seed": 1}), progress=False)
    assert not torch.equal(c.model.layers[0].mlp.up_proj.clip.gamma, a.model.layers[0].mlp.up_proj.clip.gamma)


def test_grad_flags_restored_and_weights_untouched():
    model = quantize_model(tiny(), 3, 64, method="lwc")
    before = {n: p.clone() for n, p in model.named_parameters() if "clip" not in n}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calibrate_blocks(model, IDS, CalibConfig(**{**CFG.__dict__, "epochs": 1}), progress=False)
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], n
        if n in before:
            assert torch.equal(p, before[n]), n
    assert all(m.calib_stage is None for m in quant_linears(model).values())


def test_nan_loss_names_the_block():
    model = quantize_model(tiny(), 3, 64, method="lwc")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="block 1, stage 'lwc'"):
        calibrate_blocks(model, IDS, CFG, progress=False)


def test_bad_calib_ids():
    with pytest.raises(CalibrationError, match="nsamples, seqlen"):
        calibrate_blocks(quantize_model(tiny(), 3, 64, method="lwc"), IDS[0], CFG, progress=False)


class ScaledLinear(nn.Module):
    """A toy calibratable module: ``y = a * (x W^T) + bias``, ``a`` trained only in the "joint" stage."""

    def __init__(self, linear: nn.Linear, a: float):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.a = nn.Parameter(torch.tensor(a))
        self.calib_stage, self.stages_seen = None, []

    def forward(self, x):
        return F.linear(x, self.weight * self.a, self.bias)

    def calib_parameters(self, stage):
        return [{"params": [self.a], "name": "scale"}] if stage == "joint" else []

    def calib_loss(self, stage):
        self.stages_seen.append((stage, self.calib_stage))
        return 0.0 * self.a


def test_generic_contract_stages_lrs_and_fp_reference():
    """Any module with calib_parameters/calib_loss is trained; the FP reference is F.linear(x, W, b)."""
    model = tiny()
    for layer in model.model.layers:
        layer.mlp.up_proj = ScaledLinear(layer.mlp.up_proj, a=0.5)
    cfg = CalibConfig(**{**CFG.__dict__, "epochs": 15, "lwc_lr": 1e-9, "lrs": {"scale": 0.05}})
    log = calibrate_blocks(model, IDS, cfg, stages=("base", "joint"), progress=False)
    assert [(e.block, e.stage, e.n_params) for e in log.entries] == [
        (0, "base", 0), (0, "joint", 1), (1, "base", 0), (1, "joint", 1)
    ]  # fmt: skip
    for layer in model.model.layers:
        mod = layer.mlp.up_proj
        assert {s for s, _ in mod.stages_seen} == {"joint"} and all(s == c for s, c in mod.stages_seen)
        assert mod.calib_stage is None
        assert abs(mod.a.item() - 1.0) < 0.05  # recovered the full-precision layer
    assert log.final_losses("joint")[0] < 0.01 * log.init_losses("joint")[0]


def test_full_precision_context():
    model = quantize_model(tiny(), 2, 64, method="rtn")
    layer = model.model.layers[0]
    lin = layer.self_attn.q_proj
    x = torch.randn(3, 128)
    with full_precision(layer):
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    assert not torch.allclose(lin(x), F.linear(x, lin.weight))


def test_presets():
    tiny_cfg, paper = CalibConfig.tiny(), CalibConfig.paper()
    assert (paper.nsamples, paper.seqlen, paper.epochs, paper.batch_size, paper.lwc_lr, paper.wd) == (
        128, 2048, 20, 1, 1e-2, 0.0
    )  # fmt: skip
    assert tiny_cfg.seqlen == 256 and tiny_cfg.nsamples * tiny_cfg.epochs < paper.nsamples * paper.epochs
