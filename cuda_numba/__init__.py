"""Numba CUDA kernels for MoBiQuant inference (paper Sec. 4.3), written to be read.

Every module follows the same order (llm.c ``dev/cuda`` style): a docstring listing the
numbered kernel versions, a NumPy/torch reference, the kernels ``*_kernel1..N``, their
launchers ``*_v1..N`` and one dispatcher taking ``version=``.

* ``packing``       -- MoBiSlice codes ``uint8 [N, K]`` -> bit-planes ``uint32 [8, N, ceil(K/32)]``
* ``binary_matmul`` -- integer activations x bit-plane weights by AND + popcount
* ``dequant``       -- ``W_k`` from planes: the torch reference and the device helpers every slice kernel shares
* ``slice_gemv``    -- decode GEMV ladder, fp16/fp32 activations x the first ``k`` slices (v1-v6; v4+ look-up tables)
* ``slice_gemm``    -- prefill GEMM ladder (v1 naive, v2 shared-memory tiles, v3 register tiles)
* ``slice_linear``  -- per-token routed precision: sort by ``k_t``, grouped / streams / fused; ``CASES``
* ``bench``         -- ``python -m cuda_numba.bench`` (real GPU), ``--sim`` for a simulator demo
* ``bench_env``     -- commit, versions, device and the simulator switch, recorded by ``bench`` and by
  ``mbq_ref.e2e`` (the end-to-end decode benchmark lives in ``mbq_ref``: it runs the model)

Each kernel module exposes ``LAUNCHERS`` (version -> launcher) and, where the benchmark times
it, ``CASES`` (benchmark name -> what to run); launch geometry is the same on a GPU and in the
simulator (block sizes are parameters, clamped to the problem).

Without a GPU the kernels run in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set by
the repository's ``conftest.py``); it must be set before ``numba.cuda`` is first imported.
``mbq_ref`` never imports this package at import time, and this package never imports ``mbq_ref``.
"""

__all__ = [
    "bench",
    "bench_env",
    "binary_matmul",
    "dequant",
    "packing",
    "real_gpu_available",
    "slice_gemm",
    "slice_gemv",
    "slice_linear",
]


def real_gpu_available() -> bool:
    """True when Numba sees a real CUDA GPU (not the simulator). Imports ``numba.cuda`` only when called."""
    from ._common import real_gpu_available as _available

    return _available()
