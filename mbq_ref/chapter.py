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
import sys
import time
from functools import partialmethod

import torch
import tqdm

__all__ = ["Laps", "chapter3_windows", "quiet", "setup_chapter", "show_markdown", "show_table"]


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


class Laps:
    """Seconds per chapter section: ``lap("name")`` charges the time since the previous lap to "name"."""

    def __init__(self) -> None:
        self.t0 = self._last = time.perf_counter()
        self.times: dict[str, float] = {}

    def __call__(self, label: str) -> None:
        now = time.perf_counter()
        self.times[label] = self.times.get(label, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        """Seconds since the chapter started."""
        return time.perf_counter() - self.t0

    def report(self) -> str:
        """``'chapter ran in N s; section seconds: {...}'``."""
        return f"chapter ran in {self.total():.0f} s; section seconds: {({k: round(v) for k, v in self.times.items()})}"


def chapter3_windows(tokenizer, calib, test_chars: int = 60_000, train_chars: int = 400_000):
    """The token windows chapters 3a, 3b and 4 share, so their calibrations are the same cache entries.

    Args:
        tokenizer: the model's tokenizer.
        calib: a :class:`mbq_ref.calibrate.CalibConfig` (its ``dataset``, ``nsamples``, ``seqlen``, ``seed``).
        test_chars, train_chars: characters read from the start of the test / train split
            (about 100k train tokens are plenty to draw 32 windows from).

    Returns:
        ``(calib_ids [nsamples, seqlen], test_ids [n])``: calibration windows drawn from
        ``<dataset>/train`` (GPTQ sampler, :func:`mbq_ref.data.calibration_windows`) and the
        token ids of the start of ``<dataset>/test``.
    """
    from .data import calibration_windows, load_corpus, tokenize_corpus

    train_ids = tokenize_corpus(tokenizer, load_corpus(calib.dataset, "train")[:train_chars])
    test_ids = tokenize_corpus(tokenizer, load_corpus(calib.dataset, "test")[:test_chars])
    return calibration_windows(train_ids, calib.nsamples, calib.seqlen, seed=calib.seed), test_ids


def show_table(header: list[str], rows: list[list], caption: str | None = None) -> str:
    """Show a table: rendered markdown in a notebook, pipe text otherwise; returns the markdown.

    Args:
        header: column names.
        rows: one list of cells per row (already formatted, or anything ``str()`` renders).
        caption: a line shown above the table (e.g. the evaluation setting), in italics.
    """
    from .results import markdown_table

    text = markdown_table(header, rows)
    if caption:
        text = f"*{caption}*\n\n{text}"
    return show_markdown(text)


def show_markdown(text: str) -> str:
    """Rendered markdown in a notebook (``IPython.display.Markdown``), the text itself otherwise; returns it."""
    if "ipykernel" in sys.modules:
        from IPython.display import Markdown, display

        display(Markdown(text))
    else:
        print(text)
    return text
