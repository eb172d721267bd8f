"""mbq_ref/e2e.py: argument checks and, in the simulator, one decode step of a tiny packed model."""

import pytest
from cuda_numba import real_gpu_available as real_gpu
from mbq_ref import e2e


def test_bad_arguments_return_2(capsys):
    assert e2e.main(["--models", "gpt5", "--sim"]) == 2
    assert e2e.main(["--models", "tiny", "--sim", "--settings", "3"]) == 2  # 3 bits is not a slice boundary
    assert e2e.main(["--sim", "--new-tokens", "-1"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()  # one line each on stderr, in the house format; nothing on stdout
    assert len(err) == 3 and all(line.startswith("python -m mbq_ref.e2e: error: ") for line in err) and not cap.out


@pytest.mark.skipif(real_gpu(), reason="a real GPU is present")
def test_real_run_needs_a_gpu(capsys):
    assert e2e.main(["--models", "tiny"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(real_gpu(), reason="simulator run")
def test_sim_tiny_decode(capsys):
    """Prefill 2 tokens and decode 1 through PackedMoBiLinear + routed GEMV v6 (simulated): finite logits."""
    assert e2e.main(["--sim", "--models", "tiny", "--prompt", "2", "--new-tokens", "1", "--settings", "2,routed"]) == 0
    out = capsys.readouterr().out
    assert "NOT performance numbers" in out and out.count("packed") == 2
