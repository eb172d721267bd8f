"""Fallback for GPU images with numpy >= 2.5 and no numpy<2.5 wheel carried (used by gpu_check.sh only).

numba-cuda 0.30.4 registers ``overload(np.row_stack)`` when it loads, and numpy 2.5 removed that
alias of ``np.vstack``, so the first kernel compile fails (``numpy has no attribute
'row_stack'``). Restoring the alias before numba-cuda loads lets it start. The project pins
numpy<2.5 instead (pyproject.toml); this file is put on PYTHONPATH only when that pin cannot
be met on the GPU machine, and gpu_check.sh says so in its log.
"""

import numpy

if not hasattr(numpy, "row_stack"):
    numpy.row_stack = numpy.vstack
