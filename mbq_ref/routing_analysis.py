"""Is routing worth its bits? Time-sharing, slice histograms and the acceptance checks (Sec. 4.2, 5).

One MoBiQuant checkpoint can be read at ``k`` slices for every token (a static
``B_k``-bit model). Serving a share ``p`` of the requests at ``k`` slices and the rest
at ``k + 1`` needs no router and costs ``B_k + p (B_{k+1} - B_k)`` bits on average; its
mean NLL is the straight line between the two uniform points ("time-sharing"). A
router earns its place only below that line: at the same measured bits, lower NLL.

* :func:`time_sharing_nll` -- the line, from a checkpoint's uniform readings.
* :func:`slice_histograms` / :func:`slice_crosstab` -- per-layer slice-count histograms
  at a target, and how each token's count moves between two targets (nested routing
  never lowers a token's count when the target rises).
* :func:`acceptance` -- the four checks of the tour report (a)-(d): sweep on or below
  the time-sharing line and smooth, routed vs LWC at 4 bits, routed vs LWC on other
  domains, router vs random and input-norm routing at equal bits.

NLL here is ``ln(perplexity)``: the mean negative log-likelihood per token in nats.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import MBQError

__all__ = [
    "LINE_TOL",
    "RISE_TOL",
    "acceptance",
    "slice_crosstab",
    "slice_histograms",
    "time_sharing_nll",
]

#: (a) a sweep point counts as on the time-sharing line within this many nats (about 0.2 % PPL).
LINE_TOL = 0.002
#: (a) PPL may rise from one sweep point to the next (more bits) by at most this many nats.
RISE_TOL = 0.005


def time_sharing_nll(uniform: dict[float, float], bits: float) -> float:
    """NLL of time-sharing between the two uniform readings around ``bits`` (linear in bits).

    Args:
        uniform: ``{B_k: NLL}`` of the checkpoint read at ``k`` slices for every token.
        bits: measured average bits, within ``[min B_k, max B_k]``.
    Returns:
        the interpolated NLL (nats per token).
    """
    if len(uniform) < 2:
        raise MBQError(f"time-sharing needs at least two uniform readings, got {len(uniform)}")
    pts = sorted((float(b), float(v)) for b, v in uniform.items())
    if not pts[0][0] - 1e-9 <= bits <= pts[-1][0] + 1e-9:
        raise MBQError(f"{bits} bits is outside the uniform readings {pts[0][0]}..{pts[-1][0]}")
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if bits <= b1 + 1e-9:
            w = min(max((bits - b0) / (b1 - b0), 0.0), 1.0)
            return v0 + w * (v1 - v0)
    return pts[-1][1]


@torch.no_grad()
def _counts_per_layer(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Each routed layer's slice count per token over ``ids`` ``[n, T]`` at its current routing, long ``[n*T]``."""
    from .mobiquant import mobi_layers, run_windows

    layers = mobi_layers(model)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda mod, args, _y, n=n: out[n].append(mod.route(args[0]).reshape(-1)))
             for n, m in layers.items()]  # fmt: skip
    try:
        run_windows(model, ids, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).cpu() for n, v in out.items()}


def slice_histograms(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict[str, list[float]]:
    """Per layer, the share of tokens of ``ids`` reading 1..E slices at the current thresholds."""
    from .mobiquant import mobi_layers

    e = {n: m.num_slices for n, m in mobi_layers(model).items()}
    return {n: (torch.bincount(c - 1, minlength=e[n]).double() / max(len(c), 1)).tolist()
            for n, c in _counts_per_layer(model, ids, batch_size).items()}  # fmt: skip


def slice_crosstab(model: nn.Module, ckpt, ids: torch.Tensor, targets: tuple[float, ...], batch_size: int = 8) -> dict:
    """How each token's slice count moves as the target rises (is routing nested?).

    Args:
        ckpt: a loaded :class:`mbq_ref.checkpoint.Checkpoint` of ``model`` (its table sets the targets).
        targets: increasing target bits, e.g. ``(3.0, 4.0, 6.0)``.
    Returns:
        ``{"targets", "tables": [E x E counts (rows: count at the lower target, columns: at
        the next) summed over layers, one per consecutive pair], "lowered": share of
        (token, layer) pairs whose count fell when the target rose}``.
    """
    counts = []
    for t in targets:
        ckpt.set_bits(t)
        counts.append(_counts_per_layer(model, ids, batch_size))
    e = max(int(c.max()) for c in counts[-1].values())
    tables, lowered, total = [], 0, 0
    for lo, hi in zip(counts, counts[1:]):
        tab = torch.zeros(e, e, dtype=torch.long)
        for n in lo:
            tab.index_put_((lo[n] - 1, hi[n] - 1), torch.ones_like(lo[n]), accumulate=True)
            lowered += int((hi[n] < lo[n]).sum())
            total += lo[n].numel()
        tables.append(tab.tolist())
    return {"targets": list(targets), "tables": tables, "lowered": lowered / max(total, 1)}


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "fail")


def acceptance(report: dict) -> dict:
    """The four routing checks of a tour report (``report.json``): numbers and a verdict each.

    (a) every sweep point's NLL at most :data:`LINE_TOL` above the time-sharing line of the
        same checkpoint's uniform readings (``mobiquant.fixed``), and NLL never rising by more
        than :data:`RISE_TOL` from one sweep point to the next;
    (b) routed at 4 bits vs LWC calibrated at 4 bits (``controls`` row at 4.0, paired SE);
    (c) on the other domains at 3 and 4 bits (thresholds from the calibration domain),
        routed vs LWC calibrated at that width (``generalization``), RTN beside;
    (d) router vs random routing with the router's per-layer histogram: better by more than
        2 SE at 3 bits, no worse than 2 SE at 5 bits; input-norm routing reported beside.
    Returns:
        ``{"a": {...}, "b": ..., "c": ..., "d": ..., "verdicts": {"a": "pass"|"fail"|"n/a", ...}}``.
    """
    mq = report["mobiquant"]
    uniform = {float(b): math.log(v["ppl"]) for b, v in mq["fixed"].items()}
    pts = []
    for r in mq["sweep"]:
        nll, bits = math.log(r["ppl"]), r["test_bits"]
        pts.append({"target": r["target"], "bits": bits, "nll": round(nll, 5),
                    "line": round(time_sharing_nll(uniform, bits), 5),
                    "excess": round(nll - time_sharing_nll(uniform, bits), 5)})  # fmt: skip
    rises = [round(b["nll"] - a["nll"], 5) for a, b in zip(pts, pts[1:])]
    a = {"points": pts, "max_excess": max(p["excess"] for p in pts), "max_rise": max(rises, default=0.0)}
    a_ok = a["max_excess"] <= LINE_TOL and a["max_rise"] <= RISE_TOL

    rows = {float(r["target"]): r for r in report.get("controls", {}).get("rows", [])}
    b = None
    if 4.0 in rows and "lwc" in rows[4.0]:
        r = rows[4.0]
        # delta_nll of "lwc" is LWC minus router: > 0 means the router is better
        b = {"router_ppl": r["router"]["ppl"], "router_bits": r["router"]["bits"], "lwc_ppl": r["lwc"]["ppl"],
             "lwc_minus_router": r["lwc"]["delta_nll"], "se": r["lwc"]["se"]}  # fmt: skip
    b_ok = None if b is None else b["lwc_minus_router"] >= 0.0

    c, c_ok = {}, None
    calib = report.get("setup", {}).get("calib_dataset", "austen")
    for dom, drows in report.get("generalization", {}).items():
        if dom == calib:
            continue
        for r in drows:
            if r["target"] in (3.0, 4.0) and r.get("lwc"):
                d = math.log(r["ppl"]) - math.log(r["lwc"])
                c[f"{dom}@{r['target']:g}"] = {"routed": r["ppl"], "bits": r.get("test_bits"), "lwc": r["lwc"],
                                               "rtn": r.get("rtn"), "routed_minus_lwc": round(d, 5)}  # fmt: skip
                c_ok = (c_ok is not False) and d <= 0.0

    d_out, d_ok = {}, None
    for t, need in ((3.0, "better"), (5.0, "no_worse")):
        if t not in rows:
            continue
        r = rows[t]
        rnd, se = r["random"]["delta_nll"], r["random"]["se"]  # random minus router
        ok = rnd > 2 * se if need == "better" else rnd > -2 * se
        d_out[f"{t:g}"] = {"random_minus_router": rnd, "se": se, "norm_minus_router": r.get("norm", {}).get("delta_nll"),
                           "norm_se": r.get("norm", {}).get("se"), "needed": need, "ok": ok}  # fmt: skip
        d_ok = (d_ok is not False) and ok
    verdicts = {"a": _check(a_ok), "b": _check(b_ok), "c": _check(c_ok), "d": _check(d_ok)}
    return {"a": a, "b": b, "c": c, "d": d_out, "verdicts": verdicts}
