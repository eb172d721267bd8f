"""Which router? An ablation of the routing design and the router width at equal effective bits.

    python scripts/routing_study.py                       # every config (about 30-60 min on 2 CPU cores)
    python scripts/routing_study.py --configs ladder_h4   # one config (results are cached per config)

Each config calibrates MoBiQuant on the tiny model with the tour's settings
(``MoBiConfig.tiny()``, austen train windows), then, on the tour's evaluation windows
(austen test, first 16 x 512):

* the uniform readings (every token reads k slices) and routed points at several targets;
* the time-sharing line between the uniform readings and each routed point's excess over it;
* random routing and input-norm routing with the router's own per-layer histogram at 3 and
  5 bits (paired SE over windows; ``mbq_ref.routing_controls``);
* the router cost (``mbq_ref.mobiquant.router_cost``): effective bits = measured bits +
  router parameters at 16 bits per quantized weight.

Writes ``docs/results_routing.json`` (every number), ``docs/results_routing.md`` and
``docs/routing_study.png``; per-config results are cached in ``runs/routing_study/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mbq_ref.data import calibration_windows, load_corpus, tokenize_corpus  # noqa: E402
from mbq_ref.mobiquant import MoBiConfig, average_bits, reset_bit_stats, router_cost, set_slices  # noqa: E402
from mbq_ref.perplexity import perplexity  # noqa: E402
from mbq_ref.routing_analysis import time_sharing_nll  # noqa: E402
from mbq_ref.routing_controls import norm_routing, paired_delta, random_routing  # noqa: E402
from mbq_ref.mobiquant import set_threshold, set_token_slices  # noqa: E402
from mbq_ref.thresholds import quantize_and_table, threshold_table  # noqa: E402
from mbq_ref.tour import TOUR_SEQLEN  # noqa: E402
from mbq_ref.zoo import load_model  # noqa: E402

CONFIGS = {
    "per_slice_h64": {"routing": "per_slice", "router_hidden": 64},
    "ladder_h4": {"routing": "ladder", "router_hidden": 4},
    "ladder_h16": {"routing": "ladder", "router_hidden": 16},
    "ladder_h64": {"routing": "ladder", "router_hidden": 64},
}
TARGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
CONTROL_BITS = (3.0, 5.0)
WINDOWS = 16
CACHE = ROOT / "runs" / "routing_study"


def _eval(model, ids) -> dict:
    reset_bit_stats(model)
    res = perplexity(model, ids, seqlen=TOUR_SEQLEN, max_windows=WINDOWS, batch_size=8, progress=False)
    return {"bits": average_bits(model), "ppl": res.ppl, "nll": math.log(res.ppl), "window_nll": list(map(float, res.window_nll))}


def run_config(name: str, over: dict) -> dict:
    torch.manual_seed(0)
    model, tok = load_model("tiny-llama", with_tokenizer=True)
    cfg = replace(MoBiConfig.tiny(), **over)
    train = tokenize_corpus(tok, load_corpus(cfg.calib.dataset, "train"))
    calib_ids = calibration_windows(train, cfg.calib.nsamples, cfg.calib.seqlen, seed=cfg.calib.seed)
    test = tokenize_corpus(tok, load_corpus("austen", "test"))
    t0 = time.time()
    qm = copy.deepcopy(model)
    res = quantize_and_table(qm, calib_ids, cfg, TARGETS, threshold_windows=4, progress=True)
    calib_s = time.time() - t0
    out = {"name": name, "config": over, "calibration_seconds": round(calib_s, 1), "load": os.getloadavg(),
           "router_cost": router_cost(qm), "uniform": {}, "routed": [], "controls": []}  # fmt: skip
    for k in range(1, len(cfg.slice_bits) + 1):
        set_slices(qm, k)
        r = _eval(qm, test)
        out["uniform"][str(round(r["bits"]))] = {"ppl": r["ppl"], "nll": r["nll"]}
    set_slices(qm, None)
    uniform = {float(b): v["nll"] for b, v in out["uniform"].items()}
    table = res["thresholds"]
    for t in TARGETS:
        set_threshold(qm, table[t]["logits"], logit=True)
        r = _eval(qm, test)
        line = time_sharing_nll(uniform, r["bits"])
        row = {"target": t, "bits": r["bits"], "ppl": r["ppl"], "nll": r["nll"], "line": line, "excess": r["nll"] - line}
        if t in CONTROL_BITS:
            for ctl, policy in (("random", random_routing(0)), ("norm", norm_routing())):
                set_token_slices(qm, policy)
                c = _eval(qm, test)
                set_token_slices(qm, None)
                d, se = paired_delta(c["window_nll"], r["window_nll"])
                row[ctl] = {"bits": c["bits"], "ppl": c["ppl"], "minus_router": d, "se": se}
        out["routed"].append(row)
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, (name, r) in enumerate(results.items()):
        cost = r["router_cost"]["router_bits_per_weight"]
        xs = [p["bits"] + cost for p in r["routed"]]
        ax.plot(xs, [p["excess"] for p in r["routed"]], "o-", label=f"{name} (+{cost:.2f} bits router)")
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("effective bits per weight (measured + router parameters at 16 bits)")
    ax.set_ylabel("NLL minus time-sharing line (nats)")
    ax.set_title("Routing designs against time-sharing (austen test, 16 x 512)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results: dict) -> str:
    lines = ["# Routing designs and router width (tiny model)", "",
             "Generated by `python scripts/routing_study.py` (settings in its docstring). NLL in nats per token; "
             "excess = NLL minus the time-sharing line of the same checkpoint's uniform readings at the same measured "
             "bits (negative = routing beats serving uniform readings in proportion). Effective bits add the router "
             "parameters stored at 16 bits. Control columns: NLL of the control minus the router's ± paired SE "
             "(positive = the router is better).", "",
             "| config | router bits/weight | calib s | target | measured bits | effective bits | PPL | excess | random − router | norm − router |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        cost = r["router_cost"]["router_bits_per_weight"]
        for p in r["routed"]:
            ctl = [f"{p[c]['minus_router']:+.4f} ± {p[c]['se']:.4f}" if c in p else "" for c in ("random", "norm")]
            lines.append(f"| {name} | {cost:.3f} | {r['calibration_seconds']:.0f} | {p['target']:g} | {p['bits']:.3f} | "
                         f"{p['bits'] + cost:.3f} | {p['ppl']:.3f} | {p['excess']:+.4f} | {ctl[0]} | {ctl[1]} |")  # fmt: skip
    lines += ["", "Uniform readings (every token k slices), PPL:", "", "| config | " + " | ".join(f"{b} bits" for b in next(iter(results.values()))["uniform"]) + " |",
              "|---" * (1 + len(next(iter(results.values()))["uniform"])) + "|"]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v['ppl']:.3f}" for v in r["uniform"].values()) + " |")
    # equal effective bits: a router's parameters cost bits that time-sharing could have spent instead
    lines += ["", "## Verdict at equal effective bits (computed)", "",
              "The router's bits are charged at the slope of the same checkpoint's time-sharing line between 2 and "
              "4 bits (nats per bit): net = excess + slope x router bits per weight. Negative net = routed beats "
              "time-sharing even after paying for the router.", "",
              "| config | excess at 3 bits | slope (nats/bit) | router bits/weight | net at 3 bits | router − random at 3 bits |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    nets = {}
    for name, r in results.items():
        p3 = next(p for p in r["routed"] if p["target"] == 3.0)
        u = {float(b): v["nll"] for b, v in r["uniform"].items()}
        slope = (u[2.0] - u[4.0]) / 2.0
        cost = r["router_cost"]["router_bits_per_weight"]
        nets[name] = p3["excess"] + slope * cost
        lines.append(f"| {name} | {p3['excess']:+.4f} | {slope:.4f} | {cost:.3f} | {nets[name]:+.4f} | "
                     f"{-p3['random']['minus_router']:+.4f} ± {p3['random']['se']:.4f} |")  # fmt: skip
    best = min(nets, key=nets.get)
    lines += ["", f"Best at equal effective bits: **{best}** (net {nets[best]:+.4f} nats at 3 bits). "
              "`MoBiConfig.tiny()` uses the ladder with a width-4 router."]  # fmt: skip
    lines += ["", "Machine load (1/5/15-min averages) during each calibration: " +
              "; ".join(f"{n} {tuple(round(x, 1) for x in r['load'])}" for n, r in results.items()) + ".",
              "", "![routing study](routing_study.png)", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--fresh", action="store_true", help="ignore cached per-config results")
    args = ap.parse_args(argv)
    bad = sorted(set(args.configs) - set(CONFIGS))
    if bad:
        ap.error(f"unknown config(s) {bad}; choose among {list(CONFIGS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        path = CACHE / f"{name}.json"
        if path.exists() and not args.fresh:
            continue
        print(f"== {name}", flush=True)
        path.write_text(json.dumps(run_config(name, CONFIGS[name]), indent=1))
    results = {n: json.loads((CACHE / f"{n}.json").read_text()) for n in CONFIGS if (CACHE / f"{n}.json").exists()}
    docs = ROOT / "docs"
    (docs / "results_routing.json").write_text(json.dumps(results, indent=1) + "\n")
    (docs / "results_routing.md").write_text(_markdown(results))
    _plot(results, docs / "routing_study.png")
    print(f"wrote docs/results_routing.md ({len(results)} configs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
