"""MoBiRoute: a per-layer token router that picks how many slices each token reads (paper Sec. 4.2, Eq. 4).

MoBiSlice (:mod:`mbq_ref.mobislice`) cuts a weight into ``E`` slices; the first
("shared expert", always on) gives ``B_1`` bits and each further slice refines
it. MoBiRoute decides, per token and per linear layer, how many residual
slices the token gets. The paper states a learnable 2-layer MLP per
layer (Eq. 4), learned binary gates, a budget-aware objective, and a runtime
threshold ``τ`` (higher ``τ`` = fewer slices). The rest is our design
(``docs/design.md``, ``docs/paper.md``), all of it implemented here:

Router (Eq. 4)::

    r(x) = W_2 SiLU(W_1 (x / c) + b_1) + b_2        x [T, K] -> r [T, E-1]
    g_e  = σ(r_e)                                    one gate per residual slice

``c`` is a constant input scale (the RMS of the layer's first calibration
batch), so one initialisation suits every layer whatever its activation scale.

Two designs share everything below (``MoBiConfig.routing``). **Ladder** (the default,
``MoBiRouter(ladder=True)``): the MLP gives one score per token, normalised and bounded
to ``s ∈ (-S, S)``, and the ``E-1`` slice scores are its rungs ``r_e = s - (e-1) ρ`` with
``ρ > 2S`` (:attr:`MoBiRouter.rung`), so at any threshold a layer's tokens read ``k`` or
``k+1`` slices and raising the target never takes a slice away; it trains at a budget
drawn per step, met exactly by the batch quantile (:func:`threshold_for_bits`), without
the budget loss. **Per-slice** (the earlier design): one score per residual slice, the
masks, surrogate and budget loss described next.

Nested hard masks (slice ``e+1`` only if slice ``e``; slice 1 always on)::

    m_e = Π_{j<=e} 1[g_j > τ]  =  1[min_{j<=e} r_j > logit(τ)]
    k_t = 1 + Σ_e m_{t,e}        (slices read by token t)
    b_t = B_{k_t}                (bits of token t: 2/4/6/8 for slices 2,2,2,2)

We compare in logit space (``r > logit(τ)``): identical to ``σ(r) > τ`` but
exact where ``σ`` saturates in float32, and ``τ = 0`` / ``τ = 1`` mean "all
slices" / "base slice only" for any finite score.

Surrogate gradient (our choice; the paper does not specify its estimator):
straight-through. The forward pass uses the hard nested mask, the backward
pass the gradient of the soft nested mask ``p_e = Π_{j<=e} g_j``::

    m_ste = m_hard + p - stopgrad(p)

Budget loss (Eq. 9's bit term, our form): ``λ(t) · ref · ((b̄ - b*) / (B_E - B_1))^2``
with ``b̄`` the mean over tokens of the straight-through bits
``B_1 + Σ_e b_{e+1} m_ste`` (value = the real hard bits, gradient = soft),
``ref`` a per-layer error scale (:class:`mbq_ref.mobilinear.MoBiLinear` uses its
base-slice output MSE, making ``λ`` dimensionless) and ``λ(t)`` ramped linearly
from 0 over a warm-up (:func:`warmup_weight`), so the clipping first adapts to
the slices before the router is pushed towards the budget.

Threshold controller (Sec. 4.2 "runtime precision switching"):
:func:`threshold_for_bits` finds, for one layer's scores on calibration tokens,
the ``logit(τ)`` whose mean bits is closest to a target. The model-level
controllers (global ``τ`` by bisection, or per-layer ``τ``) are in
:mod:`mbq_ref.mobiquant`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MBQError
from .mobislice import check_slice_bits, cumulative_bits

__all__ = [
    "BitStats",
    "MoBiRouter",
    "RouteError",
    "RouterBudget",
    "budget_loss",
    "counts_to_bits",
    "dual_step",
    "logit_to_tau",
    "mask_bits",
    "nested_masks",
    "slice_counts",
    "soft_masks",
    "ste_masks",
    "surrogate_saturation",
    "tau_to_logit",
    "threshold_for_bits",
    "warmup_weight",
]


class RouteError(MBQError):
    """A router argument that cannot be used (bad τ, slice count or shape; the message says which)."""


def tau_to_logit(tau: float) -> float:
    """``logit(τ)`` in float64; ``τ = 0 -> -inf`` (all slices on), ``τ = 1 -> +inf`` (base only)."""
    tau = float(tau)
    if not 0.0 <= tau <= 1.0 or math.isnan(tau):
        raise RouteError(f"threshold τ must be in [0, 1], got {tau}")
    if tau == 0.0:
        return -math.inf
    if tau == 1.0:
        return math.inf
    return math.log(tau) - math.log1p(-tau)


def logit_to_tau(u: float) -> float:
    """``σ(u)`` in float64 (inverse of :func:`tau_to_logit`, ``±inf`` map to 1 / 0)."""
    if u == math.inf:
        return 1.0
    if u == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))


class MoBiRouter(nn.Module):
    """The 2-layer MLP router of one linear layer (Eq. 4): a score per residual slice.

    Args:
        in_features: ``K``, the width of the layer input it reads.
        num_scores: ``E - 1``, the number of residual slices.
        hidden: hidden width (the paper does not specify it; 64 by default).
        init_bias: initial ``b_2``; positive = every slice starts on (``σ(1) ≈ 0.73``),
            the budget loss then switches off the tokens that need them least.
        score_bound: ``S`` of the bounded score ``r = S tanh(n / S)`` (``inf`` = unbounded).
        spread: standard deviation of the normalised scores ``n`` over calibration tokens
            (the surrogate temperature: scores then stay where the surrogate has gradient).
    """

    def __init__(
        self,
        in_features: int,
        num_scores: int,
        hidden: int = 64,
        init_bias: float = 1.0,
        score_bound: float = 8.0,
        spread: float = 1.0,
        ladder: bool = False,
    ):
        super().__init__()
        if num_scores < 1 or hidden < 1:
            raise RouteError(f"router needs num_scores >= 1 and hidden >= 1, got {num_scores}, {hidden}")
        if not score_bound > 0:
            raise RouteError(f"router score bound must be > 0 (inf = unbounded), got {score_bound}")
        if ladder and not math.isfinite(score_bound):
            raise RouteError("a ladder router needs a finite score bound (its rungs are 2S apart)")
        self.num_scores = num_scores
        self.ladder = bool(ladder)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.SiLU()
        # ladder: one score per token (how much this token needs bits), the rungs make E-1 of it
        self.fc2 = nn.Linear(hidden, 1 if ladder else num_scores)
        # small output weights: tokens start with nearly equal scores, the
        # calibration gradients (not the random init) decide who is above τ
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.constant_(self.fc2.bias, float(init_bias))
        # c: constant input scale (0 = not measured yet; see set_input_scale)
        self.register_buffer("in_scale", torch.zeros(()))
        # S: scores live in (-S, S) (saved with the router, so a checkpoint routes as trained)
        self.register_buffer("score_bound", torch.tensor(float(score_bound)))
        # score normalisation n = spread (raw - mean) / std + offset: batch statistics while the
        # joint stage trains (batch_stats), their running average at inference (0 = not yet measured)
        self.register_buffer("score_mean", torch.zeros(self.fc2.out_features))
        self.register_buffer("score_std", torch.zeros(self.fc2.out_features))
        # ladder: the threshold alone sets the level, a learned offset would only shift it
        self.offset = nn.Parameter(torch.zeros(self.fc2.out_features), requires_grad=not ladder)
        self.register_buffer("spread", torch.tensor(float(spread)))  # saved: a checkpoint routes as trained
        self.batch_stats = False

    @torch.no_grad()
    def set_input_scale(self, x: torch.Tensor) -> None:
        """Fix ``c`` = RMS of ``x`` ``[T, K]`` (called once, on the first calibration batch)."""
        self.in_scale.fill_(float(x.float().pow(2).mean().sqrt().clamp_min(1e-6)))

    def raw_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP output ``W_2 SiLU(W_1 x / c + b_1) + b_2``, ``[..., E-1]``, before normalisation."""
        c = self.in_scale if self.in_scale > 0 else self.in_scale.new_ones(())
        h = self.act(self.fc1(x.float() / c))  # [..., hidden]
        return self.fc2(h)  # [..., E-1]

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        flat = raw.reshape(-1, raw.shape[-1])
        if self.batch_stats and flat.shape[0] > 1:
            mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)  # differentiable, as in batch norm
            with torch.no_grad():  # running statistics for inference (EMA over calibration batches)
                if self.score_std.min() <= 0:
                    self.score_mean.copy_(mean)
                    self.score_std.copy_(std)
                else:
                    self.score_mean.lerp_(mean.detach(), 0.1)
                    self.score_std.lerp_(std.detach(), 0.1)
        elif self.score_std.min() > 0:
            mean, std = self.score_mean, self.score_std
        else:  # never calibrated: raw scores
            return raw
        return self.spread * (raw - mean) / std + self.offset

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, tau_logit: float, slice_bits, target_bits: float) -> None:
        """Data-dependent start of the joint stage: on budget at ``τ`` (Sec. 4.2 budget, our initialisation).

        Sets the running score statistics from ``x`` ``[T, K]`` and the offset so that the
        hard nested masks at ``logit(τ)`` give ``target_bits`` on these tokens. Without it
        every token starts with the same score (``fc2`` is initialised near 0), so the
        first budget steps flip all tokens at once and leave them in the flat tails of
        the surrogate. The ranking of tokens is still random; the reconstruction loss
        learns it.
        """
        raw = self.raw_scores(x).reshape(-1, self.fc2.out_features)  # [T, E-1] ([T, 1] for a ladder)
        self.score_mean.copy_(raw.mean(0))
        self.score_std.copy_(raw.std(0).clamp_min(1e-6))
        self.offset.zero_()
        if self.ladder:  # the per-step quantile threshold sets the level: no offset to fit
            return
        z = self.spread * (raw - self.score_mean) / self.score_std
        u_star = threshold_for_bits(z, slice_bits, target_bits)
        if math.isfinite(u_star):
            self.offset.fill_(self._unbounded(tau_logit) - u_star)

    def _unbounded(self, r: float) -> float:
        """The normalised score ``n`` with ``S tanh(n / S) = r`` (the bound is monotone, so thresholds map 1:1)."""
        s = float(self.score_bound)
        return r if not math.isfinite(s) else s * math.atanh(max(min(r / s, 1 - 1e-7), -1 + 1e-7))

    @torch.no_grad()
    def settle_offset(self, scores: torch.Tensor, tau_logit: float, slice_bits, target_bits: float) -> float:
        """Shift the score offset so that these tokens read ``target_bits`` on average at ``logit(τ)``.

        The budget settle that ends the joint stage (:func:`mbq_ref.mobiquant.settle_budget`).
        The offset is a bias added to every normalised score, so the shift moves every
        token by the same amount: the ranking the router learned (who gets slices) is
        unchanged; only the level (how many) is set, exactly, on the calibration tokens.

        Args:
            scores: ``[T, E-1]`` router outputs ``r`` (bounded) on calibration tokens, at
                the current offset and the running score statistics (inference mode).
            tau_logit: the trained threshold ``logit(τ)``.
            target_bits: the layer's ``train_bits``.
        Returns:
            the shift added to the offset (normalised-score units: 1 = one standard
            deviation of the scores); 0 if the target is met by all-on / all-off.
        """
        u_star = threshold_for_bits(scores, slice_bits, target_bits)  # in r (bounded) space
        if not math.isfinite(u_star):
            return 0.0
        shift = self._unbounded(tau_logit) - self._unbounded(u_star)
        self.offset.add_(shift)
        return shift

    @property
    def rung(self) -> float:
        """Ladder spacing ``ρ = 2S (1 + 10^-3)``: wider than the score range ``(-S, S)`` (ladder routers only)."""
        return 2.0 * float(self.score_bound) * (1.0 + 1e-3)

    def score_limits(self) -> tuple[float, float]:
        """``(lo, hi)``: every score :meth:`forward` returns lies strictly inside (``∓inf`` if unbounded).

        A threshold below ``lo`` turns every slice on, one above ``hi`` leaves the base slice only.
        """
        s = float(self.score_bound)
        if not math.isfinite(s):
            return -math.inf, math.inf
        return (-s - (self.num_scores - 1) * self.rung, s) if self.ladder else (-s, s)

    def token_score(self, x: torch.Tensor) -> torch.Tensor:
        """The bounded score ``s = S tanh(n / S)`` before any ladder, ``[..., fc2 outputs]`` (float32)."""
        raw = self._normalise(self.raw_scores(x))
        s = self.score_bound
        # bounded score: identity near 0, never beyond ±S, so the surrogate σ((r - u)/T)
        # keeps a gradient for every token (|r - u| <= S + |u|); S = inf = unbounded
        return raw if not torch.isfinite(s) else s * torch.tanh(raw / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores ``r`` ``[..., E-1]`` (float32) for ``x`` ``[..., K]``: one per residual slice, or a ladder.

        Per-slice router: ``r_e = S tanh(n_e / S)``, one MLP output ``n_e`` per residual slice.
        Ladder router (our design, ``docs/design.md``): one score ``s`` per token and
        ``r_e = s - (e - 1) ρ`` with ``ρ > 2S`` (:attr:`rung`). Whatever the threshold ``u``,
        at most one rung lies inside ``(-S, S)``, so the tokens of a layer split between
        two adjacent slice counts ``k`` and ``k + 1`` (higher score = more slices), and as
        ``u`` falls each token's count only grows: nested in the target by construction.
        """
        s = self.token_score(x)
        if not self.ladder:
            return s
        # ρ from the bound buffer on its device (no host read of it during decode)
        rho = 2.0 * (1.0 + 1e-3) * self.score_bound.to(s.dtype)
        return s - torch.arange(self.num_scores, device=s.device, dtype=s.dtype) * rho  # [..., 1] - [E-1] -> [..., E-1]


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise RouteError(f"router scores must be [..., E-1] with E >= 2, got shape {tuple(logits.shape)}")


def nested_masks(logits: torch.Tensor, tau_logit: float) -> torch.Tensor:
    """Hard nested masks ``m_e = 1[min_{j<=e} r_j > logit(τ)]``.

    Args:
        logits: ``[..., E-1]`` router scores ``r``.
        tau_logit: ``logit(τ)`` (see :func:`tau_to_logit`).
    Returns:
        bool ``[..., E-1]``; along the last dim a run of ``True`` then ``False`` (a prefix).
    """
    _check_logits(logits)
    # the cumulative min makes slice e on only if every earlier residual slice is on
    return logits.cummin(dim=-1).values > tau_logit


def slice_counts(logits: torch.Tensor, tau_logit: float) -> torch.Tensor:
    """Slices read per token ``k_t = 1 + Σ_e m_{t,e}`` (the base slice is always on); long ``[...]``."""
    return 1 + nested_masks(logits, tau_logit).sum(-1)


def soft_masks(logits: torch.Tensor, tau_logit: float, temperature: float = 1.0) -> torch.Tensor:
    """Soft nested masks ``p_e = Π_{j<=e} σ((r_j - u) / T)``, centred on the threshold ``u``; ``[..., E-1]``."""
    _check_logits(logits)
    if not temperature > 0:
        raise RouteError(f"surrogate temperature must be > 0, got {temperature}")
    if not math.isfinite(tau_logit):
        raise RouteError(f"the surrogate needs a finite threshold logit, got {tau_logit}")
    return torch.sigmoid((logits - tau_logit) / temperature).cumprod(dim=-1)


def ste_masks(logits: torch.Tensor, tau_logit: float, temperature: float = 1.0) -> torch.Tensor:
    """Straight-through nested masks: hard forward, gradient of :func:`soft_masks` backward; float ``[..., E-1]``.

    The soft mask is centred on the same ``u = logit(τ)`` as the hard one, so the
    gradient is largest for the tokens the threshold is about to flip.
    """
    hard = nested_masks(logits, tau_logit).to(logits.dtype)
    soft = soft_masks(logits, tau_logit, temperature)
    return hard + soft - soft.detach()


@torch.no_grad()
def surrogate_saturation(
    logits: torch.Tensor, tau_logit: float, temperature: float = 1.0, score_bound: float = math.inf, rel: float = 1e-3
) -> float:
    """Share of scores whose surrogate gradient is below ``rel`` x its peak (0 = every score can still learn).

    The gradient of ``σ((r - u)/T)`` with respect to the router's raw output is
    ``σ'((r - u)/T) / T · dr/draw`` with ``dr/draw = 1 - (r/S)^2`` for the bounded
    score (1 when unbounded); its peak is ``1 / (4T)`` (at ``r = u``, ``r = 0``).

    Args:
        logits: ``[..., E-1]`` scores ``r``.
    """
    z = (logits.double() - tau_logit) / temperature
    g = torch.sigmoid(z) * torch.sigmoid(-z) * 4.0  # σ'(z) / σ'(0)
    if math.isfinite(score_bound):
        g = g * (1 - (logits.double() / score_bound) ** 2).clamp_min(0)
    return float((g < rel).double().mean()) if g.numel() else math.nan


_CUM_BITS = {}  # (slice_bits, device) -> float32 [E + 1] = (0, B_1, ..., B_E), for counts_to_bits(check=False)


def counts_to_bits(counts: torch.Tensor, slice_bits, check: bool = True) -> torch.Tensor:
    """Bits per token ``b_t = B_{k_t}`` (float32, same shape as ``counts``).

    ``check=False`` skips the range check (it reads the device; decode defers it to
    :class:`BitStats`): counts are clamped to 0..E, so an out-of-range count reads 0 or B_E bits.
    """
    if not check:  # decode: the table is made once per device (a tensor from host data is a copy and a sync)
        key = (tuple(int(b) for b in slice_bits), str(counts.device))
        if key not in _CUM_BITS:
            _CUM_BITS[key] = torch.tensor([0, *cumulative_bits(slice_bits)], dtype=torch.float32, device=counts.device)
        cum = _CUM_BITS[key]
        return cum[counts.long().clamp(0, len(cum) - 1)]
    cum = torch.tensor([0, *cumulative_bits(slice_bits)], dtype=torch.float32, device=counts.device)
    if counts.numel() and (counts.min() < 1 or counts.max() > len(cum) - 1):
        raise RouteError(f"slice counts must be in 1..{len(cum) - 1}, got {int(counts.min())}..{int(counts.max())}")
    return cum[counts.long()]


def mask_bits(masks: torch.Tensor, slice_bits) -> torch.Tensor:
    """Bits per token from (hard, soft or straight-through) masks: ``B_1 + Σ_e b_{e+1} m_e``; ``[...]``."""
    bits = check_slice_bits(slice_bits)
    if masks.shape[-1] != len(bits) - 1:
        raise RouteError(f"{masks.shape[-1]} masks for {len(bits)} slices (need E-1 = {len(bits) - 1})")
    w = torch.tensor(bits[1:], dtype=masks.dtype, device=masks.device)
    return bits[0] + masks @ w


def budget_loss(
    mean_bits: torch.Tensor, target: float, slice_bits, weight: float, ref: float = 1.0, multiplier: float = 0.0
) -> torch.Tensor:
    """Bit-budget term (our form of Eq. 9's): an augmented Lagrangian ``ref · (μ d + weight · d^2)``.

    ``d = (b̄ - b*) / (B_E - B_1)``; ``μ`` is the multiplier of the constraint ``b̄ = b*``
    (raised by :func:`dual_step` while the layer is over budget), ``weight`` the
    quadratic penalty (the whole term when ``μ = 0``).

    Args:
        mean_bits: scalar mean bits over tokens (straight-through, so it is differentiable).
        target: ``b*`` in ``[B_1, B_E]``.
        weight: quadratic weight ``λ(t)`` from :func:`warmup_weight`.
        ref: error scale that makes ``weight`` and ``μ`` dimensionless (block-MSE units).
        multiplier: ``μ`` (dimensionless).
    """
    cum = cumulative_bits(slice_bits)
    if not cum[0] <= target <= cum[-1]:
        raise RouteError(f"target bits {target} outside the reachable range {cum[0]}..{cum[-1]}")
    span = max(cum[-1] - cum[0], 1)
    d = (mean_bits - target) / span
    return ref * (multiplier * d + weight * d**2)


def dual_step(multiplier: float, mean_bits: float, target: float, slice_bits, step_size: float) -> float:
    """Dual ascent on the budget multiplier: ``μ <- μ + η (b̄ - b*) / (B_E - B_1)``.

    ``b̄`` is the *hard* mean bits of the last step. Over budget, ``μ`` grows until the
    budget gradient outweighs the reconstruction gradient that asks for more slices;
    under budget it shrinks (it may go negative: ``b̄ = b*`` is an equality).
    """
    cum = cumulative_bits(slice_bits)
    return float(multiplier) + float(step_size) * (float(mean_bits) - float(target)) / max(cum[-1] - cum[0], 1)


def warmup_weight(step: int, warmup_steps: int, weight: float) -> float:
    """Linear warm-up of the budget weight: ``λ · min(1, (step + 1) / warmup_steps)`` (``λ`` if no warm-up)."""
    if warmup_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, (step + 1) / warmup_steps)


@dataclass
class RouterBudget:
    """The joint stage's bit budget for one layer's router: settings and the state they drive.

    One optimizer step (:meth:`step`) given the straight-through mean bits ``b̄`` of its forward:

    1. loss ``ramp · ref · (μ d + λ d²)``, ``d = (b̄ - b*) / (B_E - B_1)`` (:func:`budget_loss`),
       ``ramp`` rising from 0 to 1 over ``warmup_steps`` (:func:`warmup_weight`);
    2. dual ascent ``μ <- μ + ramp · η d_hard`` (:func:`dual_step`), on the hard bits;
    3. integral control of the router's score offset, ``offset <- offset - ramp · κ d_hard``.

    Attributes:
        train_bits: ``b*``, the layer's target mean bits (Sec. 5.3: the same for every layer).
        weight: ``λ`` after warm-up (dimensionless: the loss is scaled by ``ref``).
        warmup_steps: optimizer steps of the linear ramp.
        dual_step: ``η`` (0 = fixed penalty only).
        offset_step: ``κ`` (0 = off; 1 = one score standard deviation per unit of ``d``).
        ref: the layer's error scale (set by the layer at the first joint step; ``None`` before).
        multiplier: ``μ``; ``steps``: optimizer steps taken in this joint stage.
    """

    train_bits: float = 3.0
    weight: float = 1.0
    warmup_steps: int = 0
    dual_step: float = 0.0
    offset_step: float = 0.0
    ref: float | None = None
    multiplier: float = 0.0
    steps: int = 0

    def check(self, slice_bits) -> RouterBudget:
        """Return self if ``train_bits`` is reachable with ``slice_bits`` and the step sizes are >= 0."""
        cum = cumulative_bits(check_slice_bits(slice_bits))
        if not cum[0] <= self.train_bits <= cum[-1]:
            raise RouteError(f"train_bits {self.train_bits} outside {cum[0]}..{cum[-1]}")
        if not (self.weight >= 0 and self.dual_step >= 0 and self.offset_step >= 0 and self.warmup_steps >= 0):
            raise RouteError(f"budget weight, warm-up and step sizes must be >= 0, got {self}")
        return self

    def reset(self) -> None:
        """Start a new joint stage: no reference scale, ``μ = 0``, warm-up from step 0."""
        self.ref, self.multiplier, self.steps = None, 0.0, 0

    def step(self, bits: torch.Tensor, slice_bits, router: MoBiRouter) -> torch.Tensor:
        """The budget loss of one optimizer step (differentiable in ``bits``), then the dual and offset updates."""
        if self.ref is None:
            raise RouteError("RouterBudget.ref is unset: the layer sets it at the first joint forward")
        ramp = warmup_weight(self.steps, self.warmup_steps, 1.0)
        self.steps += 1
        loss = budget_loss(bits, self.train_bits, slice_bits, ramp * self.weight, self.ref, ramp * self.multiplier)
        hard = float(bits.detach())  # the straight-through value is the hard mean bits
        self.multiplier = dual_step(self.multiplier, hard, self.train_bits, slice_bits, ramp * self.dual_step)
        if self.offset_step > 0:
            # integral control: Adam moves the offset by about one learning rate per step, too
            # slow to follow the shape of the scores as the MLP learns; the hard-bits error of
            # this step shifts it directly (same sign as the multiplier)
            with torch.no_grad():
                d = dual_step(0.0, hard, self.train_bits, slice_bits, 1.0)
                router.offset.sub_(ramp * self.offset_step * d)
        return loss


@torch.no_grad()
def threshold_for_bits(logits: torch.Tensor, slice_bits, target: float) -> float:
    """The ``logit(τ)`` whose mean bits over these tokens is closest to ``target`` (one layer).

    Token ``t`` reads slice ``e+1`` iff ``c_{t,e} = min_{j<=e} r_{t,j} > u``, so the
    mean bits ``B_1 + Σ_e b_{e+1} · #{t: c_{t,e} > u} / T`` is a non-increasing step
    function of ``u`` that only changes at the values ``c``. We evaluate it just
    below every distinct ``c`` (counts via ``searchsorted``) and return the midpoint
    between neighbouring values, so a tiny float change in ``u`` flips no token.

    Args:
        logits: ``[T, E-1]`` scores on calibration tokens.
        target: wanted mean bits in ``[B_1, B_E]``.
    Returns:
        ``u``: a float (``-inf`` = all slices on, ``+inf`` = base only).
    """
    bits = check_slice_bits(slice_bits)
    _check_logits(logits)
    cum = cumulative_bits(bits)
    if not cum[0] <= target <= cum[-1]:
        raise RouteError(f"target bits {target} outside the reachable range {cum[0]}..{cum[-1]}")
    c = logits.reshape(-1, logits.shape[-1]).double().cummin(dim=-1).values  # [T, E-1]
    t = c.shape[0]
    vals = torch.unique(c)  # sorted candidate thresholds
    # thresholds tried: -inf, then midpoints between candidates, then +inf
    cand = torch.cat([vals.new_tensor([-math.inf]), (vals[:-1] + vals[1:]) / 2, vals.new_tensor([math.inf])])
    w = torch.tensor(bits[1:], dtype=torch.float64)
    mean_bits = torch.full_like(cand, float(bits[0]))
    for e in range(c.shape[1]):
        col = c[:, e].sort().values
        above = t - torch.searchsorted(col, cand, right=True)  # tokens with c > u
        mean_bits += w[e] * above.double() / t
    best = int((mean_bits - target).abs().argmin())
    return float(cand[best])


@dataclass
class BitStats:
    """Running routing statistics of one layer: tokens seen, summed bits, tokens per slice count.

    The sums live on the device of the counts they are fed (decode never waits for the GPU to
    report them); ``bit_sum``, ``hist`` and ``avg_bits`` copy them to the host when read.
    ``tokens`` is a host integer (a tensor shape, known without reading the device). Checks a
    layer defers during decode are counted here too (:meth:`note_nonfinite`, out-of-range
    counts in :meth:`update` with ``check=False``) and reported by :meth:`problems`.
    """

    num_slices: int
    tokens: int = 0

    def __post_init__(self):
        self._bits = torch.zeros((), dtype=torch.float64)
        self._hist = torch.zeros(self.num_slices, dtype=torch.long)  # tokens that read exactly k slices
        self._bad_counts = torch.zeros((), dtype=torch.long)
        self._nonfinite = torch.zeros((), dtype=torch.long)

    def _on(self, device) -> None:
        if self._hist.device != device:  # follow the layer (moved once, not per batch)
            self._bits, self._hist = self._bits.to(device), self._hist.to(device)
            self._bad_counts, self._nonfinite = self._bad_counts.to(device), self._nonfinite.to(device)

    def update(self, counts: torch.Tensor, bits: torch.Tensor, check: bool = True) -> None:
        """Add one batch: ``counts`` (slices per token) and ``bits`` (bits per token), both ``[T]``.

        ``check=False``: counts outside 1..E are counted on the device (see :meth:`problems`)
        instead of being an error now; nothing is read back from the device either way.
        """
        c = counts.reshape(-1)
        self._on(c.device)
        self.tokens += c.numel()
        self._bits += bits.double().sum()
        if not check:
            self._bad_counts += ((c < 1) | (c > self.num_slices)).sum()
        idx = (c - 1).clamp(0, self.num_slices - 1)
        self._hist.index_add_(0, idx, torch.ones_like(idx))  # no bincount: it reads the max back

    def note_nonfinite(self, x: torch.Tensor) -> None:
        """Count (on the device) one batch whose input has NaN/inf: a check deferred during decode."""
        self._on(x.device)
        self._nonfinite += (~torch.isfinite(x)).any()

    def problems(self) -> str | None:
        """What the deferred checks found since the last reset (reads the device), or None."""
        bad, nonfinite = int(self._bad_counts), int(self._nonfinite)
        out = []
        if nonfinite:
            out.append(f"{nonfinite} input batch(es) contained NaN/inf")
        if bad:
            out.append(f"{bad} token(s) had a slice count outside 1..{self.num_slices}")
        return "; ".join(out) or None

    @property
    def bit_sum(self) -> float:
        """Summed bits of every token seen (read from the device)."""
        return float(self._bits)

    @property
    def hist(self) -> torch.Tensor:
        """long ``[E]`` on the CPU: tokens that read exactly k slices (k = 1..E)."""
        return self._hist.cpu()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.tokens = 0
        for t in (self._bits, self._hist, self._bad_counts, self._nonfinite):
            t.zero_()

    @property
    def avg_bits(self) -> float:
        """Mean bits per token (NaN if no token was seen since the last reset)."""
        return self.bit_sum / self.tokens if self.tokens else math.nan

    def fractions(self) -> torch.Tensor:
        """Share of tokens that read 1..E slices, float ``[E]``."""
        return self.hist.double() / max(self.tokens, 1)
