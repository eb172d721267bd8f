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
# # Chapter 2 — MoBiSlice: one checkpoint, every precision
#
# MoBiQuant (Sec. 4.1 and App. B of [arXiv 2602.20191](https://arxiv.org/abs/2602.20191))
# stores each weight **once**, as an 8-bit integer made of four 2-bit *slices*. Reading the
# first `k` slices gives a `2k`-bit weight, so a single checkpoint serves 2, 4, 6 and 8 bits,
# and the router of chapter 3 can pick the slice count per token. The slices come from
# **recursive residual quantization**: slice 1 quantizes the weight on a coarse grid, slice 2
# quantizes what slice 1 missed on a grid 4× finer, and so on. The mapping is
# **floor-aligned** ("truncation-ready", App. B), which makes a lower precision literally the
# top bits of a higher one.
#
# What you will learn:
# 1. the recursion on a handful of numbers, and a picture of the nested grids;
# 2. three claims checked numerically on the real model: nesting (lower precision = top
#    bits), the error bound `s_k / 2` for every weight in the clip range, and the memory
#    saving of one many-in-one checkpoint (8 bits/weight) over four separate ones
#    (20 bits/weight) — and why the zero point must be rounded on the *finest* grid;
# 3. how MoBiSlice compares with the any-precision alternatives — independent RTN per
#    bit-width and MSB truncation of an 8-bit RTN code (MatQuant-style) — in
#    reconstruction error and perplexity;
# 4. the **clipping tension**: one clip range is shared by all precisions, and what is best
#    for 2 bits is bad for 8 bits;
# 5. what calibrating the base slice (Alg. 1, Stage 1) does at each slice count.
#
# Runtime: about a minute on 2 idle CPU cores.

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import mbq_ref
from mbq_ref.chapter import setup_chapter
from mbq_ref.baselines import (
    baseline_perplexities,
    baseline_weights,
    clip_tension,
    memory_accounting,
    reconstruction_errors,
    relative_error,
)
from mbq_ref.calibrate import calibrate_blocks
from mbq_ref.data import calibration_windows, load_corpus, tokenize_corpus
from mbq_ref.fakequant import quantizable_linears
from mbq_ref.mobilinear import MoBiLinear
from mbq_ref.mobiquant import MoBiConfig, mobi_layers, set_slices
from mbq_ref.mobislice import SlicedWeight, cumulative_bits, dequant_codes, nested_code, slice_codes
from mbq_ref.perplexity import perplexity
from mbq_ref.results import generated_by, record
from mbq_ref.zoo import load_model

T0 = time.time()
setup_chapter()  # one thread unless OMP_NUM_THREADS is set, seed 0, no progress bars (see mbq_ref.chapter)
SLICES = (2, 2, 2, 2)  # the paper's default slice_bits_list (App. C.1)
WIDTHS = cumulative_bits(SLICES)  # [2, 4, 6, 8]
print("mbq_ref", mbq_ref.__version__, "| torch", torch.__version__, "| widths", WIDTHS)

# %% [markdown]
# ## 1. Recursive residual slicing, by hand
#
# One group of weights shares a scale `s` and a zero point (App. B: "the first slice uses the
# calibrated scale and zero point"). The base slice reads the zero point as `z_1`; we store it
# on the finest (8-bit) grid as the integer `z_E = z_1 · 4^3`, so `z_1` itself may be a
# fraction like 85/64 (section 2 shows why). Then
#
# * **base slice** (floor, mid-rise):
#
#   $$q_1 = \mathrm{clamp}\bigl(\lfloor W/s + z_1 \rfloor,\ 0,\ 3\bigr), \qquad \hat W_1 = s\,(q_1 - z_1 + \tfrac12);$$
#
# * **residual slice e > 1**: the step shrinks by $2^{b_e}$, the zero point is the fixed
#   mid-code 2, and the slice quantizes what is left:
#
#   $$s_e = \frac{s_{e-1}}{4}, \qquad q_e = \mathrm{clamp}\Bigl(\Bigl\lfloor \frac{W - \hat W_{e-1}}{s_e} \Bigr\rfloor + 2,\ 0,\ 3\Bigr),
#   \qquad \hat W_e = \hat W_{e-1} + s_e\,(q_e - 2 + \tfrac12).$$
#
# The `+½` puts each reconstruction in the middle of its cell, so the residual after slice
# `e−1` lies in `[−s_{e−1}/2, s_{e−1}/2)` — exactly the interval the 4 cells of the next
# slice tile. Eight weights, with `s = 0.5` and `z_1 = 1` (`z_E = 64`) picked by hand so the
# numbers stay short (how `s` and `z_E` follow from a group's range is section 2's topic):

# %%
w_toy = torch.tensor([[-0.5, -0.21, 0.0, 0.13, 0.42, 0.77, 1.08, 1.5]], dtype=torch.float64)
s_toy = torch.tensor(0.5, dtype=torch.float64)
z_toy = torch.tensor(1.0, dtype=torch.float64)  # base zero point z_1
zE_toy = z_toy * 4**3  # stored zero point, on the 8-bit grid
print(f"s = {s_toy.item()}, z_1 = {z_toy.item():.0f} (z_E = {zE_toy.item():.0f}), covered range "
      f"[{-z_toy.item() * s_toy.item()}, {(4 - z_toy.item()) * s_toy.item()})")


def slice_by_hand(w, s, z, bits=SLICES):
    """The recursion above, one slice at a time (teaching version of mobislice.slice_codes); z is z_1."""
    q = torch.clamp(torch.floor(w / s + z), 0, 2 ** bits[0] - 1)  # base code q_1
    w_hat, code, s_e = s * (q - z + 0.5), q.clone(), s
    codes, recons = [q], [w_hat]
    for b in bits[1:]:
        s_e = s_e / 2**b  # next step = previous / 2^b
        q_e = torch.clamp(torch.floor((w - w_hat) / s_e) + 2 ** (b - 1), 0, 2**b - 1)  # residual code
        w_hat = w_hat + s_e * (q_e - 2 ** (b - 1) + 0.5)
        code = code * 2**b + q_e  # append the slice's bits: Q_k = Q_{k-1} << b | q_k
        codes.append(q_e)
        recons.append(w_hat)
    return codes, recons, code


codes, recons, Q = slice_by_hand(w_toy, s_toy, z_toy)
print(f"{'W':>6s} | q1 q2 q3 q4 | Q (binary) | {'Ŵ_1':>8s} {'Ŵ_2':>8s} {'Ŵ_3':>9s} {'Ŵ_4':>10s}")
for i in range(w_toy.shape[1]):
    qs = " ".join(f"{int(c[0, i]):2d}" for c in codes)
    ws = " ".join(f"{r[0, i].item():9.6f}" for r in recons)
    print(f"{w_toy[0, i].item():6.2f} | {qs} | {int(Q[0, i]):08b}   | {ws}")

# %% [markdown]
# Read the row of `W = 0.42`: slice 1 puts it in cell 1 (`Ŵ_1 = 0.25`), slice 2 adds
# `+1.5 · 0.125`, slice 3 `−0.5 · 0.03125`, slice 4 `−0.5 · 0.0078125`; the stored byte
# `01 11 01 01` is the four 2-bit codes side by side. The two range ends sit on cell edges:
# `−0.5` gets all-zero codes and `1.5` (clamped into the top cell) all-three codes, and both
# are off by exactly `s_k / 2` at every `k` — the bound checked below is tight.
#
# The package version (`mbq_ref.mobislice`) computes the same codes, and rebuilds every
# precision from the stored byte alone by **shift-and-add**:
# `Ŵ_k = s_k (Q_k − z_k + ½)` with `Q_k = Q_4 >> (8 − 2k)`, `s_k = s / 4^{k−1}`,
# `z_k = z_E / 4^{4−k}` (Sec. 4.3: one shared scale and zero point, no per-precision parameters).

# %%
pkg_codes = slice_codes(w_toy, s_toy.view(1, 1), zE_toy.view(1, 1), SLICES, group_size=8)
assert torch.equal(pkg_codes.long(), Q.long()), "hand recursion and mobislice.slice_codes disagree"
for k in range(1, 5):
    w_k = dequant_codes(pkg_codes, s_toy.view(1, 1), zE_toy.view(1, 1), SLICES, k, 8, torch.float64)
    assert torch.allclose(w_k, recons[k - 1], rtol=0, atol=1e-12), f"shift-and-add differs from the recursion at k={k}"
    s_k = s_toy / 4 ** (k - 1)
    assert ((w_toy - w_k).abs() <= s_k / 2 + 1e-12).all()
print("hand recursion == package codes; shift-and-add == recursion at k = 1..4; |W - Ŵ_k| <= s_k/2")

# %% [markdown]
# ### The nested grids
# Each row below is one precision. Vertical ticks are cell edges, dots the reconstruction
# levels (cell centres). Every cell of row `k` is split into exactly 4 cells of row `k+1`,
# so the path of a weight (red) can only *refine*: it never jumps to another coarse cell.
# The right panel shows why independent RTN grids cannot do this: most 4-bit decision edges
# (midpoints between levels, red) fall *inside* 6-bit cells, so a 6-bit code does not even
# determine the 4-bit code (63 steps are not a multiple of 15). At 2 vs 4 bits the RTN cells
# happen to align (15 = 5 · 3), but even there the 2-bit code is `round(q_4 / 5)`, not a shift.

# %%
lo, hi = -z_toy.item() * s_toy.item(), (4 - z_toy.item()) * s_toy.item()  # the 4 base cells
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 2]})
ax = axes[0]
for k in range(1, 4):
    n_cells = 4**k
    edges = np.linspace(lo, hi, n_cells + 1)
    ax.vlines(edges, k - 0.25, k + 0.25, color="0.5", lw=0.6 if k == 3 else 1.2)
    ax.plot((edges[:-1] + edges[1:]) / 2, np.full(n_cells, k), ".", color="C0", ms=3 if k == 3 else 6)
    ax.plot(recons[k - 1][0, 4].item(), k, "o", mfc="none", mec="C3", ms=11)
ax.axvline(w_toy[0, 4].item(), color="C3", ls="--", lw=1, label="W = 0.42")
for x in w_toy[0].tolist():
    ax.plot(x, 0.4, "v", color="k", ms=5)
ax.set(yticks=[1, 2, 3], yticklabels=["k=1 (2 bit)", "k=2 (4 bit)", "k=3 (6 bit)"], ylim=(0.2, 3.5),
       xlabel="weight value", title="MoBiSlice: each cell splits into 4 (nested)")
ax.legend(loc="upper left")
ax = axes[1]
xmin, xmax = w_toy.min().item(), w_toy.max().item()


def rtn_edges(b):
    """Levels and decision edges of b-bit RTN on [xmin, xmax] (2^b - 1 steps, levels on both ends)."""
    levels = np.linspace(xmin, xmax, 2**b)
    return levels, (levels[:-1] + levels[1:]) / 2


for row, b in ((1, 4), (2, 6)):
    levels, edges = rtn_edges(b)
    ax.vlines(edges, row - 0.25, row + 0.25, color="0.5")
    ax.plot(levels, np.full(2**b, row), ".", color="C1", ms=6)
for x in rtn_edges(4)[1]:
    ax.axvline(x, color="C3", ls=":", lw=1)
ax.set(yticks=[1, 2], yticklabels=["RTN 4 bit", "RTN 6 bit"], ylim=(0.4, 2.6), xlim=(xmin - 0.02, xmin + 0.62),
       xlabel="weight value (zoom on the lower end)", title="independent RTN: 4-bit edges (red) cut 6-bit cells")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The claims on the real model
# The bundled tiny Llama (`data/tiny-llama`, see chapter 0) has a few decoder layers with
# seven projections each (q/k/v/o/gate/up/down; the counts are printed below), all with an
# input dimension that is a multiple of the paper's group size 128. Embeddings and `lm_head`
# stay in full precision, as in the paper.

# %%
model, tok = load_model("tiny-llama", with_tokenizer=True)
linears = quantizable_linears(model)
weights = {name: m.weight.detach() for name, m in linears.items()}
GROUP = MoBiConfig.tiny().group_size  # 128, App. C.1
assert all(w.shape[1] % GROUP == 0 for w in weights.values())
print(f"{model.config.num_hidden_layers} decoder layers, {len(weights)} projections, {sum(w.numel() for w in weights.values()) / 1e6:.2f}M quantized weights; "
      f"shapes {sorted({tuple(w.shape) for w in weights.values()})}")

# %% [markdown]
# **Nesting and the error bound.** Slice every matrix once (uncalibrated: the range is each
# group's min/max). The scale and zero point follow from the range on the **finest** grid
# (`mobislice.floor_scale_zero`, the default `zero_grid="finest"`):
#
# $$s_8 = \frac{x_{max} - x_{min}}{2^8 - 1}, \qquad z_E = \left\lceil \frac{-x_{min}}{s_8} \right\rceil,
# \qquad s = 4^3 s_8 .$$
#
# Then `W / s_8 + z_E` lies in `[0, 256)` for every weight of the group — at `x_min` it is
# `⌈u⌉ − u ∈ [0, 1)`, at `x_max` it is below `255 + 1` — so no weight is clipped at any
# precision. For every layer check that the `k−1`-slice code is the `k`-slice code shifted
# right by 2 bits, and that **every** weight is within `s_k/2` of its reconstruction.

# %%
sliced = {n: SlicedWeight.from_float(w, SLICES, GROUP) for n, w in weights.items()}
worst = [0.0] * 4  # max |W - Ŵ_k| / (s_k / 2) over all weights
for name, sw in sliced.items():
    w = weights[name]
    for k in range(2, 5):
        assert torch.equal(nested_code(sw.codes, SLICES, k - 1), nested_code(sw.codes, SLICES, k) >> 2), name
    s = sw.scale.repeat_interleave(GROUP, 1)  # [N, K]
    for k in range(1, 5):
        ratio = (w - sw.dequant(k)).abs() / (s / 4 ** (k - 1) / 2)
        worst[k - 1] = max(worst[k - 1], ratio.max().item())
print("nesting Q_{k-1} == Q_k >> 2 holds in all", len(sliced), "layers")
print("max |W - Ŵ_k| / (s_k/2) over all weights, k = 1..4:", [f"{r:.4f}" for r in worst])
assert all(r <= 1 + 1e-5 for r in worst), "error bound s_k/2 violated: some weight is clipped"

# %% [markdown]
# ### Where to round the zero point
# A first version of this package (and a natural reading of App. B) rounded the zero point
# on the **2-bit grid** instead: `s = (x_max − x_min) / 4`, `z_1 = round(−x_min / s)`. It is
# still available as `zero_grid="base"`. Rounding `z_1` shifts the 4 base cells by up to half
# a cell (`s/2 = range/8`), and whatever falls off one end of the group is clipped — at
# *every* precision, since the residual codes saturate. Below, both rules on the same
# matrices: the share of weights with `|W − Ŵ_8| > s_8/2` (clipped), the share of the 8-bit
# squared error they carry, and the relative error `‖W − Ŵ‖_F / ‖W‖_F` (pooled over all
# matrices) next to independent RTN at each width.

# %%
def zero_rule_stats(zero_grid):
    """Clipped fraction, clipped share of the 8-bit squared error and pooled relative error per width."""
    n_clip = n_all = 0
    sq_clip = sq_all = 0.0
    num = dict.fromkeys(WIDTHS, 0.0)
    den = 0.0
    for w in weights.values():
        sw = SlicedWeight.from_float(w, SLICES, GROUP, zero_grid=zero_grid)
        s8 = sw.scale.repeat_interleave(GROUP, 1).double() / 4**3
        for k, b in enumerate(WIDTHS, start=1):
            num[b] += float(((w.double() - sw.dequant(k, torch.float64)) ** 2).sum())
        e8 = (w.double() - sw.dequant(4, torch.float64)).abs()
        clipped = e8 > s8 / 2 * (1 + 1e-5)
        n_clip, n_all = n_clip + int(clipped.sum()), n_all + w.numel()
        sq_clip, sq_all = sq_clip + float((e8[clipped] ** 2).sum()), sq_all + float((e8**2).sum())
        den += float((w.double() ** 2).sum())
    return {"clipped": n_clip / n_all, "share": sq_clip / sq_all, "err": {b: (num[b] / den) ** 0.5 for b in WIDTHS}}


rules = {"finest": zero_rule_stats("finest"), "base": zero_rule_stats("base")}
rtn_num = dict.fromkeys(WIDTHS, 0.0)
for w in weights.values():
    for b, w_hat in baseline_weights(w, "rtn", WIDTHS, GROUP).items():
        rtn_num[b] += float(((w.double() - w_hat.double()) ** 2).sum())
rtn_pooled = {b: (rtn_num[b] / sum(float((w.double() ** 2).sum()) for w in weights.values())) ** 0.5 for b in WIDTHS}
print(f"{'rule':26s}{'clipped':>9s}{'8-bit err share':>17s}" + "".join(f"{b:>9d}b" for b in WIDTHS))
for name, r in rules.items():
    print(f"{'zero_grid=' + repr(name):26s}{100 * r['clipped']:8.2f}%{100 * r['share']:16.1f}%"
          + "".join(f"{r['err'][b]:10.4f}" for b in WIDTHS))
print(f"{'RTN, one grid per width':26s}{'':26s}" + "".join(f"{rtn_pooled[b]:10.4f}" for b in WIDTHS))
share_clipped = rules["base"]["share"]
assert rules["finest"]["clipped"] == 0 and rules["base"]["clipped"] > 0
assert share_clipped > 0.5, "expected the clipped weights to dominate the 8-bit error of the base-grid rule"
assert rules["finest"]["err"][8] <= 1.05 * rtn_pooled[8]  # finest grid: as good as RTN at 8 bits

# %% [markdown]
# With the zero point on the 2-bit grid about one weight in a hundred is clipped, yet those
# weights carry most of the 8-bit error, which ends up several times RTN's (the assertions
# above check the direction, the table gives the sizes). On the finest grid nothing is
# clipped, the 8-bit error matches RTN, and the 2- and 4-bit errors are lower too: the base
# cells are no longer shifted off the range. The rest of this chapter, and the package, use
# the finest grid; old checkpoints (format version 1, zero point on the 2-bit grid) are refused.

# %% [markdown]
# **Memory.** One many-in-one checkpoint stores 8 code bits per weight plus one fp16 scale and
# one 8-bit zero point per group of 128; four separate 2/4/6/8-bit checkpoints store
# 2+4+6+8 = 20 code bits and four scale/zero sets. (MSB truncation is also a many-in-one
# layout: one 8-bit code and one set.)

# %%
mem = memory_accounting(model, (2, 4, 6, 8), GROUP)
print(mem.table())
print(f"separate / many-in-one: {mem.ratio:.3f} (code bits only: {mem.weight_bits_ratio})")
assert mem.weight_bits_ratio == 20 / 8
assert mem.many_in_one_bytes == sum(sw.nbytes for sw in sliced.values())  # agrees with the stored codes
assert abs(mem.ratio - (20 + 4 * 24 / GROUP) / (8 + 24 / GROUP)) < 1e-3

# %% [markdown]
# ## 3. MoBiSlice vs the any-precision baselines
# Three ways to serve 2/4/6/8 bits (all per group of 128, asymmetric, uncalibrated —
# `mbq_ref.baselines`):
#
# | method | checkpoint | how width `b` is read |
# |---|---|---|
# | `rtn` | one per width (20 bits/weight) | independent round-to-nearest, `s_b = range / (2^b − 1)` |
# | `msb` | one 8-bit RTN code | top `b` bits `q_b = q_8 >> (8−b)`, read at the centre of its `2^{8−b}` fine codes |
# | `mobislice` | one 8-bit sliced code | first `b/2` slices, shift-and-add |
#
# The MSB read-back is `Ŵ = s_8 (q_b 2^{8−b} + (2^{8−b}−1)/2 − z_8)`: round-to-nearest maps
# `[q − ½, q + ½)` to code `q`, so this is the exact centre of the real interval a truncated
# code covers, and its error is at most half a coarse step, like MoBiSlice's `+½`.
# For MSB truncation we also try reading the dropped bits as zeros (`edge`) and MatQuant's
# rounding to the coarse grid (`round`, not nested: a carry can change the top bits).
# The metric is the relative reconstruction error `‖W − Ŵ‖_F / ‖W‖_F` per layer.

# %%
t0 = time.time()
errs = reconstruction_errors(weights, ("rtn", "msb", "mobislice"), WIDTHS, GROUP)
errs["msb (edge)"] = reconstruction_errors(weights, ["msb"], WIDTHS, GROUP, msb_mode="edge")["msb"]
errs["msb (round)"] = reconstruction_errors(weights, ["msb"], WIDTHS, GROUP, msb_mode="round")["msb"]
mean_err = {m: {b: float(np.mean(list(d[b].values()))) for b in WIDTHS} for m, d in errs.items()}
print(f"{'method':12s}" + "".join(f"{b:>9d}b" for b in WIDTHS), f"   ({time.time() - t0:.1f} s)")
for m, row in mean_err.items():
    print(f"{m:12s}" + "".join(f"{row[b]:10.4f}" for b in WIDTHS))
# at 8 bits the truncated code *is* the 8-bit RTN code
assert all(abs(errs["msb"][8][n] / errs["rtn"][8][n] - 1) < 1e-4 for n in weights)
# every method, every layer: more bits, less error
for m, d in errs.items():
    for name in weights:
        e = [d[b][name] for b in WIDTHS]
        assert all(a > b_ for a, b_ in zip(e, e[1:])), (m, name, e)

# %% [markdown]
# Perplexity on the `austen` test split (our stand-in for WikiText-2), GPTQ protocol with
# 256-token windows; to keep the chapter fast only the first 16 windows (4,096 tokens) are used.

# %%
SEQLEN, WINDOWS = 256, 16
test_ids = tokenize_corpus(tok, load_corpus("austen", "test"))
t0 = time.time()
fp_ppl = perplexity(model, test_ids, SEQLEN, WINDOWS, progress=False).ppl
ppl = baseline_perplexities(model, test_ids, ("rtn", "msb", "mobislice"), WIDTHS, GROUP, SEQLEN, WINDOWS)
print(f"full precision: {fp_ppl:.2f}   ({time.time() - t0:.1f} s for {1 + 3 * len(WIDTHS)} evaluations)")
print(f"{'method':12s}" + "".join(f"{b:>9d}b" for b in WIDTHS))
for m, row in ppl.items():
    print(f"{m:12s}" + "".join(f"{row[b]:10.2f}" for b in WIDTHS))
assert all(v > 0.99 * fp_ppl for row in ppl.values() for v in row.values())

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
styles = {"rtn": "o-", "msb": "s-", "mobislice": "^-", "msb (edge)": "s:", "msb (round)": "s--"}
for m, row in mean_err.items():
    axes[0].semilogy(WIDTHS, [row[b] for b in WIDTHS], styles[m], label=m)
axes[0].set(xlabel="bits per weight", ylabel=f"mean ‖W−Ŵ‖/‖W‖ over {len(weights)} layers", title="reconstruction error",
            xticks=WIDTHS)
for m, row in ppl.items():
    axes[1].plot(WIDTHS, [row[b] for b in WIDTHS], styles[m], label=m)
axes[1].axhline(fp_ppl, color="k", lw=0.8, ls="--", label="full precision")
axes[1].set(xlabel="bits per weight", ylabel="perplexity", title="austen test perplexity", xticks=WIDTHS)
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the table (the rankings are printed by the next cell, from the measured numbers):
#
# * At **2 bits** the mid-rise grids (`mobislice`, `msb` mid) have four levels *inside* the
#   range, while RTN spends two of its four levels on the range ends, where few weights live.
# * At **8 bits** independent RTN and MSB truncation coincide exactly (the 8-bit code *is* the
#   RTN code). Uncalibrated MoBiSlice, with its zero point on the finest grid, clips no weight
#   and comes close to them (with the zero point rounded on the 2-bit grid it kept a floor
#   under its error, section 2). Its code is then one floor on the 8-bit grid, so its readings
#   are MSB truncation with centred read-back of a *floor* (not round-to-nearest) 8-bit code.
#   With both on the finest grid the two nearly coincide: compare the `mobislice` and `msb`
#   rows, which differ far less in error than either differs from RTN at 2 bits. MoBiSlice's
#   advantage over MSB truncation is therefore not in the uncalibrated grid but in what the
#   slices allow afterwards (calibrating the base slice, section 5; routing, chapter 3).
# * Reading truncated codes without re-centring (`msb (edge)`) biases every weight by about
#   half a coarse step; MatQuant's rounding (`msb (round)`) avoids the bias but clips the top cell.
# * Reconstruction error is a proxy: the method with the lowest error need not have the
#   lowest perplexity, since the output error depends on which weights (and inputs) are hit.

# %%
for b in WIDTHS:
    by_err = sorted(mean_err, key=lambda m: mean_err[m][b])
    by_ppl = sorted(ppl, key=lambda m: ppl[m][b])
    print(f"{b} bit | error, best first: {', '.join(by_err)} | PPL, best first: {', '.join(by_ppl)}")

# %% [markdown]
# ## 4. The clipping tension
# The base slice's range is shared by all precisions (App. B: only the first slice has a
# calibrated scale and zero point). Shrink every group's range by a factor `c`
# (`x_min, x_max = c · min, c · max`, what LWC learns) and slice again: a tighter range makes
# the 2-bit grid finer where most weights are, but the clipped weights stay clipped at 4, 6
# and 8 bits.

# %%
FACTORS = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5]
t0 = time.time()
tension = clip_tension(weights, FACTORS, SLICES, GROUP)  # [factors, 4] pooled relative error
print(f"({time.time() - t0:.1f} s)   clip factor -> pooled relative error at k = 1..4 slices")
for c, row in zip(FACTORS, tension.tolist()):
    print(f"  c = {c:4.2f}: " + "  ".join(f"{e:.4f}" for e in row))
best = {k: FACTORS[int(tension[:, k - 1].argmin())] for k in range(1, 5)}
print("best clip factor per slice count:", best)
assert (tension[:, :-1] >= tension[:, 1:]).all(), "more slices increased the error at some clip factor"
# the tension, in weight error: some clipping helps 2 bits, every tighter clip hurts 8 bits
assert best[1] < 1.0 and (tension[1:, 3] > tension[:-1, 3]).all()

# %%
# the same tension in perplexity: clip factors at k = 1 (2 bit) and k = 4 (8 bit)
PPL_FACTORS = [1.0, 0.9, 0.8, 0.7]
t0 = time.time()
ppl_clip = {b: [baseline_perplexities(model, test_ids, ["mobislice"], (b,), GROUP, SEQLEN, WINDOWS, clip=c)
                ["mobislice"][b] for c in PPL_FACTORS] for b in (2, 8)}
print(f"({time.time() - t0:.1f} s)")
for b, row in ppl_clip.items():
    print(f"{b} bit: " + "  ".join(f"c={c}: {p:.2f}" for c, p in zip(PPL_FACTORS, row)))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for k in range(1, 5):
    axes[0].semilogy(FACTORS, tension[:, k - 1], "o-", label=f"k={k} ({2 * k} bit)")
axes[0].set(xlabel="clip factor c (range = c · min/max)", ylabel="pooled ‖W−Ŵ‖/‖W‖",
            title="one clip range for all precisions")
axes[0].invert_xaxis()
axes[0].legend()
for b, row in ppl_clip.items():
    axes[1].plot(PPL_FACTORS, [p / row[0] for p in row], "o-", label=f"{b} bit")
axes[1].set(xlabel="clip factor c", ylabel="PPL / PPL(c = 1)", title="perplexity relative to no clipping")
axes[1].invert_xaxis()
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Weight error and perplexity need not agree in detail. On this model a moderate uniform
# shrink lowers the 2-bit perplexity as well as the 2-bit weight error, while at 8 bits the
# perplexity hardly moves even though the weight error grows at every step (read both rows of
# the perplexity table). One clip factor for every group of every layer is still a blunt
# instrument: it also cuts the large weights of the groups whose outputs matter most. LWC
# (next section) learns one factor *per group*, from the block output instead of the weight
# error.

# %% [markdown]
# ## 5. The calibrated sliced model (Alg. 1, Stage 1)
# Alg. 1 starts with **first-slice stabilization**: OmniQuant's learnable weight clipping
# (LWC, `x_max = σ(γ)·max`, `x_min = σ(β)·min` per group, logits initialised at 4 so
# `σ ≈ 0.98`) is trained block by block so that each decoder block, reading **only the base
# slice**, reproduces its full-precision output (MSE, AdamW). The layers are
# `mbq_ref.mobilinear.MoBiLinear` (chapter 3 adds their router) and the loop is
# `mbq_ref.calibrate.calibrate_blocks` run with the single stage `"base"`.
# (`mbq_ref.mobiquant.quantize_mobiquant` runs this stage and then the joint slices + router
# stage; that second stage is chapter 3's subject.) Afterwards `set_slices(model, k)` makes
# every token read `k` slices of the one frozen checkpoint.
#
# The tiny preset `MoBiConfig.tiny()` (printed below) trains on a few dozen `austen`
# training windows for a few dozen AdamW steps per block, against the paper's 128 windows
# × 20 epochs = 2,560 steps: expect the clipping to move only a little.

# %%
cfg = MoBiConfig.tiny()
train_ids = tokenize_corpus(tok, load_corpus("austen", "train"))
calib_ids = calibration_windows(train_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed)  # [n, T]
steps = cfg.calib.epochs * -(-cfg.calib.nsamples // cfg.calib.batch_size)  # AdamW steps per block
print(f"calibration: {cfg.calib.nsamples} x {cfg.calib.seqlen} tokens, {cfg.calib.epochs} epochs, "
      f"batch {cfg.calib.batch_size}, lwc_lr {cfg.calib.lwc_lr} -> {steps} steps per block")
stage1 = copy.deepcopy(model)  # keep `model` in full precision for the comparison
for name, lin in quantizable_linears(stage1).items():
    stage1.set_submodule(name, MoBiLinear(lin, cfg.slice_bits, cfg.group_size, name=name))
t0 = time.time()
log1 = calibrate_blocks(stage1, calib_ids, cfg.calib, stages=("base",), progress=False)
print(f"Stage 1 calibration: {time.time() - t0:.1f} s")
print(log1.table())

# %%
layers1 = mobi_layers(stage1)
lo = torch.cat([torch.sigmoid(m.clip.beta).flatten() for m in layers1.values()])  # learned shrink of x_min
hi = torch.cat([torch.sigmoid(m.clip.gamma).flatten() for m in layers1.values()])  # learned shrink of x_max
print(f"learned clip factors: mean σ(β) = {lo.mean():.3f}, mean σ(γ) = {hi.mean():.3f}, "
      f"smallest {min(lo.min(), hi.min()):.3f} (1 = the group's min/max)")

t0 = time.time()
calib_err, calib_ppl = {}, {}
for k, b in enumerate(WIDTHS, start=1):
    calib_err[b] = float(np.mean([relative_error(m.weight, m.dequant(k)) for m in layers1.values()]))
    set_slices(stage1, k)
    calib_ppl[b] = perplexity(stage1, test_ids, SEQLEN, WINDOWS, progress=False).ppl
print(f"({time.time() - t0:.1f} s)")
print(f"{'':28s}" + "".join(f"{b:>9d}b" for b in WIDTHS))
print(f"{'error, uncalibrated':28s}" + "".join(f"{mean_err['mobislice'][b]:10.4f}" for b in WIDTHS))
print(f"{'error, Stage-1 LWC':28s}" + "".join(f"{calib_err[b]:10.4f}" for b in WIDTHS))
print(f"{'PPL, uncalibrated':28s}" + "".join(f"{ppl['mobislice'][b]:10.2f}" for b in WIDTHS))
print(f"{'PPL, Stage-1 LWC':28s}" + "".join(f"{calib_ppl[b]:10.2f}" for b in WIDTHS))
print(f"{'PPL, full precision':28s}{fp_ppl:10.2f}")
deltas = "  ".join(f"{b} bit {calib_ppl[b] - ppl['mobislice'][b]:+.2f}" for b in WIDTHS)
print("Stage 1 minus uncalibrated, PPL:", deltas)

# the calibrated checkpoint is still a MoBiSlice checkpoint: nested codes, more slices = less error
for m in layers1.values():
    for k in range(2, 5):
        assert torch.equal(nested_code(m.sliced.codes, SLICES, k - 1), nested_code(m.sliced.codes, SLICES, k) >> 2)
assert all(calib_err[a] > calib_err[b] for a, b in zip(WIDTHS, WIDTHS[1:]))

# %% [markdown]
# Compare the two error rows with the clip sweep of section 4. Stage 1 only sees the base
# slice, so it shrinks the ranges (mean factors printed above) in the direction that helps
# 2 bits; the sweep says what such factors cost at 6 and 8 bits, where the clipped weights
# can no longer be recovered. In perplexity, read the two PPL rows: on this model Stage 1
# helps most at 2 bits, and its higher 6- and 8-bit weight error does not show up as a
# perplexity loss there (compare the columns; `docs/results_ch2.md` has the same table).
# Balancing the two ends is left to the joint stage of Alg. 1 (slices + router, chapter 3).

# %% [markdown]
# ### What the routers add to the bits
#
# Chapter 3 puts a small router in front of every sliced layer. Its parameters are stored next
# to the slices, so a routed checkpoint's true bits per weight are its measured average bits
# plus the routers' share (`mbq_ref.mobiquant.router_cost`), and every token pays the router's
# FLOPs next to each slice it reads. From the committed tour report (`mbq tour`, width-4 ladder
# routers on this model):

# %%
import json  # noqa: E402
from pathlib import Path  # noqa: E402

rc = json.loads((Path("..") / "docs" / "results_tour" / "report.json").read_text())["mobiquant"]["router_cost"]
print(f"routers: {rc['router_params']:,} parameters next to {rc['quantized_weights']:,} quantized weights = "
      f"{rc['router_bits_per_weight']:.3f} extra bits per weight at fp16; {rc['router_flops_per_token']:,} FLOPs per "
      f"token = {100 * rc['router_flops_per_slice_flops']:.1f} % of one slice's {rc['slice_flops_per_token']:,}")

# %% [markdown]
# ## 6. Results file
# The tables above are summarized in `docs/results_ch2.md`. Running this chapter only *checks*
# them against that committed file (`mbq_ref.results.record`: same words, every number within
# 2 % or 0.01); `python scripts/write_results.py 2` rewrites it.

# %%
def md_table(header, rows):
    """A markdown table from a header list and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


bits_hdr = [f"{b} bit" for b in WIDTHS]
sections = [
    "# Chapter 2 results: MoBiSlice vs any-precision baselines",
    "",
    generated_by(2),
    "",
    f"Model `data/tiny-llama` ({len(weights)} projections, {mem.n_weights:,} quantized weights), group size {GROUP}, "
    f"slices {'/'.join(map(str, SLICES))}, torch {torch.__version__}.",
    "",
    f"## Relative reconstruction error ‖W − Ŵ‖_F / ‖W‖_F (mean over the {len(weights)} projections, uncalibrated)",
    "",
    md_table(["method"] + bits_hdr, [[m] + [f"{mean_err[m][b]:.4f}" for b in WIDTHS] for m in mean_err]),
    "",
    f"## Perplexity, austen test, seqlen {SEQLEN}, first {WINDOWS} windows (full precision {fp_ppl:.2f})",
    "",
    md_table(["method"] + bits_hdr, [[m] + [f"{ppl[m][b]:.2f}" for b in WIDTHS] for m in ppl]),
    "",
    "## Memory",
    "",
    mem.table(),
    "",
    "## Clipping tension (MoBiSlice, pooled relative error; base range = c · group min/max)",
    "",
    md_table(["c"] + [f"k={k} ({b} bit)" for k, b in enumerate(WIDTHS, 1)],
             [[f"{c:.2f}"] + [f"{e:.4f}" for e in row] for c, row in zip(FACTORS, tension.tolist())]),
    "",
    "Perplexity (same protocol) of MoBiSlice with the shrunk base range:",
    "",
    md_table(["width"] + [f"c={c}" for c in PPL_FACTORS],
             [[f"{b} bit"] + [f"{p:.2f}" for p in row] for b, row in ppl_clip.items()]),
    "",
    "## MoBiSlice after Alg. 1 Stage 1 (LWC on the base slice, `MoBiConfig.tiny()`), `set_slices(k)`",
    "",
    md_table(["", *bits_hdr], [
        ["rel. error, uncalibrated"] + [f"{mean_err['mobislice'][b]:.4f}" for b in WIDTHS],
        ["rel. error, Stage 1"] + [f"{calib_err[b]:.4f}" for b in WIDTHS],
        ["PPL, uncalibrated"] + [f"{ppl['mobislice'][b]:.2f}" for b in WIDTHS],
        ["PPL, Stage 1"] + [f"{calib_ppl[b]:.2f}" for b in WIDTHS],
    ]),
    "",
    f"Learned clip factors: mean σ(β) = {lo.mean():.3f}, mean σ(γ) = {hi.mean():.3f}.",
    "",
    "## Zero point on the finest grid vs on the 2-bit grid (uncalibrated, pooled relative error)",
    "",
    md_table(["rule", "weights clipped", "share of the 8-bit squared error"] + bits_hdr,
             [[f"zero_grid={name!r}", f"{100 * r['clipped']:.2f}%", f"{100 * r['share']:.1f}%"]
              + [f"{r['err'][b]:.4f}" for b in WIDTHS] for name, r in rules.items()]
             + [["RTN, one grid per width", "", ""] + [f"{rtn_pooled[b]:.4f}" for b in WIDTHS]]),
    "",
]
print("\n".join(sections))
record(2, "\n".join(sections))
print(f"chapter ran in {time.time() - T0:.0f} s")

# %% [markdown]
# ## Summary
# * MoBiSlice stores **one 8-bit code per weight** and **one scale/zero per group**; the
#   first `k` 2-bit slices give a `2k`-bit weight by shift-and-add. Checked on every layer:
#   the `k−1`-slice code is the `k`-slice code shifted right (nesting), and inside the base
#   range the error is at most `s_k/2`.
# * One checkpoint instead of four separate 2/4/6/8-bit ones: 8 instead of 20 code bits per
#   weight (2.5×; ≈2.53× with scales).
# * Reconstruction error falls with every added slice, for every method and layer. How the
#   methods rank at each width is in the table above and in `docs/results_ch2.md`.
# * The base slice's clip range is shared by all precisions: in the sweep, shrinking it
#   lowers the 2-bit weight error (and, on this model, the 2-bit perplexity) down to an
#   optimum and raises the 8-bit weight error at every step. With the zero point on the
#   finest grid the uncalibrated min/max range clips no weight; rounding it on the coarse
#   2-bit grid instead (`zero_grid="base"`, section 2) clips about 1% of the weights, and those
#   few clipped weights dominate the 8-bit error.
# * Uncalibrated, MoBiSlice and MSB truncation of an 8-bit code (centred read-back) are nearly
#   the same grid, and both beat independent RTN at 2 bits (section 3).
# * Stage 1 of Alg. 1 (LWC on the base slice alone) learns such a shrink; the calibrated
#   checkpoint keeps nesting and the per-slice refinement, with the 2/8-bit trade-off shown
#   in section 5.
#
# ## Exercises
# 1. The old rule `zero_grid="base"` rounds `z = round(−x_min / s)` on the 2-bit grid and clips.
#    Fix it another way than the finest grid: widen `s` until `[−z s, (4 − z) s)` contains
#    `[x_min, x_max]`. What happens to the 2-bit and the 8-bit error, compared with both rules?
# 2. Try slices `(4, 4)` and `(2, 3, 3)` with `SlicedWeight.from_float`. Which widths can
#    they serve, and how does the 8-bit error compare with `(2, 2, 2, 2)`?
# 3. MSB truncation of an 8-bit RTN code and uncalibrated MoBiSlice are nearly the same grid
#    at 2 bits. Work out, on paper, the exact difference between their 2-bit cell widths
#    (`range · 64/255` vs `range/4`) and where each places its levels.
#
# ## Solutions
#
# Try the exercises first. All three run below in a few seconds, on the same matrices.
#
# **1. Widen the step instead.** Keep the 2-bit rule $z_1 = \mathrm{round}(-x_{min}/s_0)$ with
# $s_0 = (x_{max} - x_{min})/4$, then grow $s$ until the four cells cover the group:
# $s = \max\bigl(s_0,\ -x_{min}/z_1,\ x_{max}/(4 - z_1)\bigr)$ (with $z_1$ kept in 1..3).
# No weight is clipped, but every cell is wider than needed.

# %%
def widened_scale_zero(w, group=GROUP):
    """Per-group (s, z_E) of exercise 1: z_1 rounded on the 2-bit grid, s widened to cover [x_min, x_max]."""
    wg = w.double().reshape(w.shape[0], -1, group)
    xmin, xmax = wg.amin(-1), wg.amax(-1)  # [N, K/g]
    s0 = (xmax - xmin) / 4
    z1 = torch.round(-xmin / s0).clamp(1, 3)
    s = torch.maximum(s0, torch.maximum(-xmin / z1, xmax / (4 - z1))) * (1 + 1e-9)
    return s, z1 * 4**3  # the zero point on the 8-bit grid, as the package stores it


num, den = dict.fromkeys(WIDTHS, 0.0), 0.0
for w in weights.values():
    s_w, z_w = widened_scale_zero(w)
    q = slice_codes(w.double(), s_w, z_w, SLICES, GROUP)
    for k, b in enumerate(WIDTHS, start=1):
        num[b] += float(((w.double() - dequant_codes(q, s_w, z_w, SLICES, k, GROUP, torch.float64)) ** 2).sum())
    den += float((w.double() ** 2).sum())
widened = {b: (num[b] / den) ** 0.5 for b in WIDTHS}
print("pooled relative error  " + "  ".join(f"{b:>7d}b" for b in WIDTHS))
for label, err in (("finest grid", rules["finest"]["err"]), ("2-bit grid (clips)", rules["base"]["err"]),
                   ("2-bit grid, widened", widened)):  # fmt: skip
    print(f"{label:22s}" + "  ".join(f"{err[b]:8.4f}" for b in WIDTHS))

# %% [markdown]
# Compare the rows: widening removes the clipped weights, so the 8-bit error no longer has
# the floor of the clipping rule, but every step is larger than the finest rule's, which
# costs at every width; the finest grid gets both (no clipping, the smallest step that
# covers the range up to one 8-bit step).
#
# **2. Other slicings.** The widths are the cumulative sums: `(4, 4)` serves 4 and 8 bits,
# `(2, 3, 3)` serves 2, 5 and 8. At 8 bits all three store the same 8-bit floor code
# of the same range, so their 8-bit errors agree:

# %%
for sb in ((2, 2, 2, 2), (4, 4), (2, 3, 3)):
    widths = cumulative_bits(sb)
    e = {b: 0.0 for b in widths}
    for w in weights.values():
        sw = SlicedWeight.from_float(w, sb, GROUP)
        for k, b in enumerate(widths, start=1):
            e[b] += float(((w.double() - sw.dequant(k, torch.float64)) ** 2).sum())
    den = sum(float((w.double() ** 2).sum()) for w in weights.values())
    print(f"slices {str(sb):13s} widths {widths}: pooled error " + ", ".join(f"{b}b {(v / den) ** 0.5:.4f}" for b, v in e.items()))

# %% [markdown]
# **3. MSB truncation vs MoBiSlice at 2 bits.** With the zero point on the finest grid both
# 2-bit cells are 64 fine steps wide, $64\, s_8 = 64\cdot\mathrm{range}/255$ (MoBiSlice's
# $s = 4^3 s_8$); the `range/4` of the exercise is the old 2-bit-grid rule, narrower by
# $\mathrm{range}\,(64/255 - 1/4) = \mathrm{range}/1020$, a quarter of a fine step. What
# differs is *where* the cells sit: RTN rounds, so fine code $q$ covers
# $[(q - \tfrac12) s_8, (q + \tfrac12) s_8)$ around $x_{min}$ and the truncated cells start half a
# fine step lower than MoBiSlice's floor cells (whose zero point is also rounded up, $\lceil\cdot\rceil$,
# instead of to nearest). Both read back at the centre of their cell. Checked on one group:

# %%
w_g = next(iter(weights.values()))[:1, :GROUP]  # one group of one row
lv_msb = baseline_weights(w_g, "msb", (2,), GROUP)[2].double().unique()
lv_mbs = SlicedWeight.from_float(w_g, SLICES, GROUP).dequant(1, torch.float64).unique()
s8 = float(w_g.max() - w_g.min()) / 255
print(f"fine step s_8 = {s8:.3e}; level spacing / s_8: msb {(lv_msb.diff() / s8).tolist()}, "
      f"mobislice {(lv_mbs.diff() / s8).tolist()}")
print(f"offset of the lowest levels (msb - mobislice) / s_8: {float(lv_msb[0] - lv_mbs[0]) / s8:+.3f}")

