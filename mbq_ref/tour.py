"""``mbq tour``: the main job on the bundled data, end to end on a CPU (every key: ``docs/cli.md``).

Steps (each a section of ``OUT/report.json`` and ``OUT/report.md``):

1. ``fp``: full-precision perplexity of the bundled tiny Llama on the three test
   splits, full GPTQ protocol (every 512-token window).
2. ``static``: per-bit static PTQ, the paper's baselines (Sec. 3, 5.1): RTN at
   2/3/4/6/8 bits and OmniQuant-style LWC calibrated at 2/3/4 bits, plus each
   LWC model evaluated at the other widths (the Fig. 1 mismatch: "calibrated at
   3 bits, run at 4").
3. ``mobiquant``: one MoBiQuant calibration (Alg. 1, ``MoBiConfig.tiny``), the
   fixed readings at 1..4 slices (2/4/6/8 bits), and the elastic sweep: for each
   target average bit-width the threshold controller (Sec. 4.2) picks ``τ`` on
   calibration windows, and the perplexity and the bits measured on the test
   windows are recorded.
4. ``checkpoint``: the calibrated model saved as one file, reloaded, and checked
   to give bit-identical logits; the cost of switching precision (a threshold
   change, no bytes loaded) against loading a per-bit checkpoint.
5. ``generalization``: the model calibrated on ``austen`` evaluated on ``bible``
   and ``shakespeare`` at a few budgets, next to RTN and LWC at the same bits.

Quantized models are evaluated on the first ``eval_windows`` windows of each
test split (the FP section uses all of them); ``report.json["setup"]`` records it.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import OutputError, atomic_write, atomic_write_text, check_writable
from .data import BUNDLED, calibration_windows, load_corpus, tokenize_corpus
from .fakequant import check_group_size
from .perplexity import perplexity
from .routing_analysis import LINE_TOL, RISE_TOL, acceptance
from .thresholds import quantize_and_table, table_targets, threshold_table
from .zoo import load_model

__all__ = ["run_tour", "MODEL_PRESETS", "TOUR_SEQLEN", "TourSettings"]

#: Full-protocol FP perplexity uses the model's whole context.
TOUR_SEQLEN = 512


#: What differs, per model, from the tiny Llama's settings (attributes of :class:`TourSettings`).
#: ``smollm2-135m`` (:mod:`mbq_ref.zoo.real`): group 64, since hidden 576 is not a multiple of 128
#: (64 divides 576 and 1536 and holds two whole Q4_1 blocks of 32, so no 4-bit grid is lossless by
#: construction); counts sized from per-step costs measured on the shared 2-core CPU machine
#: (load average 4-5: about 3.4 s per 512-token forward, 5 s per block for an LWC epoch and
#: 13 s per MoBiQuant joint step of 1024 tokens): eight 512-token FP windows per domain
#: instead of all ~230, 8 x 256 evaluation windows, 16 x 128 calibration windows for one
#: epoch, and the per-token sections (``outliers``). The committed run's wall time and the
#: load it ran under: ``docs/results_smollm2/``.
MODEL_PRESETS: dict[str, dict] = {
    "tiny-llama": {},
    "smollm2-135m": {
        "group_size": 64,
        "calib": {"nsamples": 16, "seqlen": 128, "batch_size": 2, "epochs": 1},
        "fp_max_windows": 8,
        "eval_seqlen": 256,
        "eval_windows": 8,
        "sweep": (2.0, 2.5, 3.0, 3.5, 4.0),
        "general_bits": (3.0,),
        "controls_bits": (2.5, 3.0, 3.5, 4.0),
        "refit_windows": 2,
        "outliers": True,
    },
}


class TourSettings:
    """What the tour evaluates; ``quick`` shrinks every count (a smoke run).

    ``model`` picks the model and its preset (:data:`MODEL_PRESETS`, applied over the
    defaults); keyword overrides apply last. ``calib`` overrides fields of
    :meth:`mbq_ref.calibrate.CalibConfig.tiny` (e.g. ``{"nsamples": 2, "epochs": 1}``);
    the static LWC baselines and MoBiQuant always share one calibration setting.
    ``outliers`` adds the per-token sections (:func:`_outlier_section`): per-token error
    across bit-widths (Sec. 3) and where the router sends bits next to the activation outliers.
    """

    def __init__(self, quick: bool = False, model: str = "tiny-llama", **overrides):
        if model not in MODEL_PRESETS:
            raise ValueError(f"unknown tour model {model!r}; choose one of {', '.join(MODEL_PRESETS)}")
        self.model = model
        self.quick = quick
        self.group_size = 128
        self.calib: dict = {}
        self.eval_seqlen = TOUR_SEQLEN
        self.fp_max_windows = 8 if quick else None  # None: the full protocol
        self.eval_windows = 4 if quick else 16  # quantized models: first windows of each test split
        self.rtn_bits = (2, 3, 4, 6, 8)
        self.lwc_bits = (2, 3, 4)
        self.sweep = (2.0, 3.0, 4.0, 6.0, 8.0) if quick else tuple(2.0 + 0.5 * i for i in range(13))
        self.table_step = 1.0 if quick else 0.5
        self.threshold_windows = 2 if quick else 4
        self.general_bits = (3.0, 4.0) if quick else (3.0, 4.0, 6.0)
        self.controls_bits = (3.0,) if quick else (2.5, 3.0, 3.5, 4.0, 5.0)  # routing vs controls, equal bits
        self.refit_windows = 2 if quick else 4  # unlabelled windows of a new domain to refit thresholds on
        self.outliers = False
        preset = dict(MODEL_PRESETS[model])
        if quick:  # a smoke run keeps the preset's model-specific fields, not its counts
            preset = {k: v for k, v in preset.items() if k in ("group_size", "calib", "outliers", "eval_seqlen")}
        for k, v in {**preset, **overrides}.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown tour setting {k!r}")
            setattr(self, k, v)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


def _windows(ids, st: TourSettings):
    """The first ``eval_windows`` evaluation windows of a 1-D token stream, ``[n, eval_seqlen]``."""
    n = min(st.eval_windows, ids.numel() // st.eval_seqlen)
    return ids[: n * st.eval_seqlen].view(n, st.eval_seqlen)


def _ppl(model, ids, st: TourSettings) -> float:
    return perplexity(model, ids, seqlen=st.eval_seqlen, max_windows=st.eval_windows, batch_size=8, progress=False).ppl


def _r(x: float, n: int = 4) -> float:
    return round(float(x), n) if math.isfinite(x) else float(x)


def _fp_section(model, test_ids: dict, st: TourSettings, progress: bool) -> dict:
    out = {}
    for name in BUNDLED:
        ids = test_ids[name]
        res = perplexity(model, ids, seqlen=TOUR_SEQLEN, max_windows=st.fp_max_windows, batch_size=8, progress=progress, desc=f"FP {name}")
        out[name] = {"ppl": round(res.ppl, 4), "windows": res.n_windows, "tokens": int(ids.numel())}
    return out


def _static_section(fp_model, calib_ids, calib_cfg, test_ids: dict, st: TourSettings, progress: bool) -> tuple[dict, dict]:
    """RTN at every width, LWC calibrated at each of ``lwc_bits`` and evaluated at every LWC width."""
    from .calibrate import calibrate_static
    from .fakequant import quantize_model, set_bits

    ids = test_ids["austen"]
    rtn = quantize_model(copy.deepcopy(fp_model), bits=st.rtn_bits[0], group_size=st.group_size, method="rtn")
    out: dict = {"rtn": {}, "lwc": {}}
    for b in tqdm(st.rtn_bits, desc="RTN", disable=not progress, leave=False):
        set_bits(rtn, b)
        out["rtn"][str(b)] = {"ppl": _r(_ppl(rtn, ids, st))}
    lwc_models = {}
    for c in tqdm(st.lwc_bits, desc="LWC", disable=not progress, leave=False):
        t0 = time.perf_counter()
        m, _ = calibrate_static(copy.deepcopy(fp_model), calib_ids, c, calib_cfg, group_size=st.group_size, progress=False)
        secs = time.perf_counter() - t0
        cross = {}
        for b in st.lwc_bits:  # the Fig. 1 mismatch: calibrated at c, run at b
            set_bits(m, b)
            cross[str(b)] = _r(_ppl(m, ids, st))
        set_bits(m, c)
        out["lwc"][str(c)] = {"ppl": cross[str(c)], "calib_seconds": round(secs, 2), "eval_at_bits": cross}
        lwc_models[c] = m
    return out, {"rtn": rtn, "lwc": lwc_models}


def _sweep(ckpt, ids, st: TourSettings, targets, progress: bool, desc: str) -> list[dict]:
    """Perplexity and measured bits at each target, thresholds from the checkpoint's table (no recalibration)."""
    from .mobiquant import average_bits, reset_bit_stats

    rows = []
    for target in tqdm(targets, desc=desc, disable=not progress, leave=False):
        ckpt.set_bits(target)
        reset_bit_stats(ckpt.model)
        ppl = _ppl(ckpt.model, ids, st)
        rows.append({"target": float(target), "test_bits": _r(average_bits(ckpt.model)), "ppl": _r(ppl)})
    return rows


def _controls_section(qm, calib_ids, test_ids, static_models: dict, st: TourSettings) -> dict:
    """(a) router, (b) random, (c) oracle, (d) static mix at equal bits (:mod:`mbq_ref.routing_controls`), plus LWC."""
    from .routing_controls import compare_controls, paired_delta

    table = threshold_table(qm, calib_ids, st.controls_bits)
    rows = compare_controls(qm, table, calib_ids, test_ids, seqlen=st.eval_seqlen, max_windows=st.eval_windows)
    lwc = {}
    for b, m in static_models["lwc"].items():
        res = perplexity(m, test_ids, seqlen=st.eval_seqlen, max_windows=st.eval_windows, batch_size=8, progress=False)
        lwc[str(b)] = {"ppl": _r(res.ppl), "window_nll": res.window_nll}
    for row in rows:
        b = row["target"]
        if b == int(b) and str(int(b)) in lwc:  # a per-bit LWC model at exactly these bits
            d, se = paired_delta(lwc[str(int(b))]["window_nll"], row["router"]["window_nll"])
            row["lwc"] = {"bits": b, "ppl": lwc[str(int(b))]["ppl"], "delta_nll": d, "se": se}
    for row in rows:  # the report keeps the summary; window NLLs only for the router (paired references)
        for name in ("random", "norm", "oracle", "static"):
            row[name].pop("window_nll")
        for v in row.values():
            if isinstance(v, dict):
                for k in list(v):
                    if isinstance(v[k], float):
                        v[k] = _r(v[k])
    return {"rows": rows, "lwc": {b: v["ppl"] for b, v in lwc.items()}, "windows": st.eval_windows}


_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


@torch.no_grad()
def _outlier_section(fp_model, qm, ids, tok, st: TourSettings, frac: float = 0.1) -> dict:
    """Per-token error across bit-widths (Sec. 3) and where the router sends bits, on one test window.

    ``ids`` ``[1, T]``. Three parts:

    * ``sensitivity``: :func:`mbq_ref.sensitivity.sensitivity_report` on the FP model (RTN at
      each width, ``st.group_size``): Jaccard of the top-``frac`` token sets and Spearman ρ of
      the per-token errors between every two widths, averaged over the projections
      (``jaccard``, ``spearman``: ``[nb, nb]``), and Jaccard(3, 4) and (2, 8) per projection kind.
    * ``massive``: per decoder layer, ``max |x| / median |x|`` of the FP ``down_proj`` input and
      the token holding the max (the massive activations of pretrained LLMs).
    * ``router``: ``qm`` as routed now (the caller sets 3 bits): per projection, bits per
      token, split into the top-``frac`` tokens by ``max_c |x_tc|`` of the layer's input
      (activation outliers) and the rest; Spearman ρ of the bits with ``max |x_t|`` and with
      ``e_t(1) - e_t(2)`` (what the second slice buys, :meth:`MoBiLinear.token_errors`); the
      tokens that get the most bits averaged over all projections.
    """
    from .mobiquant import average_bits, mobi_layers, reset_bit_stats
    from .mobiroute import counts_to_bits
    from .sensitivity import BITS, capture_linear_inputs, sensitivity_report, spearman, topk_mask

    rep = sensitivity_report(fp_model, ids, BITS, st.group_size, frac)
    jac, rho = rep.overlap("abs")  # [L, nb, nb] each
    by_kind = {}
    i3, i4, i2, i8 = (rep.bits.index(b) for b in (3, 4, 2, 8))
    for kd in _KINDS:
        sel = [j for j, n in enumerate(rep.layers) if _kind(n) == kd]
        if sel:
            by_kind[kd] = {"jaccard_3_4": _r(float(jac[sel, i3, i4].mean())), "jaccard_2_8": _r(float(jac[sel, i2, i8].mean())),
                           "spearman_3_4": _r(float(rho[sel, i3, i4].mean()))}  # fmt: skip
    sensitivity = {
        "bits": list(rep.bits),
        "jaccard": [[_r(float(v)) for v in row] for row in jac.mean(0)],
        "spearman": [[_r(float(v)) for v in row] for row in rho.mean(0)],
        "random_jaccard": _r(rep.random_jaccard),
        "by_kind": by_kind,
    }

    fp_inputs = capture_linear_inputs(fp_model, ids)
    massive = []
    for n, x in fp_inputs.items():
        if _kind(n) == "down":
            a = x.abs()
            t = int(a.amax(-1).argmax())
            massive.append({"layer": int(n.split(".")[2]), "ratio": _r(float(a.max() / a.median().clamp_min(1e-12)), 1),
                            "max_abs": _r(float(a.max()), 2), "token": t})  # fmt: skip
    del fp_inputs

    reset_bit_stats(qm)
    q_inputs = capture_linear_inputs(qm, ids)  # what each router sees in the routed model
    avg = average_bits(qm)
    layers = mobi_layers(qm)
    rows, token_bits = [], []
    for n, x in q_inputs.items():
        layer = layers[n]
        bits = counts_to_bits(layer.route(x), layer.slice_bits)  # [T]
        amax = x.abs().amax(-1)  # [T]
        err = layer.token_errors(x)  # [E, T]
        hot = topk_mask(amax, frac)
        rows.append({
            "layer": n, "bits": _r(float(bits.mean())),
            "outlier_bits": _r(float(bits[hot].mean())), "other_bits": _r(float(bits[~hot].mean())),
            "rho_absmax": _r(spearman(bits, amax)), "rho_gain": _r(spearman(bits, err[0] - err[1])),
        })  # fmt: skip
        token_bits.append(bits)
    del q_inputs
    tb = torch.stack(token_bits).mean(0)  # [T] mean bits over projections
    pieces = tok.convert_ids_to_tokens(ids[0].tolist())
    top = tb.topk(min(10, tb.numel())).indices.tolist()
    summary = {k: _r(sum(r[k] for r in rows) / len(rows)) for k in ("outlier_bits", "other_bits", "rho_absmax", "rho_gain")}
    kinds = {}
    for kd in _KINDS:
        sel = [r for r in rows if _kind(r["layer"]) == kd]
        if sel:
            kinds[kd] = {k: _r(sum(r[k] for r in sel) / len(sel)) for k in ("bits", "outlier_bits", "other_bits", "rho_absmax", "rho_gain")}
    router = {
        "avg_bits": _r(avg),
        **summary,
        "by_kind": kinds,
        "layers": rows,
        "top_tokens": [{"position": p, "token": pieces[p], "bits": _r(float(tb[p]))} for p in top],
        "token_bits_mean": _r(float(tb.mean())),
    }
    return {"tokens": int(ids.numel()), "frac": frac, "sensitivity": sensitivity, "massive": massive, "router": router}


def _outlier_plot(o: dict, out: Path, files: list) -> None:
    """Left: Jaccard of the top-10 % error tokens between widths; right: router bits per decoder layer vs massive activations."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.0, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    bits = o["sensitivity"]["bits"]
    im = a1.imshow(o["sensitivity"]["jaccard"], vmin=0, vmax=1, cmap="viridis")
    a1.set_xticks(range(len(bits)), [str(b) for b in bits])
    a1.set_yticks(range(len(bits)), [str(b) for b in bits])
    a1.set_xlabel("bits")
    a1.set_ylabel("bits")
    a1.set_title(f"Top-{100 * o['frac']:.0f} % error tokens: Jaccard\n(mean over projections; random {o['sensitivity']['random_jaccard']:.2f})", fontsize=9)
    fig.colorbar(im, ax=a1, fraction=0.046)
    per_layer: dict[int, list[float]] = {}
    for r in o["router"]["layers"]:
        per_layer.setdefault(int(r["layer"].split(".")[2]), []).append(r["bits"])
    xs = sorted(per_layer)
    a2.bar(xs, [sum(per_layer[i]) / len(per_layer[i]) for i in xs], color="C0", label="router: mean bits of the layer's 7 projections")
    a2.set_xlabel("decoder layer")
    a2.set_ylabel("bits per token (3-bit budget)")
    tw = a2.twinx()
    m = {r["layer"]: r["ratio"] for r in o["massive"]}
    tw.plot(xs, [m.get(i, float("nan")) for i in xs], "r.-", label="FP down_proj input: max|x| / median|x|")
    tw.set_yscale("log")
    tw.set_ylabel("max|x| / median|x|", color="r")
    a2.set_title("Where the router sends bits, next to the activation outliers", fontsize=9)
    h1, l1 = a2.get_legend_handles_labels()
    h2, l2 = tw.get_legend_handles_labels()
    a2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    _finish(fig, a2, out, "outliers.png", files)


def _switch_cost(ckpt, bits_a: float, bits_b: float, repeats: int = 20) -> dict:
    """Seconds per :meth:`Checkpoint.set_bits` on a loaded model (thresholds only; no weight bytes move)."""
    t0 = time.perf_counter()
    for i in range(repeats):
        ckpt.set_bits(bits_b if i % 2 else bits_a)
    secs = (time.perf_counter() - t0) / repeats
    # what a switch writes: one float64 threshold per layer
    return {"seconds": secs, "bytes_written": 8 * len(ckpt.table.layers), "weight_bytes_loaded": 0}


def _per_bit_reload_cost(lwc_models: dict, out: Path, calib: dict, base_model: str) -> dict:
    """Save each static per-bit model as its own checkpoint and time loading it back (the non-elastic way to switch)."""
    from .checkpoint import load_static_checkpoint, save_static_checkpoint

    rows = {}
    folder = out / "per_bit"
    for b, m in lwc_models.items():
        path = save_static_checkpoint(m, folder / f"lwc_w{b}.safetensors", {"base_model": base_model, "calib": calib})
        t0 = time.perf_counter()
        load_static_checkpoint(path)
        rows[str(b)] = {"file_bytes": path.stat().st_size, "load_seconds": time.perf_counter() - t0}
    return rows


# --- plots --------------------------------------------------------------------------
def _yscale(ax) -> None:
    """Log scale only when the perplexities span a wide range (collapsed 2-bit models)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y is not None and math.isfinite(y)]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 3:
        ax.set_yscale("log")


def _finish(fig, ax, out: Path, name: str, files: list, labels: tuple[str, str, str] | None = None) -> None:
    """Axis labels, title, log scale if needed and legend (``labels``), then save ``out/name`` atomically."""
    import matplotlib.pyplot as plt

    if labels is not None:
        _yscale(ax)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_title(labels[2])
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, out / name)
    plt.close(fig)
    files.append(name)


def _short(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``L3.down``."""
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "").replace("_proj", "")


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    fp = report["fp_eval"]["austen"]
    mq = report["mobiquant"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sw = mq["sweep"]
    ax.plot([r["test_bits"] for r in sw], [r["ppl"] for r in sw], "o-", label="MoBiQuant (one checkpoint, routed)")
    fixed = mq["fixed"]
    ax.plot([float(b) for b in fixed], [v["ppl"] for v in fixed.values()], "s", mfc="none", label="MoBiQuant, k slices for all tokens")
    st = report["static"]
    ax.plot([float(b) for b in st["rtn"]], [v["ppl"] for v in st["rtn"].values()], "x--", label="RTN (one checkpoint per width)")
    ax.plot([float(b) for b in st["lwc"]], [v["ppl"] for v in st["lwc"].values()], "^--", label="LWC static PTQ (per width)")
    ax.axhline(fp, color="k", lw=0.8, ls=":", label=f"FP32 ({fp:.2f}, same windows)")
    _finish(fig, ax, out, "ppl_vs_bits.png", files,
            ("average bits per weight (measured)", "perplexity (austen test)", "Elastic precision: perplexity vs average bits"))  # fmt: skip

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for c, v in st["lwc"].items():
        ax.plot([float(b) for b in v["eval_at_bits"]], list(v["eval_at_bits"].values()), "o-", label=f"LWC calibrated at {c} bits")
    _finish(fig, ax, out, "mismatch.png", files,
            ("bits at inference", "perplexity (austen test)", "Static PTQ at a precision it was not calibrated for"))  # fmt: skip

    ctl = report.get("controls", {}).get("rows", [])
    if ctl:
        from .routing_controls import plot_controls

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        lwc_pts = [(r["lwc"]["bits"], r["lwc"]["delta_nll"], r["lwc"]["se"]) for r in ctl if "lwc" in r]
        plot_controls(ax, ctl, {"LWC, per bit": lwc_pts})
        _finish(fig, ax, out, "controls.png", files)

    lb = mq["layer_bits_at_3"]
    names = list(lb)
    many = len(names) > 60  # a real model: one tick per decoder layer, not per projection
    fig, ax = plt.subplots(figsize=(12.0 if many else 6.4, 3.4))
    ax.bar(range(len(names)), list(lb.values()))
    ax.axhline(3.0, color="k", lw=0.8, ls=":")
    ticks = [i for i, n in enumerate(names) if not many or n.endswith("q_proj")]
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short(names[i]).split(".")[0] if many else _short(names[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_ylabel("bits per token (austen test)")
    ax.set_title("Per-layer precision at a 3-bit budget (one global τ)")
    _finish(fig, ax, out, "layer_bits.png", files)

    if "outliers" in report:
        _outlier_plot(report["outliers"], out, files)
    return files


# --- report ---------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None:
        return "–"  # not run in this configuration
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _write_markdown(report: dict, path: Path) -> None:
    st = report["setup"]
    lines = ["# mbq tour report", "", (f"Generated {report['meta']['timestamp']} on {report['meta']['machine']}, "
             f"{report['meta']['wall_seconds']} s wall."), ""]  # fmt: skip
    model = st.get("model", "tiny-llama")
    lines += [f"## Full-precision perplexity ({'bundled ' if model == 'tiny-llama' else ''}{model})", "", "| domain | PPL | windows x seqlen |", "|---|---|---|"]
    for name, r in report["fp"].items():
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['windows']} x {TOUR_SEQLEN} |")
    if "static" not in report:
        atomic_write_text(path, "\n".join(lines) + "\n", "report")
        return
    lines += ["", f"Quantized models below: first {st['eval_windows']} windows x {st['eval_seqlen']} tokens of each test "
              f"split (FP32 on the same windows: " + ", ".join(f"{d} {v:.3f}" for d, v in report["fp_eval"].items()) +
              f"); calibration on `austen` train ({st['calib_nsamples']} x {st['calib_seqlen']}); group size {st['group_size']}.", ""]
    h = report["headline"]
    lines += ["## Headline (austen test)", "", "| bits | FP32 | RTN | LWC (calibrated at that width) | MoBiQuant (routed, measured bits) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for row in h["rows"]:
        mq_bits = f" ({row['mobiquant_bits']:.2f})" if row["mobiquant_bits"] is not None else ""
        lines.append(f"| {row['bits']:g} | {h['fp_ppl']:.3f} | {_fmt(row['rtn'])} | {_fmt(row['lwc'])} | "
                     f"{_fmt(row['mobiquant'])}{mq_bits} |")  # fmt: skip
    lines += ["", "## Static per-bit PTQ", "", "| method | bits | PPL |", "|---|---|---|"]
    for b, v in report["static"]["rtn"].items():
        lines.append(f"| RTN | {b} | {v['ppl']:.3f} |")
    for b, v in report["static"]["lwc"].items():
        lines.append(f"| LWC | {b} | {v['ppl']:.3f} |")
    bits = list(report["static"]["lwc"])
    lines += ["", "Mismatch (Fig. 1): LWC calibrated at one width (rows), run at another (columns):", "",
              "| calibrated \\ run at | " + " | ".join(bits) + " |", "|---" * (len(bits) + 1) + "|"]  # fmt: skip
    for c, v in report["static"]["lwc"].items():
        lines.append(f"| {c} | " + " | ".join(f"{v['eval_at_bits'][b]:.3f}" for b in bits) + " |")
    mq = report["mobiquant"]
    lines += ["", "## MoBiQuant", "", (f"Calibrated in {mq['calibration_seconds']:.1f} s (two stages, Alg. 1); "
              f"threshold table ({len(mq['table_targets'])} targets) in {mq['threshold_table_seconds']:.1f} s."), "",
              "Every token reads k slices:", "", "| bits | PPL |", "|---|---|"]  # fmt: skip
    for b, v in mq["fixed"].items():
        lines.append(f"| {b} | {v['ppl']:.3f} |")
    acc = report.get("acceptance")
    excess = {p["target"]: p for p in acc["a"]["points"]} if acc else {}
    lines += ["", ("Elastic sweep (threshold table, measured bits on the test windows). Time-sharing: the NLL of "
              "serving the two neighbouring uniform readings in proportion (no router); excess = NLL minus that "
              "line (negative = routing beats it):"), "",
              "| target bits | measured bits | PPL | time-sharing PPL | excess (nats) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in mq["sweep"]:
        p = excess.get(r["target"])
        ts = f"{math.exp(p['line']):.3f} | {p['excess']:+.4f}" if p else "– | –"
        lines.append(f"| {r['target']:.2f} | {r['test_bits']:.3f} | {r['ppl']:.3f} | {ts} |")
    rc = mq.get("router_cost")
    if rc:
        lines += ["", (f"Router cost ({rc['routing']} routers, hidden {rc['hidden']}): {rc['router_params']:,} parameters "
                  f"next to {rc['quantized_weights']:,} quantized weights = {rc['router_bits_per_weight']:.3f} extra bits "
                  f"per weight at {rc['storage_bits']}-bit storage (add it to every measured-bits figure above); "
                  f"{rc['router_flops_per_token']:,} router FLOPs per token = "
                  f"{100 * rc['router_flops_per_slice_flops']:.2f} % of one slice's {rc['slice_flops_per_token']:,}.")]  # fmt: skip
    lines += ["", (f"Router training (budget check): {mq['avg_bits_trained']:.3f} bits at the trained threshold on the "
              f"calibration windows and {mq['avg_bits_trained_test']:.3f} on the test windows, for `train_bits` "
              f"{mq['train_bits']:g}; surrogate saturation "
              f"{mq['surrogate_saturation']:.3f} (share of router scores whose straight-through gradient is below "
              "1e-3 of its peak).")]  # fmt: skip
    before = list(mq.get("layer_bits_before_settle", {}).values())
    if before and mq.get("routing", "per_slice") == "per_slice":
        lines.append(f"Before the budget settle the joint stage had left the layers at {min(before):.2f} to "
                     f"{max(before):.2f} bits at the trained threshold; the settle shifts each router's offset "
                     "so that every layer reads `train_bits` there.")  # fmt: skip
    elif before:
        lines.append(f"Ladder routers: at the default threshold the layers read {min(before):.2f} to "
                     f"{max(before):.2f} bits; each layer's trained threshold is set to read `train_bits` on the "
                     "calibration windows (the level of a ladder is its threshold).")  # fmt: skip
    if acc:
        v = acc["verdicts"]
        lines += ["", "## Acceptance of the routing (computed by `mbq_ref.routing_analysis.acceptance`)", "",
                  f"(a) on or below the time-sharing line (tolerance {LINE_TOL} nats) and smooth (rise at most "
                  f"{RISE_TOL}): **{v['a']}** (largest excess {acc['a']['max_excess']:+.4f}, largest rise "
                  f"{acc['a']['max_rise']:+.4f} nats)."]  # fmt: skip
        if acc["b"]:
            b = acc["b"]
            lines.append(f"(b) routed at 4 bits ({b['router_bits']:.3f} measured, PPL {b['router_ppl']:.3f}) vs LWC-4 "
                         f"(PPL {b['lwc_ppl']:.3f}): LWC minus routed {b['lwc_minus_router']:+.4f} ± {b['se']:.4f} "
                         f"nats: **{v['b']}**.")  # fmt: skip
        for key, c in acc["c"].items():
            lines.append(f"(c) {key}: routed {c['routed']:.3f} at {_fmt(c['bits'])} bits, LWC {c['lwc']:.3f}, "
                         f"RTN {_fmt(c['rtn'])}: routed minus LWC {c['routed_minus_lwc']:+.4f} nats.")  # fmt: skip
        lines.append(f"(c) overall: **{v['c']}**.")
        for t, d in acc["d"].items():
            norm = (f"; input-norm routing minus router {d['norm_minus_router']:+.4f} ± {d['norm_se']:.4f}"
                    if d["norm_minus_router"] is not None else "")  # fmt: skip
            lines.append(f"(d) at {t} bits: random minus router {d['random_minus_router']:+.4f} ± {d['se']:.4f} "
                         f"(needed: {d['needed'].replace('_', ' ')}){norm}.")  # fmt: skip
        lines.append(f"(d) overall: **{v['d']}**.")
    ctl = report.get("controls")
    if ctl:
        lines += ["", "## Routing against controls (same checkpoint, equal measured bits)", "",
                  (f"Austen test, first {ctl['windows']} windows. ΔNLL: mean per-window NLL minus the router's, "
                   "± paired standard error over windows (negative = better than the router)."), "",
                  "| target | method | measured bits | PPL | ΔNLL ± SE |", "|---|---|---|---|---|"]  # fmt: skip
        for r in ctl["rows"]:
            for name in ("router", "random", "norm", "oracle", "static", "lwc"):
                if name not in r:
                    continue
                v = r[name]
                lines.append(f"| {r['target']:g} | {name} | {v['bits']:.3f} | {v['ppl']:.3f} | "
                             f"{v['delta_nll']:+.4f} ± {v['se']:.4f} |")  # fmt: skip
    ck = report["checkpoint"]
    lines += ["", "## One checkpoint, any precision", "",
              (f"`{ck['file']}`: {ck['bytes']:,} bytes, saved in {ck['save_seconds']:.2f} s, loaded and verified in "
               f"{ck['load_seconds']:.2f} s; reloaded logits identical: {ck['roundtrip_identical']}."), "",
              (f"Switching precision: {1e6 * ck['switch']['seconds']:.1f} µs, {ck['switch']['bytes_written']} bytes of "
               "thresholds written, 0 weight bytes loaded. Per-bit static checkpoints instead:"), "",
              "| bits | file bytes (codes bit-packed) | load time (s) |", "|---|---|---|"]  # fmt: skip
    for b, v in ck["per_bit_reload"].items():
        lines.append(f"| {b} | {v['file_bytes']:,} | {v['load_seconds']:.3f} |")
    g = report["generalization"]
    lines += ["", "## Generalization (calibrated on austen)", "",
              (f"Refit: only the thresholds re-fitted on {st['refit_windows']} unlabelled windows of the domain's "
               "train split (same controller), weights and routers unchanged."), "",
              "| domain | target bits | measured bits | MoBiQuant PPL | refit: measured bits | refit: PPL | RTN PPL | LWC PPL | FP32 PPL |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for dom, rows in g.items():
        for r in rows:
            lines.append(f"| {dom} | {r['target']:g} | {r['test_bits']:.3f} | {r['ppl']:.3f} | "
                         f"{_fmt(r.get('refit_test_bits'))} | {_fmt(r.get('refit_ppl'))} | {_fmt(r['rtn'])} | "
                         f"{_fmt(r['lwc'])} | {r['fp']:.3f} |")  # fmt: skip
    if "outliers" in report:
        lines += _outlier_markdown(report["outliers"])
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    atomic_write_text(path, "\n".join(lines) + "\n", "report")


def _outlier_markdown(o: dict) -> list[str]:
    sen, rt = o["sensitivity"], o["router"]
    bits = [str(b) for b in sen["bits"]]
    lines = ["", "## Outlier tokens across bit-widths (Sec. 3)", "",
             (f"Per-token output error `||x_t (W - Ŵ_b)^T||` of every projection of the FP model (RTN), on one test window "
              f"of {o['tokens']} tokens. Jaccard index of the top-{100 * o['frac']:.0f} % tokens between two widths, mean over "
              f"projections (two random sets: {sen['random_jaccard']:.3f}):"), "",
             "| bits | " + " | ".join(bits) + " |", "|---" * (len(bits) + 1) + "|"]  # fmt: skip
    for b, row in zip(bits, sen["jaccard"]):
        lines.append(f"| {b} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "| projection | Jaccard 3 vs 4 bits | Jaccard 2 vs 8 bits | Spearman ρ 3 vs 4 bits |", "|---|---|---|---|"]
    for kd, v in sen["by_kind"].items():
        lines.append(f"| {kd} | {v['jaccard_3_4']:.3f} | {v['jaccard_2_8']:.3f} | {v['spearman_3_4']:+.3f} |")
    ratios = [m["ratio"] for m in o["massive"]]
    lines += ["", (f"Massive activations: `max|x| / median|x|` of the FP `down_proj` inputs ranges from {min(ratios):,.0f} to "
              f"{max(ratios):,.0f} over the decoder layers."), "",
              "## Where the router sends bits (3-bit budget)", "",
              (f"Same window, routed at a 3-bit target ({rt['avg_bits']:.3f} bits measured). Activation outliers: the "
               f"top-{100 * o['frac']:.0f} % tokens by `max_c |x_tc|` of each projection's input. ρ: Spearman correlation of "
               "the bits per token with `max|x_t|` and with `e_t(1) - e_t(2)` (what the second slice buys)."), "",
              "| projection | bits | outlier tokens | other tokens | ρ(bits, max abs x) | ρ(bits, gain) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for kd, v in rt["by_kind"].items():
        lines.append(f"| {kd} | {v['bits']:.3f} | {v['outlier_bits']:.3f} | {v['other_bits']:.3f} | {v['rho_absmax']:+.3f} | "
                     f"{v['rho_gain']:+.3f} |")  # fmt: skip
    lines.append(f"| all | {rt['token_bits_mean']:.3f} | {rt['outlier_bits']:.3f} | {rt['other_bits']:.3f} | "
                 f"{rt['rho_absmax']:+.3f} | {rt['rho_gain']:+.3f} |")  # fmt: skip
    lines += ["", "Tokens with the most bits (mean over projections): " +
              ", ".join(f"{t['position']} `{t['token']}` ({t['bits']:.2f})" for t in rt["top_tokens"]) + "."]  # fmt: skip
    return lines


def _headline(report: dict) -> dict:
    """PPL at 2/3/4 bits for every method side by side (MoBiQuant: the sweep row at that target)."""
    st, mq = report["static"], report["mobiquant"]
    rows = []
    for b in (2, 3, 4):
        sw = next((r for r in mq["sweep"] if abs(r["target"] - b) < 1e-9), None)
        rows.append({
            "bits": float(b),
            "rtn": st["rtn"].get(str(b), {}).get("ppl"),
            "lwc": st["lwc"].get(str(b), {}).get("ppl"),
            "mobiquant": sw["ppl"] if sw else None,
            "mobiquant_bits": sw["test_bits"] if sw else None,
        })  # fmt: skip
    return {"fp_ppl": report["fp_eval"]["austen"], "rows": rows}


def _save_json(report: dict, out: Path) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=True) + "\n", "report")


def _save_png(fig, path: Path) -> None:
    """``fig.savefig`` through :func:`mbq_ref.atomic.atomic_write` (the temporary name has no .png: say the format)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "plot")


def run_tour(out: Path, quick: bool = False, progress: bool = True, settings: TourSettings | None = None) -> dict:
    """Run every step (module docstring), write ``out/report.json``, ``report.md``, plots and the checkpoint.

    Args:
        out: output folder (created).
        quick: a smoke run (fewer windows and sweep points), see :class:`TourSettings`.
        progress: tqdm bars.
        settings: explicit settings (overrides ``quick``); tests use tiny ones.

    Returns:
        the report dict (the content of ``report.json``).
    """
    from .checkpoint import load_checkpoint, save_checkpoint
    from .fakequant import set_bits as set_static_bits
    from .mobiquant import (
        MoBiConfig,
        average_bits,
        layer_bits,
        reset_bit_stats,
        router_cost,
        routing_diagnostics,
        set_slices,
        set_threshold,
        thresholds,
    )

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; the tour writes a folder of reports, give a folder path")
    check_writable(out / "report.json")  # a read-only or full disk fails now, not after the whole run
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out} ({exc.strerror or exc}); choose another --out") from exc
    t_start = time.time()
    torch.manual_seed(0)
    st = settings or TourSettings(quick)
    model, tok = load_model(st.model, with_tokenizer=True)
    check_group_size(model, st.group_size)  # one line now, not after the FP section
    report: dict = {
        "meta": {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "quick": st.quick,
        }
    }
    test_ids = {d: tokenize_corpus(tok, load_corpus(d, "test")) for d in BUNDLED}
    timings = {}

    t0 = time.time()
    report["fp"] = _fp_section(model, test_ids, st, progress)
    # the same FP model on exactly the windows every quantized model is evaluated on
    report["fp_eval"] = {d: _r(_ppl(model, test_ids[d], st)) for d in BUNDLED}
    timings["fp"] = time.time() - t0

    cfg = MoBiConfig.tiny()
    cfg.group_size = st.group_size
    for k, v in st.calib.items():
        setattr(cfg.calib, k, v)
    train = tokenize_corpus(tok, load_corpus(cfg.calib.dataset, "train"))
    calib_ids = calibration_windows(train, cfg.calib.nsamples, cfg.calib.seqlen, seed=cfg.calib.seed)
    report["setup"] = {
        **st.as_dict(),
        "eval_dataset": "austen",
        "calib_dataset": cfg.calib.dataset,
        "calib_nsamples": cfg.calib.nsamples,
        "calib_seqlen": cfg.calib.seqlen,
        "group_size": st.group_size,
        "mobiquant_config": asdict(cfg),
    }

    t0 = time.time()
    report["static"], static_models = _static_section(model, calib_ids, cfg.calib, test_ids, st, progress)
    timings["static"] = time.time() - t0

    # --- MoBiQuant: calibrate, threshold table, checkpoint ---------------------------------
    t0 = time.time()
    mq_model = copy.deepcopy(model)
    targets = table_targets(st.table_step, cfg.slice_bits)
    res = quantize_and_table(mq_model, calib_ids, cfg, targets, st.threshold_windows, progress)
    timings["mobiquant_calibration"] = time.time() - t0
    ck_path = out / "mobiquant.safetensors"
    t1 = time.perf_counter()
    save_checkpoint(mq_model, ck_path, {"base_model": st.model, "calibration": res["calibration"], "results": res["results"]},
                    tokenizer=tok, thresholds=res["thresholds"])  # fmt: skip
    save_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    ckpt = load_checkpoint(ck_path, expect_model=st.model)
    load_s = time.perf_counter() - t1
    trained_logits = thresholds(ckpt.model, logit=True)
    probe = test_ids["austen"][: st.eval_seqlen].unsqueeze(0)
    ckpt.set_bits(3.0)
    with torch.no_grad():
        a = ckpt.model(input_ids=probe).logits
        set_threshold(mq_model, thresholds(ckpt.model, logit=True), logit=True)  # the same routing, exactly
        b = mq_model(input_ids=probe).logits
    identical = bool(torch.equal(a, b))

    # everything below runs on the reloaded model: what a user of the file gets
    qm = ckpt.model
    t0 = time.time()
    # the trained thresholds, as saved (per layer for a ladder), on the test windows (the budget check's second half)
    set_threshold(qm, trained_logits, logit=True)
    trained_test = routing_diagnostics(qm, _windows(test_ids["austen"], st))
    fixed = {}
    for k, bits in enumerate(ckpt.cumulative_bits, start=1):
        set_slices(qm, k)
        fixed[str(bits)] = {"ppl": _r(_ppl(qm, test_ids["austen"], st))}
    sweep = _sweep(ckpt, test_ids["austen"], st, st.sweep, progress, "elastic sweep")
    ckpt.set_bits(3.0)
    reset_bit_stats(qm)
    _ppl(qm, test_ids["austen"], st)
    lb3 = {n: _r(v) for n, v in layer_bits(qm).items()}
    timings["mobiquant_eval"] = time.time() - t0
    report["mobiquant"] = {
        "calibration_seconds": res["results"]["calibration_seconds"],
        "threshold_table_seconds": res["results"]["threshold_table_seconds"],
        "avg_bits_trained": _r(res["results"]["avg_bits_trained"]),
        "train_bits": cfg.train_bits,
        "surrogate_saturation": _r(res["results"]["surrogate_saturation"]),
        "avg_bits_trained_test": _r(trained_test["avg_bits"]),
        # each layer's bits at the trained threshold before the budget settle (mobiquant.settle_budget)
        "layer_bits_before_settle": {n: _r(v) for n, v in res["results"]["layer_bits_before_settle"].items()},
        "block_mse": res["results"]["block_mse"],
        "table_targets": targets,
        "table_achieved_bits": [_r(v["achieved"]) for v in res["thresholds"].values()],
        "table_targets_missed": res["results"]["table_targets_missed"],
        "fixed": fixed,
        "sweep": sweep,
        "layer_bits_at_3": lb3,
        "avg_bits_at_3": _r(average_bits(qm)),
        "routing": cfg.routing,
        "router_hidden": cfg.router_hidden,
        # router parameters (fp16) per quantized weight and FLOPs per token next to one slice's
        "router_cost": {k: (_r(v, 6) if isinstance(v, float) else v) for k, v in router_cost(qm).items()},
    }

    if st.outliers:  # --- per-token error across widths, and the router next to the outliers ---------
        t0 = time.time()
        ckpt.set_bits(3.0)
        report["outliers"] = _outlier_section(model, qm, _windows(test_ids["austen"], st)[:1], tok, st)
        timings["outliers"] = time.time() - t0

    # --- routing against controls: same checkpoint, same measured bits -------------------------
    t0 = time.time()
    report["controls"] = _controls_section(qm, calib_ids[: st.threshold_windows], test_ids["austen"], static_models, st)
    ckpt.set_bits(3.0)
    timings["controls"] = time.time() - t0

    t0 = time.time()
    report["checkpoint"] = {
        "file": ck_path.name,
        "bytes": ck_path.stat().st_size,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "roundtrip_identical": identical,
        "switch": _switch_cost(ckpt, 2.0, 8.0),
        "per_bit_reload": _per_bit_reload_cost(static_models["lwc"], out, vars(cfg.calib), st.model),
    }
    timings["checkpoint"] = time.time() - t0

    # --- generalization: calibrated on austen, evaluated on the other domains ------------------
    t0 = time.time()
    gen = {}
    for dom in BUNDLED:
        rows = _sweep(ckpt, test_ids[dom], st, st.general_bits, progress, f"sweep {dom}")
        if dom != cfg.calib.dataset:  # mitigation: refit only the thresholds on unlabelled text of the domain
            dom_train = tokenize_corpus(tok, load_corpus(dom, "train"))
            refit_ids = calibration_windows(dom_train, st.refit_windows, cfg.calib.seqlen, seed=cfg.calib.seed)
            refit = threshold_table(qm, refit_ids, st.general_bits)
            for r in rows:
                set_threshold(qm, refit[r["target"]]["logits"], logit=True)
                reset_bit_stats(qm)
                r["refit_ppl"] = _r(_ppl(qm, test_ids[dom], st))
                r["refit_test_bits"] = _r(average_bits(qm))
            ckpt.set_bits(3.0)
        for r in rows:
            b = r["target"]
            r["fp"] = report["fp_eval"][dom]
            r["rtn"] = r["lwc"] = None
            if b == int(b) and int(b) in st.rtn_bits:
                set_static_bits(static_models["rtn"], int(b))
                r["rtn"] = _r(_ppl(static_models["rtn"], test_ids[dom], st))
            if b == int(b) and int(b) in static_models["lwc"]:
                r["lwc"] = _r(_ppl(static_models["lwc"][int(b)], test_ids[dom], st))
        gen[dom] = rows
    report["generalization"] = gen
    timings["generalization"] = time.time() - t0

    report["acceptance"] = acceptance(report)
    report["headline"] = _headline(report)
    report["plots"] = _plots(report, out)
    report["meta"]["timings_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    report["meta"]["wall_seconds"] = round(time.time() - t_start, 1)
    _save_json(report, out)
    _write_markdown(report, out / "report.md")
    return report
