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
