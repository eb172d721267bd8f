"""The bundled tiny Llama, load_model, and the reproducible training script."""

import math
import os
from dataclasses import replace

import pytest
import torch

from mbq_ref.zoo import ModelError, load_model
from mbq_ref.zoo.train_tiny import TinyConfig, _lr_at, train


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


def test_load_and_greedy_generation_runs(tiny_llama):
    model, tok = load_model("tiny-llama", with_tokenizer=True)
    ids = tok("It is a truth", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline mode"):
        load_model("no-such-org/no-such-model")


def _small_cfg(**kw):
    return replace(TinyConfig.tiny(), **kw)


TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20,
         "In the beginning was the Word, and the Word was with God. " * 20]


def test_default_config_is_the_committed_recipe():
    cfg = TinyConfig()
    assert cfg == TinyConfig.paper()
    assert (cfg.batch_size, cfg.seqlen, cfg.steps, cfg.warmup_steps) == (64, 512, 915, 100)
    assert cfg.min_lr == pytest.approx(0.1 * cfg.lr)
    lrs = [_lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / 100) and max(lrs) <= cfg.lr
    assert lrs[-1] == pytest.approx(cfg.min_lr, rel=0.01)  # cosine decay to 10 % of the peak


def test_training_is_resumable_bit_for_bit_and_logs_validation(tmp_path):
    full = train(_small_cfg(), tmp_path / "full", texts=TEXTS, val_texts=TEXTS, device="cpu")
    # interrupted after 2 of 4 steps (the state is saved every 2), then resumed
    train(_small_cfg(), tmp_path / "cut", texts=TEXTS, val_texts=TEXTS, stop_after=2, device="cpu")
    resumed = train(_small_cfg(), tmp_path / "cut", resume=True, texts=TEXTS, val_texts=TEXTS, device="cpu")
    assert full["loss_curve"] == resumed["loss_curve"]
    assert [v["step"] for v in full["validation_ppl"]] == [2, 4]  # every eval_every steps
    assert full["validation_ppl"] == resumed["validation_ppl"]
    assert all(math.isfinite(v["val_ppl"]) and v["val_ppl"] > 1 for v in full["validation_ppl"])
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="no CUDA device"):
        train(_small_cfg(), tmp_path / "x", texts=TEXTS, val_texts=TEXTS, device="cuda")


@pytest.mark.slow
def test_bundled_model_is_quantization_sensitive(tiny_llama):
    """Per-group (128) RTN of all 28 block projections must visibly hurt, on the tour's windows.

    The former 3M-token model lost only +5 % at 2 bits and +0.2 % at 3 bits, so no chapter
    could show what MoBiQuant fixes; the committed 30M-token weights lose ~+75 % / +11 %.
    """
    import copy

    from mbq_ref.data import load_corpus, tokenize_corpus
    from mbq_ref.fakequant import quant_linears, quantize_model, set_bits
    from mbq_ref.perplexity import perplexity
    from mbq_ref.tour import TourSettings

    model, tok = tiny_llama
    st = TourSettings()
    ids = tokenize_corpus(tok, load_corpus("austen", "test"))

    def ppl(m):
        return perplexity(m, ids, seqlen=st.eval_seqlen, max_windows=st.eval_windows, batch_size=8, progress=False).ppl

    fp = ppl(model)
    rtn = quantize_model(copy.deepcopy(model), bits=2, group_size=128, method="rtn")
    assert len(quant_linears(rtn)) == 7 * model.config.num_hidden_layers
    cost = {}
    for b in (2, 3):
        set_bits(rtn, b)
        cost[b] = ppl(rtn) / fp - 1
    assert cost[2] >= 0.40 and cost[3] >= 0.05, f"RTN costs only {cost[2]:+.1%} (2 bits), {cost[3]:+.1%} (3 bits) over FP {fp:.2f}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_random_llama_is_seeded(arch):
    from mbq_ref.zoo import random_llama

    a, b = random_llama(arch, hidden=64, layers=1, vocab=32, seed=3), random_llama(arch, hidden=64, layers=1, vocab=32, seed=3)
    assert a.config.num_hidden_layers == 1 and a.config.hidden_size == 64
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_random_llama_unknown_architecture():
    from mbq_ref.zoo import random_llama

    with pytest.raises(ValueError, match="unknown architecture"):
        random_llama("gpt2")


def _local_model_cases(tmp_path):
    import json
    import shutil

    from mbq_ref.paths import model_dir

    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    (tmp_path / "noweights").mkdir()
    shutil.copy(model_dir() / "config.json", tmp_path / "noweights" / "config.json")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    data = tmp_path / "data"
    shutil.copytree(model_dir(), data / "tiny-llama", copy_function=os.symlink)  # links: no 20 MB copy
    (data / "tiny-llama" / "config.json").unlink()
    (data / "tiny-llama" / "config.json").write_text('{"model_type": "llama", "hidden')  # damaged bundled files
    return {
        "no-config": (str(tmp_path / "empty"), "has no config.json"),
        "a-file": (str(tmp_path / "afile"), "is a file"),
        "broken-json": (str(tmp_path / "badjson"), "is not valid JSON"),
        "no-weights": (str(tmp_path / "noweights"), "no weights"),
        "gpt2": (str(tmp_path / "gpt2"), "describes a 'gpt2' model"),
        "damaged-bundled": ("tiny-llama", "not valid JSON.*git checkout data/"),
    }


@pytest.mark.parametrize("case", ["no-config", "a-file", "broken-json", "no-weights", "gpt2", "damaged-bundled"])
def test_local_folder_errors_name_the_real_problem(monkeypatch, tmp_path, case):
    """Every local-folder problem used to be reported as "offline mode is on"."""
    name, match = _local_model_cases(tmp_path)[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "damaged-bundled":
        monkeypatch.setenv("MBQ_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(ModelError, match=match) as err:
        load_model(name)
    assert "offline mode" not in str(err.value)
