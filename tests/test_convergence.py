"""The convergence rule of scripts/convergence.py (mbq_ref.convergence)."""

import pytest

from mbq_ref.convergence import TOL, converged, doubling_changes


def test_doubling_changes_pairs_each_budget_with_its_double():
    assert doubling_changes({1: 4.5, 2: 4.4, 4: 4.395, 3: 9.0}) == pytest.approx({1: -0.1, 2: -0.005})


def test_converged_needs_every_curve_flat():
    flat_late = {1: 4.5, 2: 4.4, 4: 4.395, 8: 4.39}
    assert converged({"a": flat_late}) == 2
    still_moving = {1: 4.5, 2: 4.45, 4: 4.43, 8: 4.41}
    assert converged({"a": flat_late, "b": still_moving}) is None
    assert converged({"a": {1: 0.0, 2: TOL}}) is None  # exactly TOL is not "less than"
    assert converged({}) is None
    # flat first, steep later (measured: 1 -> 2 epochs moved < 0.01, 2 -> 4 by 0.026): not converged
    assert converged({"a": {1: 4.3611, 2: 4.3559, 4: 4.3301}}) is None
