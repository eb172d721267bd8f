"""Test-wide environment, set before anything imports numba or the HF hub client.

* Kernels run in Numba's CUDA simulator unless MBQ_REAL_GPU=1.
* Nothing may reach a model or dataset hub.
* A short GIL switch interval makes the simulator's per-thread Python
  threads hand over faster (syncthreads-heavy kernels run ~3x faster).
"""

import os
import sys

if os.environ.get("MBQ_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# the same floats on every x86-64 CPU with AVX2 (MKL and ATen kernels pinned; the committed
# results files are computed this way and checked strictly, mbq_ref.results.NUMERICS)
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
sys.setswitchinterval(5e-4)

# notebooks/*.py are jupytext sources; nbval runs their .ipynb twins.
collect_ignore_glob = ["notebooks/*.py", "data/*.py", "benchmarks/*"]
