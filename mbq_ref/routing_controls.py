"""Routing measured against controls: is the trained MoBiRoute router better than chance? (paper Sec. 4.2, 5)

The paper's claim is that the learned router puts the slices where they matter.
At one *measured* average bit-width, one calibrated checkpoint is evaluated with:

(a) ``router``   the trained routers at the controller's thresholds
                 (:func:`mbq_ref.thresholds.threshold_table`, default mode);
(b) ``random``   the same per-layer slice-count histogram as (a) on the same inputs,
                 given to random tokens (a permutation of the router's counts):
                 same bits, no information;
(c) ``oracle``   the same histogram, the most slices to the tokens whose base-slice
                 output error ``||x_t (W - Ŵ_1)^T||^2`` is largest (measured, per
                 layer; an upper reference a router could aim at);
(e) ``norm``     the same histogram, the most slices to the tokens with the largest
                 input norm ``||x_t||`` (parameter-free: no router at all);
(d) ``static``   the best static mix: whole layers at fixed widths (no routing), chosen
                 greedily on calibration windows by measured layer-output error saved
                 per bit (:func:`static_mix`), average bits as close to the target as
                 the layer sizes allow without exceeding it.

Every method is evaluated on the same test windows; :func:`paired_delta` gives the
mean difference of per-window NLL against (a) with its paired standard error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import MBQError
from .mobiquant import (
    average_bits,
    mobi_layers,
    reset_bit_stats,
    run_windows,
    set_slices,
    set_threshold,
    set_token_slices,
)
from .mobiroute import slice_counts
from .mobislice import cumulative_bits
from .perplexity import perplexity

__all__ = [
    "CONTROLS",
    "compare_controls",
    "layer_errors",
    "mix_train_bits",
    "norm_routing",
    "oracle_routing",
    "paired_delta",
    "plot_controls",
    "random_routing",
    "ranked_routing",
    "static_mix",
]

#: The routing methods compared, in report order.
CONTROLS = ("router", "random", "norm", "oracle", "static")


def random_routing(seed: int = 0):
    """``token_slices`` policy (b): the router's own slice counts, permuted over the tokens of each call.

    Keeps each layer's slice-count histogram (so the bits) on its inputs, drops which token gets what.
    """
    gen = torch.Generator().manual_seed(seed)

    def policy(layer, x: torch.Tensor) -> torch.Tensor:
        counts = slice_counts(layer.router(x), layer.tau_logit)  # x.shape[:-1]
        flat = counts.reshape(-1)
        return flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)].reshape(counts.shape)

    return policy


def ranked_routing(key):
    """``token_slices`` policy: the router's own slice-count histogram, handed out by ``key``.

    ``key(layer, x2)`` gives one number per token (``x2`` ``[T, K]`` float32); the tokens with
    the largest keys get the most slices. Same bits per layer as the router, another ranking.
    """

    def policy(layer, x: torch.Tensor) -> torch.Tensor:
        counts = slice_counts(layer.router(x), layer.tau_logit)
        flat = counts.reshape(-1)
        k = key(layer, x.reshape(-1, layer.in_features).float())  # [T]
        out = torch.empty_like(flat)
        out[k.argsort(descending=True)] = flat.sort(descending=True).values
        return out.reshape(counts.shape)

    return policy


def oracle_routing():
    """``token_slices`` policy (c): the router's histogram, assigned by measured base-slice error (largest first)."""
    # ||x_t (W - Ŵ_1)^T||^2: what the base slice gets wrong for this token
    return ranked_routing(lambda layer, x2: ((x2 @ (layer.weight.float() - layer.dequant(1)).T) ** 2).sum(-1))


def norm_routing():
    """``token_slices`` policy (e): the router's histogram, assigned by input norm ``||x_t||`` (largest first).

    A parameter-free rule: a token's output error at any width is at most its input norm
    times the weight error, so large-norm tokens tend to need bits most; no router cost.
    """
    return ranked_routing(lambda _layer, x2: x2.norm(dim=-1))


@torch.no_grad()
def layer_errors(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Each layer's output error at every width, ``e_l(k) = Σ_t ||x_t (W - Ŵ_k)^T||^2``, float64 ``[E]``.

    Measured on ``calib_ids`` with every layer at full width (inputs close to FP).
    """
    layers = mobi_layers(model)
    if not layers:
        raise MBQError("model has no MoBiLinear layers; call quantize_mobiquant first")
    errs = {n: torch.zeros(m.num_slices, dtype=torch.float64) for n, m in layers.items()}

    def hook_for(name):
        def hook(mod, args):
            errs[name] += mod.token_errors(args[0]).double().sum(-1).cpu()

        return hook

    set_token_slices(model, None)
    set_slices(model, max(m.num_slices for m in layers.values()))
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        run_windows(model, calib_ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    set_slices(model, None)
    return errs


def static_mix(model: nn.Module, errors: dict[str, torch.Tensor], target_bits: float) -> dict[str, int]:
    """Control (d): a slice count per layer (whole layers at fixed widths) with average bits <= ``target_bits``.

    Starting from the base slice everywhere, the layer step ``k -> k+1`` with the largest
    reduction of :func:`layer_errors` per added weight-bit is taken while the
    weight-count-weighted average stays within the target (a greedy knapsack).

    Returns:
        ``{layer path: k}``.
    """
    layers = mobi_layers(model)
    errs = errors
    sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
    total = sum(sizes.values())
    cum = {n: cumulative_bits(m.slice_bits) for n, m in layers.items()}
    k = dict.fromkeys(layers, 1)
    bits = sum(sizes[n] * cum[n][0] for n in layers) / total
    while True:
        best, best_gain = None, -math.inf
        for n in layers:
            if k[n] >= len(cum[n]):
                continue
            add = sizes[n] * (cum[n][k[n]] - cum[n][k[n] - 1]) / total
            if bits + add > target_bits + 1e-9:
                continue
            gain = float(errs[n][k[n] - 1] - errs[n][k[n]]) / (add * total)
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        bits += sizes[best] * (cum[best][k[best]] - cum[best][k[best] - 1]) / total
        k[best] += 1
    return k


def mix_train_bits(
    model: nn.Module, mix: dict[str, int], target_bits: float, margin: float = 0.25
) -> dict[str, float]:
    """Per-layer ``train_bits`` from a static mix's allocation (for ``MoBiConfig(train_bits=...)``).

    The mix's width of layer ``l``, ``B_{k_l}``, is clamped into ``[B_1 + margin, B_E - margin]``
    (a router trained at ``B_1`` or ``B_E`` would have nothing left to route), and one
    constant ``c`` is added to every layer before clamping, ``b_l = clip(B_{k_l} + c)``, with
    ``c`` found by bisection so that the weight-count-weighted average is exactly
    ``target_bits`` (the mix itself may sit below its target: whole layers are coarse).

    Args:
        model: a MoBiQuant model (its layers give sizes and slice widths).
        mix: :func:`static_mix` output ``{layer path: k}``.
        target_bits: the average the budgets must keep.
        margin: bits kept from either end of the readable range.
    Returns:
        ``{layer path: bits}``.
    """
    layers = mobi_layers(model)
    sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
    cum = {n: cumulative_bits(m.slice_bits) for n, m in layers.items()}
    lo = {n: cum[n][0] + margin for n in layers}
    hi = {n: cum[n][-1] - margin for n in layers}
    if not all(lo[n] <= target_bits <= hi[n] for n in layers):
        raise MBQError(f"target {target_bits} bits is outside the trainable range with margin {margin}")
    width = {n: float(cum[n][mix[n] - 1]) for n in layers}

    def avg(c: float) -> tuple[float, dict[str, float]]:
        b = {n: min(max(width[n] + c, lo[n]), hi[n]) for n in layers}
        return sum(sizes[n] * b[n] for n in layers) / sum(sizes.values()), b

    a, z = -max(cum[n][-1] for n in layers), max(cum[n][-1] for n in layers)  # avg(a) = min, avg(z) = max
    for _ in range(100):  # avg is continuous and non-decreasing in c
        mid = 0.5 * (a + z)
        if avg(mid)[0] < target_bits:
            a = mid
        else:
            z = mid
    return avg(0.5 * (a + z))[1]


def paired_delta(nll: list[float], ref: list[float]) -> tuple[float, float]:
    """Mean per-window NLL difference ``nll - ref`` and its paired standard error (same windows)."""
    d = torch.tensor(nll, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else math.nan, math.nan
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(len(d)))


def _eval(model, test_ids, seqlen, max_windows) -> dict:
    reset_bit_stats(model)
    res = perplexity(model, test_ids, seqlen=seqlen, max_windows=max_windows, batch_size=8, progress=False)
    return {"bits": average_bits(model), "ppl": res.ppl, "window_nll": list(map(float, res.window_nll))}


@torch.no_grad()
def compare_controls(
    model: nn.Module,
    table: dict[float, dict],
    calib_ids: torch.Tensor,
    test_ids: torch.Tensor,
    seqlen: int = 256,
    max_windows: int | None = 16,
    seed: int = 0,
) -> list[dict]:
    """Evaluate (a)-(d) of the module docstring at every target of ``table`` on the same test windows.

    Args:
        model: a calibrated MoBiQuant model.
        table: rows of :func:`mbq_ref.thresholds.threshold_table` for the targets to compare.
        calib_ids: windows for the static mix's error measurement.
        test_ids: 1-D test token ids (GPTQ protocol windows of ``seqlen``).
    Returns:
        one dict per target: ``target``, ``calib_bits`` (the table's), and per method
        ``{"bits", "ppl", "window_nll", "delta_nll", "se"}`` (deltas against ``router``),
        plus ``static_layers`` (the mix chosen for ``static``).
    """
    rows = []
    errors = layer_errors(model, calib_ids)
    for target, entry in sorted(table.items()):
        row: dict = {"target": float(target), "calib_bits": float(entry["achieved"])}
        set_threshold(model, entry["logits"], logit=True)
        row["router"] = _eval(model, test_ids, seqlen, max_windows)
        set_token_slices(model, random_routing(seed))
        row["random"] = _eval(model, test_ids, seqlen, max_windows)
        set_token_slices(model, norm_routing())
        row["norm"] = _eval(model, test_ids, seqlen, max_windows)
        set_token_slices(model, oracle_routing())
        row["oracle"] = _eval(model, test_ids, seqlen, max_windows)
        set_token_slices(model, None)
        mix = static_mix(model, errors, float(target))
        for n, m in mobi_layers(model).items():
            m.fixed_k = mix[n]
        row["static"] = _eval(model, test_ids, seqlen, max_windows)
        row["static_layers"] = mix
        set_slices(model, None)
        ref = row["router"]["window_nll"]
        for name in CONTROLS:
            row[name]["delta_nll"], row[name]["se"] = paired_delta(row[name]["window_nll"], ref)
        rows.append(row)
    set_threshold(model, next(iter(table.values()))["logits"], logit=True)
    return rows


#: Legend labels of :func:`plot_controls`.
LABELS = {
    "router": "(a) trained router",
    "random": "(b) random, same histogram",
    "oracle": "(c) oracle by sensitivity",
    "static": "(d) best static mix",
    "norm": "(e) by input norm, same histogram",
}


def plot_controls(ax, rows: list[dict], extra: dict[str, list[tuple[float, float, float]]] | None = None) -> None:
    """ΔNLL against the router (± paired SE) per method vs measured bits, on a matplotlib ``ax``.

    Args:
        rows: :func:`compare_controls` output.
        extra: more points ``{label: [(bits, delta_nll, se), ...]}`` (e.g. per-bit LWC baselines).
    """
    for j, name in enumerate(CONTROLS):
        xs = [r[name]["bits"] + 0.02 * (j - 2) for r in rows]  # small offsets: error bars stay apart
        se = [r[name]["se"] if math.isfinite(r[name]["se"]) else 0.0 for r in rows]
        ax.errorbar(xs, [r[name]["delta_nll"] for r in rows], yerr=se, fmt="o-", capsize=3, label=LABELS[name])
    for label, pts in (extra or {}).items():
        if pts:
            b, d, e = zip(*pts)
            ax.errorbar(b, d, yerr=[x if math.isfinite(x) else 0.0 for x in e], fmt="^", capsize=3, label=label)
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("average bits (measured on the test windows)")
    ax.set_ylabel("mean NLL per window minus the router's (nats)")
    ax.set_title("Routing vs controls at equal bits (± paired SE)")
    ax.legend(fontsize=8)
