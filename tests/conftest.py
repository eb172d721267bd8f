"""Shared fixtures: the bundled model/tokenizer (loaded once) and tiny random Llama-family configs.

Property tests (hypothesis) are deterministic by default: the "ci" profile derandomizes them (the
examples depend only on the test's name) and keeps no example database, so a run is reproducible.
``MBQ_HYPOTHESIS=random`` draws fresh random examples instead, and ``MBQ_HYPOTHESIS_EXAMPLES=N``
runs N examples per property test, overriding the counts in the tests' ``@settings``::

    MBQ_HYPOTHESIS=random MBQ_HYPOTHESIS_EXAMPLES=1000 pytest -m "not slow" tests/
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("random", derandomize=False, database=None, deadline=None, print_blob=True)
_PROFILE = os.environ.get("MBQ_HYPOTHESIS", "ci")
if _PROFILE not in ("ci", "random"):
    raise pytest.UsageError(f"MBQ_HYPOTHESIS must be 'ci' (derandomized, the default) or 'random', got {_PROFILE!r}")
settings.load_profile(_PROFILE)


def pytest_collection_modifyitems(config, items):
    """``MBQ_HYPOTHESIS_EXAMPLES=N``: every property test runs N examples (its own ``@settings`` otherwise)."""
    n = os.environ.get("MBQ_HYPOTHESIS_EXAMPLES")
    if not n:
        return
    if not n.isdigit() or int(n) < 1:
        raise pytest.UsageError(f"MBQ_HYPOTHESIS_EXAMPLES must be a positive integer, got {n!r}")
    for item in items:
        fn = getattr(item, "obj", None)
        inner = getattr(getattr(fn, "hypothesis", None), "inner_test", None)
        if inner is None:
            continue
        # hypothesis keeps a test's @settings on the wrapper it returns; derive new ones from them
        old = getattr(fn, "_hypothesis_internal_use_settings", settings.default)
        fn._hypothesis_internal_use_settings = settings(old, max_examples=int(n))


@pytest.fixture(scope="session")
def tiny_llama():
    from mbq_ref.zoo import load_model

    return load_model("tiny-llama", with_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from mbq_ref.zoo import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of small tensors: two threads on a shared 2-core
    machine can be 10-40x slower (measured), and one is about as fast on an idle one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
