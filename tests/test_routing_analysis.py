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
