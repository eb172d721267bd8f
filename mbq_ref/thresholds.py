"""The threshold controller: which ``τ`` gives a target average bit-width, measured, never assumed (Sec. 4.2).

One calibrated MoBiQuant model runs at any average precision by changing only the
routing thresholds: a token reads residual slice ``e`` when its router score clears
``logit(τ)`` (Eq. 5). The controller turns a target average bits (e.g. 3.0) into
thresholds by *measuring* the bits on calibration tokens
(:func:`mbq_ref.mobiquant.measure_bits`): routing upstream changes the inputs
downstream, so the bits of a threshold are only known by running the model.

**Global vs per-layer τ** (the paper does not specify which; both are supported, docs/paper.md):

* ``"global"`` (the default, :data:`DEFAULT_THRESHOLD_MODE`): one ``u = logit(τ)`` shared by
  every layer, found on the measured curve ``bits(u)``; the routers, not the controller,
  decide which layers get the bits.
* ``"per_layer"``: each layer its own ``u``, putting *its* mean bits at the target
  (:func:`mbq_ref.mobiroute.threshold_for_bits`).

**The table of measured bits.** :func:`threshold_table` solves a list of targets
(:func:`table_targets`: ``B_1..B_E`` every ``step`` bits) and records for each row the
per-layer ``u`` and the bits it *achieved*; :func:`calibrate_threshold` applies one row.
A checkpoint stores the table, read back as a :class:`ThresholdTable`.

**Blending.** :meth:`ThresholdTable.logits_for` serves any bit-width in the measured range
without recalibration: each row sits at the bits it measured, and between two rows each
layer's ``u`` is interpolated linearly (an infinite end takes the finite neighbour). The
routed bits are measured again afterwards. :func:`bits_sweep` evaluates perplexity at
several targets.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint.format import CheckpointError
from .mobilinear import MoBiError, MoBiLinear
from .mobiquant import (
    average_bits,
    measure_bits,
    mobi_layers,
    quantize_mobiquant,
    reset_bit_stats,
    routing_diagnostics,
    set_slices,
    set_threshold,
    set_token_slices,
    thresholds,
)
from .mobiroute import logit_to_tau, threshold_for_bits
from .mobislice import cumulative_bits
from .perplexity import perplexity

__all__ = [
    "DEFAULT_THRESHOLD_MODE",
    "MIN_TABLE_STEP",
    "THRESHOLD_MODES",
    "ThresholdTable",
    "bits_sweep",
    "calibrate_threshold",
    "quantize_and_table",
    "table_targets",
    "threshold_ends",
    "threshold_table",
]

#: The one default of every threshold controller in the package (tour, ``mbq quantize``,
#: ``Checkpoint.set_bits``, chapters): one ``τ`` shared by all layers (Sec. 4.2's runtime
#: threshold), so the routers, not the controller, decide which layers get the bits.
DEFAULT_THRESHOLD_MODE = "global"
THRESHOLD_MODES = ("global", "per_layer")


def threshold_ends(layers: dict[str, MoBiLinear]) -> tuple[float, float]:
    """``(u_all, u_base)``: thresholds that give every slice / the base slice only, on any input.

    Finite for bounded routers (just outside every layer's score range,
    :meth:`mbq_ref.mobiroute.MoBiRouter.score_limits`); ``∓inf`` otherwise.
    """
    limits = [m.router.score_limits() for m in layers.values()]
    lo, hi = min(a for a, _ in limits), max(b for _, b in limits)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return -math.inf, math.inf
    pad = 1e-3 * max(abs(lo), abs(hi))
    return lo - pad, hi + pad


def _global_table(model, layers, calib_ids, targets, tol, batch_size, max_probes) -> dict[float, tuple[float, float]]:
    """One ``u = logit(τ)`` per target, shared by every layer; ``{target: (u, measured bits)}``.

    The measured curve ``bits(u)`` is non-increasing. One pass records the range of the
    nested scores ``min_{j<=e} r_j`` (the bracket: outside it every token reads the
    same slices), then every probe (a forward over ``calib_ids``) serves every target:
    each target is refined inside the bracket of the probes already made, alternating a
    linear-interpolation step with a bisection step, until a probe lands within
    ``tol / 4`` bits or the bracket is narrower than a float step.
    """
    seen = [math.inf, -math.inf]

    def record(_mod, _args, r):
        c = r.detach().cummin(dim=-1).values
        seen[0], seen[1] = min(seen[0], float(c.min())), max(seen[1], float(c.max()))

    curve: dict[float, float] = {}

    def probe(u: float) -> float:
        if u not in curve:
            for m in layers.values():
                m.tau_logit = u
            curve[u] = measure_bits(model, calib_ids, batch_size)
        return curve[u]

    u_all, u_base = threshold_ends(layers)
    handles = [m.router.register_forward_hook(record) for m in layers.values()]
    try:
        probe(u_all)
    finally:
        for h in handles:
            h.remove()
    probe(u_base)
    # bracket from the observed scores (inside the exact ends)
    pad = 1e-3 * max(1.0, seen[1] - seen[0])
    lo_end, hi_end = max(seen[0] - pad, u_all), min(seen[1] + pad, u_base)
    curve.setdefault(lo_end, curve[u_all])  # no token is below / above: same bits as the ends
    curve.setdefault(hi_end, curve[u_base])
    out = {}
    for target in sorted(float(t) for t in targets):
        step = 0
        while len(curve) < max_probes:
            best = min(curve.items(), key=lambda p: (abs(p[1] - target), abs(p[0])))
            if abs(best[1] - target) <= tol / 4:
                break
            finite = [(u, b) for u, b in curve.items() if lo_end <= u <= hi_end]
            a, fa = max(((u, b) for u, b in finite if b >= target), default=(lo_end, curve[lo_end]))
            b_, fb = min(((u, b) for u, b in finite if b <= target), default=(hi_end, curve[hi_end]))
            if b_ - a <= 1e-9 * max(1.0, abs(a)):
                break  # the measured curve steps over the target here (a few tokens' worth of bits)
            u = (a + b_) / 2
            if step % 2 == 0 and fa > fb:
                w = (fa - target) / (fa - fb)  # where the chord crosses the target, kept inside
                u = a + min(max(w, 0.02), 0.98) * (b_ - a)
            probe(u)
            step += 1
        # exact ends for the end targets; otherwise the probe closest to the target
        if target <= curve[u_base]:
            out[target] = (u_base, curve[u_base])
        elif target >= curve[u_all]:
            out[target] = (u_all, curve[u_all])
        else:
            out[target] = min(curve.items(), key=lambda p: (abs(p[1] - target), abs(p[0])))
    return out


def _per_layer_row(model, layers, calib_ids, target) -> tuple[dict[str, float], float]:
    """Each layer's ``u`` putting its own mean bits at ``target`` (one forward, layers tuned in order)."""
    u_all, u_base = threshold_ends(layers)

    def hook(mod, args):
        u = threshold_for_bits(mod.router(args[0]).reshape(-1, mod.num_slices - 1), mod.slice_bits, target)
        mod.tau_logit = min(max(u, u_all), u_base)  # ±inf -> the exact finite ends of a bounded router

    handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
    try:
        # each layer routes with its new τ within this pass, so it also measures the result
        achieved = measure_bits(model, calib_ids, len(calib_ids))
    finally:
        for h in handles:
            h.remove()
    return thresholds(model, logit=True), achieved


def _check_mode(mode: str) -> str:
    if mode not in THRESHOLD_MODES:
        raise MoBiError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    return mode


@torch.no_grad()
def threshold_table(
    model: nn.Module,
    calib_ids: torch.Tensor,
    targets,
    mode: str = DEFAULT_THRESHOLD_MODE,
    tol: float = 0.05,
    batch_size: int = 8,
    max_probes: int = 400,
) -> dict[float, dict]:
    """The threshold controller (Sec. 4.2): thresholds whose *measured* average bits on ``calib_ids`` hit each target.

    Every controller in the package is this function (``mbq quantize``, the tour,
    :func:`calibrate_threshold`, the chapters); ``Checkpoint.set_bits`` reads its table.

    * ``mode="global"`` (default, :data:`DEFAULT_THRESHOLD_MODE`): one ``u = logit(τ)`` for
      every layer, found on the measured curve ``bits(u)`` (routing upstream changes the
      inputs downstream, so each probe is a forward pass; probes are shared by all
      targets). The bracket comes from the observed router scores.
    * ``mode="per_layer"``: each layer its own ``u`` that puts *its* mean bits at the
      target (:func:`mbq_ref.mobiroute.threshold_for_bits`), one forward per target.

    End targets (``B_1``, ``B_E``) get the exact ends of :func:`threshold_ends`.

    Args:
        model: a calibrated MoBiQuant model (fixed slice counts and overrides are cleared).
        calib_ids: ``[n, T]`` windows the bits are measured on.
        targets: target average bits within ``[B_1, B_E]``.
        tol: a global target is done when a probe lands within ``tol / 4`` bits.
    Returns:
        ``{target: {"logits": {layer: u}, "achieved": measured bits}}`` (ascending targets),
        the form :func:`mbq_ref.checkpoint.save_checkpoint` takes. The model is left at
        the last probe; :func:`set_threshold` applies a row.
    """
    _check_mode(mode)
    set_token_slices(model, None)  # also refuses a model without MoBiLinear layers
    set_slices(model, None)
    layers = mobi_layers(model)
    cum = cumulative_bits(next(iter(layers.values())).slice_bits)
    targets = sorted({float(t) for t in targets})
    for t in targets:
        if not cum[0] <= t <= cum[-1] or math.isnan(t):
            raise MoBiError(f"target bits {t} outside the reachable range {cum[0]}..{cum[-1]}")
    table: dict[float, dict] = {}
    if mode == "global":
        for t, (u, bits) in _global_table(model, layers, calib_ids, targets, tol, batch_size, max_probes).items():
            table[t] = {"logits": dict.fromkeys(layers, u), "achieved": bits}
    else:
        for t in targets:
            logits, bits = _per_layer_row(model, layers, calib_ids, t)
            table[t] = {"logits": logits, "achieved": bits}
    return table


@torch.no_grad()
def calibrate_threshold(
    model: nn.Module,
    calib_ids: torch.Tensor,
    target_bits: float,
    mode: str = DEFAULT_THRESHOLD_MODE,
    tol: float = 0.05,
    batch_size: int = 8,
    logit: bool = False,
) -> float | dict[str, float]:
    """Set the thresholds so the average bits measured on ``calib_ids`` is ``target_bits`` (±``tol``).

    One row of :func:`threshold_table` applied to the model. Afterwards the layer stats
    hold one measuring pass at the chosen thresholds (:func:`average_bits` = the achieved
    bits); a warning is raised if it misses the target by more than ``tol``.

    Returns:
        the global ``τ`` (``mode="global"``) or ``{layer path: τ}`` (``"per_layer"``);
        ``logit(τ)`` instead with ``logit=True`` (exact; see :func:`set_threshold`).
    """
    row = threshold_table(model, calib_ids, [target_bits], mode, tol, batch_size)[float(target_bits)]
    set_threshold(model, row["logits"], logit=True)
    achieved = measure_bits(model, calib_ids, batch_size)
    if abs(achieved - target_bits) > tol:
        warnings.warn(f"threshold controller reached {achieved:.3f} bits for a target of {target_bits} (tol {tol})")
    if mode == "global":
        u = next(iter(row["logits"].values()))
        return u if logit else logit_to_tau(u)
    return dict(row["logits"]) if logit else {n: logit_to_tau(u) for n, u in row["logits"].items()}


#: Finest spacing of a threshold table (121 rows over 2..8 bits): finer rows cost probes and bytes, not accuracy.
MIN_TABLE_STEP = 0.05


def table_targets(step: float, slice_bits=(2, 2, 2, 2)) -> list[float]:
    """Evenly spaced target bits from ``B_1`` to ``B_E`` (2..8 for slices 2,2,2,2), about ``step`` apart."""
    cum = cumulative_bits(slice_bits)
    span = cum[-1] - cum[0]
    if not MIN_TABLE_STEP <= step <= span:
        raise MoBiError(f"the threshold-table step must be in [{MIN_TABLE_STEP}, {span}] bits, got {step}")
    n = round(span / step)
    return [round(cum[0] + i * span / n, 6) for i in range(n + 1)]


def bits_sweep(
    model: nn.Module,
    calib_ids: torch.Tensor,
    test_ids: torch.Tensor,
    targets,
    mode: str = DEFAULT_THRESHOLD_MODE,
    seqlen: int = 256,
    max_windows: int | None = None,
    tol: float = 0.05,
) -> list[dict]:
    """Perplexity of one calibrated checkpoint at several target average bits (controller per target).

    Returns:
        one dict per target: ``target``, ``calib_bits`` (achieved on ``calib_ids``),
        ``test_bits`` (measured while evaluating), ``ppl``, ``window_nll`` (mean NLL per
        window, for paired comparisons) and ``tau_logit`` (``logit(τ)``: a float or a per-layer dict).
    """
    rows = []
    for target in targets:
        tau = calibrate_threshold(model, calib_ids, float(target), mode=mode, tol=tol, logit=True)
        calib_bits = average_bits(model)
        reset_bit_stats(model)
        res = perplexity(model, test_ids, seqlen=seqlen, max_windows=max_windows, progress=False)
        rows.append({
            "target": float(target), "calib_bits": calib_bits, "test_bits": average_bits(model),
            "ppl": res.ppl, "window_nll": res.window_nll, "tau_logit": tau,
        })  # fmt: skip
    return rows


# --- the table a checkpoint stores -------------------------------------------------
@dataclass
class ThresholdTable:
    """Per-layer thresholds ``logit(τ)`` for a list of target average bits (our controller; the paper only states that τ sets the precision, Sec. 4.2).

    Attributes:
        targets: ``[M]`` target average bits, ascending.
        tau_logit: ``[M, L]`` float64, ``logit(τ)`` of each layer (``±inf`` allowed:
            ``+inf`` = base slice only, ``-inf`` = all slices).
        layers: the ``L`` layer paths, in column order.
        achieved: ``[M]`` average bits measured on the calibration windows (or NaN).
    """

    targets: torch.Tensor
    tau_logit: torch.Tensor
    layers: list[str]
    achieved: list[float] = field(default_factory=list)

    #: ``logits_for`` refuses a target further than this from every bit-width the table measured.
    REACH_TOL = 0.1

    def logits_for(self, bits: float) -> dict[str, float]:
        """``{layer: logit(τ)}`` for ``bits``: the table row, or a linear blend of the two rows around it.

        Rows are placed at the bits they *measured* (``achieved``; the targets when a
        table has no measurements), so a row that missed its target is not mistaken for
        it. Between rows each layer's ``logit(τ)`` is interpolated linearly; an infinite
        end is replaced by the finite neighbour. The routed bits are measured afterwards,
        never assumed.

        Raises:
            CheckpointError: ``bits`` more than :attr:`REACH_TOL` outside the measured range
                (the table cannot reach it: a one-line error, never a silent neighbour).
        """
        t = self.targets.double()
        if not len(t):
            raise CheckpointError("the checkpoint has an empty threshold table; re-run `mbq quantize`")
        bits = float(bits)
        ach = torch.tensor(self.achieved, dtype=torch.float64) if len(self.achieved) == len(t) else t.clone()
        x = torch.where(torch.isfinite(ach), ach, t)  # where each row lands
        exact = (t - bits).abs() < 1e-9
        lo_b, hi_b = float(x.min()), float(x.max())
        if not lo_b - self.REACH_TOL <= bits <= hi_b + self.REACH_TOL:
            raise CheckpointError(
                f"the threshold table reaches {lo_b:.3f}..{hi_b:.3f} measured bits, not {bits:g}; "
                "re-build it with `mbq quantize` (more --threshold-windows)"
            )
        order = torch.argsort(x, stable=True)
        xs = x[order]
        if exact.any() and abs(float(x[int(exact.nonzero()[0])]) - bits) <= self.REACH_TOL:
            row = self.tau_logit[int(exact.nonzero()[0])]
        elif bits <= xs[0]:
            row = self.tau_logit[int(order[0])]
        elif bits >= xs[-1]:
            row = self.tau_logit[int(order[-1])]
        else:
            hi = int(torch.searchsorted(xs, torch.tensor([bits], dtype=xs.dtype))[0])
            lo = hi - 1
            w = (bits - float(xs[lo])) / max(float(xs[hi] - xs[lo]), 1e-12)
            a, b = self.tau_logit[int(order[lo])].clone(), self.tau_logit[int(order[hi])].clone()
            a = torch.where(torch.isfinite(a), a, b)
            b = torch.where(torch.isfinite(b), b, a)
            row = (1 - w) * a + w * b
        return {name: float(u) for name, u in zip(self.layers, row.tolist())}


# --- one call for `mbq quantize`, the tour and chapter 4 ---------------------------------

def quantize_and_table(model, calib_ids, cfg, targets, threshold_windows: int = 8, progress: bool = True) -> dict:
    """Calibrate MoBiQuant on ``model`` (in place) and build its threshold table.

    :func:`quantize_mobiquant` (Alg. 1, two stages) followed by
    :func:`threshold_table` (the package's one controller, default mode)
    on the first ``threshold_windows`` calibration windows.
    The model is left routing as calibrated (its trained thresholds).

    Args:
        model: full-precision HF Llama-family causal LM.
        calib_ids: ``[nsamples, seqlen]`` calibration windows.
        cfg: :class:`MoBiConfig`.
        targets: target bits, within ``[B_1, B_E]``.
    Returns:
        ``{"thresholds": ..., "calibration": settings dict, "results": measured dict}``
        (the first in the form :func:`mbq_ref.checkpoint.save_checkpoint` takes).
    """
    t0 = time.perf_counter()
    log = quantize_mobiquant(model, calib_ids, cfg, progress=progress)
    calib_s = time.perf_counter() - t0
    # the budget check: bits at the trained threshold on every calibration window
    trained = routing_diagnostics(model, calib_ids)
    thr_ids = calib_ids[:threshold_windows]
    t1 = time.perf_counter()
    table = threshold_table(model, thr_ids, targets)
    table_s = time.perf_counter() - t1
    misses = [t for t, v in table.items() if abs(v["achieved"] - t) > 0.05]
    set_threshold(model, log["thresholds"], logit=True)  # the trained thresholds (per layer for a ladder)
    return {
        "thresholds": table,
        "calibration": {
            "config": log["config"],
            "nsamples": int(calib_ids.shape[0]),
            "seqlen": int(calib_ids.shape[1]),
            "threshold_windows": int(thr_ids.shape[0]),
            "threshold_controller": f"mbq_ref.thresholds.threshold_table, mode {DEFAULT_THRESHOLD_MODE!r}, measured bits",
        },
        "results": {
            "calibration_seconds": round(calib_s, 2),
            "threshold_table_seconds": round(table_s, 2),
            "train_bits": cfg.train_bits,
            "avg_bits_trained": trained["avg_bits"],
            "layer_bits_trained": trained["layer_bits"],
            "surrogate_saturation": trained["saturation"],
            # the budget settle: each layer's bits at the trained threshold before it (what the
            # joint stage alone reached) and after (see mobiquant.settle_budget)
            "layer_bits_before_settle": {n: v["before"] for n, v in log["settle"].items()},
            "block_mse": [
                {"block": e.block, "stage": e.stage, "before": e.init_loss, "after": e.final_loss}
                for e in log["calib"].entries
            ],
            "table_targets_missed": misses,
        },
    }
