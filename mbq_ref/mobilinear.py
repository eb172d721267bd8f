"""``MoBiLinear``: the base slice for every token, residual slices only for routed tokens (paper Eq. 6, Alg. 1).

The layer output is linear in the slices, so a token routed to ``k_t`` slices gets
(Eq. 6)::

    y_t = x_t Ŵ_1^T + Σ_{e=2..E} m_{t,e} (x_t ΔŴ_e^T) + bias          x [T, K], Ŵ, ΔŴ [N, K]

Two ways to evaluate it:

* **calibration mode** (``calib_stage`` set by :mod:`mbq_ref.calibrate`): the
  slices come from the frozen FP weight and the learnable clipping through
  straight-through floors (:func:`mbq_ref.mobislice.slice_deltas`), every slice is
  computed for every token and multiplied by the straight-through mask
  (:func:`mbq_ref.mobiroute.ste_masks`). Stage ``"base"`` (Alg. 1 first-slice
  stabilisation) reads the base slice only and trains the clipping; stage
  ``"joint"`` routes and trains clipping + router with the budget loss.
* **inference mode** (``calib_stage is None``): the clipping is frozen into a
  :class:`mbq_ref.mobislice.SlicedWeight` (8-bit codes, one scale/zero per group,
  the deployable format) and slice ``e`` is computed only for the tokens that
  read it: tokens are gathered once by decreasing slice count (``index_select``),
  each residual slice is one matmul over its contiguous prefix of tokens, and one
  ``index_copy_`` scatters the rows back (:func:`sliced_matmul`). Tokens and bits
  are counted in :attr:`MoBiLinear.stats`.

Layout. :class:`RoutedSlices` is what every served layer shares: the routing policy
(:meth:`RoutedSlices.route`, one function from layer and input to slice counts; three
modes, checked in this order: an explicit per-token override ``token_slices``, a fixed
slice count ``fixed_k`` for every token — a static 2/4/6/8-bit model —, and the router
with threshold ``τ``), the bit statistics, and the inference forward, which calls one
backend method, :meth:`RoutedSlices.slice_matmul`. :class:`MoBiLinear` is the torch
backend (float slice deltas, the CPU reference) plus calibration; the packed backend,
:class:`mbq_ref.packed.PackedMoBiLinear`, serves the same routing from bit-planes
through the kernels. The router's budget during calibration (loss, multiplier, offset
control) is a :class:`mbq_ref.mobiroute.RouterBudget`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MBQError
from .mobiroute import (
    BitStats,
    MoBiRouter,
    RouterBudget,
    counts_to_bits,
    logit_to_tau,
    mask_bits,
    slice_counts,
    ste_masks,
    tau_to_logit,
    threshold_for_bits,
)
from .mobislice import ZERO_GRIDS, SlicedWeight, check_slice_bits, floor_scale_zero, slice_codes, slice_deltas
from .quantizer import LearnableClip, check_weight

__all__ = ["ROUTINGS", "STAGES", "MoBiError", "MoBiLinear", "RoutedSlices", "sliced_matmul"]

#: Calibration stages of Alg. 1: first-slice stabilisation, then slices + router jointly.
STAGES = ("base", "joint")

#: Router designs (``docs/design.md``): ``"ladder"`` (default) one score per token, the
#: threshold splits each layer's tokens between two adjacent slice counts, budgets sampled
#: over a range while training; ``"per_slice"`` one score per residual slice, nested masks by
#: cumulative minimum, a budget loss at one ``train_bits`` (the earlier design, kept as an ablation).
ROUTINGS = ("ladder", "per_slice")

TokenSlices = torch.Tensor | Callable[["RoutedSlices", torch.Tensor], torch.Tensor] | None


class MoBiError(MBQError):
    """A MoBiLinear input or setting that cannot be used; the message names the layer."""


def sliced_matmul(
    x: torch.Tensor, deltas: list[torch.Tensor], counts: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 6 with gather/scatter: residual slice ``e`` costs a matmul over its routed tokens only.

    Masks are nested, so the tokens of slice ``e`` are those with ``k_t >= e``.
    Gather the tokens once in order of decreasing ``k_t`` (``index_select``): the
    tokens of every slice are then a contiguous prefix, each residual slice is
    one matmul over its prefix, and one ``index_copy_`` scatters the rows back.
    This is the permutation a GPU kernel uses too (and on CPU it avoids
    ``index_add_``, which is slow there); ``k_t`` equal for all tokens skips it.

    Args:
        x: ``[T, K]`` inputs.
        deltas: ``[Ŵ_1, ΔŴ_2, ..., ΔŴ_E]``, each ``[N, K]`` in ``x``'s dtype.
        counts: long ``[T]``, slices per token in ``1..E``.
    Returns:
        ``[T, N]``.
    """
    uniform = counts.numel() == 0 or bool((counts == counts[0]).all())
    order = None if uniform else torch.argsort(counts, descending=True, stable=True)  # [T]
    xs = x if order is None else x.index_select(0, order)  # gather: most slices first
    ks = counts if order is None else counts.index_select(0, order)
    y = F.linear(xs, deltas[0], bias)  # base slice (shared expert), every token: [T, N]
    for e in range(1, len(deltas)):
        n = int((ks > e).sum())  # tokens reading slice e+1: the first n rows
        if n == 0:
            break  # nested: no token reads a later slice either
        y[:n] += xs[:n] @ deltas[e].T  # [n, N]
    return y if order is None else torch.empty_like(y).index_copy_(0, order, y)  # scatter back


class RoutedSlices(nn.Module):
    """A served linear layer whose token ``t`` reads ``k_t`` slices (Eq. 6): routing, statistics, forward.

    Subclasses hold the weight in some form and implement one backend method,
    :meth:`slice_matmul` (``y_t = x_t Ŵ_{k_t}^T + bias``); everything else — which
    ``k_t`` each token gets, the bits counted, the checks — is here, once.

    Attributes set by subclasses: ``name``, ``slice_bits``, ``in_features``,
    ``out_features``, ``bias``, ``router`` (:class:`mbq_ref.mobiroute.MoBiRouter`),
    ``tau_logit``, ``fixed_k``, ``token_slices``, ``stats``
    (:class:`mbq_ref.mobiroute.BitStats`), ``host_checks``; :meth:`_init_routing` sets the last five.

    ``host_checks`` (None = by device): CPU inputs are checked on the host (NaN/inf input,
    slice counts in 1..E) and a bad one raises at once; CUDA inputs are checked on the device
    and counted in ``stats``, so decode never waits for the GPU; :meth:`check_stats` (and
    :attr:`avg_bits`) raise for what was counted. True / False force one way.
    """

    def _init_routing(self, tau: float) -> None:
        self.tau = tau
        self.fixed_k: int | None = None
        self.token_slices: TokenSlices = None
        self.stats = BitStats(self.num_slices)
        # None: check inputs on the host for CPU tensors, defer the checks on the device for CUDA
        # ones (a host read would wait for the GPU at every projection); True / False force it.
        self.host_checks: bool | None = None

    @property
    def num_slices(self) -> int:
        """``E``, the number of slices (the base slice plus ``E - 1`` routed residual slices)."""
        return len(self.slice_bits)

    @property
    def tau(self) -> float:
        """Routing threshold ``τ`` in [0, 1] (stored exactly as ``logit(τ)`` in ``tau_logit``)."""
        return logit_to_tau(self.tau_logit)

    @tau.setter
    def tau(self, value: float) -> None:
        try:
            self.tau_logit = tau_to_logit(value)
        except MBQError as exc:
            raise MoBiError(f"{exc} (layer {self.name!r})") from exc

    def check_k(self, k: int) -> int:
        """Return ``k`` if it is a valid slice count ``1..E``, else raise :class:`MoBiError`."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_slices:
            raise MoBiError(f"k must be an int in 1..{self.num_slices} slices, got {k!r} (layer {self.name!r})")
        return k

    def _host_checks(self, x: torch.Tensor) -> bool:
        checks = getattr(self, "host_checks", None)
        return (not x.is_cuda) if checks is None else bool(checks)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise MoBiError(
                f"input has {x.shape[-1]} features, layer {self.name!r} expects {self.in_features} (shape {tuple(x.shape)})"
            )
        if not self._host_checks(x):  # decode on a GPU: counted on the device, reported by check_stats
            self.stats.note_nonfinite(x)
        elif not torch.isfinite(x).all():
            raise MoBiError(f"input to layer {self.name!r} contains NaN/inf; check the layers before it")

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The routing policy: slices per token, long ``x.shape[:-1]``, values ``1..E``."""
        lead = x.shape[:-1]
        if self.token_slices is not None:
            ks = self.token_slices(self, x) if callable(self.token_slices) else self.token_slices
            ks = torch.as_tensor(ks, device=x.device).long()
            if tuple(ks.shape) != tuple(lead):
                raise MoBiError(
                    f"token_slices has shape {tuple(ks.shape)} but the input has tokens {tuple(lead)} (layer {self.name!r})"
                )
            if self._host_checks(x) and ks.numel() and (ks.min() < 1 or ks.max() > self.num_slices):
                raise MoBiError(f"token_slices must be in 1..{self.num_slices} (layer {self.name!r})")
            return ks
        if self.fixed_k is not None:
            return torch.full(lead, self.check_k(self.fixed_k), dtype=torch.long, device=x.device)
        with torch.no_grad():
            return slice_counts(self.router(x), self.tau_logit)  # [...]

    def slice_matmul(self, x2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The backend: ``[T, K]`` inputs and long ``[T]`` slice counts -> ``[T, N]`` outputs, bias included."""
        raise NotImplementedError

    def serve(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: ``x`` ``[..., K]`` -> ``[..., N]``; routes, calls the backend, counts tokens and bits."""
        self._check_input(x)
        lead = x.shape[:-1]
        counts = self.route(x).reshape(-1)  # [T]
        y = self.slice_matmul(x.reshape(-1, self.in_features), counts)
        check = self._host_checks(x)
        self.stats.update(counts, counts_to_bits(counts, self.slice_bits, check=check), check=check)
        return y.reshape(*lead, self.out_features)

    forward = serve

    def check_stats(self) -> None:
        """Raise :class:`MoBiError` if a check deferred on the device failed since the last reset."""
        problem = self.stats.problems()
        if problem:
            raise MoBiError(f"layer {self.name!r}: {problem}")

    @property
    def avg_bits(self) -> float:
        """Mean bits per token since the last :meth:`reset_stats` (inference calls only; runs :meth:`check_stats`)."""
        self.check_stats()
        return self.stats.avg_bits

    def reset_stats(self) -> None:
        """Zero the token / bit counters of :attr:`stats`."""
        self.stats.reset()


class MoBiLinear(RoutedSlices):
    """A linear layer served by MoBiSlice slices and a MoBiRoute router (Sec. 4, Eq. 6), torch backend.

    Args:
        linear: the ``nn.Linear`` to wrap; weight ``[N, K]`` and bias are shared and frozen.
        slice_bits: bits per slice (App. C.1: ``2 2 2 2``).
        group_size: ``g`` dividing ``K`` (128 in the paper); ``None`` = per-channel.
        router_hidden: hidden width of the router MLP.
        name: module path, used in every error message.
        budget: the router's bit budget in the joint stage (:class:`mbq_ref.mobiroute.RouterBudget`;
            default: 3 bits, ``λ = 1``, no warm-up, no dual ascent or offset control).
        fixed_k_weight: weight of the optional fixed-slice-count reconstruction terms
            (our addition, not in the paper; 0 = off), see :meth:`calib_loss`.
        tau: routing threshold ``τ`` (training uses it too; 0.5 = score 0).
        clip_init, router_init_bias: initial LWC logit (OmniQuant: 4.0) and router bias.
        zero_grid: scale/zero rule of :func:`mbq_ref.mobislice.floor_scale_zero`
            (``"finest"``: no weight inside the learned range is clipped; ``"base"``: the earlier rule).
        score_bound: ``S`` of the router's bounded score (:class:`mbq_ref.mobiroute.MoBiRouter`).
        surrogate_temperature: ``T`` of the straight-through soft mask ``σ((r - logit(τ)) / T)``.

    Calibration contract (``docs/design.md``): :meth:`calib_parameters`,
    :meth:`calib_loss`, :meth:`fp_forward` and ``calib_stage``. Setting
    ``calib_stage`` drops the frozen slices; the next inference call re-freezes.
    """

    def __init__(
        self,
        linear: nn.Linear,
        slice_bits=(2, 2, 2, 2),
        group_size: int | None = 128,
        router_hidden: int = 64,
        name: str | None = None,
        budget: RouterBudget | None = None,
        fixed_k_weight: float = 0.0,
        tau: float = 0.5,
        clip_init: float = 4.0,
        router_init_bias: float = 1.0,
        zero_grid: str = "finest",
        score_bound: float = 8.0,
        surrogate_temperature: float = 1.0,
        routing: str = "ladder",
    ):
        super().__init__()
        self.name = name
        if routing not in ROUTINGS:
            raise MoBiError(f"unknown routing {routing!r}; use one of {ROUTINGS} (layer {name!r})")
        self.routing = routing
        if zero_grid not in ZERO_GRIDS:
            raise MoBiError(f"unknown zero_grid {zero_grid!r}; use one of {ZERO_GRIDS} (layer {name!r})")
        self.zero_grid = zero_grid
        try:
            self.slice_bits = check_slice_bits(slice_bits)
            if len(self.slice_bits) < 2:
                raise MoBiError(f"MoBiLinear needs at least 2 slices to route, got {self.slice_bits}")
            self.budget = (budget or RouterBudget()).check(self.slice_bits)
            if not surrogate_temperature > 0:
                raise MoBiError(f"surrogate_temperature must be > 0, got {surrogate_temperature}")
        except MBQError as exc:
            raise MoBiError(f"{exc} (layer {name!r})") from exc
        self.group_size = check_weight(linear.weight.detach(), group_size, name)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.requires_grad_(False)
        self.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        dev = self.weight.device
        self.clip = LearnableClip(self.out_features, self.in_features, self.group_size, clip_init).to(dev)
        self.router = MoBiRouter(
            self.in_features, self.num_slices - 1, router_hidden, router_init_bias, score_bound, surrogate_temperature,
            ladder=routing == "ladder",
        ).to(dev)
        # ladder: the mean bits of the current joint step (set per step by the calibration's
        # budget sampler, mbq_ref.mobiquant); None = the budget's train_bits
        self.step_bits: float | None = None
        self.fixed_k_weight = float(fixed_k_weight)
        self.surrogate_temperature = float(surrogate_temperature)
        self._init_routing(tau)
        self.sliced: SlicedWeight | None = None
        self._deltas: list[torch.Tensor] | None = None  # float slice deltas of `sliced` (the torch backend)
        self._stage: str | None = None
        self._e0: torch.Tensor | None = None  # fixed-k output MSEs at the first joint step
        self._last: dict = {}  # what calib_loss needs from the latest calibration forward

    @property
    def train_bits(self) -> float:
        """The budget's target mean bits (``budget.train_bits``)."""
        return self.budget.train_bits

    @property
    def calib_stage(self) -> str | None:
        """``"base"`` / ``"joint"`` while :mod:`mbq_ref.calibrate` trains this layer, ``None`` at inference."""
        return self._stage

    @calib_stage.setter
    def calib_stage(self, stage: str | None) -> None:
        if stage is not None and stage not in STAGES:
            raise MoBiError(f"unknown calibration stage {stage!r}; MoBiLinear has {STAGES} (layer {self.name!r})")
        self.router.batch_stats = stage == "joint"  # score statistics from each training batch
        if stage is not None:
            self.sliced, self._deltas = None, None  # parameters will change: re-freeze afterwards
            if stage == "joint" and self._stage != "joint":
                self.budget.reset()
                self._e0 = None
        self._stage = stage

    # --- quantizer ----------------------------------------------------------
    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Base scale and finest-grid zero point ``(s, z_E)`` ``[N, K/g]`` from the learned clip range."""
        xmin, xmax = self.clip(self.weight)
        return floor_scale_zero(xmin, xmax, self.slice_bits, self.zero_grid)

    def slice_deltas(self, num_slices: int | None = None) -> list[torch.Tensor]:
        """Differentiable ``[Ŵ_1, ΔŴ_2, ..., ΔŴ_k]`` (each ``[N, K]`` float32) from the current clipping.

        ``num_slices``: ``k``, the slices to build (default: all ``E``).
        """
        s, z = self.scale_zero()
        w = self.weight.float()
        return slice_deltas(w, s, z, self.slice_bits, self.group_size, ste=True, num_slices=num_slices)

    @torch.no_grad()
    def freeze(self) -> SlicedWeight:
        """Quantize with the current clipping into integer codes (the deployable format); returns it."""
        s, z = self.scale_zero()
        codes = slice_codes(self.weight.float(), s, z, self.slice_bits, self.group_size)  # [N, K] uint8
        return self.set_sliced(
            SlicedWeight(codes, s.detach().clone(), z.detach().clone(), self.slice_bits, self.group_size)
        )

    @torch.no_grad()
    def set_sliced(self, sw: SlicedWeight) -> SlicedWeight:
        """Serve from ``sw`` (e.g. codes loaded from a checkpoint); returns it.

        Caches the per-slice float deltas ``[Ŵ_1, ΔŴ_2, ...]`` dequantized once from the
        codes (float64 readings, exact differences), which inference multiplies with.
        """
        if tuple(sw.codes.shape) != (self.out_features, self.in_features) or tuple(sw.slice_bits) != self.slice_bits:
            raise MoBiError(
                f"sliced weight {tuple(sw.codes.shape)} / slices {sw.slice_bits} does not fit layer {self.name!r} "
                f"({self.out_features}, {self.in_features}) / {self.slice_bits}"
            )
        self.sliced = sw
        full = [sw.dequant(k, torch.float64) for k in range(1, self.num_slices + 1)]
        self._deltas = [full[0]] + [full[k] - full[k - 1] for k in range(1, self.num_slices)]
        return sw

    def dequant(self, k: int | None = None) -> torch.Tensor:
        """The frozen ``Ŵ_k`` ``[N, K]`` (float32) read from the codes; ``k`` defaults to all slices."""
        sw = self.sliced if self.sliced is not None else self.freeze()
        return sw.dequant(None if k is None else self.check_k(k))

    @torch.no_grad()
    def token_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token output error at each slice count: ``e_t(k) = ||x_t (W - Ŵ_k)^T||^2``, float32 ``[E, T]``.

        The sensitivity a router should follow: ``e_t(1) - e_t(2)`` is what slice 2 buys token ``t``.
        ``x`` is ``[..., K]`` (flattened to ``T`` tokens).
        """
        self._check_input(x)
        x2 = x.reshape(-1, self.in_features).float()  # [T, K]
        w = self.weight.float()
        return torch.stack([((x2 @ (w - self.dequant(k)).T) ** 2).sum(-1) for k in range(1, self.num_slices + 1)])

    # --- forward --------------------------------------------------------------
    def fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-precision reference ``x W^T + bias`` (used by calibration for the teacher output)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` -> ``[..., N]``: calibration mode if ``calib_stage`` is set, else inference (:meth:`serve`)."""
        if self._stage is None:
            return self.serve(x)
        self._check_input(x)
        y = self._calib_forward(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def slice_matmul(self, x2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Torch backend: :func:`sliced_matmul` over the float slice deltas of the frozen codes."""
        if self._deltas is None:
            self.freeze()
        deltas = [d.to(x2.device, x2.dtype) for d in self._deltas]
        if deltas[0].data_ptr() != self._deltas[0].data_ptr() and torch.finfo(x2.dtype).bits >= 32:
            self._deltas = deltas  # cache the cast for the next call
        # (never cache a bf16/fp16 cast: it would replace the float32 readings for every later float32 call)
        return sliced_matmul(x2, deltas, counts, self.bias)

    def _calib_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.router.in_scale <= 0:
            self.router.set_input_scale(x2)
        xf = x2.float()
        if self._stage == "joint" and self.routing == "ladder":
            if self.budget.ref is None:  # first joint step: score statistics from data
                self.router.init_from_data(xf, self.tau_logit, self.slice_bits, self.train_bits)
                self.budget.ref = 1.0  # (marks the stage as started; a ladder has no budget loss)
            y = self._ladder_forward(xf)
        else:
            # E x [N, K], differentiable in the clip; the base stage reads the base slice only
            deltas = self.slice_deltas(1 if self._stage == "base" else None)
            y = xf @ deltas[0].T  # base slice for every token (the shared expert): [T, N]
        if self._stage == "joint" and self.routing == "per_slice":
            if self.budget.ref is None:  # first joint step: start on budget, scores spread over the surrogate
                self.router.init_from_data(xf, self.tau_logit, self.slice_bits, self.train_bits)
            # [T, E-1], hard forward / soft backward centred on the training threshold
            m = ste_masks(self.router(xf), self.tau_logit, self.surrogate_temperature)
            for e in range(1, self.num_slices):
                y = y + m[:, e - 1 : e] * (xf @ deltas[e].T)
            if self.budget.ref is None:  # base-slice output MSE: the scale of what routing can win back
                with torch.no_grad():
                    self.budget.ref = float(((xf @ (self.weight.float() - deltas[0]).T) ** 2).mean().clamp_min(1e-12))
            self._last = {"bits": mask_bits(m, self.slice_bits).mean(), "x": xf, "deltas": deltas}
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x2.dtype)

    def _ladder_forward(self, xf: torch.Tensor) -> torch.Tensor:
        """One joint step of a ladder router at this step's budget ``b`` (``step_bits``), bias excluded.

        The threshold is the batch quantile that gives exactly ``b`` mean bits
        (:func:`mbq_ref.mobiroute.threshold_for_bits`), so no budget loss is needed: every
        token reads ``k`` slices and the tokens above the threshold one more::

            y_t = x_t Ŵ_k^T + m_t · x_t (Ŵ_{k+1} - Ŵ_k)^T        m_t = 1[r_{t,k} > u] (straight-through)

        The soft mask ``σ((r_{t,k} - u) / T)`` carries the gradient: the reconstruction loss
        raises the scores of the tokens whose extra slice lowers it (the router learns a
        ranking), and the clipping gets gradient from both readings ``Ŵ_k`` and ``Ŵ_{k+1}``;
        sampling ``b`` over a range trains every width the checkpoint serves.
        """
        r = self.router(xf)  # [T, E-1], a ladder: r_e = s - (e - 1) ρ
        b = self.train_bits if self.step_bits is None else float(self.step_bits)
        u = threshold_for_bits(r.detach(), self.slice_bits, b)
        counts = slice_counts(r.detach(), u)  # [T], two adjacent values at most
        k = int(counts.min())
        deltas = self.slice_deltas(min(k + 1, self.num_slices))  # only the slices this step reads
        w_k = deltas[0]
        for e in range(1, k):
            w_k = w_k + deltas[e]  # Ŵ_k
        y = xf @ w_k.T
        if k < self.num_slices:
            col = r[:, k - 1]  # the rung between k and k + 1 slices
            hard = (col > u).to(col.dtype)
            soft = torch.sigmoid((col - u) / self.surrogate_temperature) if math.isfinite(u) else hard
            m = hard + soft - soft.detach()
            y = y + m[:, None] * (xf @ deltas[k].T)
            bits = self.slice_bits[k] * m.mean() + sum(self.slice_bits[:k])
        else:
            bits = xf.new_tensor(float(sum(self.slice_bits)))
        self._last = {"bits": bits}
        return y

    # --- calibration contract (docs/design.md) --------------------------------
    def calib_parameters(self, stage: str) -> list[dict]:
        """AdamW groups: LWC logits in both stages (``"lwc"``), plus the router in ``"joint"`` (``"router"``)."""
        if stage not in STAGES:
            raise MoBiError(f"unknown calibration stage {stage!r}; MoBiLinear has {STAGES} (layer {self.name!r})")
        groups = [{"params": [self.clip.gamma, self.clip.beta], "name": "lwc"}]
        if stage == "joint":
            # a ladder's offset stays 0: its per-step threshold sets the level
            params = [p for n, p in self.router.named_parameters() if not (self.router.ladder and n == "offset")]
            groups.append({"params": params, "name": "router"})
        return groups

    def calib_loss(self, stage: str) -> torch.Tensor | float:
        """Extra loss of one optimizer step (call after the forward of that step).

        ``"base"``: 0 (Alg. 1 stage 1 fits the base slice to the block output alone).
        ``"joint"``: the budget loss of :meth:`mbq_ref.mobiroute.RouterBudget.step` on the
        straight-through mean bits of the last forward (which also takes the dual-ascent
        and offset-control steps); plus, if ``fixed_k_weight > 0``, our addition (not in
        the paper) that keeps every fixed precision usable: ``fixed_k_weight · ref · mean_k e_k / e_k^0``
        with ``e_k`` the layer-output MSE when every token reads ``k`` slices and
        ``e_k^0`` its value at the first joint step.
        """
        if stage == "base" or not self._last:
            return 0.0
        if self.routing == "ladder":  # the quantile threshold meets the budget exactly: no loss
            self._last = {}
            return 0.0
        loss = self.budget.step(self._last["bits"], self.slice_bits, self.router)
        if self.fixed_k_weight > 0:
            loss = loss + self.fixed_k_weight * self.budget.ref * self._fixed_k_term()
        self._last = {}
        return loss

    def _fixed_k_term(self) -> torch.Tensor:
        x, deltas = self._last["x"], self._last["deltas"]
        err = self.weight.float() - deltas[0]  # W - Ŵ_k, built up slice by slice
        terms = []
        for k in range(self.num_slices):
            if k:
                err = err - deltas[k]
            terms.append(((x @ err.T) ** 2).mean())
        e = torch.stack(terms)  # [E]
        if self._e0 is None:
            self._e0 = e.detach().clamp_min(1e-12)
        return (e / self._e0).mean()

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == self.in_features else self.group_size
        mode = f"k={self.fixed_k}" if self.fixed_k is not None else f"tau={self.tau:.4g}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"slice_bits={self.slice_bits}, group_size={g}, {mode}"
        )
