"""Real-GPU checks at realistic shapes (skipped without one): ``MBQ_REAL_GPU=1 pytest -m gpu tests/cuda``.

The simulator tests cover correctness at tiny shapes; these add what only hardware shows:
compiled-code typing (integer promotion, fp16 stores), many blocks, K in the thousands,
streams actually running concurrently, and the benchmark end to end.
"""

import numpy as np
import pytest
from kernel_helpers import assert_close, mobislice_weight, poisoned

from cuda_numba.binary_matmul import binary_matmul, binary_matmul_ref
from cuda_numba.packing import n_words, pack_bitplanes, pack_bitplanes_ref, pack_mobislice, unpack_bitplanes
from cuda_numba.slice_linear import CASES, slice_linear, slice_linear_ref

pytestmark = pytest.mark.gpu
SB = (2, 2, 2, 2)


@pytest.mark.parametrize("version", [1, 2])
def test_pack_large(rng, version):
    codes = rng.integers(0, 256, (1001, 4128), dtype=np.uint8)
    planes = pack_bitplanes(codes, version=version, out=poisoned((8, 1001, n_words(4128)), np.uint32))
    np.testing.assert_array_equal(planes, pack_bitplanes_ref(codes))
    np.testing.assert_array_equal(unpack_bitplanes(planes, 4128), codes)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_binary_matmul_large(rng, version):
    T, N, K, g = 67, 515, 1024, 128
    xq = rng.integers(0, 256, (T, K), dtype=np.uint8)
    wq = rng.integers(0, 256, (N, K), dtype=np.uint8)
    xz, wz = rng.integers(0, 256, T), rng.integers(0, 256, (N, K // g))
    got = binary_matmul(
        pack_bitplanes_ref(xq), pack_bitplanes_ref(wq), K, xz, wz, g, version=version, out=poisoned((T, N), np.int64)
    )
    np.testing.assert_array_equal(got, binary_matmul_ref(xq, wq, xz, wz, g))


@pytest.mark.parametrize("T", [1, 7, 130])
@pytest.mark.parametrize("case", list(CASES))
def test_slice_linear_large(rng, T, case):
    """Every benchmark case (slice_linear.CASES) at a decode/prefill shape with K in the thousands."""
    method, kind, version = CASES[case]
    N, K, g = 1000, 4096, 128
    codes, scale, zero = mobislice_weight(rng, N, K, g)
    w = pack_mobislice(codes, scale, zero, SB, g)
    x = rng.standard_normal((T, K)).astype(np.float16)
    k_t = rng.integers(1, 5, T)
    y = slice_linear(x, w, k_t, method=method, kind=kind, version=version, out=poisoned((T, N), np.float16))
    assert_close(y, slice_linear_ref(x, codes, scale, zero, SB, k_t, g).float().numpy(), np.float16)


def test_bench_smoke(tmp_path):
    from cuda_numba import bench

    rc = bench.main(
        [
            "--shapes",
            "4096x4096",
            "--tokens",
            "1,64",
            "--bits",
            "3",
            "--reps",
            "3",
            "--warmup",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert len(list(tmp_path.glob("*.json"))) == 1


@pytest.mark.parametrize("N,K", [(4096, 4096), (1000, 14336)])
def test_lut_gemv_split_k_large(rng, N, K):
    """GEMV v5/v6 with many K-splits and row blocks at decode shapes; twice (counters reset)."""
    from cuda_numba.slice_gemv import slice_gemv

    g = 128
    codes, scale, zero = mobislice_weight(rng, N, K, g)
    w = pack_mobislice(codes, scale, zero, SB, g).to_device()
    x = rng.standard_normal((1, K)).astype(np.float16)
    for k in (1, 2, 4):
        ref = slice_linear_ref(x, codes, scale, zero, SB, k, g).float().numpy()
        for version in (5, 6, 5):
            assert_close(slice_gemv(x, w, k, version=version, out=poisoned((1, N), np.float16)), ref, np.float16)


@pytest.mark.parametrize("n_tokens", [5, 12])
def test_packed_model_on_cuda(n_tokens):
    """The packed backend on CUDA torch tensors (fp16): same routing and logits as the torch path on CPU.

    Covers what the simulator cannot: torch CUDA tensors handed to Numba (zero-copy views of
    int32 planes as uint32, device k_t, torch-allocated outputs). 5 tokens: the routed GEMV v6;
    12: the grouped GEMM.
    """
    import copy

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import random_llama

    from mbq_ref.fakequant import quantizable_linears
    from mbq_ref.mobilinear import MoBiLinear
    from mbq_ref.packed import PackedMoBiLinear, pack_model

    model = random_llama("llama", hidden=256, layers=2, vocab=128, seed=0)
    gen = torch.Generator().manual_seed(0)
    for name, lin in quantizable_linears(model).items():
        layer = MoBiLinear(lin, SB, group_size=128, name=name)
        with torch.no_grad():
            layer.router.fc2.weight.copy_(torch.randn(layer.router.fc2.weight.shape, generator=gen) * 3)
            layer.router.fc2.bias.zero_()
        layer.freeze()
        model.set_submodule(name, layer)
    packed = copy.deepcopy(model)
    pack_model(packed)  # backend "auto": kernels for CUDA inputs
    packed = packed.to("cuda", torch.float16)
    ids = torch.randint(0, 128, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        got = packed(ids.cuda()).logits.float().cpu()
    hist = {n: m.stats.hist for n, m in model.named_modules() if isinstance(m, MoBiLinear)}
    hist_p = {n: m.stats.hist for n, m in packed.named_modules() if isinstance(m, PackedMoBiLinear)}
    assert hist.keys() == hist_p.keys()
    agree = sum(torch.equal(hist[n], hist_p[n]) for n in hist)
    assert agree >= len(hist) - 2  # fp16 activations may flip a token at the threshold in a layer or two
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 5e-2 * scale


def test_cli_eval_and_generate_on_cuda(tmp_path, capsys):
    """`mbq eval/generate --device cuda`: a checkpoint served by the packed backend on the kernels.

    Against `--device cpu --packed` (the torch reference reading the same planes): the same
    PPL within float rounding and nearly the same measured bits (a token at a threshold may flip).
    """
    import json

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    from mbq_ref.cli import main

    ck = tmp_path / "tiny.mbq.safetensors"
    quick = ["--nsamples", "2", "--seqlen", "64", "--epochs", "1", "--table-step", "1", "--threshold-windows", "2"]
    assert main(["quantize", "--model", "tiny-llama", "--out", str(ck), "--device", "cpu", "--no-progress", *quick]) == 0
    capsys.readouterr()
    rows = {}
    for dev in (["--device", "cuda"], ["--device", "cpu", "--packed"]):
        argv = ["eval", str(ck), "--bits", "3", "--seqlen", "64", "--max-windows", "2", "--json", "--no-progress", *dev]
        assert main(argv) == 0
        rows[dev[1]] = json.loads(capsys.readouterr().out)
    assert rows["cuda"]["device"] == "cuda" and rows["cuda"]["backend"] == "packed"
    assert rows["cuda"]["weight_bits_per_weight"] == pytest.approx(8.5)
    assert rows["cuda"]["ppl"] == pytest.approx(rows["cpu"]["ppl"], rel=1e-2)
    assert abs(rows["cuda"]["measured_bits"] - rows["cpu"]["measured_bits"]) < 0.1
    argv = ["generate", str(ck), "--prompt", "Emma", "--schedule", "2:2,8:3", "--device", "cuda", "--json", "--no-progress"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert [s["measured_bits"] for s in res["tokens"]] == [2.0, 2.0, 8.0] and res["backend"] == "packed"


def test_packed_decode_step_in_cuda_graph():
    """One decode step of the packed projections (the sync-free RoutedPlan path) captured as a CUDA graph:
    the replay gives the eager outputs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    from mbq_ref.e2e import build_model, pack_random, projection_step
    from mbq_ref.packed import packed_layers

    model = build_model("tiny", "cuda")
    pack_random(model)
    for p in packed_layers(model).values():
        p.backend, p.fixed_k = "kernels", 2
    res = projection_step(model, "cuda", graph=True, reps=3)
    assert res["projections"] == 7 and res["graph_max_abs_diff"] < 1e-3
