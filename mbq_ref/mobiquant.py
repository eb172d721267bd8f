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
* :func:`calibrate_threshold` — the controller: the ``τ`` whose measured average
  bits on calibration tokens hits a target (e.g. 3.0) within ``tol``.

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
from .mobiroute import BitStats, logit_to_tau, threshold_for_bits
from .mobislice import cumulative_bits
from .perplexity import perplexity

__all__ = [
    "MoBiConfig",
    "average_bits",
    "bit_stats",
    "bits_sweep",
    "calibrate_threshold",
    "layer_bits",
    "mobi_layers",
    "quantize_mobiquant",
    "reset_bit_stats",
    "set_slices",
    "set_threshold",
    "set_token_slices",
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
        tau: threshold used in the joint stage and right after calibration.
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
    calib: CalibConfig = field(default_factory=CalibConfig.paper)

    @classmethod
    def paper(cls) -> MoBiConfig:
        """App. C.1: 128 x 2048 WikiText-2 windows, 20 epochs, batch 1, ``lwc_lr`` 1e-2, group 128, slices 2 2 2 2."""
        return cls(calib=CalibConfig.paper())

    @classmethod
    def tiny(cls) -> MoBiConfig:
        """The bundled tiny Llama on ``austen`` (CPU, well under 2 min): :meth:`CalibConfig.tiny` windows, 2 epochs.

        32 x 256 windows, batch 4, ``lwc_lr`` 5e-2, 2 epochs per stage (the joint
        stage computes all four slices for every token, 4x a static layer's cost).
        16 steps per block and stage instead of 2560, so the router learning rate
        is raised to 3e-2 (1e-1 made router scores run away to |r| > 100).
        """
        return cls(router_lr=3e-2, calib=replace(CalibConfig.tiny(), epochs=2))


def mobi_layers(model: nn.Module) -> dict[str, MoBiLinear]:
    """Every :class:`MoBiLinear` of ``model`` by module path (empty before :func:`quantize_mobiquant`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoBiLinear)}


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
        )  # fmt: skip
        model.set_submodule(name, layer)
    log = calibrate_blocks(model, calib_ids, calib, stages=STAGES, progress=progress)
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
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }


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


def _bisect_global(model, layers, calib_ids, target, tol, batch_size, max_iter) -> tuple[float, float]:
    """One ``u = logit(τ)`` for all layers by safeguarded bisection; returns ``(u, measured bits)``.

    The bracket ``[a, b]`` always has ``bits(a) >= target >= bits(b)``. Odd steps
    split it at the linear interpolation of the two end measurements (a few
    steps when ``bits(u)`` is smooth), even steps at its midpoint (so the bracket
    at least halves every two probes, whatever the curve). Leaves the model at ``u``.
    """
    seen = [math.inf, -math.inf]  # range of the nested scores min_{j<=e} r_j met so far
    last = [None]

    def record(_mod, _args, r):
        c = r.detach().cummin(dim=-1).values
        seen[0], seen[1] = min(seen[0], float(c.min())), max(seen[1], float(c.max()))

    def probe(u: float) -> tuple[float, float]:
        for m in layers.values():
            m.tau_logit = u
        last[0] = u
        return u, _measure(model, calib_ids, batch_size)

    def miss(p):
        return abs(p[1] - target)

    # bits fall as u rises; ±inf are "all slices" / "base only"
    handles = [m.router.register_forward_hook(record) for m in layers.values()]
    try:
        top, bottom = probe(-math.inf), probe(math.inf)
    finally:
        for h in handles:
            h.remove()
    best = min(top, bottom, key=miss)
    # bracket: just outside every score seen with all slices on and with none on
    pad = 1e-3 * max(1.0, seen[1] - seen[0])
    (a, fa), (b, fb) = (seen[0] - pad, top[1]), (seen[1] + pad, bottom[1])
    for step in range(max_iter):
        if miss(best) <= tol / 4 or b - a < 1e-9 * max(1.0, abs(a)):
            break
        u = (a + b) / 2
        if step % 2 == 0 and fa > fb:
            w = (fa - target) / (fa - fb)  # where the chord crosses the target
            u = a + min(max(w, 0.05), 0.95) * (b - a)  # stay strictly inside the bracket
        p = probe(u)
        best = min(best, p, key=miss)
        if p[1] > target:
            a, fa = p
        else:
            b, fb = p
    if last[0] != best[0]:  # the stats hold the last probe: measure the chosen u again
        probe(best[0])
    return best


@torch.no_grad()
def calibrate_threshold(
    model: nn.Module,
    calib_ids: torch.Tensor,
    target_bits: float,
    per_layer: bool = False,
    tol: float = 0.05,
    batch_size: int = 8,
    max_iter: int = 40,
    logit: bool = False,
) -> float | dict[str, float]:
    """The threshold controller: set ``τ`` so the average bits on ``calib_ids`` is ``target_bits`` (±``tol``).

    * ``per_layer=False``: one global ``τ``, found by bisection on ``logit(τ)`` (every
      other step splits the bracket by interpolation instead of at the midpoint); each
      probe is a forward pass over ``calib_ids`` (routing upstream changes the inputs
      downstream, so the bits are measured, not predicted).
    * ``per_layer=True``: each layer gets the ``τ`` that puts *its own* mean bits at
      the target (:func:`mbq_ref.mobiroute.threshold_for_bits`), set by a pre-hook
      during one forward of all windows at once, so every layer sees inputs routed
      by the already-tuned layers before it.

    Clears fixed slice counts and per-token overrides. Afterwards the layer stats
    hold one measuring pass at the chosen ``τ`` (:func:`average_bits` = the achieved
    bits); a warning is raised if it misses the target by more than ``tol``.

    Returns:
        the global ``τ``, or ``{layer path: τ}``; ``logit(τ)`` instead with ``logit=True``
        (exact; see :func:`set_threshold`).
    """
    layers = _layers(model)
    cum = cumulative_bits(next(iter(layers.values())).slice_bits)
    if not cum[0] <= target_bits <= cum[-1]:
        raise MoBiError(f"target_bits {target_bits} outside the reachable range {cum[0]}..{cum[-1]}")
    set_token_slices(model, None)
    set_slices(model, None)
    if per_layer:

        def hook(mod, args):
            mod.tau_logit = threshold_for_bits(
                mod.router(args[0]).reshape(-1, mod.num_slices - 1), mod.slice_bits, target_bits
            )

        handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
        try:
            # each layer routes with its new τ within this pass, so it also measures the result
            achieved = _measure(model, calib_ids, len(calib_ids))
        finally:
            for h in handles:
                h.remove()
        result: float | dict[str, float] = thresholds(model, logit)
    else:
        u, achieved = _bisect_global(model, layers, calib_ids, target_bits, tol, batch_size, max_iter)
        result = u if logit else logit_to_tau(u)
    if abs(achieved - target_bits) > tol:
        warnings.warn(f"threshold controller reached {achieved:.3f} bits for a target of {target_bits} (tol {tol})")
    return result


def bits_sweep(
    model: nn.Module,
    calib_ids: torch.Tensor,
    test_ids: torch.Tensor,
    targets,
    per_layer: bool = False,
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
        tau = calibrate_threshold(model, calib_ids, float(target), per_layer=per_layer, tol=tol, logit=True)
        calib_bits = average_bits(model)
        reset_bit_stats(model)
        res = perplexity(model, test_ids, seqlen=seqlen, max_windows=max_windows, progress=False)
        rows.append({
            "target": float(target), "calib_bits": calib_bits, "test_bits": average_bits(model),
            "ppl": res.ppl, "window_nll": res.window_nll, "tau_logit": tau,
        })  # fmt: skip
    return rows
