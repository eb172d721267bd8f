"""Group sizes other than 128: one up-front check for a whole model, and group 64 everywhere.

The model mimics SmolLM2-135M's shapes at a third of the size: hidden 192 (576/3),
FFN 512 (1536/3), head dim 64, so group 128 fits no projection and 64 fits all.
"""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mbq_ref.calibrate import CalibConfig
from mbq_ref.checkpoint import load_checkpoint, save_checkpoint
from mbq_ref.fakequant import QuantLinear, check_group_size, quant_linears, quantize_model
from mbq_ref.mobiquant import MoBiConfig, mobi_layers, quantize_mobiquant, set_slices
from mbq_ref.mobislice import SlicedWeight
from mbq_ref.quantizer import QuantError

G = 64


def smol_like(seed: int = 0, layers: int = 1) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _ids(n=2, t=32, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_check_names_the_layer_and_what_fits():
    model = smol_like()
    with pytest.raises(QuantError) as exc:
        check_group_size(model, 128)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "group_size 128 does not divide the input dimension 192 of 'model.layers.0.self_attn.q_proj'" in msg
    assert "6 of 7 projections" in msg and "input dims 192, 512" in msg and "use one of 32, 64 or" in msg
    # 96 divides 192 (q/k/v/o/gate/up) but not 512 (down): only down_proj is named
    with pytest.raises(QuantError, match=r"512 of 'model.layers.0.mlp.down_proj' \(1 of 7 projections"):
        check_group_size(model, 96)
    assert check_group_size(model, G) == G
    assert check_group_size(model, None) is None and check_group_size(model, -1) == -1
    for bad in (0, -3, 64.0, True, "64"):
        with pytest.raises(QuantError, match="group_size must be"):
            check_group_size(model, bad)


def test_a_bad_group_size_swaps_nothing():
    # without the up-front check, group 96 would swap six projections before failing at down_proj
    model = smol_like()
    with pytest.raises(QuantError, match="down_proj"):
        quantize_model(model, 4, 96)
    assert not quant_linears(model)
    with pytest.raises(QuantError, match="down_proj"):
        quantize_mobiquant(model, _ids(), MoBiConfig(group_size=96), progress=False)
    assert not mobi_layers(model)


@pytest.mark.parametrize("method", ["rtn", "lwc"])
def test_static_quantizers_run_at_group_64(method, one_thread):
    model = quantize_model(smol_like(), 4, G, method)
    layers = quant_linears(model)
    assert len(layers) == 7 and all(isinstance(m, QuantLinear) and m.group_size == G for m in layers.values())
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.clip is None or down.clip.gamma.shape == (192, 512 // G)
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_mobiquant_and_checkpoint_at_group_64(tmp_path, one_thread):
    model = smol_like()
    cfg = MoBiConfig(group_size=G, calib=CalibConfig(nsamples=2, seqlen=32, epochs=1, batch_size=2, dataset="random"))
    quantize_mobiquant(model, _ids(), cfg, progress=False)
    sw = mobi_layers(model)["model.layers.0.mlp.down_proj"].sliced
    assert sw.group_size == G and sw.scale.shape == (192, 512 // G)
    path = save_checkpoint(model, tmp_path / "g64.safetensors", {"base_model": "smol-like"})
    ck = load_checkpoint(path, with_tokenizer=False)
    assert ck.meta["quantization"]["group_size"] == G
    x = _ids(seed=3)
    for k in (1, 4):
        set_slices(model, k)
        set_slices(ck.model, k)
        with torch.no_grad():
            assert torch.equal(model(x).logits, ck.model(x).logits), k


def test_kernel_references_and_packing_at_group_64():
    from cuda_numba.binary_matmul import binary_linear_ref
    from cuda_numba.dequant import dequant_codes
    from cuda_numba.packing import pack_mobislice
    from cuda_numba.slice_linear import slice_linear_ref

    torch.manual_seed(0)
    w = torch.randn(48, 192)
    sw = SlicedWeight.from_float(w, (2, 2, 2, 2), G)
    x = torch.randn(5, 192)
    packed = pack_mobislice(sw.codes, sw.scale, sw.zero.to(torch.int32), sw.slice_bits, G)
    assert packed.n_groups == 192 // G
    for k in (1, 2, 4):
        wk = sw.dequant(k)
        torch.testing.assert_close(dequant_codes(sw.codes, sw.scale, sw.zero, sw.slice_bits, k, G), wk)
        torch.testing.assert_close(slice_linear_ref(x, sw.codes, sw.scale, sw.zero, sw.slice_bits, k, G), x @ wk.T)
        # 8-bit activations: close to the float product, not equal
        y8 = binary_linear_ref(x.numpy(), sw.codes, sw.scale, sw.zero, sw.slice_bits, k, G)
        ref = (x @ wk.T).double().numpy()
        assert np.abs(y8 - ref).max() < 0.02 * np.abs(ref).max()


def test_cli_quantize_refuses_a_group_size_in_one_line(tmp_path, capsys):
    import shutil

    from mbq_ref.cli import main
    from mbq_ref.paths import model_dir

    folder = tmp_path / "smol-like"
    smol_like().save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir() / f, folder / f)
    out = tmp_path / "m.safetensors"
    assert main(["quantize", "--model", str(folder), "--out", str(out), "--group-size", "128", "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("mbq quantize: error: group_size 128 does not divide") and "64" in err[0]
    assert not out.exists()


def test_sensitivity_report_at_group_64(one_thread):
    from mbq_ref.sensitivity import sensitivity_report

    model = smol_like()
    with pytest.raises(QuantError, match="group_size 128"):
        sensitivity_report(model, _ids(1, 16))
    rep = sensitivity_report(model, _ids(1, 16), group_size=G)
    assert len(rep.layers) == 7
    # a model quantized at group 64 carries its own grid: the group_size argument is not used
    assert len(sensitivity_report(quantize_model(model, 4, G), _ids(1, 16)).layers) == 7
