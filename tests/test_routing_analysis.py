"""Time-sharing line and the routing acceptance checks (mbq_ref.routing_analysis)."""

import math

import pytest

from mbq_ref.errors import MBQError
from mbq_ref.routing_analysis import LINE_TOL, acceptance, time_sharing_nll

UNIFORM = {2.0: 4.5, 4.0: 4.27, 6.0: 4.256, 8.0: 4.258}


def test_time_sharing_is_the_line_between_neighbours():
    assert time_sharing_nll(UNIFORM, 2.0) == 4.5 and time_sharing_nll(UNIFORM, 8.0) == 4.258
    assert time_sharing_nll(UNIFORM, 3.0) == pytest.approx((4.5 + 4.27) / 2)
    assert time_sharing_nll(UNIFORM, 5.5) == pytest.approx(4.27 + 0.75 * (4.256 - 4.27))
    with pytest.raises(MBQError, match="outside"):
        time_sharing_nll(UNIFORM, 1.5)
    with pytest.raises(MBQError, match="two uniform"):
        time_sharing_nll({2.0: 1.0}, 2.0)


def _report(sweep_nll, lwc4=4.3, rnd3=(0.04, 0.01), rnd5=(0.0, 0.002), dom=(3.6, 3.7)):
    fixed = {str(int(b)): {"ppl": math.exp(v)} for b, v in UNIFORM.items()}
    sweep = [{"target": b, "test_bits": b, "ppl": math.exp(v)} for b, v in sweep_nll]
    row = lambda t, r: {"target": t, "router": {"bits": t, "ppl": 1.0}, "random": {"delta_nll": r[0], "se": r[1]},
                        "norm": {"delta_nll": 0.01, "se": 0.005}}  # fmt: skip
    rows = [row(3.0, rnd3), row(5.0, rnd5), {**row(4.0, (0, 0)), "lwc": {"ppl": math.exp(lwc4), "delta_nll": 0.03, "se": 0.01}}]
    gen = {"austen": [], "bible": [{"target": 3.0, "test_bits": 3.0, "ppl": math.exp(dom[0]), "lwc": math.exp(dom[1]), "rtn": 40.0}]}
    return {"mobiquant": {"fixed": fixed, "sweep": sweep}, "controls": {"rows": rows}, "generalization": gen,
            "setup": {"calib_dataset": "austen"}}  # fmt: skip


def test_acceptance_passes_below_the_line_and_fails_above_it():
    good = acceptance(_report([(2.0, 4.5), (3.0, 4.35), (4.0, 4.27), (6.0, 4.256), (8.0, 4.258)]))
    assert good["verdicts"] == {"a": "pass", "b": "pass", "c": "pass", "d": "pass"}
    assert good["a"]["points"][1]["excess"] == pytest.approx(4.35 - 4.385, abs=1e-5)
    above = acceptance(_report([(2.0, 4.5), (3.0, 4.385 + 2 * LINE_TOL), (8.0, 4.258)]))
    assert above["verdicts"]["a"] == "fail"
    rising = acceptance(_report([(2.0, 4.5), (6.0, 4.25), (7.0, 4.2575), (8.0, 4.258)]))
    assert rising["a"]["max_rise"] == pytest.approx(0.0075, abs=1e-5) and rising["verdicts"]["a"] == "fail"


def test_acceptance_b_c_d_can_fail():
    base = [(2.0, 4.5), (8.0, 4.258)]
    r = acceptance(_report(base, rnd3=(0.01, 0.01), rnd5=(-0.01, 0.002), dom=(3.8, 3.7)))
    assert r["verdicts"]["c"] == "fail" and r["verdicts"]["d"] == "fail"
    assert r["d"]["3"]["ok"] is False and r["d"]["5"]["ok"] is False
    rep = _report(base)
    rep["controls"]["rows"][2]["lwc"]["delta_nll"] = -0.01  # LWC better than the router at 4 bits
    assert acceptance(rep)["verdicts"]["b"] == "fail"
    rep["controls"]["rows"] = []
    assert acceptance(rep)["verdicts"]["b"] == "n/a" and acceptance(rep)["verdicts"]["d"] == "n/a"


def test_histograms_and_crosstab_on_a_calibrated_ladder(tmp_path):
    """Slice histograms sum to one per layer; a ladder's counts never fall as the target rises (nested)."""
    import torch

    from mbq_ref.calibrate import CalibConfig
    from mbq_ref.checkpoint import load_checkpoint, save_checkpoint
    from mbq_ref.mobiquant import MoBiConfig
    from mbq_ref.routing_analysis import slice_crosstab, slice_histograms
    from mbq_ref.thresholds import quantize_and_table
    from mbq_ref.zoo.random import random_llama

    torch.manual_seed(0)
    model = random_llama(hidden=64, layers=1, vocab=128)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = MoBiConfig(group_size=32, router_hidden=4, calib=CalibConfig(nsamples=4, seqlen=32, epochs=1, batch_size=2, dataset="random"))
    res = quantize_and_table(model, ids, cfg, (3.0, 4.0, 6.0), threshold_windows=4, progress=False)
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"base_model": "random"}, thresholds=res["thresholds"])
    ck = load_checkpoint(path, with_tokenizer=False)
    ck.set_bits(3.0)
    hist = slice_histograms(ck.model, ids)
    assert len(hist) == 7 and all(abs(sum(h) - 1.0) < 1e-9 for h in hist.values())
    assert all(sum(v > 0 for v in h) <= 2 for h in hist.values())  # a ladder: two adjacent counts per layer
    ct = slice_crosstab(ck.model, ck, ids, (3.0, 4.0, 6.0))
    assert ct["lowered"] == 0.0 and len(ct["tables"]) == 2
    total = sum(map(sum, ct["tables"][0]))
    assert total == 7 * ids.numel()  # every (token, layer) pair counted once
    for tab in ct["tables"]:
        assert all(tab[i][j] == 0 for i in range(len(tab)) for j in range(i))  # nothing below the diagonal
