"""Any-precision baselines that MoBiSlice is compared with (paper Sec. 4.1, App. B; Sec. 5 tables).

A deployment that must serve 2, 4, 6 and 8-bit weights can do it in three ways.
Each is a *weight transform* ``W [N, K] -> Ŵ [N, K]`` with per-group (``g = 128``)
asymmetric ranges, so they are compared on equal footing:

``"rtn"``  independent round-to-nearest, **one checkpoint per bit-width**
    (OmniQuant convention, :func:`mbq_ref.quantizer.rtn`):
    ``s_b = (x_max - x_min) / (2^b - 1)``, ``q = clamp(round(W/s_b) + z_b, 0, 2^b - 1)``,
    ``Ŵ = s_b (q - z_b)``. Best grid per width, but 2+4+6+8 = 20 bits per weight
    and four scale/zero sets are stored.

``"msb"``  **MSB truncation** of one 8-bit RTN code (MatQuant-style slicing):
    keep the top ``b`` bits, ``q_b = q_8 >> (8 - b)``, and dequantize with the
    parent's scale/zero. The truncated code stands for the ``2^{8-b}`` fine codes
    that share its top bits; how it is read back is the ``mode``:

    * ``"mid"`` (default): the centre of those fine codes,
      ``Ŵ = s_8 (q_b 2^{8-b} + (2^{8-b} - 1)/2 - z_8)``. Since ``round`` maps the
      interval ``[q - 1/2, q + 1/2)`` to ``q``, this is exactly the centre of the
      real interval the coarse code covers, so ``|W - Ŵ| <= 2^{8-b-1} s_8``
      (half a coarse step), like MoBiSlice's ``+1/2``.
    * ``"edge"``: the dropped bits read as zeros, ``Ŵ = s_8 (q_b 2^{8-b} - z_8)``
      (what a kernel gets by simply ignoring the low bit-planes); biased by
      about half a coarse step.
    * ``"round"``: MatQuant's ``clamp(round(q_8 / 2^{8-b}), 0, 2^b - 1) 2^{8-b}``
      (round half up). Not nested: a carry can change the top bits, and the
      clamp clips the top of the range.

``"mobislice"``  MoBiSlice at ``k`` slices (:class:`mbq_ref.mobislice.SlicedWeight`,
    floor-aligned, recursive residuals), here **uncalibrated**: the base range
    is the group min/max, optionally shrunk by ``clip`` (``x = clip * min/max``).
    One 8-bit code and one scale/zero set serve every width.

Model-level helpers act on the q/k/v/o/gate/up/down projections found by
:func:`mbq_ref.fakequant.quantizable_linears` (embeddings and ``lm_head`` stay
full precision, as in the paper). :func:`memory_accounting` counts the bytes of
one many-in-one checkpoint against separate per-width checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MBQError
from .fakequant import QuantLinear, check_group_size, quantizable_linears
from .mobislice import SlicedWeight, SliceError, cumulative_bits
from .perplexity import perplexity
from .quantizer import QuantError, check_weight, group_minmax, quantize, resolve_group_size, rtn, scale_zero

__all__ = [
    "METHODS",
    "MSB_MODES",
    "BaselineError",
    "rtn_codes",
    "truncate_msb",
    "dequant_truncated",
    "baseline_weights",
    "baseline_weight",
    "relative_error",
    "reconstruction_errors",
    "clip_tension",
    "swapped_weights",
    "baseline_perplexities",
    "MemoryReport",
    "memory_accounting",
]


class BaselineError(MBQError):
    """A baseline request that cannot be run (bad method, bits, group size or weight; message says why)."""


#: The three ways to serve several bit-widths (module docstring): per-width RTN, MSB truncation, MoBiSlice.
METHODS = ("rtn", "msb", "mobislice")
#: How an MSB-truncated code is read back: the centre of the fine codes it stands for, their bottom, or MatQuant's rounding.
MSB_MODES = ("mid", "edge", "round")


# --- validation ------------------------------------------------------------
def _check(w: torch.Tensor, group_size: int | None, name: str | None = None) -> int:
    """Validate ``w`` ``[N, K]`` (2-D, finite, ``g | K``) and return the effective group size."""
    try:
        return check_weight(w, group_size, name)
    except QuantError as exc:  # one error family for the CLI (MBQError)
        raise BaselineError(str(exc)) from exc


def _check_widths(bits: Iterable[int], lo: int = 1, hi: int = 8) -> tuple[int, ...]:
    out = tuple(bits) if isinstance(bits, Iterable) else (bits,)
    if not out:
        raise BaselineError("no bit-widths requested; pass e.g. bits=(2, 4, 6, 8)")
    for b in out:
        if isinstance(b, bool) or not isinstance(b, int) or not lo <= b <= hi:
            raise BaselineError(f"bit-width must be an integer in {lo}..{hi}, got {b!r}")
    return out


# --- (b) MSB truncation of an 8-bit RTN code --------------------------------
@torch.no_grad()
def rtn_codes(
    w: torch.Tensor, bits: int = 8, group_size: int | None = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer RTN checkpoint ``(q, s, z)`` of ``w`` (OmniQuant convention, min/max range).

    Args:
        w: ``[N, K]`` weight.
    Returns:
        ``q`` uint8 ``[N, K]`` in ``0..2^bits - 1``; ``s``, ``z`` float32 ``[N, K/g]``.
    """
    g = _check(w, group_size)
    (bits,) = _check_widths((bits,))
    wmin, wmax = group_minmax(w, g)
    s, z = scale_zero(wmin, wmax, bits, ste=False)
    return quantize(w, s, z, bits, g), s, z


def truncate_msb(q: torch.Tensor, parent_bits: int, bits: int) -> torch.Tensor:
    """Keep the top ``bits`` of a ``parent_bits`` code: ``q >> (parent_bits - bits)`` (int32, same shape).

    Example (8 -> 2 bits)::

        q_8 = 0b10110111 = 183   ->   q_2 = 0b10 = 2
    """
    parent_bits, bits = _check_widths((parent_bits, bits))
    if bits > parent_bits:
        raise BaselineError(f"cannot truncate a {parent_bits}-bit code to {bits} bits (more bits than it has)")
    return q.to(torch.int32) >> (parent_bits - bits)


def dequant_truncated(
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    parent_bits: int,
    bits: int,
    mode: str = "mid",
    group_size: int | None = 128,
) -> torch.Tensor:
    """Dequantize the ``bits``-bit MSB slice of a ``parent_bits`` RTN code with the parent's ``s``, ``z``.

    See the module docstring for the three ``mode`` readings. With ``bits ==
    parent_bits`` every mode returns the parent's RTN weight ``s (q - z)``.

    Args:
        q: ``[N, K]`` parent codes (from :func:`rtn_codes`); ``s``, ``z``: ``[N, K/g]``.
    Returns:
        float32 ``[N, K]``.
    """
    if mode not in MSB_MODES:
        raise BaselineError(f"unknown MSB truncation mode {mode!r}; choose one of {', '.join(MSB_MODES)}")
    parent_bits, bits = _check_widths((parent_bits, bits))
    if bits > parent_bits:
        raise BaselineError(f"cannot truncate a {parent_bits}-bit code to {bits} bits (more bits than it has)")
    n, k = q.shape
    try:
        g = resolve_group_size(k, group_size)
    except QuantError as exc:
        raise BaselineError(str(exc)) from exc
    shift = parent_bits - bits
    step = 2**shift  # one coarse code = 2^shift fine codes
    if mode == "round":
        # MatQuant: round the parent code to the coarse grid (half up), clamp to b bits
        qb = torch.clamp(torch.floor(q.double() / step + 0.5), 0, 2**bits - 1)
        fine = qb * step
    else:
        fine = truncate_msb(q, parent_bits, bits).double() * step  # back to parent units
        if mode == "mid":
            fine = fine + (step - 1) / 2  # centre of the 2^shift fine codes sharing the top bits
    fg = fine.reshape(n, k // g, g)  # [N, K/g, g]
    w_hat = s.double().unsqueeze(-1) * (fg - z.double().unsqueeze(-1))
    return w_hat.reshape(n, k).float()


# --- one weight, every width -------------------------------------------------
def baseline_weights(
    w: torch.Tensor,
    method: str,
    bits: Iterable[int] = (2, 4, 6, 8),
    group_size: int | None = 128,
    *,
    msb_mode: str = "mid",
    parent_bits: int = 8,
    slice_bits=(2, 2, 2, 2),
    clip: float = 1.0,
    name: str | None = None,
) -> dict[int, torch.Tensor]:
    """``Ŵ`` at each bit-width for one method (Sec. 4.1 comparison).

    The many-in-one methods quantize once and read every width from the same
    checkpoint (one 8-bit code per weight); ``"rtn"`` quantizes once per width.

    Args:
        w: ``[N, K]`` weight.
        method: one of :data:`METHODS`.
        bits: widths to return; for ``"mobislice"`` each must be a cumulative
            slice width (2/4/6/8 for slices ``2,2,2,2``), for ``"msb"`` at most ``parent_bits``.
        msb_mode, parent_bits: MSB truncation reading (``"mid"``/``"edge"``/``"round"``) and parent width.
        slice_bits, clip: MoBiSlice slices and base-range shrink factor (``1.0`` = group min/max).
        name: layer name for error messages.
    Returns:
        ``{bits: Ŵ}``, each ``[N, K]`` in ``w``'s dtype.
    """
    if method not in METHODS:
        raise BaselineError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    g = _check(w, group_size, name)
    widths = _check_widths(bits)
    w32 = w.detach().float()
    if method == "rtn":
        out = {b: rtn(w32, b, g, name) for b in widths}
    elif method == "msb":
        too_wide = [b for b in widths if b > parent_bits]
        if too_wide:
            raise BaselineError(f"MSB truncation of a {parent_bits}-bit code cannot give {too_wide} bits")
        q, s, z = rtn_codes(w32, parent_bits, g)  # the single stored checkpoint
        out = {b: dequant_truncated(q, s, z, parent_bits, b, msb_mode, g) for b in widths}
    else:
        try:
            cum = cumulative_bits(slice_bits)
        except SliceError as exc:
            raise BaselineError(str(exc)) from exc
        missing = [b for b in widths if b not in cum]
        if missing:
            raise BaselineError(
                f"MoBiSlice with slices {tuple(slice_bits)} reads {'/'.join(map(str, cum))} bits, not {missing}; "
                "widths in between come from routing tokens to different slice counts (Sec. 4.2)"
            )
        if not 0 < clip <= 1:
            raise BaselineError(f"clip factor must be in (0, 1], got {clip}")
        wmin, wmax = group_minmax(w32, g)  # [N, K/g]
        sw = SlicedWeight.from_float(w32, slice_bits, g, xmin=clip * wmin, xmax=clip * wmax)
        out = {b: sw.dequant(cum.index(b) + 1) for b in widths}
    return {b: v.to(w.dtype) for b, v in out.items()}


def baseline_weight(w: torch.Tensor, method: str, bits: int, group_size: int | None = 128, **opts) -> torch.Tensor:
    """``Ŵ`` ``[N, K]`` of ``w`` at one width; options as in :func:`baseline_weights`."""
    return baseline_weights(w, method, (bits,), group_size, **opts)[bits]


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||W - Ŵ||_F / ||W||_F`` in float64 (``W``, ``Ŵ``: same shape)."""
    w64 = w.detach().double()
    return float(torch.linalg.norm(w64 - w_hat.detach().double()) / torch.linalg.norm(w64).clamp(min=1e-300))


# --- model-level helpers ----------------------------------------------------
def _weights(source) -> dict[str, torch.Tensor]:
    """``{name: W [N, K]}`` of a model's quantizable projections, or a dict / single tensor as given."""
    if isinstance(source, torch.Tensor):
        return {"weight": source}
    if isinstance(source, dict):
        return source
    if isinstance(source, nn.Module):
        return {n: m.weight for n, m in _plain_linears(source).items()}
    raise BaselineError(f"expected a model, a dict of weights or a tensor, got {type(source).__name__}")


def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    try:
        mods = quantizable_linears(model)
    except QuantError as exc:
        raise BaselineError(str(exc)) from exc
    for name, m in mods.items():
        if isinstance(m, QuantLinear):
            # a QuantLinear would fake-quantize the swapped weight a second time
            raise BaselineError(f"{name} is already a QuantLinear; baselines need a full-precision model")
    return mods


def reconstruction_errors(
    source,
    methods: Iterable[str] = METHODS,
    bits: Iterable[int] = (2, 4, 6, 8),
    group_size: int | None = 128,
    **opts,
) -> dict[str, dict[int, dict[str, float]]]:
    """Per-layer relative error ``||W - Ŵ||_F / ||W||_F`` of each method at each width.

    Args:
        source: a HF Llama-family model (its q/k/v/o/gate/up/down weights),
            a ``{name: W}`` dict, or one ``[N, K]`` tensor.
        opts: passed to :func:`baseline_weights` (``msb_mode``, ``slice_bits``, ``clip``).
    Returns:
        ``errs[method][bits][layer]`` (floats).
    """
    weights = _weights(source)
    widths = _check_widths(bits)
    errs: dict[str, dict[int, dict[str, float]]] = {m: {b: {} for b in widths} for m in methods}
    for name, w in weights.items():
        for m in errs:
            for b, w_hat in baseline_weights(w, m, widths, group_size, name=name, **opts).items():
                errs[m][b][name] = relative_error(w, w_hat)
    return errs


def clip_tension(
    source,
    factors: Iterable[float],
    slice_bits=(2, 2, 2, 2),
    group_size: int | None = 128,
) -> torch.Tensor:
    """MoBiSlice error at every slice count when the shared base range is shrunk by each factor.

    The clip range is fixed by the 2-bit base slice and shared by every
    precision (App. B; ``docs/design.md``): clipping helps the coarse grid but
    clipped weights stay clipped at 8 bits. Errors are pooled over all weights,
    ``sqrt(Σ ||W - Ŵ||² / Σ ||W||²)``.

    Returns:
        float64 ``[len(factors), E]``: row ``i`` = factor ``i``, column ``k-1`` = ``k`` slices.
    """
    weights = _weights(source)
    cum = cumulative_bits(slice_bits)
    factors = list(factors)
    sq_err = torch.zeros(len(factors), len(cum), dtype=torch.float64)
    sq_norm = sum(float(w.detach().double().pow(2).sum()) for w in weights.values())
    for name, w in weights.items():
        for i, c in enumerate(factors):
            w_hats = baseline_weights(w, "mobislice", cum, group_size, slice_bits=slice_bits, clip=c, name=name)
            for j, b in enumerate(cum):
                sq_err[i, j] += float((w.detach().double() - w_hats[b].double()).pow(2).sum())
    return (sq_err / sq_norm).sqrt()


@contextlib.contextmanager
def swapped_weights(
    model: nn.Module, method: str, bits: int, group_size: int | None = 128, **opts
) -> Iterator[nn.Module]:
    """Inside the ``with``, every quantizable projection holds its baseline weight ``Ŵ``; restored on exit.

    The original tensors are kept (not copied) and put back even if the body
    raises, so one full-precision model serves every method and width.
    """
    mods = _plain_linears(model)
    check_group_size(model, group_size)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, m in mods.items():
                w_hat = baseline_weight(m.weight, method, bits, group_size, name=name, **opts)
                saved[name] = m.weight.data
                m.weight.data = w_hat  # swap the storage; the Parameter object stays the same
        yield model
    finally:
        for name, data in saved.items():
            mods[name].weight.data = data


def baseline_perplexities(
    model: nn.Module,
    ids: torch.Tensor,
    methods: Iterable[str] = METHODS,
    bits: Iterable[int] = (2, 4, 6, 8),
    group_size: int | None = 128,
    seqlen: int = 256,
    max_windows: int | None = None,
    **opts,
) -> dict[str, dict[int, float]]:
    """Perplexity of ``model`` with each method's weights at each width (GPTQ protocol, Sec. 5.1).

    Args:
        ids: ``[T]`` test token stream; ``seqlen``, ``max_windows``: see :func:`mbq_ref.perplexity.perplexity`.
    Returns:
        ``ppl[method][bits]``; the model is left in full precision.
    """
    widths = _check_widths(bits)
    out: dict[str, dict[int, float]] = {}
    for m in methods:
        out[m] = {}
        for b in widths:
            with swapped_weights(model, m, b, group_size, **opts):
                out[m][b] = perplexity(model, ids, seqlen, max_windows, progress=False).ppl
    return out


# --- memory accounting ------------------------------------------------------
@dataclass
class MemoryReport:
    """Bytes of one many-in-one checkpoint vs separate per-width checkpoints (Sec. 4.1 memory claim).

    Codes take ``bits`` bits per weight; each group stores an fp16 scale and an
    8-bit zero point (``scale_bytes + zero_bytes`` per group and per set).
    """

    n_weights: int
    n_groups: int
    bit_widths: tuple[int, ...]
    stored_bits: int  # bits per weight of the many-in-one code (8 for slices 2,2,2,2)
    many_in_one_bytes: int
    separate_bytes: int

    @property
    def ratio(self) -> float:
        """``separate / many-in-one`` including scales (≈ 20/8 for 2/4/6/8 bits, g = 128)."""
        return self.separate_bytes / self.many_in_one_bytes

    @property
    def weight_bits_ratio(self) -> float:
        """Code bits only: ``sum(bit_widths) / stored_bits`` (exactly 20/8 = 2.5)."""
        return sum(self.bit_widths) / self.stored_bits

    def table(self) -> str:
        """A markdown table of the two layouts."""
        n = self.n_weights
        rows = [
            "| layout | code bits / weight | scale+zero sets | bytes | bits / weight (all-in) |",
            "|---|---|---|---|---|",
            f"| one many-in-one checkpoint | {self.stored_bits} | 1 | {self.many_in_one_bytes:,} "
            f"| {8 * self.many_in_one_bytes / n:.3f} |",
            f"| separate {'/'.join(map(str, self.bit_widths))}-bit checkpoints | {sum(self.bit_widths)} "
            f"| {len(self.bit_widths)} | {self.separate_bytes:,} | {8 * self.separate_bytes / n:.3f} |",
        ]
        return "\n".join(rows)


def memory_accounting(
    source,
    bit_widths: Iterable[int] = (2, 4, 6, 8),
    group_size: int = 128,
    stored_bits: int | None = None,
    scale_bytes: int = 2,
    zero_bytes: int = 1,
) -> MemoryReport:
    """Count the bytes of the two deployment layouts.

    Per layer ``[N, K]`` with ``G = N K / g`` groups: the many-in-one checkpoint
    stores ``ceil(N K B / 8)`` code bytes (``B = stored_bits``, default the widest
    width) plus one scale/zero set; separate checkpoints store ``ceil(N K b / 8)``
    plus a set for every width ``b``. Agrees with :attr:`SlicedWeight.nbytes`.

    Args:
        source: a model, a ``{name: W}`` dict, a tensor, or an iterable of ``(N, K)`` shapes.
    """
    widths = _check_widths(bit_widths)
    stored = max(widths) if stored_bits is None else stored_bits
    if isinstance(source, (nn.Module, dict, torch.Tensor)):
        shapes = [tuple(w.shape) for w in _weights(source).values()]
    else:
        shapes = [tuple(s) for s in source]
    n_w = n_g = one = sep = 0
    for n, k in shapes:
        if group_size <= 0 or k % group_size:
            raise BaselineError(f"group size {group_size} does not divide the input dimension {k}")
        groups = n * k // group_size
        per_set = groups * (scale_bytes + zero_bytes)
        n_w, n_g = n_w + n * k, n_g + groups
        one += math.ceil(n * k * stored / 8) + per_set
        sep += sum(math.ceil(n * k * b / 8) + per_set for b in widths)
    return MemoryReport(n_w, n_g, widths, stored, one, sep)
