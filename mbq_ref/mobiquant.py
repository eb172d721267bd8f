"""MoBiQuant for a whole model: swap, two-stage calibration, freezing and runtime precision (Alg. 1, Sec. 4.2).

:func:`quantize_mobiquant` replaces the q/k/v/o/gate/up/down projections of every
decoder layer by :class:`mbq_ref.mobilinear.MoBiLinear` and calibrates them block
by block with :func:`mbq_ref.calibrate.calibrate_blocks` in the two stages of
Alg. 1 (``"base"``: first-slice stabilisation; ``"joint"``: clipping + router with
the bit budget), then freezes every layer into integer codes.

One calibrated checkpoint then runs at any precision, without recalibration:

* :func:`set_slices` — every token reads ``k`` slices (a static 2/4/6/8-bit model);
* :func:`set_threshold` — the routers decide per token, with one global ``τ`` or
  one ``τ`` per layer (the paper does not specify which; both are supported, docs/paper.md);
* the threshold controller (:mod:`mbq_ref.thresholds`) — the ``τ`` whose measured
  average bits on calibration tokens (:func:`measure_bits`) hits a target (e.g. 3.0),
  global (default) or per layer.

**Average bits** of a model is the mean over layers of each layer's mean bits per
token, weighted by the layer's weight count ``N·K``: the bits per weight a static
model would need to read the same number of weight bytes per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .calibrate import CalibConfig, calibrate_blocks
from .fakequant import check_group_size, modules_of_type, quantizable_linears
from .mobilinear import ROUTINGS, STAGES, MoBiError, MoBiLinear, RoutedSlices
from .mobiroute import BitStats, RouterBudget, counts_to_bits, slice_counts, surrogate_saturation, threshold_for_bits
from .mobislice import cumulative_bits

__all__ = [
    "MoBiConfig",
    "average_bits",
    "bit_stats",
    "layer_bits",
    "measure_bits",
    "mobi_layers",
    "quantize_mobiquant",
    "reset_bit_stats",
    "router_cost",
    "routing_diagnostics",
    "run_windows",
    "set_slices",
    "set_threshold",
    "set_token_slices",
    "settle_budget",
    "thresholds",
]


@dataclass
class MoBiConfig:
    """MoBiQuant settings (App. C.1 where stated, our choices elsewhere; see ``docs/design.md``).

    Attributes:
        slice_bits: bits per slice (App. C.1: ``2 2 2 2`` -> 2/4/6/8-bit readings).
        group_size: weights per (scale, zero) group (128).
        router_hidden: hidden width of each layer's router MLP (the paper does not specify it; ours).
        train_bits: mean bits the budget loss aims at in the joint stage: one number for every
            layer (Sec. 5.3), or ``{layer path: bits}`` with one entry per quantized layer (our
            extension: a between-layer allocation fixed at training time, e.g.
            :func:`mbq_ref.routing_controls.mix_train_bits`); checked by :meth:`layer_train_bits`.
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
        routing: the router design (:data:`mbq_ref.mobilinear.ROUTINGS`, ``docs/design.md``):
            ``"ladder"`` (default, ours) one score per token, each step's threshold the batch
            quantile for a budget drawn from :attr:`budget_range`; ``"per_slice"`` one score per
            residual slice, trained at ``train_bits`` with the budget loss (the earlier design).
        budget_range: ``(lo, hi)`` mean bits the ladder's per-step budget is drawn from,
            uniformly (``None`` = the whole readable range ``B_1..B_E``); ladder only.
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
    train_bits: float | dict[str, float] = 3.0
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
    routing: str = "ladder"
    budget_range: tuple[float, float] | None = None
    calib: CalibConfig = field(default_factory=CalibConfig.paper)

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise MoBiError(f"unknown routing {self.routing!r}; use one of {ROUTINGS}")
        if self.routing == "ladder" and self.fixed_k_weight:
            raise MoBiError("fixed_k_weight is a per_slice option; a ladder router trains every width already")
        if self.budget_range is not None:
            self.layer_budget_range()  # checked now, not after the first block

    def layer_budget_range(self) -> tuple[float, float]:
        """The checked ``(lo, hi)`` of :attr:`budget_range` (default ``(B_1, B_E)``)."""
        cum = cumulative_bits(self.slice_bits)
        if self.budget_range is None:
            return float(cum[0]), float(cum[-1])
        try:
            lo, hi = (float(b) for b in self.budget_range)
        except (TypeError, ValueError):
            raise MoBiError(f"budget_range must be two numbers (lo, hi), got {self.budget_range!r}") from None
        if not cum[0] <= lo <= hi <= cum[-1]:
            raise MoBiError(f"budget_range {self.budget_range} must satisfy {cum[0]} <= lo <= hi <= {cum[-1]}")
        return lo, hi

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
        return cls(router_hidden=4, router_lr=1e-2, calib=replace(CalibConfig.tiny(), epochs=2))

    def layer_train_bits(self, names) -> dict[str, float]:
        """``train_bits`` of every layer in ``names``, checked: one value each, within ``B_1..B_E``.

        Raises:
            MoBiError: a layer without a value, a value for no such layer, or a value
                outside the readable range of :attr:`slice_bits` (one line naming it).
        """
        names = list(names)
        per = self.train_bits if isinstance(self.train_bits, dict) else dict.fromkeys(names, self.train_bits)
        missing = [n for n in names if n not in per]
        if missing:
            raise MoBiError(f"train_bits has no value for layer {missing[0]!r} ({len(missing)} missing)")
        unknown = sorted(set(per) - set(names))
        if unknown:
            raise MoBiError(f"train_bits names {unknown[0]!r}, not a quantized layer ({len(unknown)} unknown)")
        cum = cumulative_bits(self.slice_bits)
        lo, hi = cum[0], cum[-1]
        for n in names:
            b = per[n]
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not lo <= b <= hi:
                raise MoBiError(f"train_bits of layer {n!r} is {b!r}, outside the readable {lo}..{hi} bits")
        return {n: float(per[n]) for n in names}


def mobi_layers(model: nn.Module) -> dict[str, RoutedSlices]:
    """Every routed layer of ``model`` by module path (empty before :func:`quantize_mobiquant`).

    :class:`MoBiLinear` and :class:`mbq_ref.packed.PackedMoBiLinear` (after
    :func:`mbq_ref.packed.pack_model`) are both :class:`mbq_ref.mobilinear.RoutedSlices`:
    they route, take thresholds and count bits the same way, so every routing and
    bit-statistics function below serves both.
    """
    return modules_of_type(model, RoutedSlices)


def _layers(model: nn.Module) -> dict[str, RoutedSlices]:
    return modules_of_type(model, RoutedSlices, MoBiError("model has no MoBiLinear layers; call quantize_mobiquant first"))


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
        ``layer_bits`` (mean bits per token of each layer at its trained threshold on the
        calibration windows, as routed in the last calibration pass), ``avg_bits``,
        ``settle`` (per layer: ``before`` = bits at ``τ`` as the joint stage left them,
        ``after``, and the offset ``shift``; empty if ``cfg.settle_budget`` is off for
        per-slice routers), ``thresholds`` (``{layer: logit(τ)}`` the model is left routing at),
        ``seconds`` and ``config``. The model is left routing at its trained thresholds.
    """
    cfg = cfg or MoBiConfig.paper()
    check_group_size(model, cfg.group_size)  # before any layer is swapped or calibrated
    t0 = time.perf_counter()
    calib = replace(cfg.calib, lrs={**cfg.calib.lrs, "router": cfg.router_lr})
    steps = calib.epochs * math.ceil(len(calib_ids) / calib.batch_size)  # optimizer steps per block and stage
    torch.manual_seed(calib.seed)  # router initialisation: same seed, same model
    linears = quantizable_linears(model)
    targets = cfg.layer_train_bits(linears)  # before any layer is swapped
    for name, mod in linears.items():
        if not isinstance(mod, nn.Linear):
            raise MoBiError(f"{name} is a {type(mod).__name__}, expected nn.Linear; load a fresh full-precision model")
        budget = RouterBudget(  # one per layer: it holds that layer's multiplier, error scale and target
            targets[name], cfg.budget_weight, round(cfg.budget_warmup * steps), cfg.budget_dual_step,
            cfg.budget_offset_step,
        )  # fmt: skip
        layer = MoBiLinear(
            mod, cfg.slice_bits, cfg.group_size, cfg.router_hidden, name, budget, cfg.fixed_k_weight, cfg.tau,
            router_init_bias=cfg.router_init_bias, score_bound=cfg.score_bound,
            surrogate_temperature=cfg.surrogate_temperature, routing=cfg.routing,
        )  # fmt: skip
        model.set_submodule(name, layer)
    settled: dict[str, dict[str, float]] = {}
    # a ladder always settles: its trained threshold is the one that reads train_bits on the windows
    settle = cfg.settle_budget or cfg.routing == "ladder"
    finish = (lambda _i, block, rerun: settled.update(settle_budget(block, rerun))) if settle else None
    before = _budget_sampler(cfg) if cfg.routing == "ladder" else None
    log = calibrate_blocks(
        model, calib_ids, calib, stages=STAGES, progress=progress, finish_block=finish, before_step=before
    )
    layers = mobi_layers(model)
    # calibrate_blocks' last pass over each block ran in inference mode at the trained thresholds: its stats
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
        "thresholds": {n: m.tau_logit for n, m in layers.items()},  # logit(τ) each layer was left routing at
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }


def _budget_sampler(cfg: MoBiConfig):
    """``before_step`` for :func:`mbq_ref.calibrate.calibrate_blocks`: each joint step of a block
    trains at one budget ``b ~ U(budget_range)`` shared by the block's layers (our design: the
    checkpoint is served at every ``b`` of the range, so it is trained at every ``b``).
    Its own seeded generator: the draws never change the calibration's window order."""
    lo, hi = cfg.layer_budget_range()
    gen = torch.Generator().manual_seed(cfg.calib.seed * 7919 + 17)

    def before_step(_i, block, stage, training):
        b = lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64)) if training else None
        for m in modules_of_type(block, MoBiLinear).values():
            m.step_bits = b if stage == "joint" else None

    return before_step


@torch.no_grad()
def settle_budget(block: nn.Module, rerun, tol: float = 0.02, max_passes: int = 4) -> dict[str, dict[str, float]]:
    """The budget settle: shift each router's offset until its layer meets ``train_bits`` at ``τ``.

    After the joint stage the hard bits at the trained threshold are near, not at,
    ``train_bits``: the dual ascent and the integral offset control get a few dozen
    steps per block (16 in the tiny preset), and the running score statistics used at
    inference differ from the batch statistics used in training. The settle measures
    each layer's scores ``r`` ``[T, E-1]`` over all calibration windows in inference
    mode and adds to its offset the shift that makes the mean bits at ``logit(τ)``
    equal ``train_bits`` (:meth:`mbq_ref.mobiroute.MoBiRouter.settle_offset`); a ladder router
    (``routing="ladder"``) keeps its scores and gets its own threshold instead (the level of a
    ladder is the threshold; this is how its "trained threshold" is defined). One shift per
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
    layers = {m.name or n: m for n, m in modules_of_type(block, MoBiLinear).items()}
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
                if m.router.ladder:  # the level is the threshold itself: set the layer's own τ
                    m.tau_logit = threshold_for_bits(r[n], m.slice_bits, m.train_bits)
                else:
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
def run_windows(model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    """Forward ``model`` over the windows ``ids`` ``[n, T]``, ``batch_size`` at a time (for hooks and bit counters)."""
    device = next(model.parameters()).device
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i : i + batch_size].to(device))


@torch.no_grad()
def measure_bits(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> float:
    """Run the model over ``calib_ids`` ``[n, T]``, ``batch_size`` windows at a time; the :func:`average_bits` it routed."""
    reset_bit_stats(model)
    run_windows(model, calib_ids, batch_size)
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
            if mod.router.ladder:  # one score s per token, read at the rung nearest the threshold
                rung = (r - u).abs().argmin(-1, keepdim=True)
                r, u = r[..., :1], u + rung.to(r.dtype) * mod.router.rung  # r_e - u = s - (u + (e - 1) ρ)
            frac = surrogate_saturation(r, u, mod.surrogate_temperature, float(mod.router.score_bound))
            counts[name][0] += frac * r.numel()
            counts[name][1] += r.numel()

        return hook

    handles = [m.router.register_forward_hook(hook_for(n, m)) for n, m in layers.items()]
    try:
        avg = measure_bits(model, ids, batch_size)
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


def router_cost(model: nn.Module, storage_bits: int = 16) -> dict:
    """What the routers cost next to the slices they route (counted, not estimated).

    Per routed layer ``[N, K]`` with a router ``K -> H -> outputs``: parameters
    ``K H + H + H o + o`` (weights and biases; ``o`` = 1 for a ladder, ``E - 1`` per slice) and
    ``2 (K H + H o)`` FLOPs per token, against ``2 N K`` FLOPs per token for each slice read.

    Returns:
        ``router_params``, ``quantized_weights`` (``Σ N K``), ``router_bits_per_weight``
        (router parameters stored at ``storage_bits`` bits, spread over the quantized weights:
        add it to the average bits for the checkpoint's true bits per weight),
        ``router_flops_per_token``, ``slice_flops_per_token`` (one slice, every layer) and
        their ratio, ``hidden`` and ``routing``.
    """
    layers = _layers(model)
    params = sum(sum(p.numel() for p in m.router.parameters()) for m in layers.values())
    weights = sum(m.in_features * m.out_features for m in layers.values())
    r_flops = sum(2 * (m.router.fc1.in_features * m.router.fc1.out_features
                       + m.router.fc2.in_features * m.router.fc2.out_features) for m in layers.values())  # fmt: skip
    s_flops = 2 * weights
    first = next(iter(layers.values()))
    return {
        "routing": getattr(first, "routing", "per_slice"),
        "hidden": first.router.fc1.out_features,
        "router_params": params,
        "quantized_weights": weights,
        "router_bits_per_weight": storage_bits * params / weights,
        "storage_bits": storage_bits,
        "router_flops_per_token": r_flops,
        "slice_flops_per_token": s_flops,
        "router_flops_per_slice_flops": r_flops / s_flops,
    }
