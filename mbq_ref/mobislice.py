"""MoBiSlice: one checkpoint, recursive residual slices (paper Sec. 4.1, App. B).

A weight group (``group_size`` inputs of one output row) is quantized into ``E``
slices of ``b_e`` bits (default ``2,2,2,2``). Reading the first ``k`` slices
gives a ``B_k = b_1 + ... + b_k``-bit weight (2/4/6/8 bits), so one stored model
serves every precision. The formulation (see ``docs/design.md``):

One scale ``s`` (the base slice's step) and one integer zero point ``z_E`` per
group, the latter on the *finest* (``B_E``-bit) grid. Reading ``k`` slices uses::

    s_k = s / 2^{B_k - B_1}          z_k = z_E / 2^{B_E - B_k}     (z_1 may be fractional)

Base slice, floor-aligned and mid-rise ("truncation-ready", App. B)::

    q_1 = clamp(floor(W / s + z_1), 0, 2^b1 - 1)          Ŵ_1 = s (q_1 - z_1 + 1/2)

Residual slice ``e > 1`` with a fixed mid-code zero point and the step divided
by ``2^{b_e}`` (the paper's "next scale = previous / 2^b")::

    s_e = s_{e-1} / 2^{b_e}
    q_e = clamp(floor((W - Ŵ_{e-1}) / s_e) + 2^{b_e - 1}, 0, 2^{b_e} - 1)
    ΔŴ_e = s_e (q_e - 2^{b_e - 1} + 1/2)                Ŵ_e = Ŵ_{e-1} + ΔŴ_e

Concatenating the codes, ``Q_k = Q_{k-1} << b_k | q_k``, gives exactly::

    Ŵ_k = s_k (Q_k - z_k + 1/2),     Q_{k-1} = Q_k >> b_k

so a lower precision is the top bits of a higher one (nested codes), and
dequantization is shift-and-add on the integer code followed by one multiply
with the single shared scale (Sec. 4.3). Because ``z_E`` is an integer, the
recursion is the same as one floor on the finest grid,
``Q_E = floor(W / s_E + z_E)`` while nothing clamps, and the kernels in
``cuda_numba`` read the stored ``Q_E`` bit-planes directly.

Choosing ``s`` and ``z_E`` for a group range ``[xmin, xmax]`` (:func:`floor_scale_zero`):

* ``zero_grid="finest"`` (default)::

      s_E = (xmax - xmin) / (2^B_E - 1)      z_E = ceil(-xmin / s_E)      s = s_E 2^{B_E - B_1}

  Then ``0 <= W / s_E + z_E < 2^B_E`` for every ``W`` in ``[xmin, xmax]``
  (``xmin / s_E + z_E`` is in ``[0, 1)`` and the top end is below
  ``2^B_E - 1 + 1``): no weight in the range is clipped at any precision, and
  ``|W - Ŵ_k| <= s_k / 2`` for every ``k``.
* ``zero_grid="base"`` (the earlier rule, kept for comparison)::

      s = (xmax - xmin) / 2^b1      z_1 = round(-xmin / s)      z_E = z_1 2^{B_E - B_1}

  Rounding ``z_1`` on the coarse base grid shifts the covered range
  ``[-z_1 s, (2^b1 - z_1) s)`` by up to ``s/2``, so weights near one end of the
  group fall outside it and stay clipped at every precision (the residual codes
  saturate): at 8 bits their error is up to ``s/2`` instead of ``s_E/2``.

Example, one weight, slices 2,2, s = 1, z_E = 8 (z_1 = 2), W = 0.8::

    q_1 = floor(0.8 + 2) = 2              Ŵ_1 = 1 (2 - 2 + .5)     = 0.5
    q_2 = floor(0.3 / .25) + 2 = 3        Ŵ_2 = .5 + .25 (3-2+.5)  = 0.875
    Q_2 = 2 << 2 | 3 = 0b1011 = 11        Ŵ_2 = .25 (11 - 8 + .5)  = 0.875  (same)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .errors import MBQError
from .quantizer import GridSTE, group_view, round_ste

__all__ = [
    "SliceError",
    "check_slice_bits",
    "cumulative_bits",
    "ZERO_GRIDS",
    "floor_scale_zero",
    "zero_at",
    "slice_deltas",
    "slice_codes",
    "nested_code",
    "dequant_codes",
    "SlicedWeight",
]


class SliceError(MBQError):
    """Invalid slice configuration or tensor (message says why and how to fix it)."""


def check_slice_bits(slice_bits) -> tuple[int, ...]:
    """Validate a slice list: each slice a whole number of 1..8 bits, at most 16 bits in total."""
    import numbers

    try:
        raw = tuple(slice_bits)
    except TypeError:
        raise SliceError(f"slice_bits must be a sequence of integers such as (2, 2, 2, 2), got {slice_bits!r}") from None
    # 2.0 is accepted as 2; 2.7, True or "2" are refused rather than silently truncated
    if not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and float(b).is_integer() for b in raw):
        raise SliceError(f"each slice needs a whole number of bits, got {raw}")
    bits = tuple(int(b) for b in raw)
    if not bits:
        raise SliceError("slice_bits is empty; use e.g. (2, 2, 2, 2)")
    if any(b < 1 or b > 8 for b in bits):
        raise SliceError(f"each slice needs 1..8 bits, got {bits}")
    if sum(bits) > 16:
        raise SliceError(f"slices total {sum(bits)} bits; at most 16 are supported (codes are stored as int16/uint8)")
    return bits


def cumulative_bits(slice_bits) -> list[int]:
    """``[B_1, ..., B_E]``: the weight precision when reading 1..E slices."""
    out, acc = [], 0
    for b in check_slice_bits(slice_bits):
        acc += b
        out.append(acc)
    return out


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, K/g, g]`` view (checks divisibility)."""
    if w.ndim != 2:
        raise SliceError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise SliceError(f"group size {group_size} does not divide the input dimension {k}")
    return group_view(w, group_size)


ZERO_GRIDS = ("finest", "base")


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x) - x).detach()


def _ceil_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.ceil(x) - x).detach()


def zero_at(zero: torch.Tensor, slice_bits, k: int) -> torch.Tensor:
    """``z_k = z_E / 2^{B_E - B_k}``: the zero point of a ``k``-slice reading (exact: a power-of-two division)."""
    cum = cumulative_bits(slice_bits)
    return zero / 2 ** (cum[-1] - cum[k - 1])


def floor_scale_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, slice_bits=(2, 2, 2, 2), zero_grid: str = "finest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base scale ``s`` and finest-grid integer zero point ``z_E`` for group ranges ``[xmin, xmax]``.

    ``zero_grid="finest"`` (default): ``s_E = (xmax - xmin) / (2^B_E - 1)``,
    ``z_E = ceil(-xmin / s_E)``, ``s = s_E 2^{B_E - B_1}``; every ``W`` in
    ``[xmin, xmax]`` has ``0 <= W / s_E + z_E < 2^B_E``, so no weight in the range
    is clipped at any precision (module docstring).

    ``zero_grid="base"``: the earlier rule, ``s = (xmax - xmin) / 2^{b_1}``,
    ``z_1 = round(-xmin / s)`` on the base grid, returned as ``z_E = z_1 2^{B_E - B_1}``
    (it clips up to ``s/2`` at one end of the range, at every precision).

    Both are differentiable in ``xmin``/``xmax`` (the zero point through a
    straight-through ceil/round), so learnable clipping (LWC) trains either.

    Args:
        xmin, xmax: ``[N, G]`` group ranges (``xmin <= 0 <= xmax`` not required).
        slice_bits: the slice widths ``(b_1, ..., b_E)``.
        zero_grid: ``"finest"`` or ``"base"``.
    Returns:
        ``(s, z_E)``, both ``[N, G]``; ``z_E`` holds integer values (float dtype).
    """
    cum = cumulative_bits(slice_bits)
    shift = cum[-1] - cum[0]  # B_E - B_1
    if zero_grid == "finest":
        s_fine = ((xmax - xmin) / (2 ** cum[-1] - 1)).clamp(min=1e-8 / 2**shift)
        z = _ceil_ste(-xmin / s_fine)
        return s_fine * 2**shift, z
    if zero_grid == "base":
        s = ((xmax - xmin) / (2 ** cum[0])).clamp(min=1e-8)
        return s, round_ste(-xmin / s) * 2**shift
    raise SliceError(f"unknown zero_grid {zero_grid!r}; use one of {ZERO_GRIDS}")


def _residual_slices(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: tuple[int, ...], floor):
    """The recursion of App. B, one slice at a time: yields ``(q_e, ΔŴ_e)`` for ``e = 1..E`` (``ΔŴ_1 = Ŵ_1``).

    Base slice ``q_1 = clamp(floor(W/s + z_1), 0, 2^{b_1} - 1)``, ``Ŵ_1 = s (q_1 - z_1 + 1/2)``;
    residual ``e``: ``s_e = s_{e-1} / 2^{b_e}``, ``q_e = clamp(floor((W - Ŵ_{e-1}) / s_e) + 2^{b_e-1}, 0, 2^{b_e} - 1)``,
    ``ΔŴ_e = s_e (q_e - 2^{b_e-1} + 1/2)``. The one implementation behind :func:`slice_deltas`
    (``floor`` may be straight-through) and :func:`slice_codes` (float64, exact).

    Args:
        wg: ``[N, G, g]`` grouped weight; scale, zero: ``[N, G]`` base scale ``s`` and finest-grid ``z_E``.
        floor: ``torch.floor`` or its straight-through version.
    """
    s = scale.unsqueeze(-1)
    z1 = zero_at(zero, bits, 1).unsqueeze(-1)  # base zero z_1 = z_E / 2^{B_E - B_1}, may be fractional
    q = torch.clamp(floor(wg / s + z1), 0, 2 ** bits[0] - 1)  # base code q_1
    w_hat = s * (q - z1 + 0.5)  # Ŵ_1
    yield q, w_hat
    s_e = s
    for b in bits[1:]:
        s_e = s_e / 2**b  # next slice's scale = previous / 2^b (App. B)
        mid = 2 ** (b - 1)  # fixed mid-code zero point of residual slices
        q_e = torch.clamp(floor((wg - w_hat) / s_e) + mid, 0, 2**b - 1)
        delta = s_e * (q_e - mid + 0.5)
        w_hat = w_hat + delta
        yield q_e, delta


def slice_deltas(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits=(2, 2, 2, 2),
    group_size: int = 128,
    ste: bool = False,
    num_slices: int | None = None,
) -> list[torch.Tensor]:
    """The recursive residual decomposition ``[Ŵ_1, ΔŴ_2, ..., ΔŴ_E]``.

    ``sum(out[:k]) == Ŵ_k``. With ``ste=True`` floors pass gradients straight
    through, so the learnable scale/zero (LWC) can be calibrated through every
    slice (Alg. 1, stage 2); the forward runs the recursion without a graph
    (the same float32 operations: bit-identical values, since ``x + (floor(x) - x)``
    is exactly ``floor(x)``) and :class:`mbq_ref.quantizer.GridSTE` computes the
    straight-through gradient in closed form (equal to autograd through the
    recursion with straight-through floors, within float32 summation order).

    Args:
        w: ``[N, K]`` float weight.
        scale, zero: ``[N, K/g]`` base scale ``s`` and finest-grid integer zero point ``z_E``.
        num_slices: compute only the first ``k`` slices (default: all ``E``); a
            calibration step that reads the base slice alone needs one.
    Returns:
        ``k`` tensors of shape ``[N, K]``.
    """
    bits = check_slice_bits(slice_bits)
    k = len(bits) if num_slices is None else num_slices
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(bits):
        raise SliceError(f"num_slices must be an int in 1..{len(bits)}, got {num_slices!r}")
    if ste:
        if w.ndim != 2:
            raise SliceError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
        _groups(w, group_size)  # checks the group size before the autograd function runs

        def grid(wg, s, z):  # the recursion without a graph; its base floor gives the clamp mask
            first = []

            def floor(x):
                y = torch.floor(x)
                if not first:
                    first.append(y)
                return y

            outs = [d for _, d in itertools.islice(_residual_slices(wg, s[..., 0], z[..., 0], bits, floor), k)]
            # no residual code clamps where the base code does not (|W - Ŵ_1| <= s/2)
            return outs, (first[0] >= 0) & (first[0] <= 2 ** bits[0] - 1)

        cum = cumulative_bits(bits)
        # ∂Ŵ_j/∂z_E = -s_j / 2^{B_E - B_j} = -s / 2^{B_E - B_1} for every j where the codes clamp
        return list(GridSTE.apply(w, scale, zero, grid, 2.0 ** -(cum[-1] - cum[0]), group_size))
    wg = _groups(w, group_size)  # [N, G, g]
    slices = itertools.islice(_residual_slices(wg, scale, zero, bits, torch.floor), k)
    return [delta.reshape_as(w) for _, delta in slices]


@torch.no_grad()
def slice_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, slice_bits=(2, 2, 2, 2), group_size: int = 128
) -> torch.Tensor:
    """The stored integer code ``Q_E`` per weight (all slices concatenated, MSB first).

    Args:
        w: ``[N, K]`` float weight.
        scale, zero: ``[N, K/g]`` base scale ``s`` and finest-grid integer zero point ``z_E``.
    Returns:
        ``[N, K]`` ``torch.uint8`` when ``B_E <= 8`` else ``torch.int32``.
        Bits ``[B_E - B_k, B_E)`` hold slices ``1..k`` (see :func:`nested_code`).
    """
    bits = check_slice_bits(slice_bits)
    if not torch.isfinite(w).all():
        raise SliceError("weight contains NaN/inf; cannot slice it")
    wg = _groups(w, group_size).double()  # float64: exact floors for the integer codes
    code = torch.zeros_like(wg)
    for b, (q_e, _) in zip(bits, _residual_slices(wg, scale.double(), zero.double(), bits, torch.floor)):
        code = code * 2**b + q_e  # Q_k = Q_{k-1} << b_k | q_k
    total = sum(bits)
    dtype = torch.uint8 if total <= 8 else torch.int32
    return code.reshape_as(w).to(dtype)


def nested_code(codes: torch.Tensor, slice_bits, k: int) -> torch.Tensor:
    """``Q_k = Q_E >> (B_E - B_k)``: the code of the first ``k`` slices (truncation, no re-rounding)."""
    cum = cumulative_bits(slice_bits)
    if not 1 <= k <= len(cum):
        raise SliceError(f"k={k} slices requested, but there are {len(cum)} (1..{len(cum)})")
    return codes.to(torch.int32) >> (cum[-1] - cum[k - 1])


def dequant_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits=(2, 2, 2, 2),
    k: int | None = None,
    group_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Shift-and-add dequantization at ``k`` slices: ``Ŵ_k = s_k (Q_k - z_k + 1/2)``.

    Args:
        codes: ``[N, K]`` stored ``Q_E`` (from :func:`slice_codes`).
        scale, zero: ``[N, K/g]`` base scale ``s`` and finest-grid integer zero point ``z_E``.
        k: slices to read (default: all).
    Returns:
        ``[N, K]`` weight in ``dtype``.
    """
    cum = cumulative_bits(slice_bits)
    k = len(cum) if k is None else k
    qk = nested_code(codes, slice_bits, k)
    shift = cum[k - 1] - cum[0]
    cg = _groups(qk, group_size).double()
    s_k = scale.double().unsqueeze(-1) / 2**shift
    z_k = zero_at(zero.double(), slice_bits, k).unsqueeze(-1)
    return (s_k * (cg - z_k + 0.5)).reshape(codes.shape).to(dtype)


@dataclass
class SlicedWeight:
    """A MoBiSlice-quantized weight: one code per weight, one scale/zero per group.

    ``nbytes`` counts what a deployment stores: ``B_E`` bits per weight for the
    codes plus an fp16 scale and an 8-bit zero point per group (one set, shared
    by every precision; separate per-bit checkpoints would each need their own).
    """

    codes: torch.Tensor  # [N, K] uint8 / int32
    scale: torch.Tensor  # [N, K/g] float, base scale s
    zero: torch.Tensor  # [N, K/g] integer-valued z_E, on the finest (B_E-bit) grid
    slice_bits: tuple[int, ...] = (2, 2, 2, 2)
    group_size: int = 128

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        slice_bits=(2, 2, 2, 2),
        group_size: int = 128,
        xmin: torch.Tensor | None = None,
        xmax: torch.Tensor | None = None,
        zero_grid: str = "finest",
    ) -> "SlicedWeight":
        """Slice ``w`` with the range ``[xmin, xmax]`` per group (default: the group's min/max, i.e. RTN-style).

        ``zero_grid`` picks the scale/zero rule of :func:`floor_scale_zero`.
        """
        bits = check_slice_bits(slice_bits)
        if isinstance(group_size, bool) or not hasattr(group_size, "__index__") or int(group_size) < 1:
            raise SliceError(f"group_size must be a positive integer such as 128, got {group_size!r}")
        wg = _groups(w.detach(), int(group_size))
        if xmin is None:
            xmin = wg.amin(-1)
        if xmax is None:
            xmax = wg.amax(-1)
        if not bool(torch.isfinite(wg).all()):  # named as such, before any range arithmetic hides it
            raise SliceError("weight contains NaN/inf; check the model's weights before slicing")
        s, z = floor_scale_zero(xmin.detach(), xmax.detach(), bits, zero_grid)
        if not bool(torch.isfinite(z).all()):  # e.g. a constant 1e30 group: range ~0, zero point -1e30/s overflows
            raise SliceError(f"a group's zero point overflows float32 (|w| up to {float(w.abs().max()):.3g} in a group of near-zero range); such a weight cannot be sliced")
        return cls(slice_codes(w, s, z, bits, int(group_size)), s.detach().clone(), z.detach().clone(), bits, int(group_size))

    @property
    def num_slices(self) -> int:
        return len(self.slice_bits)

    def dequant(self, k: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant_codes(self.codes, self.scale, self.zero, self.slice_bits, k, self.group_size, dtype)

    @property
    def nbytes(self) -> int:
        n, kdim = self.codes.shape
        groups = n * kdim // self.group_size
        return (n * kdim * sum(self.slice_bits) + 7) // 8 + groups * (2 + 1)
