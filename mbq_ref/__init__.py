"""mbq_ref: a reference implementation of MoBiQuant (arXiv 2602.20191)."""

import sys
import warnings

__version__ = "0.1.0"

if "ipykernel" in sys.modules:
    # In a notebook without ipywidgets, the first import of tqdm.auto (by transformers) warns
    # that it falls back to text bars; the chapters switch bars off (mbq_ref.chapter.quiet).
    warnings.filterwarnings("ignore", message="IProgress not found")
