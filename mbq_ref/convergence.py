"""When has a calibration converged? NLL against the calibration budget (App. C.1 budget vs ours).

The paper calibrates each block for 20 epochs over 128 windows at batch 1 (2,560 optimizer
steps per block); the CPU presets run a few dozen. A comparison of methods is only fair
when each has converged, or when both get the same budget. :func:`converged` applies the
rule used by ``scripts/convergence.py``: a budget is converged when doubling it, and every
larger measured budget, changes the NLL (nats per token) by less than :data:`TOL` at every
measured setting.
"""

from __future__ import annotations

__all__ = ["TOL", "converged", "doubling_changes"]

#: A budget is converged when doubling it moves every NLL by less than this (nats per token).
TOL = 0.01


def doubling_changes(curve: dict[int, float]) -> dict[int, float]:
    """``{budget b: NLL(2b) - NLL(b)}`` for every ``b`` whose double was measured too.

    Args:
        curve: ``{budget (epochs or windows): NLL}`` of one method at one setting.
    """
    return {b: curve[2 * b] - curve[b] for b in sorted(curve) if 2 * b in curve}


def converged(curves: dict[str, dict[int, float]], tol: float = TOL) -> int | None:
    """The smallest budget from which every measured doubling changes every curve by less than ``tol``.

    A flat step followed by a steep one is not convergence: budget ``b`` qualifies only if the
    doublings at ``b`` and at every larger measured budget are all below ``tol``.

    Args:
        curves: ``{label: {budget: NLL}}``, e.g. ``{"mobiquant@3": {1: 4.41, 2: 4.37, 4: 4.36}}``.
    Returns:
        that budget, or ``None`` if no measured budget qualifies (not converged yet).
    """
    common = sorted(set.intersection(*(set(doubling_changes(c)) for c in curves.values()))) if curves else []
    flat = [all(abs(doubling_changes(c)[b]) < tol for c in curves.values()) for b in common]
    for i, b in enumerate(common):
        if all(flat[i:]):
            return b
    return None
