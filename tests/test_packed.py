"""Packed MoBiLinear backend (mbq_ref/packed.py): the kernels (in the CUDA simulator) vs the torch MoBiLinear path."""

import copy

import numpy as np
import pytest
import torch
from helpers import random_llama

from mbq_ref.fakequant import quantizable_linears
from mbq_ref.mobilinear import MoBiError, MoBiLinear
from mbq_ref.packed import PackedMoBiLinear, pack_model, packed_layers

SB = (2, 2, 2, 2)
G = 32


def _mobi_llama(seed=0):
    """A random 1-layer Llama with every projection a frozen MoBiLinear whose router spreads tokens over 1..4 slices."""
    model = random_llama("llama", hidden=64, layers=1, vocab=64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for name, lin in quantizable_linears(model).items():
        layer = MoBiLinear(lin, SB, group_size=G, name=name)
        with torch.no_grad():  # a router that spreads tokens: large random output weights, no bias
            layer.router.fc2.weight.copy_(torch.randn(layer.router.fc2.weight.shape, generator=gen) * 3)
            layer.router.fc2.bias.zero_()
        layer.freeze()
        model.set_submodule(name, layer)
    return model


def _hists(model, cls):
    return {n: m.stats.hist.clone() for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.fixture(scope="module")
def models():
    ref = _mobi_llama()
    packed = copy.deepcopy(ref)
    report = pack_model(packed, backend="kernels")
    return ref, packed, report


def test_packed_model_matches_torch_path(models):
    """Decode-sized input (6 tokens: the one-launch routed GEMV): same routing, same logits."""
    ref, packed, _ = models
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    for m in list(packed_layers(packed).values()) + [m for m in ref.modules() if isinstance(m, MoBiLinear)]:
        m.reset_stats()
    with torch.no_grad():
        want = ref(ids).logits
        got = packed(ids).logits
    h_ref, h_packed = _hists(ref, MoBiLinear), _hists(packed, PackedMoBiLinear)
    assert h_ref.keys() == h_packed.keys() and len(h_ref) == 7
    for name in h_ref:
        assert torch.equal(h_ref[name], h_packed[name]), name  # same tokens at the same slice counts
    assert sum(int((h[:-1] > 0).any()) for h in h_ref.values()) >= 3  # routing really mixes precisions
    torch.testing.assert_close(got, want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


def test_packed_torch_backend_is_the_reference(models):
    ref, packed, _ = models
    layer_ref = ref.model.layers[0].mlp.down_proj
    layer = packed.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    layer.backend = "torch"
    try:
        torch.testing.assert_close(layer(x), layer_ref(x), rtol=1e-5, atol=1e-5)
    finally:
        layer.backend = "kernels"


def test_packed_prefill_path(models):
    """More than 8 tokens: the grouped GEMM path, token_slices override shared with MoBiLinear's routing."""
    ref, packed, _ = models
    layer_ref, layer = ref.model.layers[0].self_attn.q_proj, packed.model.layers[0].self_attn.q_proj
    x = torch.randn(10, layer.in_features, generator=torch.Generator().manual_seed(3))
    ks = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1, 1, 4])
    layer_ref.token_slices = layer.token_slices = ks
    try:
        torch.testing.assert_close(layer(x), layer_ref(x), rtol=1e-4, atol=1e-4)
    finally:
        layer_ref.token_slices = layer.token_slices = None


def test_memory_report(models):
    _, packed, report = models
    assert report["layers"] == 7
    # B_E = 8 bits of planes + (float32 scale + int32 zero) per group of 32 = 8 + 64/32 bits per weight
    assert report["packed_bits_per_weight"] == pytest.approx(8 + 64 / G)
    assert all(not hasattr(m, "weight") for m in packed_layers(packed).values())  # no float weight kept
    assert report["torch_bytes_per_weight"] > 20  # fp32 weight + float64 slice deltas in the torch path


def test_routing_settings_are_shared(models):
    """Settings MoBiLinear exposes (tau, fixed_k) route a packed layer the same way."""
    ref, packed, _ = models
    layer_ref, layer = ref.model.layers[0].mlp.up_proj, packed.model.layers[0].mlp.up_proj
    x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(4))
    for tau in (0.2, 0.9):
        layer_ref.tau = layer.tau = tau
        assert torch.equal(layer.route(x), layer_ref.route(x))
    layer.fixed_k = 2
    assert layer.route(x).tolist() == [2] * 7
    layer.fixed_k = None
    layer_ref.tau = layer.tau = 0.5


def test_pack_model_errors():
    with pytest.raises(MoBiError):
        pack_model(random_llama("llama", hidden=64, layers=1, vocab=64))
    with pytest.raises(MoBiError):
        pack_model(_mobi_llama(), backend="magic")


def test_zero_point_is_on_the_finest_grid(models):
    """The packed zero point reproduces the package's dequantization at every precision (any stored grid)."""
    from cuda_numba.packing import unpack_bitplanes_ref
    from cuda_numba.dequant import dequant_codes

    ref, packed, _ = models
    layer_ref, layer = ref.model.layers[0].self_attn.o_proj, packed.model.layers[0].self_attn.o_proj
    codes = unpack_bitplanes_ref(layer.planes.numpy().view(np.uint32), layer.in_features)
    for k in range(1, 5):
        ours = dequant_codes(codes, layer.scale, layer.zero, SB, k, G)
        torch.testing.assert_close(ours, layer_ref.sliced.dequant(k), rtol=0, atol=0)


def test_mobiquant_controls_serve_packed_layers(models):
    """mobi_layers, set_threshold, set_slices and the bit statistics treat packed layers as MoBiLinear ones."""
    from mbq_ref import mobiquant as mq

    ref, packed, _ = models
    assert list(mq.mobi_layers(packed)) == list(mq.mobi_layers(ref))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    layers = packed_layers(packed).values()
    for m in layers:
        m.backend = "torch"  # the whole model: the torch reference is the quick path on CPU
    try:
        for setting in ({"tau": 0.7}, {"k": 2}):
            for model in (ref, packed):
                if "tau" in setting:
                    mq.set_threshold(model, setting["tau"])
                else:
                    mq.set_slices(model, setting["k"])
                mq.reset_bit_stats(model)
                with torch.no_grad():
                    model(ids)
            assert mq.thresholds(packed) == mq.thresholds(ref)
            assert mq.layer_bits(packed) == mq.layer_bits(ref)
            assert mq.average_bits(packed) == mq.average_bits(ref)
        assert mq.average_bits(packed) == 4.0  # set_slices(2): B_2 = 4 bits everywhere
    finally:
        for model in (ref, packed):
            mq.set_threshold(model, 0.5)
        for m in layers:
            m.backend = "kernels"


def test_packed_model_is_not_saved(models, tmp_path):
    """A checkpoint stores codes; a packed model (planes only) is refused before anything is written."""
    from mbq_ref.checkpoint import CheckpointError, save_checkpoint

    _, packed, _ = models
    with pytest.raises(CheckpointError, match="save the model before packing"):
        save_checkpoint(packed, tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_served_by_the_kernels(tmp_path):
    """The CLI's path in the simulator: a saved checkpoint loaded, packed (Checkpoint.pack) and routed by set_bits,
    run on the kernels with CPU tensors: the unpacked load's routing, measured bits and logits."""
    from mbq_ref.calibrate import CalibConfig
    from mbq_ref.checkpoint import load_checkpoint, save_checkpoint
    from mbq_ref.mobiquant import MoBiConfig, average_bits, bit_stats, quantize_mobiquant, reset_bit_stats

    model = random_llama("llama", hidden=64, layers=1, vocab=64, seed=0)
    cfg = MoBiConfig(group_size=G, calib=CalibConfig(nsamples=2, seqlen=16, epochs=1, batch_size=2, dataset="random"))
    quantize_mobiquant(model, torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6)), cfg, progress=False)
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"base_model": "random-llama"},
                           thresholds={2.0: 1.0, 5.0: 0.5, 8.0: 0.0})  # fmt: skip
    ref, ck = (load_checkpoint(path, with_tokenizer=False) for _ in range(2))
    report = ck.pack(backend="kernels")
    assert report["layers"] == 7 and report["packed_bits_per_weight"] == pytest.approx(8 + 64 / G)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(7))
    for c in (ref, ck):
        c.set_bits(5.0)
        reset_bit_stats(c.model)
    with torch.no_grad():
        want, got = ref.model(ids).logits, ck.model(ids).logits
    assert all(isinstance(m, PackedMoBiLinear) for m in packed_layers(ck.model).values())
    hist_ref, hist = ({n: s.hist for n, s in bit_stats(c.model).items()} for c in (ref, ck))
    assert hist.keys() == hist_ref.keys() and all(torch.equal(hist[n], hist_ref[n]) for n in hist)
    assert sum(int((h > 0).sum() > 1) for h in hist.values()) >= 3  # tokens at several precisions in one launch
    assert average_bits(ck.model) == average_bits(ref.model)
    torch.testing.assert_close(got, want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


def _count_host_syncs(monkeypatch, fn):
    """Run ``fn()`` with every way the host can wait for the device patched to count; returns the calls.

    Counted: torch's host reads (``item``, ``tolist``, ``bool``/``float``/``int`` of a tensor,
    ``.cpu()``), tensors made from host data (``torch.tensor``, ``torch.as_tensor``: a copy to
    the device), torch's and Numba's synchronise, Numba copies (``to_device``,
    ``copy_to_host``) and a synchronising ``as_cuda_array``. Each call is returned with the functions on its stack.
    """
    import traceback

    import numba.cuda as nc
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    calls = []

    def counting(name, orig):
        def f(*a, **k):
            calls.append((name, [fr.name for fr in traceback.extract_stack()[:-1]]))
            return orig(*a, **k)

        return f

    T = torch.Tensor
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
        monkeypatch.setattr(T, name, counting(name, getattr(T, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("torch.cuda.synchronize", torch.cuda.synchronize))
    for name in ("tensor", "as_tensor"):  # a tensor made from host data is a host-to-device copy (and a sync)
        monkeypatch.setattr(torch, name, counting(f"torch.{name}", getattr(torch, name)))
    monkeypatch.setattr(nc, "synchronize", counting("numba.synchronize", nc.synchronize))
    monkeypatch.setattr(nc, "to_device", counting("numba.to_device", nc.to_device))
    if hasattr(nc, "as_cuda_array"):  # not in the simulator
        orig = nc.as_cuda_array
        monkeypatch.setattr(nc, "as_cuda_array", lambda obj, sync=True: (calls.append(("as_cuda_array", [])) if sync
                                                                         else None) or orig(obj, sync=sync))  # fmt: skip
    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", counting("copy_to_host", FakeCUDAArray.copy_to_host))
    try:
        with torch.no_grad():
            out = fn()
    finally:
        monkeypatch.undo()
    return calls, out


def _in_router(stack) -> bool:
    """The call was made inside the router module's forward (``route`` -> ``self.router(x)``)."""
    return "route" in stack and "_call_impl" in stack[stack.index("route") :]


@pytest.mark.parametrize("routing", ["fixed_k", "router"])
def test_decode_projection_never_synchronises(models, monkeypatch, routing):
    """A decode call of a packed layer (the GPU path: deferred checks, a cached RoutedPlan) reads nothing back.

    In the simulator CPU tensors stand for device memory (viewed in place, as CUDA tensors are
    on a GPU). After a first call, which prepares the plan and its workspace, a call of
    ``serve`` and the packed backend must count zero host synchronisations. With the router
    on, the router's own forward (MoBiRouter) is left out of the count.
    """
    _, packed, _ = models
    layer = packed.model.layers[0].mlp.down_proj
    layer.host_checks = False  # what a CUDA input gets by default
    layer.fixed_k = 3 if routing == "fixed_k" else None
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(7))
    try:
        layer.reset_stats()
        with torch.no_grad():
            y0 = layer(x)  # prepares the RoutedPlan
        calls, y1 = _count_host_syncs(monkeypatch, lambda: layer(x))
        ours = [(name, stack[-4:]) for name, stack in calls if not _in_router(stack)]
        assert ours == [], f"host synchronisations in one decode projection: {ours}"
        torch.testing.assert_close(y1, y0)
        assert layer.stats.tokens == 2 and layer.stats.problems() is None  # read lazily, after the calls
    finally:
        layer.host_checks, layer.fixed_k = None, None
        layer.reset_stats()


def test_deferred_checks_report_on_read(models):
    """With host checks off, a NaN input is not an error at call time; reading the stats reports it."""
    _, packed, _ = models
    layer = packed.model.layers[0].mlp.up_proj
    layer.host_checks = False
    try:
        layer.reset_stats()
        x = torch.randn(1, layer.in_features)
        x[0, 3] = float("nan")
        with torch.no_grad():
            layer(x)
        assert "NaN/inf" in layer.stats.problems()
        with pytest.raises(MoBiError, match="NaN/inf"):
            layer.avg_bits
        layer.host_checks = True
        with pytest.raises(MoBiError, match="NaN/inf"):
            layer(x)
    finally:
        layer.host_checks = None
        layer.reset_stats()
