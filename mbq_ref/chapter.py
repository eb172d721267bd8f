"""What every chapter does first: a thread count and a seed that make its numbers reproducible.

The chapters (``notebooks/``) multiply small matrices (256 to 768 wide for the bundled
model). On a 2-core machine shared with other processes, two intra-op threads were measured
2x (and under load many times) slower than one, and the thread count also changes the order
of floating-point sums, hence the calibrated models: the committed results
(``docs/results_chN.md``) were written with one thread. ``OMP_NUM_THREADS`` overrides it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["setup_chapter"]


def setup_chapter(seed: int = 0) -> int:
    """One torch intra-op thread unless ``OMP_NUM_THREADS`` is set, and ``torch.manual_seed(seed)``; returns the thread count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    return torch.get_num_threads()
