"""The fast calibrator (closed-form straight-through gradients, cached clip ranges, only the slices a
stage reads) trains exactly what the straight-through autograd reference trains, on a random Llama."""

import copy

import pytest
import torch
from helpers import fake_quant_reference, random_llama, ste_slices_reference

import mbq_ref.fakequant as fakequant_mod
import mbq_ref.mobilinear as mobilinear_mod
from mbq_ref.calibrate import CalibConfig, calibrate_static
from mbq_ref.fakequant import quantizable_linears
from mbq_ref.mobiquant import MoBiConfig, quantize_mobiquant
from mbq_ref.quantizer import LearnableClip, group_minmax

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = CalibConfig(nsamples=8, seqlen=32, epochs=2, batch_size=2, lwc_lr=5e-2)  # 8 steps per block and stage
IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
# the closed form sums the same gradient terms in another order (float32 ulps); Adam's normalised
# steps carry them through 8 steps per stage: the losses agree to ~2e-7 relative (measured), checked at 1e-5
RTOL = 1e-5


@pytest.fixture(scope="module")
def fp_model():
    model = random_llama(hidden=128, layers=2, vocab=256)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # 1% planted outliers: the learned clipping moves, some weights clamp
        for lin in quantizable_linears(model).values():
            spikes = torch.rand(lin.weight.shape, generator=gen) < 0.01
            lin.weight.add_(spikes * 8 * lin.weight.std() * torch.randn(lin.weight.shape, generator=gen))
    return model


@pytest.fixture
def reference(monkeypatch):
    """Patch in the slow path: autograd through the STE recursion for every slice, no cached min/max."""

    def slices(w, s, z, bits, gs, ste=False, num_slices=None):
        assert ste
        return ste_slices_reference(w, s, z, bits, gs)  # all E slices, as before num_slices existed

    def patch():
        monkeypatch.setattr(mobilinear_mod, "slice_deltas", slices)
        monkeypatch.setattr(fakequant_mod, "fake_quant", fake_quant_reference)
        monkeypatch.setattr(LearnableClip, "group_range", lambda self, w: group_minmax(w, self.group_size))

    return patch


def _losses(log):
    return [(e.block, e.stage, e.init_loss, e.final_loss, *e.epoch_losses) for e in log.entries]


def _assert_close(fast, ref):
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert a[:2] == b[:2]
        fa, fb = (torch.tensor(x[2:], dtype=torch.float64) for x in (a, b))
        assert torch.allclose(fa, fb, rtol=RTOL, atol=0), (a, b)


def test_mobiquant_calibration_unchanged(fp_model, reference):
    cfg = MoBiConfig(router_lr=1e-2, calib=CALIB)
    fast_model = copy.deepcopy(fp_model)
    fast = quantize_mobiquant(fast_model, IDS, cfg, progress=False)
    reference()
    ref_model = copy.deepcopy(fp_model)
    ref = quantize_mobiquant(ref_model, IDS, cfg, progress=False)
    f, r = _losses(fast["calib"]), _losses(ref["calib"])
    assert f[0][2] == r[0][2]  # block 0 before training: bit-identical forward
    _assert_close(f, r)
    assert fast["avg_bits"] == pytest.approx(ref["avg_bits"], abs=0.05)
    # the trained clipping agrees too (first layer: before any rounding-order difference compounds)
    a = next(m for n, m in fast_model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    b = next(m for n, m in ref_model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    assert torch.allclose(a.clip.gamma, b.clip.gamma, rtol=RTOL, atol=1e-4)


def test_lwc_calibration_unchanged(fp_model, reference):
    fast = calibrate_static(copy.deepcopy(fp_model), IDS, 3, CALIB, 64, progress=False)[1]
    reference()
    ref = calibrate_static(copy.deepcopy(fp_model), IDS, 3, CALIB, 64, progress=False)[1]
    f, r = _losses(fast), _losses(ref)
    assert f[0][2] == r[0][2]
    _assert_close(f, r)
