"""Fixtures for the Numba CUDA kernel tests (``cuda_numba``).

The repository's root ``conftest.py`` turns the CUDA simulator on unless ``MBQ_REAL_GPU=1``.
Tests marked ``@pytest.mark.gpu`` run only on a real GPU (``MBQ_REAL_GPU=1 pytest -m gpu
tests/cuda``) and are skipped otherwise.

Inputs are fresh random draws: the seed is new each session (printed in the header) and can
be pinned with ``MBQ_TEST_SEED=<int>`` to replay a failure.
"""

import os
import secrets

import numpy as np
import pytest
from kernel_helpers import real_gpu

SEED = int(os.environ.get("MBQ_TEST_SEED", secrets.randbits(32)))


def pytest_report_header(config):
    return f"cuda_numba tests: MBQ_TEST_SEED={SEED} (simulator={os.environ.get('NUMBA_ENABLE_CUDASIM', '0')})"


@pytest.fixture(autouse=True)
def _skip_gpu_only(request):
    if request.node.get_closest_marker("gpu") and not real_gpu():
        pytest.skip("needs a real CUDA GPU (run with MBQ_REAL_GPU=1 on a GPU machine)")


@pytest.fixture
def rng(request):
    """A generator seeded from the session seed and the test id (different inputs per test)."""
    salt = int.from_bytes(request.node.nodeid.encode()[-16:].rjust(16, b"\0"), "little") % (2**32)
    return np.random.default_rng([SEED, salt])
