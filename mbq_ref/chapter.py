"""What every chapter does first: a thread count and a seed that make its numbers reproducible,
and quiet output (no progress bars or library warnings between a chapter's results).

The chapters (``notebooks/``) multiply small matrices (256 to 768 wide for the bundled
model). On a 2-core machine shared with other processes, two intra-op threads were measured
2x (and under load many times) slower than one, and the thread count also changes the order
of floating-point sums, hence the calibrated models: the committed results
(``docs/results_chN.md``) were written with one thread. ``OMP_NUM_THREADS`` overrides it.

Quiet mode (:func:`quiet`): a chapter's committed outputs are read in a browser, so the
progress bars of transformers ("Loading weights") and huggingface_hub, and this package's
own tqdm bars, are switched off; a call that passes ``progress=True`` still shows its bar.
The tqdm warning about missing ipywidgets is filtered in ``mbq_ref/__init__.py``, because it
is raised when transformers is first imported, before any chapter code runs.
"""

from __future__ import annotations

import os
from functools import partialmethod

import torch
import tqdm

__all__ = ["quiet", "setup_chapter"]


def quiet() -> None:
    """Switch off progress bars (transformers, huggingface_hub, tqdm defaults) and transformers' info logs."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    # tqdm reads TQDM_DISABLE only when it is imported (torch imports it first), so change the
    # default instead; an explicit `disable=` (the package's `progress=` arguments) still wins
    if not getattr(tqdm.std.tqdm.__init__, "_mbq_quiet", False):
        init = partialmethod(tqdm.std.tqdm.__init__, disable=True)
        init._mbq_quiet = True
        tqdm.std.tqdm.__init__ = init


def setup_chapter(seed: int = 0, quiet_output: bool = True) -> int:
    """One torch intra-op thread unless ``OMP_NUM_THREADS`` is set, ``torch.manual_seed(seed)``, and
    :func:`quiet` unless ``quiet_output=False``; returns the thread count."""
    if quiet_output:
        quiet()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    return torch.get_num_threads()
