"""cuda_numba/bench.py: the CLI contract, token mixes, and a dry run of the GPU path's bookkeeping."""

import argparse
import json

import numpy as np
import pytest
from kernel_helpers import real_gpu

from cuda_numba import bench


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "--sim" in capsys.readouterr().out


@pytest.mark.skipif(real_gpu(), reason="a real GPU is present: the benchmark would run")
def test_no_real_gpu_returns_2(capsys):
    assert bench.main(["--shapes", "64x16"]) == 2
    out = capsys.readouterr().err.strip()
    assert "no real GPU" in out and len(out.splitlines()) == 1


@pytest.mark.skipif(real_gpu(), reason="--sim re-runs itself in a subprocess when the simulator is off")
def test_sim_demo_checks_kernels(capsys):
    rc = bench.main(
        ["--sim", "--shapes", "64x11", "--tokens", "2", "--bits", "3", "--kernels", "gemv3,streams-gemm2,bmm2"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "NOT performance numbers" in out and out.count(" ok (") == 3


@pytest.mark.parametrize(
    "T,bits,expect",
    [(4, 3, [2, 2, 0, 0]), (8, 8, [0, 0, 0, 8]), (1, 3, [0, 1, 0, 0]), (6, 5, [0, 3, 3, 0]), (5, 2, [5, 0, 0, 0])],
)
def test_token_mix(T, bits, expect):
    k_t = bench.token_mix(T, bits, (2, 2, 2, 2), seed=1)
    assert np.bincount(k_t, minlength=5)[1:].tolist() == expect
    if T > 1 and bits == 3:
        assert np.mean(2 * k_t) == 3


def test_parse_shapes_and_kernels():
    assert bench.parse_shapes("4096x11008, 14336X4096") == [(4096, 11008), (14336, 4096)]
    assert bench._kernel("streams-gemm3").method == "streams"
    assert bench._kernel("bmm2").family == "bmm" and bench._kernel("pack1").family == "pack"
    for bad in ("gemm4", "pack3", "cublas"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._kernel(bad)


def test_gpu_path_bookkeeping_dry_run(monkeypatch, tmp_path, capsys):
    """Run the real-GPU code path in the simulator with faked timings: rows, bytes, JSON and plot."""
    monkeypatch.setattr("cuda_numba._common.real_gpu_available", lambda: True)
    monkeypatch.setattr(
        bench,
        "device_info",
        lambda peak: {
            "name": "Fake GPU 9000",
            "driver_version": "0",
            "l2_bytes": 2**20,
            "hbm_peak_gbs": 1000.0,
            "hbm_peak_source": "test",
        },
    )
    monkeypatch.setattr(bench, "_time", lambda run, *a, **k: [2.0, 1.0, 3.0])
    rc = bench.main(
        [
            "--shapes",
            "64x11",
            "--tokens",
            "2",
            "--bits",
            "3",
            "--kernels",
            "gemv2,pack2",
            "--no-flush",
            "--group-size",
            "32",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("fake-gpu-9000_") and files[0].endswith(".json")
    report = json.loads((tmp_path / files[0]).read_text())
    meta = report["meta"]
    for key in ("utc", "git_commit", "versions", "device"):
        assert key in meta
    assert meta["versions"]["numba"] and meta["device"]["driver_version"] == "0"
    rows = {r["kernel"]: r for r in report["results"]}
    assert set(rows) == {"gemv2", "pack2"} and all(r["check_ok"] for r in rows.values())
    g = rows["gemv2"]
    assert g["ms_median"] == 2.0 and g["k_hist"] == [1, 1, 0, 0]
    # 3 bits = one token at k=1 (2 planes), one at k=2 (4 planes): 2 + 4 planes of 11 rows x 2 words x 4 B,
    # plus scale+zero (11 x 2 groups x 8 B) for each of the two launches
    assert g["weight_bytes"] == (2 + 4) * 11 * 2 * 4 + 2 * 11 * 2 * 8
    assert g["gbs_effective"] == pytest.approx(g["weight_bytes"] / 2e-3 / 1e9)
    assert g["frac_of_roofline"] == pytest.approx(g["weight_bytes"] / 1e12 * 1e3 / 2.0)


def test_every_case_runs_call_and_kernels_only():
    """Each case the bench times (every module's CASES): the call agrees with the reference and the
    kernels-only runner runs; the bench knows exactly the modules' public case lists."""
    from cuda_numba import binary_matmul, packing, slice_linear

    names = [*slice_linear.CASES, *binary_matmul.CASES, *packing.CASES]
    assert bench.all_kernels().split(",") == [*names, "fp16"]
    weights = bench._Weights(64, 11, 32, (2, 2, 2, 2), seed=3, ref_device="cpu")
    k_t = bench.token_mix(3, 5, (2, 2, 2, 2), seed=3)
    case = bench._Case(weights, 3, k_t, seed=3)
    for name in names:
        call, kernels_only, check = case.runner(bench._kernel(name))
        assert check(call())[0], name
        if kernels_only is not None:
            kernels_only()  # runs without error; its output is checked through the call
