"""Prefill GEMM ladder (cuda_numba/slice_gemm.py): every version vs the torch reference, fresh odd shapes."""

import numpy as np
import pytest
from kernel_helpers import assert_close, check_uniform_version, poisoned, setup_layer

from cuda_numba import slice_gemm as sm

SB = (2, 2, 2, 2)
IDS = {1: "v1_naive", 2: "v2_smem_tiles", 3: "v3_register_tiles"}


def test_every_version_has_an_id():
    assert set(sm.VERSIONS) == set(IDS)


@pytest.mark.parametrize("version", sm.VERSIONS, ids=IDS.get)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_gemm_versions(rng, version, dtype):
    check_uniform_version(rng, sm.slice_gemm, sm.slice_gemm_ref, version, dtype, max_tokens=19, slice_bits=SB)


def test_more_tokens_than_one_tile(rng):
    """v2 with 17 tokens: two tiles along the tokens."""
    x, codes, scale, zero, w = setup_layer(rng, 17, 9, 64, dtype=np.float32)
    y = sm.slice_gemm(x, w, 2, version=2, out=poisoned((17, 9), np.float32))
    assert_close(y, sm.slice_gemm_ref(x, codes, scale, zero, SB, 2, 32).numpy(), np.float32)


def test_naive_block_is_a_parameter(rng):
    x, codes, scale, zero, w = setup_layer(rng, 3, 11, 50, g=50, dtype=np.float32)
    y = sm.slice_gemm(x, w, 4, version=1, block=(4, 2), out=poisoned((3, 11), np.float32))
    assert_close(y, sm.slice_gemm_ref(x, codes, scale, zero, SB, 4, 50).numpy(), np.float32)


def test_errors(rng):
    x, *_, w = setup_layer(rng, 2, 5, 64, dtype=np.float32)
    with pytest.raises(ValueError):
        sm.slice_gemm(x, w, 5)
    with pytest.raises(ValueError):
        sm.slice_gemm(x[:, :32], w, 1)
    with pytest.raises(ValueError):
        sm.slice_gemm(x, w, 1, version=4)
    with pytest.raises(ValueError):
        sm.slice_gemm(x, w, 1, out=np.zeros((2, 5), np.float16))
