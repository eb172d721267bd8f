"""Shared fixtures: the bundled model/tokenizer (loaded once) and tiny random Llama-family configs."""

import pytest
import torch


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
