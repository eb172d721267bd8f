"""MoBiQuant for a whole model: swap, two-stage calibration, freezing and runtime precision (Alg. 1, Sec. 4.2).

:func:`quantize_mobiquant` replaces the q/k/v/o/gate/up/down projections of every
decoder layer by :class:`mbq_ref.mobilinear.MoBiLinear` and calibrates them block
by block with :func:`mbq_ref.calibrate.calibrate_blocks` in the two stages of
Alg. 1 (``"base"``: first-slice stabilisation; ``"joint"``: clipping + router with
the bit budget), then freezes every layer into integer codes.

One calibrated checkpoint then runs at any precision, without recalibration:

* :func:`set_slices` — every token reads ``k`` slices (a static 2/4/6/8-bit model);
* :func:`set_threshold` — the routers decide per token, with one global ``τ`` or
  one ``τ`` per layer (the recovered text is ambiguous; both are supported);
* :func:`threshold_table` / :func:`calibrate_threshold` — the one threshold
  controller: the ``τ`` whose measured average bits on calibration tokens hits a
  target (e.g. 3.0), global (default) or per layer;
* :func:`quantize_and_table` — calibration and threshold table in one call (what
  ``mbq quantize``, ``mbq tour`` and chapter 4 run).

**Average bits** of a model is the mean over layers of each layer's mean bits per
token, weighted by the layer's weight count ``N·K``: the bits per weight a static
model would need to read the same number of weight bytes per token.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .calibrate import CalibConfig, calibrate_blocks
from .fakequant import check_group_size, quantizable_linears
from .mobilinear import STAGES, MoBiError, MoBiLinear
from .mobiroute import BitStats, counts_to_bits, logit_to_tau, slice_counts, surrogate_saturation, threshold_for_bits
from .mobislice import cumulative_bits
from .packed import PackedMoBiLinear
from .perplexity import perplexity

__all__ = [
    "MoBiConfig",
    "average_bits",
    "bit_stats",
    "bits_sweep",
    "DEFAULT_THRESHOLD_MODE",
    "THRESHOLD_MODES",
    "calibrate_threshold",
    "layer_bits",
    "mobi_layers",
    "quantize_and_table",
    "quantize_mobiquant",
    "reset_bit_stats",
    "routing_diagnostics",
    "set_slices",
    "set_threshold",
    "set_token_slices",
    "settle_budget",
    "table_targets",
    "threshold_ends",
    "threshold_table",
    "thresholds",
]


@dataclass
class MoBiConfig:
    """MoBiQuant settings (App. C.1 where stated, our choices elsewhere; see ``docs/design.md``).

    Attributes:
        slice_bits: bits per slice (App. C.1: ``2 2 2 2`` -> 2/4/6/8-bit readings).
        group_size: weights per (scale, zero) group (128).
        router_hidden: hidden width of each layer's router MLP (not recovered; ours).
        train_bits: mean bits the budget loss aims at in the joint stage (every layer, Sec. 5.3).
        budget_weight: ``λ`` after warm-up (dimensionless, see :mod:`mbq_ref.mobiroute`).
        budget_warmup: share of the joint stage's steps over which ``λ`` ramps up from 0.
        router_lr: AdamW learning rate of the routers (parameter group ``"router"``).
        router_init_bias: initial router output bias (positive: all slices on at the start).
        fixed_k_weight: weight of the fixed-slice-count reconstruction terms (our
            addition, not in the paper; 0 = the paper's objective).
        tau: threshold used in the joint stage and right after calibration (the
            "trained threshold": the budget is enforced at it).
        score_bound: ``S`` of the router's bounded, normalised score (:class:`mbq_ref.mobiroute.MoBiRouter`).
        surrogate_temperature: ``T``: spread of the normalised scores and temperature of the
            straight-through soft mask ``σ((r - logit(τ)) / T)``.
        budget_dual_step: ``η`` of the dual ascent on the budget multiplier (per optimizer step).
        budget_offset_step: ``κ``: after each step the router's score offset moves by
            ``-κ (b̄ - b*) / (B_E - B_1)`` (integral control on the hard bits; a score shift
            of 1 = one standard deviation of the normalised scores).
        settle_budget: end each block's joint stage with the budget settle
            (:func:`settle_budget`): every layer's score offset is shifted so that the hard
            masks at ``τ`` give exactly ``train_bits`` on the calibration windows (our
            addition; the training above decides *which* tokens get slices, the settle
            fixes *how many*, which the integral control only approaches in a few steps).
        calib: the block-wise calibration settings (:class:`mbq_ref.calibrate.CalibConfig`).
    """

    slice_bits: tuple[int, ...] = (2, 2, 2, 2)
    group_size: int | None = 128
    router_hidden: int = 64
    train_bits: float = 3.0
    budget_weight: float = 1.0
    budget_warmup: float = 0.25
    router_lr: float = 1e-3
    router_init_bias: float = 1.0
    fixed_k_weight: float = 0.0
    tau: float = 0.5
    score_bound: float = 8.0
    surrogate_temperature: float = 1.0
    budget_dual_step: float = 10.0
    budget_offset_step: float = 1.0
    settle_budget: bool = True
    calib: CalibConfig = field(default_factory=CalibConfig.paper)

    @classmethod
    def paper(cls) -> MoBiConfig:
        """App. C.1: 128 x 2048 WikiText-2 windows, 20 epochs, batch 1, ``lwc_lr`` 1e-2, group 128, slices 2 2 2 2.

        2560 steps per block and stage: the dual step is ``η = 1`` per step (the tiny
        preset's 10 over its 16 steps), so the multiplier reacts on the same scale per stage.
        """
        return cls(budget_dual_step=1.0, budget_offset_step=0.1, calib=CalibConfig.paper())

    @classmethod
    def tiny(cls) -> MoBiConfig:
        """The bundled tiny Llama on ``austen`` (CPU, well under 2 min): :meth:`CalibConfig.tiny` windows, 2 epochs.

        32 x 256 windows, batch 4, ``lwc_lr`` 5e-2, 2 epochs per stage (the joint
        stage computes all four slices for every token, 4x a static layer's cost).
        16 steps per block and stage instead of 2560, so the router learning rate
        is raised to 1e-2 (with normalised scores; measured on 32 x 128 windows: 3e-3
        ended at 3.27 bits for a 3.0 budget, 1e-2 at 3.10, no saturated score in either).
        """
        return cls(router_lr=1e-2, calib=replace(CalibConfig.tiny(), epochs=2))


def mobi_layers(model: nn.Module) -> dict[str, MoBiLinear | PackedMoBiLinear]:
    """Every :class:`MoBiLinear` of ``model`` by module path (empty before :func:`quantize_mobiquant`).

    Includes :class:`mbq_ref.packed.PackedMoBiLinear` layers (after :func:`mbq_ref.packed.pack_model`):
    they route, take thresholds and count bits exactly as MoBiLinear does, so every routing
    and bit-statistics function below serves both.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, (MoBiLinear, PackedMoBiLinear))}


def _layers(model: nn.Module) -> dict[str, MoBiLinear]:
    layers = mobi_layers(model)
    if not layers:
        raise MoBiError("model has no MoBiLinear layers; call quantize_mobiquant first")
    return layers


def quantize_mobiquant(
    model: nn.Module, calib_ids: torch.Tensor, cfg: MoBiConfig | None = None, progress: bool = True
) -> dict:
    """Swap in MoBiLinear layers, calibrate them in two stages (Alg. 1) and freeze them, in place.

    Args:
        model: HF Llama-family causal LM in full precision (fp32 on CPU).
        calib_ids: ``[nsamples, seqlen]`` calibration token ids.
        cfg: settings (default :meth:`MoBiConfig.paper`).
        progress: tqdm bar over blocks x stages.
    Returns:
        a log: ``calib`` (:class:`mbq_ref.calibrate.CalibLog`, block MSE per stage),
        ``layer_bits`` (mean bits per token of each layer at ``cfg.tau`` on the
        calibration windows, as routed in the last calibration pass), ``avg_bits``,
        ``settle`` (per layer: ``before`` = bits at ``τ`` as the joint stage left them,
        ``after``, and the offset ``shift``; empty if ``cfg.settle_budget`` is off),
        ``seconds`` and ``config``. The model is left routing at ``cfg.tau``.
    """
    cfg = cfg or MoBiConfig.paper()
    check_group_size(model, cfg.group_size)  # before any layer is swapped or calibrated
    t0 = time.perf_counter()
    calib = replace(cfg.calib, lrs={**cfg.calib.lrs, "router": cfg.router_lr})
    steps = calib.epochs * math.ceil(len(calib_ids) / calib.batch_size)  # optimizer steps per block and stage
    torch.manual_seed(calib.seed)  # router initialisation: same seed, same model
    for name, mod in quantizable_linears(model).items():
        if not isinstance(mod, nn.Linear):
            raise MoBiError(f"{name} is a {type(mod).__name__}, expected nn.Linear; load a fresh full-precision model")
        layer = MoBiLinear(
            mod, cfg.slice_bits, cfg.group_size, cfg.router_hidden, name, cfg.train_bits, cfg.budget_weight,
            round(cfg.budget_warmup * steps), cfg.fixed_k_weight, cfg.tau, router_init_bias=cfg.router_init_bias,
            score_bound=cfg.score_bound, surrogate_temperature=cfg.surrogate_temperature,
            budget_dual_step=cfg.budget_dual_step, budget_offset_step=cfg.budget_offset_step,
        )  # fmt: skip
        model.set_submodule(name, layer)
    settled: dict[str, dict[str, float]] = {}

    def finish(_i, block, rerun):
        if cfg.settle_budget:
            settled.update(settle_budget(block, rerun))

    log = calibrate_blocks(model, calib_ids, calib, stages=STAGES, progress=progress, finish_block=finish)
    layers = mobi_layers(model)
    # calibrate_blocks' last pass over each block ran in inference mode at cfg.tau: its stats
    # are the bits each layer settled on for the calibration windows
    trained = layer_bits(model)
    avg = average_bits(model)
    for m in layers.values():
        if m.sliced is None:
            m.freeze()
        m.reset_stats()
    return {
        "calib": log,
        "layer_bits": trained,
        "avg_bits": avg,
        "settle": settled,
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }


@torch.no_grad()
def settle_budget(block: nn.Module, rerun, tol: float = 0.02, max_passes: int = 4) -> dict[str, dict[str, float]]:
    """The budget settle: shift each router's offset until its layer meets ``train_bits`` at ``τ``.

    After the joint stage the hard bits at the trained threshold are near, not at,
    ``train_bits``: the dual ascent and the integral offset control get a few dozen
    steps per block (16 in the tiny preset), and the running score statistics used at
    inference differ from the batch statistics used in training. The settle measures
    each layer's scores ``r`` ``[T, E-1]`` over all calibration windows in inference
    mode and adds to its offset the shift that makes the mean bits at ``logit(τ)``
    equal ``train_bits`` (:meth:`mbq_ref.mobiroute.MoBiRouter.settle_offset`). One shift per
    layer moves every token equally, so which tokens read more slices is still the
    router's learned ranking. A layer's shift changes the inputs of the layers after it
    in the block, so the block is re-run until every layer is within ``tol`` bits.

    Args:
        block: one calibrated decoder block (its MoBiLinear layers in inference mode).
        rerun: runs the block once over its calibration inputs (from :func:`mbq_ref.calibrate.calibrate_blocks`).
        tol: bits; stop when every layer is this close to its ``train_bits``.
        max_passes: at most this many measuring passes (fits happen between them).
    Returns:
        ``{layer name: {"before": bits, "after": bits, "shift": total offset shift}}``
        (:attr:`MoBiLinear.name`, the module path in the model).
    """
    layers = {m.name or n: m for n, m in block.named_modules() if isinstance(m, MoBiLinear)}
    scores: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [
        m.router.register_forward_hook(lambda _mod, _a, r, n=n: scores[n].append(r.reshape(-1, r.shape[-1])))
        for n, m in layers.items()
    ]
    out = {n: {"before": math.nan, "after": math.nan, "shift": 0.0} for n in layers}
    try:
        for p in range(max_passes):
            for s in scores.values():
                s.clear()
            rerun()
            r = {n: torch.cat(scores[n]) for n in layers}
            for n, m in layers.items():
                bits = float(counts_to_bits(slice_counts(r[n], m.tau_logit), m.slice_bits).float().mean())
                out[n]["after"] = bits
                if p == 0:
                    out[n]["before"] = bits
            if p == max_passes - 1 or all(abs(o["after"] - layers[n].train_bits) <= tol for n, o in out.items()):
                break
            for n, m in layers.items():
                out[n]["shift"] += m.router.settle_offset(r[n], m.tau_logit, m.slice_bits, m.train_bits)
    finally:
        for h in hooks:
            h.remove()
        for m in layers.values():
            m.reset_stats()  # the settle's passes are not the calibration pass the log reports
    return out


def set_slices(model: nn.Module, k: int | None) -> nn.Module:
    """Every token of every layer reads ``k`` slices (``B_k`` bits: a static model); ``None`` = route again."""
    for m in _layers(model).values():
        m.fixed_k = None if k is None else m.check_k(k)
    return model


def set_token_slices(model: nn.Module, slices) -> nn.Module:
    """Per-token slice counts for every layer: long ``[B, T]`` or ``f(layer, x)``; ``None`` removes the override."""
    for m in _layers(model).values():
        m.token_slices = slices
    return model


def set_threshold(model: nn.Module, tau: float | dict[str, float], logit: bool = False) -> nn.Module:
    """Route with threshold ``τ``: one float for every layer, or ``{layer path: τ}`` (other layers unchanged).

    ``logit=True`` takes ``u = logit(τ)`` instead (any float, ``±inf`` allowed): exact
    where ``τ`` is not, since ``σ(u)`` rounds to 1.0 in float64 for ``u > 36.7`` and
    trained router scores can be that large. Also clears any fixed slice count.
    """
    layers = _layers(model)
    values = tau if isinstance(tau, dict) else dict.fromkeys(layers, tau)
    unknown = sorted(set(values) - set(layers))
    if unknown:
        raise MoBiError(f"no MoBiLinear layer named {unknown[0]!r} ({len(unknown)} unknown names)")
    for name, t in values.items():
        if logit:
            if math.isnan(t):
                raise MoBiError(f"threshold logit for layer {name!r} is NaN")
            layers[name].tau_logit = float(t)
        else:
            layers[name].tau = t
    for m in layers.values():
        m.fixed_k = None
    return model


def thresholds(model: nn.Module, logit: bool = False) -> dict[str, float]:
    """The current ``τ`` (or ``logit(τ)`` with ``logit=True``) of every layer, by path."""
    return {n: (m.tau_logit if logit else m.tau) for n, m in _layers(model).items()}


def reset_bit_stats(model: nn.Module) -> None:
    """Zero every layer's token/bit counters."""
    for m in _layers(model).values():
        m.reset_stats()


def bit_stats(model: nn.Module) -> dict[str, BitStats]:
    """Each layer's :class:`mbq_ref.mobiroute.BitStats` (tokens, bits, slice histogram) since the last reset."""
    return {n: m.stats for n, m in _layers(model).items()}


def layer_bits(model: nn.Module) -> dict[str, float]:
    """Mean bits per token of each layer since the last reset (NaN for a layer that saw no token)."""
    return {n: m.avg_bits for n, m in _layers(model).items()}


def average_bits(model: nn.Module) -> float:
    """Weight-count-weighted mean of the layers' bits per token since the last reset (module docstring)."""
    layers = _layers(model)
    if any(m.stats.tokens == 0 for m in layers.values()):
        raise MoBiError("some MoBiLinear layers have seen no token since the last reset; run the model first")
    sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
    return sum(sizes[n] * m.avg_bits for n, m in layers.items()) / sum(sizes.values())


@torch.no_grad()
def _measure(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> float:
    reset_bit_stats(model)
    device = next(model.parameters()).device
    for i in range(0, len(calib_ids), batch_size):
        model(input_ids=calib_ids[i : i + batch_size].to(device))
    return average_bits(model)


@torch.no_grad()
def routing_diagnostics(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict:
    """Bits and surrogate health at the layers' current thresholds, measured by a forward over ``ids``.

    Returns:
        ``avg_bits`` (:func:`average_bits`), ``layer_bits`` and ``saturation``: the share of
        router scores (all layers, tokens and residual slices) whose straight-through
        gradient is below 1e-3 of its peak (:func:`mbq_ref.mobiroute.surrogate_saturation`,
        at each layer's threshold and surrogate temperature), plus ``layer_saturation``.
    """
    layers = _layers(model)
    counts: dict[str, list[float]] = {n: [0.0, 0.0] for n in layers}

    def hook_for(name, mod):
        def hook(_m, _args, r):
            u = mod.tau_logit if math.isfinite(mod.tau_logit) else 0.0
            frac = surrogate_saturation(r, u, mod.surrogate_temperature, float(mod.router.score_bound))
            counts[name][0] += frac * r.numel()
            counts[name][1] += r.numel()

        return hook

    handles = [m.router.register_forward_hook(hook_for(n, m)) for n, m in layers.items()]
    try:
        avg = _measure(model, ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    sat = sum(c[0] for c in counts.values()) / max(sum(c[1] for c in counts.values()), 1)
    return {
        "avg_bits": avg,
        "layer_bits": layer_bits(model),
        "saturation": sat,
        "layer_saturation": {n: c[0] / max(c[1], 1) for n, c in counts.items()},
    }


#: The one default of every threshold controller in the package (tour, ``mbq quantize``,
#: ``Checkpoint.set_bits``, chapters): one ``τ`` shared by all layers (Sec. 4.2's runtime
#: threshold), so the routers, not the controller, decide which layers get the bits.
DEFAULT_THRESHOLD_MODE = "global"
THRESHOLD_MODES = ("global", "per_layer")


def threshold_ends(layers: dict[str, MoBiLinear]) -> tuple[float, float]:
    """``(u_all, u_base)``: thresholds that give every slice / the base slice only, on any input.

    Finite for bounded routers (``±S`` just outside the score range ``(-S, S)``); ``∓inf`` otherwise.
    """
    bound = max(float(m.router.score_bound) for m in layers.values())
    if not math.isfinite(bound):
        return -math.inf, math.inf
    pad = 1e-3 * bound
    return -(bound + pad), bound + pad


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
            curve[u] = _measure(model, calib_ids, batch_size)
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
        achieved = _measure(model, calib_ids, len(calib_ids))
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
    layers = _layers(model)
    _check_mode(mode)
    cum = cumulative_bits(next(iter(layers.values())).slice_bits)
    targets = sorted({float(t) for t in targets})
    for t in targets:
        if not cum[0] <= t <= cum[-1] or math.isnan(t):
            raise MoBiError(f"target bits {t} outside the reachable range {cum[0]}..{cum[-1]}")
    set_token_slices(model, None)
    set_slices(model, None)
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
    achieved = _measure(model, calib_ids, batch_size)
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


# --- one call for `mbq quantize`, the tour and chapter 4 ---------------------------------
def quantize_and_table(model, calib_ids, cfg, targets, threshold_windows: int = 8, progress: bool = True) -> dict:
    """Calibrate MoBiQuant on ``model`` (in place) and build its threshold table.

    :func:`quantize_mobiquant` (Alg. 1, two stages) followed by
    :func:`threshold_table` (the package's one controller, default mode)
    on the first ``threshold_windows`` calibration windows.
    The model is left routing as calibrated (``cfg.tau``).

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
    # the budget check (issue 11): bits at the trained threshold on every calibration window
    trained = routing_diagnostics(model, calib_ids)
    thr_ids = calib_ids[:threshold_windows]
    t1 = time.perf_counter()
    table = threshold_table(model, thr_ids, targets)
    table_s = time.perf_counter() - t1
    misses = [t for t, v in table.items() if abs(v["achieved"] - t) > 0.05]
    set_threshold(model, cfg.tau)
    return {
        "thresholds": table,
        "calibration": {
            "config": log["config"],
            "nsamples": int(calib_ids.shape[0]),
            "seqlen": int(calib_ids.shape[1]),
            "threshold_windows": int(thr_ids.shape[0]),
            "threshold_controller": f"mbq_ref.mobiquant.threshold_table, mode {DEFAULT_THRESHOLD_MODE!r}, measured bits",
        },
        "results": {
            "calibration_seconds": round(calib_s, 2),
            "threshold_table_seconds": round(table_s, 2),
            "train_bits": cfg.train_bits,
            "avg_bits_trained": trained["avg_bits"],
            "layer_bits_trained": trained["layer_bits"],
            "surrogate_saturation": trained["saturation"],
            "block_mse": [
                {"block": e.block, "stage": e.stage, "before": e.init_loss, "after": e.final_loss}
                for e in log["calib"].entries
            ],
            "table_targets_missed": misses,
        },
    }
