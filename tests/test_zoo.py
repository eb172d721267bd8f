"""The bundled tiny Llama, load_model, and the reproducible training script."""

import time

import pytest
import torch

from mbq_ref.zoo import ModelError, load_model
from mbq_ref.zoo.train_tiny import TinyConfig, train


def test_bundled_model_is_a_real_llama(tiny_llama):
    model, tok = tiny_llama
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention, as in Llama 3
    assert cfg.hidden_size % 128 == 0 and cfg.intermediate_size % 128 == 0  # group size 128 fits every linear
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 15e6
    assert len(tok) == cfg.vocab_size
    text = "Anne Elliot walked to Uppercross."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_load_is_fast_and_greedy_generation_runs(tiny_llama):
    t0 = time.time()
    model, tok = load_model("tiny-llama", with_tokenizer=True)
    assert time.time() - t0 < 20
    ids = tok("It is a truth", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline mode"):
        load_model("no-such-org/no-such-model")


def _small_cfg(**kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=32, seqlen=16, batch_size=2, train_tokens=16 * 2 * 4,
                warmup_steps=1, save_every=2)
    base.update(kw)
    return TinyConfig(**base)


TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20,
         "In the beginning was the Word, and the Word was with God. " * 20]


def test_training_is_resumable_bit_for_bit(tmp_path):
    full = train(_small_cfg(), tmp_path / "full", texts=TEXTS)
    # interrupted after 2 of 4 steps (the state is saved every 2), then resumed
    train(_small_cfg(train_tokens=16 * 2 * 4), tmp_path / "cut", texts=TEXTS, stop_after=2)
    resumed = train(_small_cfg(), tmp_path / "cut", resume=True, texts=TEXTS)
    assert full["loss_curve"] == resumed["loss_curve"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
