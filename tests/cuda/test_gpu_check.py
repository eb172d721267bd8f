"""benchmarks/gpu_check.sh: its simulator dry run (every step at tiny shapes) passes and streams the bench cases."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from kernel_helpers import real_gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(real_gpu(), reason="on a GPU machine run the script itself")
def test_gpu_check_sim_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script sets it per step
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--sim"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    log = (tmp_path / "gpu_check.log").read_text()
    assert res.returncode == 0, log[-3000:]
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert {c["kernel"] for c in cases} >= {"gemv7", "fused-gemv7", "fused-gemv6"}
    assert all(c["check_ok"] for c in cases)
    assert "installing" not in log  # a dry run installs nothing
