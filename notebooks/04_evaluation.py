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
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 4 — Elastic evaluation: one checkpoint, every precision
#
# **Paper:** MoBiQuant (arXiv 2602.20191), Sec. 4.2 ("runtime precision switching"),
# Sec. 5 (Table 1, Fig. 1, §5.3). **Package:** `mbq_ref.thresholds` (`threshold_table`, the
# package's one threshold controller), `mbq_ref.checkpoint`, `mbq_ref.baselines`,
# `mbq_ref.generate`, `mbq_ref.cache`.
# **Runtime:** on 2 idle CPU cores about 1.5 minutes when chapter 3 has run before (its
# calibrations are reused from `runs/cache/`, see `mbq_ref.cache`); run alone on a fresh
# checkout it first calibrates, about a minute more.
#
# Chapters 2 and 3 built the two halves of MoBiQuant: MoBiSlice stores every weight as
# four nested 2-bit slices, and MoBiRoute decides, token by token, how many slices each
# linear layer reads. The promise is *elasticity*: calibrate **once**, save **one** file, and
# run at any average precision between 2 and 8 bits by moving a threshold — no
# recalibration, no second model. This chapter measures that promise:
#
# 1. **perplexity vs average bits** on all three bundled domains, with the model calibrated
#    on `austen` only (does the routing generalize to other text?);
# 2. against the alternatives: **per-bit calibrated static PTQ** (OmniQuant-style LWC, one
#    calibration per width), **RTN** (one checkpoint per width) and **MSB truncation** of one
#    8-bit code (a many-in-one baseline, chapter 2);
# 3. the **cost of switching precision**: MoBiQuant changes a few thresholds; the static way
#    loads another checkpoint;
# 4. **text generated** at 2, 4 and 8 bits, and a schedule that switches between tokens;
# 5. what the **paper reports** for LLaMA models, for scale.

# %%
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import mbq_ref
from mbq_ref.chapter import chapter3_windows, setup_chapter, show_table
from mbq_ref.baselines import baseline_perplexities
from mbq_ref.cache import cached, cached_mobiquant, cached_static, model_key, tensor_sha256
from mbq_ref.checkpoint import load_checkpoint, load_static_checkpoint, save_checkpoint, save_static_checkpoint
from mbq_ref.data import BUNDLED, load_corpus, tokenize_corpus
from mbq_ref.generate import generate, parse_schedule
from mbq_ref.mobiquant import MoBiConfig, average_bits, layer_bits, mobi_layers, reset_bit_stats, router_cost, set_threshold
from mbq_ref.perplexity import perplexity
from mbq_ref.thresholds import calibrate_threshold, threshold_table
from mbq_ref.zoo import load_model

setup_chapter()  # one thread unless OMP_NUM_THREADS is set, seed 0, no progress bars (see mbq_ref.chapter)
T0 = time.time()
SEQLEN, MAX_WINDOWS = 256, 8  # evaluation windows: the first 8 x 256 tokens of each test split
ROOT = Path(mbq_ref.__file__).resolve().parent.parent
print("mbq_ref", mbq_ref.__version__, "| torch", torch.__version__, "| threads", torch.get_num_threads())

# %%
model, tok = load_model("tiny-llama", with_tokenizer=True)
test = {d: tokenize_corpus(tok, load_corpus(d, "test")) for d in BUNDLED}
cfg = MoBiConfig.tiny()
calib, _ = chapter3_windows(tok, cfg.calib)  # chapter 3b's calibration windows, so its cached calibrations apply


def ppl(m, domain: str) -> float:
    return perplexity(m, test[domain], seqlen=SEQLEN, max_windows=MAX_WINDOWS, batch_size=8, progress=False).ppl


fp = {d: ppl(model, d) for d in BUNDLED}
print("calibration:", cfg.calib.dataset, tuple(calib.shape), "| FP perplexity:", {d: round(v, 2) for d, v in fp.items()})

# %% [markdown]
# ## 1. One MoBiQuant checkpoint
#
# The calibrated model is chapter 3's: the two-stage calibration of Alg. 1
# (`MoBiConfig.tiny()`: 32 windows of 256 `austen` tokens), taken from `runs/cache/` when
# chapter 3 (or an earlier run of this one) made it with the same code, model, windows and
# settings (`mbq_ref.cache.cached_mobiquant`), and calibrated now otherwise. We then build
# the **threshold table** with `mbq_ref.thresholds.threshold_table` (default mode, global):
# for each target average bit-width $b^*$ it searches the one global threshold whose
# *measured* average bits on 4 calibration windows hits the target,
#
# $$\tau(b^*) = \arg\min_\tau \bigl|\,\bar b(\tau) - b^*\bigr|, \qquad
#   \bar b(\tau) = \frac{\sum_\ell N_\ell K_\ell\, \bar b_\ell(\tau)}{\sum_\ell N_\ell K_\ell},$$
#
# (each probe is a forward pass: routing in early layers changes what later layers see), and
# stores the bits it measured. `save_checkpoint` writes everything — slice codes, scales,
# zeros, routers, the table, embeddings and tokenizer — into one safetensors file, kept in
# the cache too.

# %%
SWEEP = [2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0]  # the bit-widths this chapter evaluates
TABLE_WINDOWS = 4  # calibration windows the threshold table measures bits on


def build_checkpoint(folder: Path) -> None:
    """Chapter 3's calibrated model, its threshold table for SWEEP, saved as one MoBiQuant checkpoint."""
    m, log = cached_mobiquant("tiny-llama", calib, cfg)
    t0 = time.perf_counter()
    table = threshold_table(m, calib[:TABLE_WINDOWS], SWEEP)
    meta = {
        "base_model": "tiny-llama",
        "calibration": {"config": log["config"], "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
                        "threshold_windows": TABLE_WINDOWS},
        "results": {"calibration_seconds": round(log["seconds"], 2),
                    "threshold_table_seconds": round(time.perf_counter() - t0, 2)},
    }  # fmt: skip
    save_checkpoint(m, folder / "mobiquant.safetensors", meta, tokenizer=tok, thresholds=table)


key = {**model_key("tiny-llama"), "calib_ids": tensor_sha256(calib), "config": asdict(cfg), "targets": SWEEP,
       "table_windows": TABLE_WINDOWS}  # fmt: skip
ck = load_checkpoint(cached("ch4-checkpoint", key, build_checkpoint) / "mobiquant.safetensors", expect_model="tiny-llama")
mq = ck.model
torch.manual_seed(0)  # the same random state whether the checkpoint was built now or read from the cache
print(f"{ck.path.name}: {ck.path.stat().st_size / 2**20:.2f} MiB, {len(mobi_layers(mq))} MoBiLinear layers, "
      f"threshold table {ck.table.targets.tolist()}; calibrated in {ck.meta['results']['calibration_seconds']:.0f} s")  # fmt: skip
rc = router_cost(mq)  # the routers are part of the checkpoint: count their bits and FLOPs too
print(f"routers ({rc['routing']}, hidden {rc['hidden']}): {rc['router_params']:,} parameters = "
      f"{rc['router_bits_per_weight']:.3f} extra bits per quantized weight at fp16 (add it to every 'bits' below for the "
      f"true bits per weight), {100 * rc['router_flops_per_slice_flops']:.1f} % of one slice's FLOPs per token")

# %% [markdown]
# ## 2. Static per-bit baselines
#
# The static alternative calibrates OmniQuant's learnable weight clipping (LWC) **once per
# width** — the paper's "bit-specific calibrated PTQ" — and ships one checkpoint per width.
# We calibrate at 2, 3 and 4 bits with the **same calibration settings as MoBiQuant**
# (`cfg.calib`: the same windows, epochs, batch and learning rate per stage, and the same
# group size; chapter 3's models, from the same cache), and save each as a static checkpoint
# with bit-packed codes (`save_static_checkpoint`). RTN (round-to-nearest, no calibration)
# and MSB truncation of one 8-bit RTN code (`mbq_ref.baselines`) need no calibration.

# %%
STATIC_BITS = (2, 3, 4)


def static_file(bits: int) -> Path:
    """LWC at ``bits`` with MoBiQuant's calibration settings, saved as a static checkpoint (cached)."""

    def build(folder: Path) -> None:
        m = cached_static("tiny-llama", calib, bits, cfg.calib, cfg.group_size)
        save_static_checkpoint(m, folder / f"lwc_w{bits}.safetensors", {"base_model": "tiny-llama", "calib": vars(cfg.calib)})

    k = {**model_key("tiny-llama"), "calib_ids": tensor_sha256(calib), "config": asdict(cfg.calib), "group_size": cfg.group_size}
    return cached(f"ch4-lwc-w{bits}", k, build) / f"lwc_w{bits}.safetensors"


lwc_files = {b: static_file(b) for b in STATIC_BITS}
lwc = {b: load_static_checkpoint(p, expect_model=model).model for b, p in lwc_files.items()}
print({b: f"{p.stat().st_size / 2**20:.2f} MiB" for b, p in lwc_files.items()})

# %% [markdown]
# ## 3. Perplexity vs average bits, on three domains
#
# For MoBiQuant, `ck.set_bits(b)` installs the table's thresholds for target `b` (no
# recalibration) and the bits are then **measured** on the test windows: the routers see
# text they were not calibrated on, so the measured average can drift from the target —
# especially on `bible` and `shakespeare`, which the routers never saw.

# %%
rows = []  # (domain, method, bits, ppl)
for d in BUNDLED:
    for b in SWEEP:
        ck.set_bits(b)
        reset_bit_stats(mq)
        p = ppl(mq, d)
        rows.append((d, "MoBiQuant", average_bits(mq), p))
    for b, m in lwc.items():
        rows.append((d, "LWC (per-bit)", float(b), ppl(m, d)))

# %% [markdown]
# The uncalibrated baselines on the same windows: RTN at each width (one checkpoint per
# width) and MSB truncation of one 8-bit RTN code.

# %%
for d in BUNDLED:
    base = baseline_perplexities(model, test[d], methods=("rtn", "msb"), bits=(2, 3, 4, 6, 8), seqlen=SEQLEN,
                                 max_windows=MAX_WINDOWS)  # fmt: skip
    for meth, label in (("rtn", "RTN (per-bit)"), ("msb", "MSB truncation")):
        rows += [(d, label, float(b), v) for b, v in base[meth].items()]

methods = ["MoBiQuant", "LWC (per-bit)", "RTN (per-bit)", "MSB truncation"]
print(f"tiny-llama, each domain's test split, first {MAX_WINDOWS} windows x {SEQLEN} tokens (this chapter's setting; "
      f"full precision {', '.join(f'{d} {v:.2f}' for d, v in fp.items())})")
print(f"{'domain':12s} {'method':15s}  (measured bits, PPL) at each point")
for d in BUNDLED:
    for meth in methods:
        pts = [(b, p) for dd, mm, b, p in rows if dd == d and mm == meth]
        print(f"{d:12s} {meth:15s} " + " ".join(f"({b:4.2f}, {p:6.2f})" for b, p in pts))

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=False)
styles = {"MoBiQuant": "o-", "LWC (per-bit)": "^--", "RTN (per-bit)": "x--", "MSB truncation": "s:"}
for ax, d in zip(axes, BUNDLED):
    for meth in methods:
        pts = sorted((b, p) for dd, mm, b, p in rows if dd == d and mm == meth)
        ax.plot([b for b, _ in pts], [p for _, p in pts], styles[meth], label=meth, mfc="none")
    ax.axhline(fp[d], color="k", lw=0.8, ls=":", label="FP32")
    ax.set(title=f"{d} test" + (" (calibration domain)" if d == cfg.calib.dataset else ""),
           xlabel="average bits per weight (measured)", ylabel="perplexity")  # fmt: skip
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Pareto view.** A configuration is *Pareto-optimal* if no other one has both fewer bits
# and a lower perplexity. We pool every (bits, PPL) point of every method on `austen` and
# mark the frontier.

# %%
pts = [(b, p, meth) for d, meth, b, p in rows if d == "austen"]
frontier, best = [], float("inf")
for b, p, meth in sorted(pts):
    if p < best:
        frontier.append((b, p, meth))
        best = p
plt.figure(figsize=(6.4, 4.2))
for meth in methods:
    xs = [(b, p) for b, p, mm in pts if mm == meth]
    plt.plot(*zip(*xs), styles[meth].replace("-", "").replace(":", ""), label=meth, mfc="none")
plt.step([b for b, _, _ in frontier], [p for _, p, _ in frontier], "k-", where="post", lw=0.8, label="Pareto frontier")
plt.xlabel("average bits per weight")
plt.ylabel("perplexity (austen test)")
plt.legend(fontsize=8)
plt.show()
print("Pareto frontier:", ", ".join(f"{meth} @ {b:.2f} bits ({p:.2f})" for b, p, meth in frontier))

# %% [markdown]
# **Reading the numbers.** The bundled model (trained on 30M tokens) is sensitive to weight
# quantization: 2-bit RTN costs tens of percent of perplexity and 3 bits still costs a
# visible amount, while from 4 bits up every method comes close to full precision (the
# printed rows above; chapter 1's `docs/results_ch1.md` gives the same picture with standard
# errors). This is an 8-window evaluation, so small gaps are within window-to-window noise;
# chapter 3 (`docs/results_ch3.md`) states the MoBiQuant-vs-LWC gaps with paired standard
# errors: at **2 bits** the elastic checkpoint beats LWC calibrated at 2 bits, at **3 bits**
# LWC calibrated for that one width is still better than the routed checkpoint (one
# calibration for every width costs the clipping its specialisation). Compare the `austen`
# rows above with that verdict. Claims we can check (asserted, so the notebook fails if they
# stop holding):
#
# * on the calibration domain, the measured bits follow the target (within 0.3 bits);
# * at 8 bits MoBiQuant is within 1% of full precision, and its perplexity at the top of the
#   sweep is below the bottom of it;
# * at 2 bits MoBiQuant beats RTN on every domain, and MSB truncation on average over the
#   three domains (geometric mean).

# %%
def point(d, meth, target):
    """The (bits, PPL) row of one method nearest a bit-width."""
    cand = [(b, p) for dd, mm, b, p in rows if dd == d and mm == meth]
    return min(cand, key=lambda r: abs(r[0] - target))


def geomean(xs):
    return float(torch.tensor(xs).log().mean().exp())


mq_austen = [(b, p) for d, mm, b, p in rows if d == "austen" and mm == "MoBiQuant"]
for (bits, _), target in zip(mq_austen, SWEEP):
    assert abs(bits - target) <= 0.3, (bits, target)
assert point("austen", "MoBiQuant", 8)[1] <= fp["austen"] * 1.01
assert mq_austen[-1][1] < mq_austen[0][1]
at2 = {meth: [point(d, meth, 2)[1] for d in BUNDLED] for meth in methods}
assert all(m < r for m, r in zip(at2["MoBiQuant"], at2["RTN (per-bit)"]))
assert geomean(at2["MoBiQuant"]) < geomean(at2["MSB truncation"])
print("2-bit PPL, geometric mean over the domains:", {m: round(geomean(v), 2) for m, v in at2.items()})

# %% [markdown]
# ## 4. The cost of switching precision
#
# With MoBiQuant, changing the precision of a *loaded* model is `ck.set_bits(b)`: one
# float threshold per layer is written, no weight byte moves. With static PTQ, serving
# another width means loading another checkpoint. We measure both.

# %%
n_layers = len(mobi_layers(mq))
t0 = time.perf_counter()
for i in range(50):
    ck.set_bits(2.0 if i % 2 else 6.0)
switch_s = (time.perf_counter() - t0) / 50
reload = {}
for b, path in lwc_files.items():
    t0 = time.perf_counter()
    load_static_checkpoint(path)
    reload[b] = (path.stat().st_size, time.perf_counter() - t0)
print(f"MoBiQuant switch: {1e6 * switch_s:8.1f} µs, {8 * n_layers} bytes of thresholds, 0 weight bytes")
for b, (nbytes, secs) in reload.items():
    print(f"reload LWC {b}-bit: {1e3 * secs:8.1f} ms, {nbytes:,} bytes read")
mobi_bytes = ck.path.stat().st_size
print(f"storage: one MoBiQuant file {mobi_bytes:,} bytes (every width 2..8) vs 2+3+4-bit static files "
      f"{sum(v[0] for v in reload.values()):,} bytes (three widths)")
emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
fp_floats = emb.numel() + (0 if head.data_ptr() == emb.data_ptr() else head.numel())  # tied weights count once
q_weights = sum(m.in_features * m.out_features for m in mobi_layers(mq).values())
print(f"of which full precision in every file: embeddings + lm_head, {fp_floats // emb.shape[1]:,} x {emb.shape[1]} "
      f"= {fp_floats:,} floats ({4 * fp_floats:,} bytes), against {q_weights:,} quantized weights")
assert all(switch_s < secs / 10 for _, secs in reload.values())

# %% [markdown]
# (Both file sizes include the full-precision embeddings and `lm_head` counted above, which
# dominate a model this small; in a 7B model the quantized layers dominate and one 8-bit
# nested file is smaller than the 2+3+4+6+8-bit set of static files.)
#
# ## 5. Generated text at 2, 4 and 8 bits
#
# Greedy continuations of the same prompt at three budgets, then one generation whose budget
# switches between tokens (`2:8,8:16`: 2 bits for 8 tokens, then 8 bits). The bits printed
# per token are measured from the layers' routing counters.

# %%
prompt = "It was a fine morning, and Anne"
texts = {}
for b in (2.0, 4.0, 8.0):
    g = generate(mq, ck.tokenizer, prompt, ck.set_bits, bits=b, max_new_tokens=24)
    texts[b] = g
    print(f"[{b:.0f} bits, measured {sum(s.measured_bits for s in g.steps) / len(g.steps):.2f}] {prompt}{g.text!r}\n")

g = generate(mq, ck.tokenizer, prompt, ck.set_bits, schedule=parse_schedule("2:8,8:16"), max_new_tokens=16)
print(g.table())
assert [s.measured_bits for s in g.steps[:8]] == [2.0] * 8 and [s.measured_bits for s in g.steps[8:]] == [8.0] * 8

# %% [markdown]
# ## 6. What the paper reports (LLaMA models) — *the paper's numbers, not ours*
#
# These values are transcribed from the paper (by figure and table; `docs/paper.md` lists them
# with what the paper states around them) for scale; nothing in this repository produced them. Our tiny model is
# ~5M parameters and its perplexities are not comparable.

# %%
PAPER_REPORTED = [  # (setting, model, metric, value, source in the paper)
    ("calibrated at 3 bits, run at 4 bits", "LLaMA3-8B", "WikiText2 PPL", 10.06, "Fig. 1"),
    ("calibrated at 3 bits, top-10% 3-bit outlier tokens kept at 3 bits, rest at 4", "LLaMA3-8B", "WikiText2 PPL", 9.01, "Fig. 1"),
    ("calibrated at 4 bits, run at 4 bits", "LLaMA3-8B", "WikiText2 PPL", 7.41, "Fig. 1"),
    ("MoBiQuant (token-routed, 4 bits)", "LLaMA3-8B", "WikiText2 PPL", 7.31, "Fig. 1"),
    ("AnyPrecisionLLM @ 2 bits", "LLaMA2-7B", "WikiText2 PPL", "~2e3 (collapse)", "Table 1"),
    ("AnyBCQ @ 2 bits", "LLaMA2-7B", "WikiText2 PPL", 15.38, "Table 1"),
    ("MoBiQuant @ 2 bits", "LLaMA2-7B", "WikiText2 PPL", 10.91, "Table 1"),
    ("MoBiQuant decode @ 2/3/4 bits", "LLaMA2-7B", "tokens/s (A100)", "404 / 311 / 256", "Table 1"),
    ("AnyBCQ decode @ 2/3/4 bits", "LLaMA2-7B", "tokens/s (A100)", "312 / 268 / 225", "Table 1"),
    ("FP16 / OmniQuant / MoBiQuant @ 4 bits", "LLaMA3.2-1B", "GSM8K accuracy", "46.47 / 30.86 / 32.83 %", "Table 9"),
]
print("REPORTED BY THE PAPER (arXiv 2602.20191), not measured here")
print(f"{'setting':78s} {'model':12s} {'metric':16s} {'value':>24s}  source")
for setting, mdl, metric, value, src in PAPER_REPORTED:
    print(f"{setting:78s} {mdl:12s} {metric:16s} {value!s:>24s}  {src}")

# %% [markdown]
# `docs/cli.md` gives the commands for the LLaMA3-8B row (`mbq quantize --model
# meta-llama/Meta-Llama-3-8B --preset paper --calib wikitext2 ...`, then `mbq eval ... --bits 4
# --dataset wikitext2 --seqlen 2048`), but they have not been run, and with the reference
# torch path they do not fit one 80 GB GPU: `MoBiLinear` keeps the full-precision weight and
# dequantized per-slice weights, 20 to 40 bytes per weight. The packed backend
# (`mbq_ref/packed.py`: bit-planes, scales and zero points only, served by the `cuda_numba`
# kernels) is the lower-memory path; it is tested in the CUDA simulator, not yet on a GPU.

# %%
print(f"chapter ran in {time.time() - T0:.0f} s")

# %% [markdown]
# ## Summary
#
# * One MoBiQuant file serves every average precision from 2 to 8 bits; switching is a
#   threshold change measured in microseconds, against a full checkpoint load per width
#   for static PTQ.
# * The threshold table is fitted on calibration windows; on the test windows of the same
#   domain the measured bits follow the targets closely, on other domains they drift
#   (the routers react to the text), which is why we always report *measured* bits.
# * Perplexity falls as the budget rises and reaches full precision at 8 bits; at 2 bits the
#   calibrated base slice beats uncalibrated RTN on every domain.
# * The bundled model is sensitive enough to quantization for the gaps to show: the elastic
#   checkpoint wins clearly at 2 bits, while at 3 bits a static LWC model calibrated for that
#   one width is still better (chapter 3 measures both with paired standard errors, and
#   compares routing with random, oracle and static-mix controls). Its perplexities are not
#   comparable with the paper's LLaMA numbers, which are in the table above for scale.
#
# ## Exercises
#
# 1. Re-run the sweep with one threshold **per layer** (`calibrate_threshold(mq, calib[:4],
#    target, mode="per_layer")`) instead of the table's global τ. Which layers spend more bits
#    under a global τ (compare with `mbq_ref.mobiquant.layer_bits`), and does perplexity change?
# 2. Calibrate on `bible` instead of `austen` (`cfg.calib.dataset = "bible"`) and redo the
#    three-domain plot. Is the drift of the measured bits symmetric?
# 3. Time `ck.set_bits` against `load_static_checkpoint` on a bigger random Llama
#    (`mbq_ref.zoo.random_llama(hidden=1024, layers=8)`). How do the two costs scale?
#
# ## Solutions
#
# Try the exercises first. Each solution runs below in seconds: 1 reuses this chapter's
# checkpoint, 2 runs a reduced calibration (4 windows, one epoch), 3 uses small random models.
#
# **1. One threshold per layer.** The per-layer controller gives every layer the same mean
# bits on the calibration windows; the global table's single τ lets the routers' score
# scales decide how the bits are spread over the layers:

# %%
per_layer_rows = []
for b in (2.5, 3.0, 4.0):
    ck.set_bits(b)  # the table's global tau
    reset_bit_stats(mq)
    p_glob = ppl(mq, "austen")
    bits_glob, lb_glob = average_bits(mq), layer_bits(mq)
    calibrate_threshold(mq, calib[:TABLE_WINDOWS], b, mode="per_layer")
    reset_bit_stats(mq)
    p_pl = ppl(mq, "austen")
    per_layer_rows.append((b, bits_glob, p_glob, average_bits(mq), p_pl))
    spread = max(lb_glob.values()) - min(lb_glob.values())
    top = max(lb_glob, key=lb_glob.get)
    print(f"{b:.1f} bits | global tau: {bits_glob:.2f} bits, PPL {p_glob:.2f} (layers from {min(lb_glob.values()):.2f} "
          f"to {max(lb_glob.values()):.2f} bits, most in {top}) | per-layer tau: {average_bits(mq):.2f} bits, "
          f"PPL {p_pl:.2f}")  # fmt: skip
_ = ck.set_bits(4.0)  # back to 4 bits (set_bits returns the thresholds it installed)

# %% [markdown]
# The printed spread is what a global τ does with the layers (on the test windows); the
# perplexities on the same windows say whether evening it out helps. With only 8 windows,
# differences of a few tenths are within window-to-window noise (chapter 3 states this
# comparison with paired standard errors).
#
# **2. Calibrate on `bible`.** A reduced calibration (4 windows of 256 tokens, one epoch
# per stage, so it runs in seconds; not comparable in quality with Section 1's), its own
# threshold table on `bible` windows, and the bits measured at a 3-bit target on every domain,
# next to Section 3's austen-calibrated checkpoint at the same target:

# %%
from dataclasses import replace

from mbq_ref.data import calibration_windows

cfg_b = replace(cfg, calib=replace(cfg.calib, dataset="bible", nsamples=4, epochs=1))
train_b = tokenize_corpus(tok, load_corpus("bible", "train")[:100_000])
calib_b = calibration_windows(train_b, cfg_b.calib.nsamples, cfg_b.calib.seqlen, seed=cfg_b.calib.seed)
mq_b, _ = cached_mobiquant("tiny-llama", calib_b, cfg_b)
set_threshold(mq_b, threshold_table(mq_b, calib_b, [3.0])[3.0]["logits"], logit=True)
ck.set_bits(3.0)
drift_rows = []
for d in BUNDLED:
    got = {}
    for label, m_ in (("austen", mq), ("bible", mq_b)):
        reset_bit_stats(m_)
        ppl(m_, d)
        got[label] = average_bits(m_)
    drift_rows.append([d, f"{got['austen']:.3f}", f"{got['bible']:.3f}"])
show_table(["test domain", "calibrated on austen: bits", "calibrated on bible (reduced): bits"], drift_rows,
           caption=f"Measured bits at a 3-bit target; tiny-llama, each domain's test split, first {MAX_WINDOWS} x {SEQLEN} tokens");  # fmt: skip
off_domain = {r[0]: (float(r[1]) - 3.0, float(r[2]) - 3.0) for r in drift_rows}
print("drift off the calibration domain: "
      f"austen-calibrated on bible {off_domain['bible'][0]:+.3f}, bible-calibrated on austen {off_domain['austen'][1]:+.3f}")
_ = ck.set_bits(4.0)  # back to 4 bits (set_bits returns the thresholds it installed)

# %% [markdown]
# The drift is not symmetric by any rule: the routers of each model react to how familiar
# the text is, and the printed drifts (each model on the other's domain) say by how much on
# these windows.
#
# **3. Switching cost at scale.** `ck.set_bits` writes one threshold per quantized layer, so
# its cost depends on the number of layers only; loading a static checkpoint reads and
# dequantizes every packed weight. Timed on static RTN files of two random Llamas that differ
# only in width (4x the weights per layer), and `set_bits` on this chapter's checkpoint:

# %%
import tempfile

from mbq_ref.fakequant import quantize_model
from mbq_ref.zoo import random_llama

load_s = {}
with tempfile.TemporaryDirectory() as tmp:
    for hidden in (256, 512):
        path = save_static_checkpoint(quantize_model(random_llama(hidden=hidden, layers=2), bits=3, group_size=128),
                                      Path(tmp) / f"w3_h{hidden}.safetensors")  # fmt: skip
        t = time.perf_counter()
        for _ in range(3):
            load_static_checkpoint(path)
        load_s[hidden] = (time.perf_counter() - t) / 3
t = time.perf_counter()
for b in (2.0, 3.0, 4.0) * 10:
    ck.set_bits(b)
switch_ms = (time.perf_counter() - t) / 30 * 1e3
print(f"load_static_checkpoint: {load_s[256] * 1e3:.0f} ms (hidden 256), {load_s[512] * 1e3:.0f} ms (hidden 512), "
      f"x{load_s[512] / load_s[256]:.1f} for 4x the weights per layer; ck.set_bits: {switch_ms:.2f} ms "
      f"({len(mobi_layers(mq))} layers)")
_ = ck.set_bits(4.0)  # back to 4 bits (set_bits returns the thresholds it installed)

# %% [markdown]
# Loading reads and dequantizes every weight, so its time grows with the width (the printed
# ratio; building the model and reading the header are part of it and do not grow as fast),
# while a `set_bits` switch touches one threshold per layer, whatever the width. Both are
# wall-clock times on a shared CPU: read the ratio, not the digits.
