"""mbq_ref: a reference implementation of MoBiQuant (arXiv 2602.20191)."""

__version__ = "0.1.0"
