"""The threshold controller's table (mbq_ref.thresholds.ThresholdTable): rows at measured bits, blending, reach.

The controller itself (threshold_table, calibrate_threshold) runs a calibrated model and is
tested with one in tests/test_mobiquant.py and tests/test_tour.py.
"""

import pytest
import torch

from mbq_ref.checkpoint import CheckpointError
from mbq_ref.thresholds import ThresholdTable


def test_threshold_table_refuses_what_it_cannot_reach():
    """A row that measured 2.75 bits for a 2.5 target: asking for 2.5 is an error, not 2.75 bits in silence."""
    table = ThresholdTable(
        torch.tensor([2.5, 3.0, 7.5], dtype=torch.float64),
        torch.tensor([[3.0, 3.0], [2.0, 2.0], [-3.0, -3.0]], dtype=torch.float64),
        ["a", "b"],
        [2.75, 3.0, 7.41],
    )
    with pytest.raises(CheckpointError, match="reaches 2.750..7.410 measured bits, not 2.5"):
        table.logits_for(2.5)
    with pytest.raises(CheckpointError, match="not 7.6"):
        table.logits_for(7.6)
    assert table.logits_for(2.8) == pytest.approx({"a": 3.0 - 0.2, "b": 3.0 - 0.2})  # blend by measured bits
    assert table.logits_for(7.5) == {"a": -3.0, "b": -3.0}  # 0.09 from its measurement: within reach


def test_infinite_end_blends_with_its_finite_neighbour():
    """Between a finite row and an all-slices row (-inf), a layer's logit takes the finite value, never NaN."""
    table = ThresholdTable(
        torch.tensor([6.0, 8.0], dtype=torch.float64),
        torch.tensor([[1.0, -2.0], [-torch.inf, -torch.inf]], dtype=torch.float64),
        ["a", "b"],
        [6.0, 8.0],
    )
    assert table.logits_for(7.0) == {"a": 1.0, "b": -2.0}
    assert table.logits_for(8.0) == {"a": -float("inf"), "b": -float("inf")}  # an exact row is served as stored
