"""Per-token quantization sensitivity and "outlier migration" across bit-widths (Sec. 3, Fig. 1).

The paper's observation: the tokens whose outputs suffer most from weight
quantization are not the same at every precision, so clipping calibrated at
one precision is fitted to the wrong tokens at another. The paper does not
specify the metric (docs/paper.md), so we use the most direct one: for a linear layer
``W`` ``[N, K]`` and a token's input ``x_t`` ``[K]``,

    e_t(b) = || x_t W^T - x_t Ŵ_b^T ||_2          (absolute)
    r_t(b) = e_t(b) / || x_t W^T ||_2             (relative)

on real layer inputs captured from the model. The outlier tokens at ``b`` bits
are the top ``frac`` (10%) by ``e_t(b)``; overlap across bit-widths is the
Jaccard index of those sets and the Spearman rank correlation of ``e_t``.

Also here: the perplexity mismatch matrix (calibrate at ``b_c``, evaluate at
``b_i``) and the "retain 10%" oracle (the 3-bit outlier tokens stay at 3 bits,
the others run at 4 bits), with a random-10% control of the same bit budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import CalibConfig, CalibLog, calibrate_static
from .fakequant import QuantLinear, check_group_size, quantizable_linears, quantize_model, set_bits, set_token_bits
from .perplexity import perplexity
from .quantizer import QuantError, rtn

__all__ = [
    "BITS",
    "TokenErrors",
    "capture_linear_inputs",
    "token_errors",
    "topk_mask",
    "jaccard",
    "spearman",
    "overlap",
    "SensitivityReport",
    "sensitivity_report",
    "paired_gap",
    "MismatchResult",
    "mismatch_matrix",
    "OutlierTokenPolicy",
    "RandomTokenPolicy",
    "RetainResult",
    "retain_experiment",
]

#: Bit-widths of the sensitivity analysis.
BITS = (2, 3, 4, 6, 8)


@dataclass
class TokenErrors:
    """Per-token output errors of one layer: ``abs``, ``rel`` float32 ``[len(bits), T]``."""

    bits: tuple[int, ...]
    abs: torch.Tensor
    rel: torch.Tensor


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every quantizable projection during one forward pass.

    Args:
        model: HF Llama-family causal LM (full precision or fake-quantized).
        ids: ``[B, T]`` token ids.
    Returns:
        ``{layer path: float32 [B*T, K]}`` in forward order (all layers at once:
        meant for the tiny model, ``7 L`` copies of the probe's activations).
    """
    seen: dict[str, torch.Tensor] = {}
    handles = [
        mod.register_forward_hook(lambda _m, args, _out, n=name: seen.__setitem__(n, args[0].detach()))
        for name, mod in quantizable_linears(model).items()
    ]
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: x.reshape(-1, x.shape[-1]).float() for n, x in seen.items()}


@torch.no_grad()
def token_errors(
    x: torch.Tensor, layer: nn.Module | torch.Tensor, bits=BITS, group_size: int | None = 128
) -> TokenErrors:
    """``e_t(b)`` and ``r_t(b)`` of every token for each bit-width (Sec. 3).

    Args:
        x: ``[T, K]`` layer inputs.
        layer: a :class:`QuantLinear` (its own clip range, re-gridded at each ``b``),
            or an ``nn.Linear`` / weight ``[N, K]`` (RTN with ``group_size``).
    Returns:
        :class:`TokenErrors` with ``[len(bits), T]`` tensors.
    """
    w = layer.weight if isinstance(layer, nn.Module) else layer
    w = w.detach().float()
    x = x.float()
    y = x @ w.T  # [T, N]; the bias cancels in the difference
    norm = y.norm(dim=-1).clamp_min(1e-12)  # [T]
    errs = []
    for b in bits:
        wq = layer.qweight(b).float() if isinstance(layer, QuantLinear) else rtn(w, b, group_size)
        errs.append((x @ (w - wq).T).norm(dim=-1))  # [T]
    e = torch.stack(errs)  # [len(bits), T]
    return TokenErrors(tuple(bits), e, e / norm)


def topk_mask(err: torch.Tensor, frac: float = 0.1) -> torch.Tensor:
    """Boolean mask of the top ``frac`` entries along the last dim (at least one); same shape as ``err``."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    k = max(1, round(frac * err.shape[-1]))
    idx = err.topk(k, dim=-1).indices
    return torch.zeros_like(err, dtype=torch.bool).scatter_(-1, idx, True)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two boolean masks (1.0 if both are empty)."""
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def _ranks(v: torch.Tensor) -> torch.Tensor:
    return v.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position; errors are continuous)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-12))


def overlap(err: torch.Tensor, frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise top-``frac`` Jaccard and Spearman ρ between the rows of ``err`` ``[nb, T]``; each ``[nb, nb]``."""
    masks = topk_mask(err, frac)
    nb = err.shape[0]
    jac = torch.tensor([[jaccard(masks[i], masks[j]) for j in range(nb)] for i in range(nb)])
    rho = torch.tensor([[spearman(err[i], err[j]) for j in range(nb)] for i in range(nb)])
    return jac, rho


@dataclass
class SensitivityReport:
    """Per-token errors of every quantized projection: ``abs``, ``rel`` float32 ``[L, nb, T]``."""

    layers: list[str]
    bits: tuple[int, ...]
    abs: torch.Tensor
    rel: torch.Tensor
    frac: float = 0.1

    def errors(self, metric: str = "abs") -> torch.Tensor:
        """``[L, nb, T]`` errors for ``metric`` in ``{"abs", "rel"}``."""
        if metric not in ("abs", "rel"):
            raise ValueError(f"metric must be 'abs' or 'rel', got {metric!r}")
        return self.abs if metric == "abs" else self.rel

    def overlap(self, metric: str = "abs") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer Jaccard and Spearman matrices, each ``[L, nb, nb]``."""
        pairs = [overlap(e, self.frac) for e in self.errors(metric)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def pair(self, b1: int, b2: int, metric: str = "abs") -> tuple[torch.Tensor, torch.Tensor]:
        """Jaccard and Spearman between ``b1`` and ``b2`` bits for every layer, each ``[L]``."""
        i, j = self.bits.index(b1), self.bits.index(b2)
        jac, rho = self.overlap(metric)
        return jac[:, i, j], rho[:, i, j]

    def heatmap(self, metric: str = "abs", tokens: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Heat-map data: rows ``(layer, bits)``, columns tokens, each row standardised (z-score).

        Standardising puts 2-bit and 8-bit errors, and layers whose token errors
        spread by 3% or by 50%, on one colour scale: what is compared is *which*
        tokens stand out in a row, not by how much.
        Returns ``([L * nb, T'], row labels)``.
        """
        e = self.errors(metric)[..., :tokens]  # [L, nb, T']
        e = (e - e.mean(-1, keepdim=True)) / e.std(-1, keepdim=True).clamp_min(1e-12)
        labels = [f"{n.removeprefix('model.layers.')} @{b}b" for n in self.layers for b in self.bits]
        return e.reshape(-1, e.shape[-1]), labels

    @property
    def random_jaccard(self) -> float:
        """Expected Jaccard of two independent random top-``frac`` sets: ``f / (2 - f)``."""
        return self.frac / (2 - self.frac)


def sensitivity_report(
    model: nn.Module, ids: torch.Tensor, bits=BITS, group_size: int | None = 128, frac: float = 0.1
) -> SensitivityReport:
    """Per-token errors of every q/k/v/o/gate/up/down projection on real inputs (Sec. 3, Fig. 1).

    Args:
        model: full-precision model (RTN at each ``b``) or a quantized one (its clip range).
        ids: ``[B, T]`` token ids; tokens are pooled to ``B*T``.
    """
    mods = quantizable_linears(model)
    if not all(isinstance(m, QuantLinear) for m in mods.values()):  # RTN at group_size on plain layers
        check_group_size(model, group_size)
    inputs = capture_linear_inputs(model, ids)
    errs = [token_errors(inputs[n], mods[n], bits, group_size) for n in inputs]
    return SensitivityReport(
        list(inputs), tuple(bits), torch.stack([e.abs for e in errs]), torch.stack([e.rel for e in errs]), frac
    )


def paired_gap(nll_a: torch.Tensor, nll_b: torch.Tensor) -> tuple[float, float]:
    """Mean per-token NLL difference ``a - b`` over the same windows, and its standard error.

    Both runs read the same windows, so the difference is paired; windows are
    treated as independent samples. A gap within ~2 standard errors is not
    distinguishable from window-to-window noise.

    Args:
        nll_a, nll_b: ``[W]`` mean NLL per window (:attr:`PerplexityResult.window_nll`).
    Returns:
        ``(mean, standard error)`` in nats per token.
    """
    d = torch.as_tensor(nll_a, dtype=torch.float64) - torch.as_tensor(nll_b, dtype=torch.float64)
    se = d.std() / d.numel() ** 0.5 if d.numel() > 1 else torch.tensor(float("nan"))
    return float(d.mean()), float(se)


@dataclass
class MismatchResult:
    """Perplexity when calibrating at ``b_c`` and evaluating at ``b_i``: ``ppl`` ``[len(calib), len(eval)]``.

    ``window_nll`` ``[len(calib), len(eval), W]`` and ``rtn_window_nll`` ``[len(eval), W]``
    keep the mean NLL of every window for :func:`paired_gap`.
    """

    calib_bits: tuple[int, ...]
    eval_bits: tuple[int, ...]
    ppl: torch.Tensor
    rtn: list[float]
    fp: float
    window_nll: torch.Tensor | None = field(default=None, repr=False)
    rtn_window_nll: torch.Tensor | None = field(default=None, repr=False)
    logs: dict[int, CalibLog] = field(default_factory=dict, repr=False)
    models: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    def at(self, b_c: int, b_i: int) -> float:
        """PPL of the model calibrated at ``b_c`` and run at ``b_i`` bits."""
        return float(self.ppl[self.calib_bits.index(b_c), self.eval_bits.index(b_i)])

    def nll(self, b_c: int, b_i: int) -> torch.Tensor:
        """``[W]`` per-window NLL of the model calibrated at ``b_c`` and run at ``b_i`` bits."""
        return self.window_nll[self.calib_bits.index(b_c), self.eval_bits.index(b_i)]

    def to_markdown(self) -> str:
        """The matrix, an RTN row and the FP perplexity as a markdown table."""
        head = "| calibrated at \\ evaluated at | " + " | ".join(f"{b}-bit" for b in self.eval_bits) + " |"
        rows = [head, "|---" * (len(self.eval_bits) + 1) + "|"]
        for i, bc in enumerate(self.calib_bits):
            cells = []
            for j, bi in enumerate(self.eval_bits):
                v = f"{self.ppl[i, j]:.2f}"
                cells.append(f"**{v}**" if bc == bi else v)
            rows.append(f"| LWC {bc}-bit | " + " | ".join(cells) + " |")
        rows.append("| RTN (no calibration) | " + " | ".join(f"{v:.2f}" for v in self.rtn) + " |")
        return "\n".join(rows) + f"\n\nFull precision: {self.fp:.2f}. Bold: matched precision (b_c = b_i)."


def mismatch_matrix(
    model: nn.Module,
    calib_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    calib_bits=(2, 3, 4),
    eval_bits=(2, 3, 4, 6),
    cfg: CalibConfig | None = None,
    group_size: int | None = 128,
    seqlen: int = 256,
    max_windows: int | None = None,
    keep_models: bool = False,
    progress: bool = True,
    batch_size: int = 8,
) -> MismatchResult:
    """Calibrate a copy of ``model`` at each ``b_c`` (LWC), evaluate it at each ``b_i`` (Fig. 1, Sec. 3).

    At ``b_i != b_c`` the learned clipping factors are kept and only the grid
    changes (:func:`mbq_ref.fakequant.set_bits`).

    Args:
        model: full-precision model (left untouched).
        calib_ids: ``[n, T]`` calibration windows; ``eval_ids``: ``[N]`` test stream.
        seqlen, max_windows: perplexity protocol (:func:`mbq_ref.perplexity.perplexity`).
        keep_models: return the calibrated copies in ``.models`` (e.g. for :func:`retain_experiment`).
        batch_size: windows per forward pass during evaluation.
    """

    def ppl(m):
        return perplexity(m, eval_ids, seqlen, max_windows, batch_size, progress=False)

    check_group_size(model, group_size)  # before the first (long) evaluation
    fp = ppl(model).ppl
    rtn_runs = [ppl(quantize_model(copy.deepcopy(model), b, group_size, method="rtn")) for b in eval_bits]
    table = torch.zeros(len(calib_bits), len(eval_bits))
    nlls = torch.zeros(len(calib_bits), len(eval_bits), len(rtn_runs[0].window_nll), dtype=torch.float64)
    res = MismatchResult(
        tuple(calib_bits), tuple(eval_bits), table, [r.ppl for r in rtn_runs], fp,
        nlls, torch.tensor([r.window_nll for r in rtn_runs], dtype=torch.float64),
    )  # fmt: skip
    for i, bc in enumerate(calib_bits):
        qm, res.logs[bc] = calibrate_static(copy.deepcopy(model), calib_ids, bc, cfg, group_size, progress)
        for j, bi in enumerate(eval_bits):
            run = ppl(set_bits(qm, bi))
            table[i, j], nlls[i, j] = run.ppl, torch.tensor(run.window_nll, dtype=torch.float64)
        set_bits(qm, bc)
        if keep_models:
            res.models[bc] = qm
    return res


class OutlierTokenPolicy:
    """Token bit-width oracle: in each sequence, the top ``frac`` tokens by ``e_t(low)`` get ``low`` bits.

    Every layer ranks its own tokens with the full-precision weight (an oracle,
    not a deployable router); all other tokens get ``high`` bits. Install with
    :func:`mbq_ref.fakequant.set_token_bits`.
    """

    def __init__(self, frac: float = 0.1, low: int = 3, high: int = 4):
        self.frac, self.low, self.high = frac, low, high

    @torch.no_grad()
    def __call__(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        err = (x @ (w - layer.qweight(self.low)).T).norm(dim=-1)  # [..., T]
        return torch.where(topk_mask(err, self.frac), self.low, self.high)


class RandomTokenPolicy(OutlierTokenPolicy):
    """Control for :class:`OutlierTokenPolicy`: a seeded random ``frac`` of tokens gets ``low`` bits."""

    def __init__(self, frac: float = 0.1, low: int = 3, high: int = 4, seed: int = 0):
        super().__init__(frac, low, high)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        score = torch.rand(x.shape[:-1], generator=self.gen).to(x.device)
        return torch.where(topk_mask(score, self.frac), self.low, self.high)


@dataclass
class RetainResult:
    """Outcome of :func:`retain_experiment`: ``ppl`` and per-window NLL ``[W]`` for each setting."""

    ppl: dict[str, float]
    window_nll: dict[str, torch.Tensor] = field(repr=False)

    def __getitem__(self, setting: str) -> float:
        return self.ppl[setting]


def retain_experiment(
    model: nn.Module,
    eval_ids: torch.Tensor,
    frac: float = 0.1,
    low: int = 3,
    high: int = 4,
    seqlen: int = 256,
    max_windows: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> RetainResult:
    """The "retain 10%" experiment of Sec. 3 on a model calibrated at ``low`` bits.

    Settings, in order: ``"all {high}-bit"``; ``"top-{frac} {low}-bit outliers at
    {low}-bit"`` (the oracle, :class:`OutlierTokenPolicy`); ``"random {frac} at
    {low}-bit"`` (same budget, :class:`RandomTokenPolicy`); ``"all {low}-bit"``.
    The model is left at ``low`` bits for all tokens, as calibrated.
    """
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QuantError("retain_experiment needs a quantized (calibrated) model")
    pct = f"{frac:.0%}"
    settings = [
        (f"all {high}-bit", high, None),
        (f"top-{pct} {low}-bit outliers at {low}-bit", high, OutlierTokenPolicy(frac, low, high)),
        (f"random {pct} at {low}-bit", high, RandomTokenPolicy(frac, low, high, seed)),
        (f"all {low}-bit", low, None),
    ]
    out = RetainResult({}, {})
    try:
        for name, bits, policy in settings:
            set_token_bits(set_bits(model, bits), policy)
            run = perplexity(model, eval_ids, seqlen, max_windows, batch_size, progress=False)
            out.ppl[name], out.window_nll[name] = run.ppl, torch.tensor(run.window_nll, dtype=torch.float64)
    finally:
        set_token_bits(set_bits(model, low), None)
    return out
