"""Uniform asymmetric weight quantization (RTN) and OmniQuant's learnable weight clipping.

This is the static PTQ baseline the paper builds on and compares with (Sec. 3,
Sec. 5.1, App. C.1: weight-only, ``group_size=128``, OmniQuant LWC). A weight
``W`` of shape ``[N, K]`` (``nn.Linear`` layout: ``N`` outputs, ``K`` inputs) is
cut along ``K`` into groups of ``g`` weights; each group of each output row has
its own range ``[x_min, x_max]``, scale ``s`` and integer zero point ``z``
(OmniQuant's convention, ``quantize/quantizer.py`` there)::

    s = (x_max - x_min) / (2^b - 1)          z = round(-x_min / s)
    q = clamp(round(W / s) + z, 0, 2^b - 1)  Ŵ = s (q - z)

``group_size=None`` (or ``-1``) means one group per row (per-channel).

The pieces are split so the MoBiSlice quantizer (Sec. 4.1, floor-aligned, with
``s = range / 2^b``) can reuse the range part unchanged:

* :func:`group_minmax` and :class:`LearnableClip` produce a range ``[x_min, x_max]``
  per group and know nothing about rounding;
* :func:`scale_zero`, :func:`fake_quant`, :func:`quantize`, :func:`dequantize` and
  :func:`rtn` apply the round-to-nearest convention above.

All arithmetic runs in float32 whatever the weight dtype, so fp16 models get
the same codes as fp32 ones; fake-quantized weights are cast back.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import MBQError

__all__ = [
    "QuantError",
    "check_bits",
    "resolve_group_size",
    "check_weight",
    "group_minmax",
    "group_view",
    "scale_zero",
    "round_ste",
    "GridSTE",
    "quantize",
    "dequantize",
    "fake_quant",
    "rtn",
    "LearnableClip",
]

# A zero-width range (constant group) would give s = 0; any positive floor keeps
# Ŵ exact there, since every weight of the group then sits on the grid point -z s.
_MIN_SCALE = 1e-8


class QuantError(MBQError):
    """A quantizer argument or weight that cannot be used (message says which and why)."""


def _where(name: str | None) -> str:
    return f" in layer {name!r}" if name else ""


def check_bits(bits: int, name: str | None = None) -> int:
    """Return ``bits`` if it is an int in 1..8, else raise :class:`QuantError` naming the layer."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise QuantError(f"bits must be an integer in 1..8, got {bits!r}{_where(name)}")
    return bits


def resolve_group_size(in_features: int, group_size: int | None, name: str | None = None) -> int:
    """The effective group length along the input dim: ``None``/``-1`` -> ``in_features`` (per-channel).

    Raises:
        QuantError: if ``group_size`` is not positive or does not divide ``in_features``.
    """
    if group_size is None or group_size == -1:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuantError(f"group_size must be a positive int, None or -1, got {group_size!r}{_where(name)}")
    if in_features % group_size:
        raise QuantError(
            f"group_size {group_size} does not divide the input dim {in_features}{_where(name)}; "
            f"use a divisor of {in_features} or group_size=None (per-channel)"
        )
    return group_size


def check_weight(w: torch.Tensor, group_size: int | None, name: str | None = None) -> int:
    """Validate a weight ``[N, K]`` for quantization and return the effective group size.

    Raises:
        QuantError: wrong ndim, non-finite entries, or a group size that does not divide ``K``.
    """
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise QuantError(f"expected a 2-D weight [out_features, in_features], got {shape}{_where(name)}")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QuantError(f"weight has {bad} NaN/inf entries{_where(name)}; quantization needs finite weights")
    if w.is_floating_point() and w.numel():
        # a group range max - min (and the scale from it) must stay finite in w's dtype and in float32
        limit = min(torch.finfo(w.dtype).max, torch.finfo(torch.float32).max) / 2
        peak = float(w.detach().abs().max())
        if peak > limit:
            raise QuantError(
                f"weight magnitude {peak:.3g} is too large to quantize in {str(w.dtype).removeprefix('torch.')} "
                f"(the group range would overflow; at most {limit:.3g}){_where(name)}; rescale the weights"
            )
    return resolve_group_size(w.shape[1], group_size, name)


def group_view(w: torch.Tensor, g: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, K/g, g]``: one row of the last dim per (output row, group); ``g`` must divide ``K``."""
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def group_minmax(w: torch.Tensor, group_size: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of a weight (the unclipped range of RTN).

    Args:
        w: ``[N, K]`` weight.
        group_size: ``g`` dividing ``K``; ``None``/``-1`` for per-channel (``g = K``).
    Returns:
        ``(wmin, wmax)``, each float32 ``[N, K/g]``.
    """
    if w.ndim != 2:
        raise QuantError(f"expected a 2-D weight [out_features, in_features], got {tuple(w.shape)}")
    g = resolve_group_size(w.shape[1], group_size)
    wg = group_view(w.float(), g)  # [N, K/g, g]
    return wg.amin(dim=-1), wg.amax(dim=-1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (x.round() - x).detach()


class GridSTE(torch.autograd.Function):
    """Fake quantization on a per-group grid with the straight-through gradient in closed form.

    ``GridSTE.apply(w, s, z, grid, z_scale, g)`` returns the tensors ``grid(wg, s, z)``
    computes without an autograd graph, and in the backward pass the gradient that
    autograd would derive through straight-through rounding (the rounding's gradient
    taken as the identity), summed by hand instead of replayed op by op.

    ``grid(wg, s, z)`` gets the grouped weight ``[N, G, g]`` and ``s``, ``z`` as
    ``[N, G, 1]`` and returns ``(outs, inside)``: ``outs`` a list of ``[N, G, g]``
    tensors whose prefix sums are the readings ``Ŵ_1, Ŵ_2, ...`` (one tensor for plain
    fake quantization, the residual slices for MoBiSlice), ``inside`` a bool ``[N, G, g]``,
    true where no integer code is clamped. Every reading must have the form
    ``Ŵ_j = s_j (Q_j(W / s_j) - c_j z + d_j)`` with ``s_j = s / 2^{m_j}`` and ``c_j s_j``
    the same ``z_scale · s`` for every ``j`` (true of round-to-nearest, ``Ŵ = s (q - z)``,
    ``z_scale = 1``, and of MoBiSlice, ``z_scale = 2^{-(B_E - B_1)}``). Then, with the
    codes differentiated straight through (``∂Q/∂x = 1``) where they are not clamped::

        inside:  ∂Ŵ_j/∂s = (Ŵ_j - W)/s     ∂Ŵ_j/∂z = 0                 ∂Ŵ_j/∂W = 1
        clamped: ∂Ŵ_j/∂s = Ŵ_j/s           ∂Ŵ_j/∂z = -z_scale · s      ∂Ŵ_j/∂W = 0

    With ``G_e`` the upstream gradient of output ``e`` (``Ŵ_j = Σ_{e<=j} out_e``, so the
    gradient of ``Ŵ_j`` is ``G_j - G_{j+1}``), the sums over ``j`` telescope::

        ∂L/∂s = Σ_group (Σ_e G_e out_e - [inside] W G_1) / s
        ∂L/∂z = -z_scale · s · Σ_group [clamped] G_1          ∂L/∂W = [inside] G_1

    Shapes: ``w`` ``[N, K]`` float32, ``s``, ``z`` ``[N, K/g]``; outputs ``[N, K]``.
    """

    @staticmethod
    def forward(ctx, w, s, z, grid, z_scale, g):
        n, k = w.shape
        outs, inside = grid(group_view(w, g), _broadcast(s), _broadcast(z))
        outs = [o.reshape(n, k) for o in outs]
        inside = inside.reshape(n, k)
        ctx.save_for_backward(w, s, inside, *outs)
        ctx.z_scale, ctx.g = z_scale, g
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        w, s, inside, *outs = ctx.saved_tensors
        g = ctx.g
        none = (None,) * 3
        if all(gr is None for gr in grads):
            return (None, None, None) + none
        g1 = grads[0] if grads[0] is not None else torch.zeros_like(w)
        grad_w = grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            acc = g1 * outs[0]  # Σ_e G_e out_e per weight, [N, K]
            for gr, o in zip(grads[1:], outs[1:]):
                if gr is not None:
                    acc.addcmul_(gr, o)
            acc.addcmul_(w.masked_fill(~inside, 0), g1, value=-1)
            grad_s = group_view(acc, g).sum(-1) / s
        if ctx.needs_input_grad[2]:
            grad_z = -ctx.z_scale * s * group_view(g1.masked_fill(inside, 0), g).sum(-1)
        if ctx.needs_input_grad[0]:
            grad_w = g1.masked_fill(~inside, 0)
        return (grad_w, grad_s, grad_z) + none


def scale_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, ste: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a range, OmniQuant convention (``2^b - 1`` steps span the range).

    Args:
        xmin, xmax: ``[N, K/g]`` range per group (``xmin <= xmax``).
        bits: ``b`` in 1..8.
        ste: round the zero point with a straight-through gradient, so a learned
            lower clip ``x_min`` also gets gradient through ``z`` (OmniQuant rounds
            it without gradient; the forward values are identical).
    Returns:
        ``(s, z)``, float32 ``[N, K/g]``; ``z`` holds integer values.
    """
    qmax = 2 ** check_bits(bits) - 1
    s = ((xmax - xmin) / qmax).clamp(min=_MIN_SCALE)
    z = -xmin / s
    return s, (round_ste(z) if ste else z.round())


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    # [N, K/g] -> [N, K/g, 1] so it broadcasts over the g weights of each group
    return t.unsqueeze(-1)


def quantize(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int | None = 128
) -> torch.Tensor:
    """Integer codes ``q = clamp(round(W/s) + z, 0, 2^b - 1)``.

    Args:
        w: ``[N, K]`` weight; ``s``, ``z``: ``[N, K/g]`` from :func:`scale_zero`.
    Returns:
        uint8 codes ``[N, K]``.
    """
    g = check_weight(w, group_size)
    qmax = 2 ** check_bits(bits) - 1
    q = (group_view(w.float(), g) / _broadcast(s)).round() + _broadcast(z)
    return q.clamp(0, qmax).reshape(w.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int | None = 128) -> torch.Tensor:
    """``Ŵ = s (q - z)`` for codes ``q`` ``[N, K]`` and per-group ``s``, ``z`` ``[N, K/g]``; float32 ``[N, K]``."""
    g = resolve_group_size(q.shape[1], group_size)
    wq = (group_view(q.float(), g) - _broadcast(z)) * _broadcast(s)
    return wq.reshape(q.shape)


def fake_quant(
    w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, group_size: int | None = 128
) -> torch.Tensor:
    """Quantize-dequantize ``W`` within ``[xmin, xmax]``, differentiable (STE) w.r.t. ``W`` and the range.

    This is OmniQuant's LWC forward (App. C.1 "LWC"): the clamp to ``0..2^b-1``
    is what clips weights outside the (learned) range.

    Args:
        w: ``[N, K]`` weight.
        xmin, xmax: ``[N, K/g]`` range per group (from :func:`group_minmax` or :class:`LearnableClip`).
        bits: ``b`` in 1..8.
    Returns:
        ``Ŵ`` ``[N, K]`` in ``w``'s dtype.
    """
    if w.ndim != 2:
        raise QuantError(f"expected a 2-D weight [out_features, in_features], got {tuple(w.shape)}")
    g = resolve_group_size(w.shape[1], group_size)
    qmax = 2 ** check_bits(bits) - 1
    s, z = scale_zero(xmin, xmax, bits)

    def grid(wg, s, z):  # wg [N, K/g, g]; s, z [N, K/g, 1]
        r = (wg / s).round() + z
        q = r.clamp(0, qmax)  # the clamp is what clips weights outside the range
        return [(q - z) * s], (r >= 0) & (r <= qmax)

    # straight-through rounding: a gradient for W and s inside the range, for s and z where clipped
    (out,) = GridSTE.apply(w.float(), s, z, grid, 1.0, g)
    return out.to(w.dtype)


def rtn(w: torch.Tensor, bits: int, group_size: int | None = 128, name: str | None = None) -> torch.Tensor:
    """Round-to-nearest fake quantization over each group's full min..max range.

    Args:
        w: ``[N, K]`` weight; ``name`` labels errors (e.g. ``"model.layers.0.mlp.up_proj"``).
    Returns:
        ``Ŵ`` ``[N, K]`` in ``w``'s dtype; exact for weights already on the grid.
    """
    g = check_weight(w, group_size, name)
    check_bits(bits, name)
    wmin, wmax = group_minmax(w, g)
    out = fake_quant(w, wmin, wmax, bits, g)
    if not torch.isfinite(out).all():  # a guard: check_weight already refuses what overflows
        raise QuantError(f"quantized weight is not finite{_where(name)}; the weights are too large for their dtype")
    return out


class LearnableClip(nn.Module):
    """OmniQuant learnable weight clipping (LWC): one learned shrink factor per group end.

    ``x_max = σ(γ) · max(W_g)`` and ``x_min = σ(β) · min(W_g)`` with logits
    ``γ, β`` ``[N, K/g]`` initialised to 4.0 (``σ(4) ≈ 0.982``, so training starts
    just inside RTN's range). The module only produces the range; the caller
    chooses the grid (round-to-nearest here, floor-aligned in MoBiSlice).
    As in OmniQuant the factors shrink the range only for groups with
    ``min < 0 < max`` (every real group of 128 weights); a group of one sign
    sees its range shifted towards zero instead.

    Args:
        out_features, in_features: the weight shape ``[N, K]`` it clips.
        group_size: ``g`` dividing ``K``; ``None``/``-1`` for per-channel.
        init: initial logit for both ends.
    """

    def __init__(self, out_features: int, in_features: int, group_size: int | None = 128, init: float = 4.0):
        super().__init__()
        self.group_size = resolve_group_size(in_features, group_size)
        self.shape = (out_features, in_features)
        n_groups = in_features // self.group_size
        self.gamma = nn.Parameter(torch.full((out_features, n_groups), float(init)))  # upper-end logits
        self.beta = nn.Parameter(torch.full((out_features, n_groups), float(init)))  # lower-end logits
        self._minmax: tuple | None = None  # (weight, key, (wmin, wmax)) of group_range

    @classmethod
    def for_weight(cls, w: torch.Tensor, group_size: int | None = 128, init: float = 4.0) -> LearnableClip:
        """A clip sized for weight ``w`` ``[N, K]``, on ``w``'s device."""
        check_weight(w, group_size)
        return cls(w.shape[0], w.shape[1], group_size, init).to(w.device)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned shrink factors ``(σ(β), σ(γ))`` ``[N, K/g]``, each in (0, 1)."""
        return torch.sigmoid(self.beta), torch.sigmoid(self.gamma)

    def forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped range ``(x_min, x_max)``, float32 ``[N, K/g]``, of ``w`` ``[N, K]``; differentiable in γ, β."""
        if tuple(w.shape) != self.shape:
            raise QuantError(f"LearnableClip was built for weights {self.shape}, got {tuple(w.shape)}")
        wmin, wmax = self.group_range(w)
        lo, hi = self.factors()
        return lo * wmin, hi * wmax

    def group_range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``group_minmax(w)``, float32 ``[N, K/g]`` each, cached while ``w`` is frozen and unchanged.

        Calibration trains only ``γ, β``: the weight's group min/max is the same at every
        step, so it is computed once. The cache is keyed on the tensor object, its storage
        (``.data = ...`` swaps it) and its version counter (bumped by every in-place edit
        such as ``copy_`` or ``load_state_dict``); an edit through ``w.data`` bypasses the
        version counter, so call :meth:`clear_cache` after one. A weight that requires
        grad is never cached (its min/max must stay in the graph).
        """
        if w.requires_grad:
            return group_minmax(w, self.group_size)
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.stride())
        if self._minmax is None or self._minmax[0] is not w or self._minmax[1] != key:
            self._minmax = (w, key, group_minmax(w, self.group_size))
        return self._minmax[2]

    def clear_cache(self) -> None:
        """Forget the cached group min/max of :meth:`group_range`."""
        self._minmax = None

    def extra_repr(self) -> str:
        return f"shape={self.shape}, group_size={self.group_size}"
