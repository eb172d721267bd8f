"""The quantize -> save -> load -> eval path on every Llama-family architecture (random tiny configs, no hub).

Each model is written to a local folder with ``save_pretrained`` (plus the bundled
tokenizer), so ``mbq quantize --model FOLDER`` goes through exactly the code a
user runs with ``--model meta-llama/Meta-Llama-3-8B``.
"""

import json

import pytest
import torch

from mbq_ref.calibrate import CalibConfig
from mbq_ref.checkpoint import ModelMismatchError, load_checkpoint, save_checkpoint
from mbq_ref.cli import main
from mbq_ref.mobiquant import MoBiConfig, mobi_layers, quantize_mobiquant, set_slices

HIDDEN, FFN, VOCAB = 128, 256, 8192  # vocab of the bundled tokenizer; every K a multiple of 128

ARCHS = {
    # Llama 2: multi-head attention, RoPE base 1e4
    "llama2": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4, "rope_theta": 1e4}),
    # Llama 3: grouped-query attention, RoPE base 5e5
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2, "rope_theta": 5e5}),
    # Qwen2: biases on q/k/v (MoBiLinear keeps them), GQA
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    # Mistral: GQA and a sliding attention window
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": 32}),
}


def build(arch: str, seed: int = 0):
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def folder(request, tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    build(request.param).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return request.param, path


def test_api_roundtrip_is_exact(folder, tmp_path):
    arch, path = folder
    from mbq_ref.zoo import load_model

    model = load_model(str(path))
    calib = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize_mobiquant(model, calib, MoBiConfig(calib=CalibConfig(nsamples=2, seqlen=32, epochs=1, batch_size=2)), progress=False)
    if arch == "qwen2":
        assert mobi_layers(model)["model.layers.0.self_attn.q_proj"].bias is not None
    file = save_checkpoint(model, tmp_path / f"{arch}.safetensors", {"base_model": str(path)})
    ck = load_checkpoint(file, expect_model=str(path), with_tokenizer=False)
    assert type(ck.model).__name__ == ARCHS[arch][1]
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    for k in (None, 1, 4):  # routed, then 2-bit and 8-bit readings
        if k:
            set_slices(model, k)
            set_slices(ck.model, k)
        with torch.no_grad():
            assert torch.equal(ck.model(input_ids=x).logits, model(input_ids=x).logits), (arch, k)


def test_cli_quantize_and_eval(folder, tmp_path, capsys):
    arch, path = folder
    out = tmp_path / f"{arch}.mbq.safetensors"
    code = main(["quantize", "--model", str(path), "--out", str(out), "--calib", "austen", "--nsamples", "2", "--seqlen", "64",
                 "--epochs", "1", "--table-step", "6", "--threshold-windows", "1", "--no-progress"])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--bits", "8", "--seqlen", "64", "--max-windows", "2", "--json", "--no-progress"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["measured_bits"] == 8.0 and row["ppl"] > 1  # the table's 8-bit row: every slice, every token
    # the checkpoint knows which model it belongs to
    other = next(a for a in ARCHS if a != arch)
    with pytest.raises(ModelMismatchError):
        load_checkpoint(out, expect_model=build(other), with_tokenizer=False)
