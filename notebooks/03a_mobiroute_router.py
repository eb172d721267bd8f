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
# # Chapter 3a — MoBiRoute, part 1: a router picks how many slices each token reads
#
# Chapter 2 cut every weight into four nested 2-bit slices (MoBiSlice): reading 1, 2, 3 or
# 4 of them gives a 2-, 4-, 6- or 8-bit weight, all from one stored 8-bit code. MoBiQuant's
# second half (arXiv 2602.20191, Sec. 4.2) is **MoBiRoute**: a small router in every linear
# layer decides, *per token*, how many residual slices that token reads. Because a linear
# layer is linear in its slices (Eq. 6),
#
# $$y_t = x_t \hat W_1^\top + \sum_{e=2}^{E} m_{t,e}\, x_t \Delta\hat W_e^\top ,$$
#
# a token routed to fewer slices simply skips matmuls, and a threshold $\tau$ on the router's
# gates sets the average precision at run time. This part builds the router, its nested
# masks, the straight-through gradient and the budget loss (Section 1), the ladder design
# that is our default (Section 1b, with what it measured on the tour) and the routed layer
# `MoBiLinear` with Eq. 6 as gather / matmul / scatter (Section 2), each in a few lines
# checked against the package. Chapter 3b calibrates the routers (Alg. 1) and measures what
# they buy. Where the paper does not specify a detail (the gradient estimator, the form of
# the budget term), `docs/paper.md` says so and we state our choice. Runtime: seconds.

# %%
import copy
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F

from mbq_ref.chapter import chapter3_windows, setup_chapter
from mbq_ref.mobilinear import MoBiLinear, sliced_matmul
from mbq_ref.mobiquant import MoBiConfig
from mbq_ref.mobiroute import (
    MoBiRouter,
    threshold_for_bits,
    budget_loss,
    dual_step,
    mask_bits,
    nested_masks,
    slice_counts,
    ste_masks,
    tau_to_logit,
)
from mbq_ref.mobislice import cumulative_bits
from mbq_ref.sensitivity import capture_linear_inputs
from mbq_ref.zoo import load_model

setup_chapter()  # one thread unless OMP_NUM_THREADS is set, seed 0, no progress bars (see mbq_ref.chapter)
fp_model, tokenizer = load_model("tiny-llama", with_tokenizer=True)
cfg = MoBiConfig.tiny()  # slices 2,2,2,2, group 128, router and budget settings of chapter 3b
calib_ids, _ = chapter3_windows(tokenizer, cfg.calib)  # chapter 3b's calibration windows [32, 256]

# %% [markdown]
# ## 1. The router, its nested masks and their gradient, built here (Sec. 4.2, Eq. 4)
#
# This section builds the **per-slice** design (`MoBiConfig(routing="per_slice")`, the first
# one we built and kept as an ablation); Section 1b shows what it got wrong and the **ladder**
# that replaced it as the default. One router per quantized linear layer (q/k/v/o/gate/up/down):
# a 2-layer MLP on the token's input $x_t$ with one score per *residual* slice,
#
# $$r(x) = W_2\,\mathrm{SiLU}(W_1 x / c + b_1) + b_2 \in \mathbb{R}^{E-1}, \qquad g_e = \sigma(r_e),$$
#
# ($c$ is a constant input scale, the RMS of the layer's first calibration batch). Two
# details of ours (chapter 3b, Section 3, says why) sit between the MLP and the gates: the raw scores are
# **normalised** with their mean $\mu_r$ and standard deviation $\sigma_r$ over calibration
# tokens plus a learned offset $o$, then **bounded** by $S$,
#
# $$n = s\,\frac{r_{raw} - \mu_r}{\sigma_r} + o, \qquad r = S \tanh(n / S).$$
#
# We write the router from its weights and check it against `mbq_ref.mobiroute.MoBiRouter`
# on the real inputs of one layer (two calibration windows), with the data-dependent start
# the joint stage uses (`init_from_data`: scores spread, offset set so the hard routing
# gives `train_bits`).

# %%
E = len(cfg.slice_bits)  # slices per weight (the base slice + E-1 routed residual slices)
U = tau_to_logit(cfg.tau)  # the threshold in logit space, u = logit(tau)
with torch.no_grad():
    acts = capture_linear_inputs(fp_model, calib_ids[:2])  # {layer: [T, K]}
name = "model.layers.1.mlp.down_proj"
x = acts[name]  # [T, K]
torch.manual_seed(0)
router = MoBiRouter(x.shape[-1], E - 1, hidden=cfg.router_hidden)
router.set_input_scale(x)
router.init_from_data(x, U, cfg.slice_bits, cfg.train_bits)


def teach_router(x, rt):
    """Scores r [T, E-1] of router ``rt`` for inputs x [T, K], written from its parameters."""
    h = F.silu((x / rt.in_scale) @ rt.fc1.weight.T + rt.fc1.bias)  # [T, hidden]
    raw = h @ rt.fc2.weight.T + rt.fc2.bias  # [T, E-1]
    n = rt.spread * (raw - rt.score_mean) / rt.score_std + rt.offset  # normalised
    return rt.score_bound * torch.tanh(n / rt.score_bound)  # bounded in (-S, S)


with torch.no_grad():
    r = teach_router(x, router)
    torch.testing.assert_close(r, router(x))
print(f"{name}: x {tuple(x.shape)} -> scores {tuple(r.shape)}; router parameters "
      f"{sum(p.numel() for p in router.parameters()):,} vs the layer's {fp_model.get_submodule(name).weight.numel():,} weights")  # fmt: skip

# %% [markdown]
# The first slice is the **shared expert**: every token reads it. Residual slices are
# **nested** — slice $e+1$ refines slice $e$, so it is only useful on top of it:
#
# $$m_{t,e} = \prod_{j \le e} \mathbb{1}[g_{t,j} > \tau], \qquad k_t = 1 + \sum_e m_{t,e}, \qquad b_t = B_{k_t}.$$
#
# First on four hand-made tokens, then on the real scores above:


# %%
# NBVAL_CHECK_OUTPUT
def teach_masks(r, tau):
    """Hard nested masks [T, E-1] from router scores r [T, E-1] and threshold tau (sigmoid space)."""
    on = torch.sigmoid(r) > tau  # one gate per residual slice
    return on.long().cumprod(dim=-1)  # a slice counts only if every earlier one is on


def teach_slice_counts(r, tau):
    """Slices read per token, k_t = 1 + sum_e m_te: the base slice is always read."""
    return 1 + teach_masks(r, tau).sum(-1)  # [T]


toy = torch.tensor([[3.0, 2.0, 1.0], [3.0, -1.0, 4.0], [-2.0, 5.0, 5.0], [0.5, 0.4, 0.3]])
for tau in (0.0, 0.3, 0.5, 0.7, 0.9, 1.0):
    ours = teach_slice_counts(toy, tau)
    assert torch.equal(ours, slice_counts(toy, tau_to_logit(tau))), tau
    assert torch.equal(teach_masks(toy, tau).bool(), nested_masks(toy, tau_to_logit(tau))), tau
    print(f"tau={tau:.1f}: slices per token {ours.tolist()}")

# %%
k_real = teach_slice_counts(r, cfg.tau)
assert torch.equal(k_real, slice_counts(r, U))
bits_real = torch.tensor([0, *cumulative_bits(cfg.slice_bits)])[k_real].float()  # b_t = B_{k_t}
print(f"real scores at tau = {cfg.tau}: tokens reading 1..{E} slices {torch.bincount(k_real - 1, minlength=E).tolist()}, "
      f"mean {bits_real.mean():.3f} bits (init_from_data aimed at {cfg.train_bits})")  # fmt: skip

# %% [markdown]
# Token 2 has a high score for slice 4 but a low one for slice 3, so it stops at 2 slices;
# token 3 stops at the base slice. Raising $\tau$ never adds a slice (the unit tests check both
# properties on random scores with `hypothesis`). The package compares in logit space,
# $\min_{j\le e} r_j > \mathrm{logit}(\tau)$, which is the same test without float32 saturation of $\sigma$.
#
# **Training a binary decision.** The mask is a step function, so we use a *straight-through*
# estimator (our choice): the forward pass uses the hard nested mask, the backward pass the
# gradient of the soft nested mask centred on the threshold $u = \mathrm{logit}(\tau)$,
#
# $$p_{t,e} = \prod_{j\le e} \sigma\!\left(\frac{r_{t,j} - u}{T}\right), \qquad
#   m^{\mathrm{ste}} = m + p - \mathrm{sg}(p),$$
#
# ($\mathrm{sg}$ = stop-gradient, $T$ a temperature) so $m^{\mathrm{ste}}$ has the value of $m$
# and the gradient of $p$.


# %%
def teach_ste(r, u, temperature=1.0):
    """Straight-through nested masks: value of the hard mask, gradient of the soft one."""
    hard = (r > u).float().cumprod(dim=-1)  # [T, E-1]
    soft = torch.sigmoid((r - u) / temperature).cumprod(dim=-1)  # [T, E-1]
    return hard + soft - soft.detach()


r_a = r.clone().requires_grad_(True)
r_b = r.clone().requires_grad_(True)
upstream = torch.randn(r.shape, generator=torch.Generator().manual_seed(1))  # any gradient from the loss
m_a, m_b = teach_ste(r_a, U, cfg.surrogate_temperature), ste_masks(r_b, U, cfg.surrogate_temperature)
(m_a * upstream).sum().backward()
(m_b * upstream).sum().backward()
torch.testing.assert_close(m_a.detach(), m_b.detach())
torch.testing.assert_close(m_a.detach(), nested_masks(r, U).float())  # the value is the hard mask (up to float rounding)
torch.testing.assert_close(r_a.grad, r_b.grad)
print("forward = hard masks; gradient equals the package's; largest |dL/dr| for tokens with r near u:",
      f"{r_a.grad.abs().max():.3f}")  # fmt: skip

# %% [markdown]
# **The budget loss (Eq. 9's bit term, our form).** A token's bits are
# $b_t = B_1 + \sum_e b_{e+1}\, m^{\mathrm{ste}}_{t,e}$ (value = the real bits, gradient = soft);
# the layer's mean $\bar b$ over its tokens is pushed to the training target $b^*$ by an
# augmented Lagrangian, in the normalised error $d$:
#
# $$d = \frac{\bar b - b^*}{B_E - B_1}, \qquad
#   \mathcal{L}_{\mathrm{budget}} = \mathrm{ref}\,(\mu\, d + \lambda\, d^2), \qquad
#   \mu \leftarrow \mu + \eta\, d_{\mathrm{hard}} \ \text{after each step},$$
#
# with `ref` the layer's base-slice output MSE (so $\lambda$ and $\mu$ are dimensionless). Built
# here and checked against `mask_bits`, `budget_loss` and `dual_step`, value and gradient:


# %%
def teach_budget(m, slice_bits, target, lam, ref, mu):
    """(budget loss, d) for masks m [T, E-1] of one layer."""
    b = torch.tensor(slice_bits, dtype=m.dtype)
    bits = b[0] + m @ b[1:]  # [T] bits per token
    span = sum(slice_bits) - slice_bits[0]  # B_E - B_1
    d = (bits.mean() - target) / span
    return ref * (mu * d + lam * d**2), d


lam, ref, mu, eta = 1.0, 0.37, 0.0, 0.5  # any values: the check is about the formula
r_a.grad = r_b.grad = None
m_a, m_b = teach_ste(r_a, U), ste_masks(r_b, U)
loss_a, d_a = teach_budget(m_a, cfg.slice_bits, cfg.train_bits + 0.5, lam, ref, mu)
loss_b = budget_loss(mask_bits(m_b, cfg.slice_bits).mean(), cfg.train_bits + 0.5, cfg.slice_bits, lam, ref, mu)
loss_a.backward()
loss_b.backward()
torch.testing.assert_close(loss_a, loss_b)
torch.testing.assert_close(r_a.grad, r_b.grad)
mu_next = dual_step(mu, float(mask_bits(m_b, cfg.slice_bits).mean().detach()), cfg.train_bits + 0.5, cfg.slice_bits, eta)
d_a, loss_a = float(d_a.detach()), float(loss_a.detach())
assert abs(mu_next - (mu + eta * d_a)) < 1e-6
print(f"target {cfg.train_bits + 0.5} bits: d = {d_a:+.4f}, loss {loss_a:.6f}, mu {mu} -> {mu_next:.4f}; "
      f"a gradient step moves the scores {'up (more bits)' if r_a.grad.sum() < 0 else 'down (fewer bits)'}")  # fmt: skip

# %% [markdown]
# ## 1b. The ladder: one score per token, two adjacent widths per layer (our design, the default)
#
# The per-slice router above has a weakness that measurement exposed: each slice has its own
# score, so as $\tau$ falls a token can jump from 1 slice to 3 or 4 while its neighbours stay
# at 1, and a layer's tokens spread over 2..8 bits. Per-token output error is *convex* in
# bits, so a spread costs more than a two-point split at the same mean, and the routed model
# ended up above the **time-sharing line**: serving a share of requests at $k$ slices and the
# rest at $k+1$ (no router at all) was better. The paper does not specify how the nested
# gates are built (`docs/paper.md`); our default (`MoBiConfig.routing = "ladder"`) is:
#
# $$s_t = S \tanh(n_t / S), \qquad r_{t,e} = s_t - (e-1)\,\rho, \quad \rho = 2S(1+10^{-3}) > 2S ,$$
#
# one normalised MLP score $n_t$ per token, and the $E-1$ slice scores are its "rungs".
# Token $t$ reads slice $e+1$ iff $r_{t,e} > u$. Since the rungs are further apart than the
# score range $(-S, S)$, for any threshold $u$ at most one rung falls inside it: **every
# layer splits its tokens between two adjacent slice counts $k$ and $k+1$**, the
# higher-scoring tokens get $k+1$, and lowering $u$ can only add slices to a token (nested
# in the target by construction). Built here and checked against the package:

# %%
S = 8.0
ladder = MoBiRouter(x.shape[-1], E - 1, hidden=cfg.router_hidden, ladder=True)
x_l = x  # the real inputs [T, K] of the layer above
ladder.init_from_data(x_l, 0.0, cfg.slice_bits, 3.0)  # score statistics from data (as the joint stage does)
with torch.no_grad():
    n = (ladder.raw_scores(x_l) - ladder.score_mean) / ladder.score_std  # [T, 1] normalised score
    s_tok = S * torch.tanh(n / S)
    rho = 2 * S * (1 + 1e-3)
    rungs = s_tok - torch.arange(E - 1) * rho  # [T, 3]: r_e = s - (e - 1) rho
    assert torch.allclose(rungs, ladder(x_l), atol=1e-5)  # the package's MoBiRouter(ladder=True)

ladder_rows, prev = [], None
for target in (2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0):
    u = threshold_for_bits(rungs, cfg.slice_bits, target)
    k = slice_counts(rungs, u)
    assert int(k.max() - k.min()) <= 1  # two adjacent slice counts at most
    assert prev is None or bool((k >= prev).all())  # a higher target never takes a slice away
    prev = k
    ladder_rows.append((target, round(u, 2), torch.bincount(k - 1, minlength=E).tolist(), float(2 * k.float().mean())))
for row in ladder_rows:
    print(f"target {row[0]:>3} bits: u = {row[1]:>7}, tokens at 1..4 slices {row[2]}, mean {row[3]:.3f} bits")

# %% [markdown]
# Training follows from the construction (`MoBiLinear._ladder_forward`, `mobiquant._budget_sampler`):
# each joint step draws a budget $b \sim U(2, 8)$ for the block, each layer's threshold is the
# batch quantile that gives exactly $b$ bits (so no budget loss is needed), and the layer
# computes $y = x\hat W_k^\top + m \odot x(\hat W_{k+1} - \hat W_k)^\top$ with a
# straight-through mask $m$: the reconstruction loss alone teaches the ranking, and the
# clipping is trained for every width the checkpoint will serve. What it buys, measured by
# `mbq tour` (committed report `docs/results_tour/`): the routed sweep against the
# time-sharing line of the same checkpoint's uniform readings.

# %%
tour = json.loads((Path("..") / "docs" / "results_tour" / "report.json").read_text())
acc = tour["acceptance"]
pts = acc["a"]["points"]
fig, ax = plt.subplots(figsize=(6.4, 3.6))
ax.plot([p["bits"] for p in pts], [p["nll"] for p in pts], "o-", label="routed (ladder), measured bits")
ax.plot([p["bits"] for p in pts], [p["line"] for p in pts], "k:", label="time-sharing between uniform readings")
ax.set_xlabel("average bits (measured on the test windows)")
ax.set_ylabel("NLL (nats per token)")
ax.set_title("One checkpoint: routing vs time-sharing (mbq tour report)")
ax.legend(fontsize=8)
plt.show()
best = min(pts, key=lambda p: p["excess"])
print(f"largest gain over time-sharing: {-best['excess']:.4f} nats at {best['bits']:.2f} bits; "
      f"largest excess above the line: {acc['a']['max_excess']:+.4f} nats (check (a): {acc['verdicts']['a']})")
assert acc["a"]["max_excess"] <= 0.002  # on or below the line at every sweep point (the tour's check (a))
d3 = acc["d"]["3"]
print(f"at 3 bits: random routing with the router's histogram is worse by {d3['random_minus_router']:+.4f} ± {d3['se']:.4f} "
      f"nats; ranking tokens by input norm ||x_t|| instead: {d3['norm_minus_router']:+.4f} ± {d3['norm_se']:.4f}")
rc = tour["mobiquant"]["router_cost"]
print(f"router cost: {rc['router_bits_per_weight']:.3f} bits per weight (hidden {rc['hidden']}, fp16), "
      f"{100 * rc['router_flops_per_slice_flops']:.1f} % of one slice's FLOPs")
b4 = acc["b"]
print(f"(b) at 4 bits, LWC calibrated at 4 bits minus routed: {b4['lwc_minus_router']:+.4f} ± {b4['se']:.4f} nats "
      f"(check (b): {acc['verdicts']['b']})")
for key, c in acc["c"].items():
    print(f"(c) {key}: routed minus LWC calibrated at that width {c['routed_minus_lwc']:+.4f} nats "
          f"(routed {c['routed']:.2f} at {c['bits']:.2f} bits, LWC {c['lwc']:.2f}, RTN {c['rtn']:.2f})")
lost = [k for k, c in acc["c"].items() if c["routed_minus_lwc"] > 0]
print(f"(c) other domains: {acc['verdicts']['c']}; routed loses to LWC at {', '.join(lost) or 'no target'}")
fixed = {int(b): math.log(v["ppl"]) for b, v in tour["mobiquant"]["fixed"].items()}
slope = (fixed[2] - fixed[4]) / 2  # nats per bit along the time-sharing line from 2 to 4 bits
tie = abs(d3["norm_minus_router"]) <= 2 * d3["norm_se"]
print(f"verdict (computed): the parameter-free input-norm ranking {'ties' if tie else 'differs from'} the trained router "
      f"at 3 bits (within 2 SE: {tie}); the router's {rc['router_bits_per_weight']:.3f} bits per weight are worth "
      f"{slope * rc['router_bits_per_weight']:.4f} nats on the time-sharing line, "
      + ("so at equal effective bits the norm rule is the better design on this model." if tie else "."))

# %% [markdown]
# Read the four checks: (a) the ladder stays on or below time-sharing at every sweep point;
# (b) at 4 bits it ties LWC calibrated for 4 bits (a ladder at 4 bits reads exactly 2 slices
# everywhere, and its clipping was trained for every width); (d) the router beats random
# routing at 3 bits and ties it at 5, where the uniform readings differ by hundredths of a nat.
# Check (c) fails at 3 bits: on `bible` and `shakespeare` the routed model is worse than LWC
# calibrated at 3 bits. The reason is structural: at 3 bits every routed layer splits its
# tokens between 2 and 4 bits, which is not a 3-bit grid, and a 3-bit grid calibrated for it
# is better on every domain (on `austen` too, in the tour's table); at 4 bits, where the
# routed model reads a 4-bit grid, it beats LWC-4 on both other domains. A 3-bit slice
# (e.g. `slice_bits` 3 1 2 2) would give the ladder a 3-bit rung; we have not measured it.
#
# ## 2. `MoBiLinear`: the base slice for everyone, residual slices for routed tokens (Eq. 6)
#
# `MoBiLinear` wraps one `nn.Linear`: the frozen FP weight, the learnable clipping of the base
# slice (OmniQuant LWC, `mbq_ref.quantizer.LearnableClip`, reused) and the router. After
# calibration it is frozen into a `SlicedWeight` — 8-bit codes plus one scale/zero per group,
# the deployable format. At inference Eq. 6 is evaluated with the nesting: the tokens of
# residual slice $e$ are those with $k_t \ge e$, so slice $e$ costs one matmul over *those
# tokens only*: gather them, multiply, scatter-add back,
#
# $$Y = X \hat W_1^\top, \qquad Y[\mathcal{T}_e] \mathrel{+}= X[\mathcal{T}_e]\, \Delta\hat W_e^\top, \quad
#   \mathcal{T}_e = \{t : k_t \ge e\}, \quad e = 2..E .$$
#
# Built here and checked against `mbq_ref.mobilinear.sliced_matmul` (which gathers once in
# order of decreasing $k_t$, so every $\mathcal{T}_e$ is a contiguous prefix) and against the
# dense masked sum, on the same real layer with a router whose scores we spread out by hand:


# %%
def teach_sliced_matmul(x, deltas, counts):
    """Eq. 6: x [T, K], deltas [W_1, dW_2, .., dW_E] each [N, K], counts [T] in 1..E -> [T, N]."""
    y = x @ deltas[0].T  # the base slice, every token: [T, N]
    for e in range(1, len(deltas)):
        tokens = (counts > e).nonzero().squeeze(1)  # T_{e+1}: tokens routed to this slice
        if tokens.numel() == 0:
            break  # nested: no later slice has tokens either
        y.index_add_(0, tokens, x[tokens] @ deltas[e].T)  # gather, one matmul [n_e, N], scatter-add
    return y


# per-slice routing here: its scores spread tokens over all four slice counts, which shows Eq. 6 best
demo = MoBiLinear(copy.deepcopy(fp_model.get_submodule(name)), name=name, router_init_bias=0.0, routing="per_slice")
with torch.no_grad():
    demo.router.fc2.weight.normal_(std=2.0)  # an untrained but opinionated router
    y = demo(x)  # inference mode: routed at tau = 0.5
    counts = demo.route(x)  # [T] slices per token, 1..E
    readings = [demo.sliced.dequant(k) for k in range(1, E + 1)]  # Ŵ_1..Ŵ_E from the integer codes
    deltas = [readings[0]] + [readings[k] - readings[k - 1] for k in range(1, E)]  # [Ŵ_1, ΔŴ_2, ...]
    ours = teach_sliced_matmul(x, deltas, counts)
    dense = sum((counts == k).float()[:, None] * (x @ readings[k - 1].T) for k in range(1, E + 1))
torch.testing.assert_close(ours, sliced_matmul(x, deltas, counts), rtol=1e-4, atol=1e-4)
torch.testing.assert_close(y, ours, rtol=1e-4, atol=1e-4)  # the layer's forward is this
torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-4)  # gather/scatter == masked dense
n_e = [int((counts >= e).sum()) for e in range(1, E + 1)]
print(f"{name}: {x.shape[0]} tokens, slices per token {demo.stats.hist.tolist()} (1..{E}), {demo.avg_bits:.2f} bits; "
      f"rows multiplied per slice {n_e}: {sum(n_e) / (E * x.shape[0]):.0%} of the dense work")  # fmt: skip
for k in (1, E):
    demo.fixed_k = k  # static mode: every token reads k slices
    torch.testing.assert_close(demo(x), x @ demo.sliced.dequant(k).T, rtol=1e-4, atol=1e-4)
demo.fixed_k = None

# %% [markdown]
# The data flow of Eq. 6 for the first 12 tokens of these windows, as routed above: `sliced_matmul` sorts
# the tokens by $k_t$ (gather), so the tokens of every residual slice are the first $n_e$ rows;
# each slice is one matmul over its rows; one scatter puts the rows back in token order.

# %%
def draw_gather_scatter(ax, k):
    """Tokens (left) -> gathered by decreasing k_t -> slice matmuls over prefixes -> scattered back (right)."""
    t = len(k)
    order = torch.argsort(k, descending=True, stable=True).tolist()
    colours = plt.get_cmap("viridis")(torch.linspace(0.15, 0.9, E).tolist())
    row_y = lambda i: t - 1 - i  # noqa: E731  row 0 at the top
    for i in range(t):
        ax.add_patch(plt.Rectangle((0, row_y(i) - 0.4), 1, 0.8, color=colours[k[i] - 1]))
        ax.text(0.5, row_y(i), f"x{i}: k={int(k[i])}", ha="center", va="center", fontsize=7, color="w")
        ax.add_patch(plt.Rectangle((8, row_y(i) - 0.4), 1, 0.8, color=colours[k[i] - 1]))
        ax.text(8.5, row_y(i), f"y{i}", ha="center", va="center", fontsize=7, color="w")
    for pos, i in enumerate(order):
        ax.plot([1, 2], [row_y(i), row_y(pos)], color="gray", lw=0.6)  # gather
        ax.plot([7.5, 8], [row_y(pos), row_y(i)], color="gray", lw=0.6)  # scatter
        ax.add_patch(plt.Rectangle((2, row_y(pos) - 0.4), 1, 0.8, color=colours[k[i] - 1]))
        ax.text(2.5, row_y(pos), f"x{i}", ha="center", va="center", fontsize=7, color="w")
    for e in range(1, E + 1):
        n = int((k >= e).sum())  # the first n gathered rows read slice e
        ax.add_patch(plt.Rectangle((2.5 + e, row_y(n - 1) - 0.45), 0.8, n - 0.1, fill=False, lw=1.2))
        label = "Ŵ_1" if e == 1 else f"ΔŴ_{e}"
        ax.text(2.9 + e, t - 0.3, f"{label}\n{n} rows", ha="center", va="bottom", fontsize=7)
    ax.text(0.5, t - 0.3, "tokens", ha="center", va="bottom", fontsize=8)
    ax.text(2.5, t - 0.3, "gathered", ha="center", va="bottom", fontsize=8)
    ax.text(8.5, t - 0.3, "scattered", ha="center", va="bottom", fontsize=8)
    ax.set(xlim=(-0.2, 9.2), ylim=(-0.8, t + 1.2))
    ax.axis("off")


fig, ax = plt.subplots(figsize=(9, 4.2))
draw_gather_scatter(ax, counts[:12])
ax.set_title(f"Eq. 6 as gather / matmul per slice / scatter ({name.replace('model.', '')}, 12 tokens)")
plt.show()

# %% [markdown]
# In *calibration mode* (`calib_stage` set by `mbq_ref.calibrate`) the same layer computes
# every slice for every token from the FP weight through straight-through floors and
# multiplies each by the straight-through mask, so clipping and router receive gradients.
# Both modes give the same output (unit-tested); the calibration mode is simply 4x the work.
#
# ## Summary
#
# * **MoBiRoute** is a 2-layer MLP per linear layer that scores each residual slice for each
#   token (Eq. 4). Its masks are binary and **nested** (slice $e+1$ only on top of slice $e$;
#   the base slice is a shared expert read by every token), so a token's precision is its
#   number of slices, $b_t = B_{k_t}$.
# * **Training a binary decision**: straight-through masks (hard forward, soft nested
#   $\prod \sigma$ backward) and a budget term on the straight-through mean bits of each
#   layer, pushed to the target by an augmented Lagrangian (our form; the paper does not
#   specify it).
# * **Inference** computes each residual slice only for the tokens routed to it (gather,
#   matmul, scatter), from the integer codes of one stored checkpoint.
#
# Chapter 3b calibrates these routers on the bundled model (Alg. 1), sets the precision with
# a threshold controller and measures what routing buys against controls.
#
# ## Exercises
#
# 1. **What Eq. 6 saves.** For the real scores `r` of Section 1, at $\tau$ = 0.3, 0.5, 0.7
#    and 0.9, compute the mean bits per token and the share of the dense work (rows
#    multiplied, over $E \cdot T$) that the gather/scatter form does. What is the relation
#    between the two?
# 2. **The surrogate's temperature.** Compute the straight-through gradient of Section 1
#    (`ste_masks`, same `upstream`) at temperatures 0.25, 1 and 4. How many tokens receive a
#    gradient above 1 % of the largest one, and which tokens are they?
#
# ## Solutions
#
# **1.** Slice $e$ multiplies the $n_e$ tokens with $k_t \ge e$, so the rows multiplied are
# $\sum_e n_e = \sum_t k_t$ and the share of the dense $E \cdot T$ rows is $\bar k / E$. With
# equal 2-bit slices $b_t = 2 k_t$, so the share is the mean bits over $B_E$ = 8: the work
# follows the bits exactly.

# %%
solution_1 = []
for tau in (0.3, 0.5, 0.7, 0.9):
    k = slice_counts(r, tau_to_logit(tau))  # [T] slices per token
    rows = sum(int((k >= e).sum()) for e in range(1, E + 1))  # rows multiplied by sliced_matmul
    share, mean_bits = rows / (E * k.numel()), float(torch.tensor(cumulative_bits(cfg.slice_bits))[k - 1].float().mean())
    assert abs(share - mean_bits / cumulative_bits(cfg.slice_bits)[-1]) < 1e-6  # share of the work = bits / B_E
    solution_1.append([f"{tau:.1f}", f"{mean_bits:.3f}", f"{share:.1%}"])
print("\n".join(f"tau {t}: {b} bits per token, {s} of the dense work" for t, b, s in solution_1))

# %% [markdown]
# **2.** The surrogate's gradient for a token is the slope of $\sigma((r - u)/T)$, largest
# where the score is near the threshold $u$ and vanishing $|r - u| \gg T$ away from it: a
# smaller temperature trains fewer tokens, those whose scores sit nearest the threshold, and
# a large one trains almost every token (with a gradient that no longer looks like the step
# it replaces). Our scores are normalised and bounded (Section 1), so most of them sit
# within a few units of $u$: the printed counts say how many tokens each temperature reaches.

# %%
n_trained = []
for temperature in (0.25, 1.0, 4.0):
    r_t = r.clone().requires_grad_(True)
    (ste_masks(r_t, U, temperature) * upstream).sum().backward()
    g = r_t.grad.abs().amax(-1)  # [T] largest gradient per token
    trained_tokens = g > 0.01 * g.max()
    near = (r - U).abs().amin(-1)  # [T] distance of the token's closest score to the threshold
    print(f"T = {temperature}: {int(trained_tokens.sum())} of {len(g)} tokens get > 1% of the largest gradient; "
          f"their scores lie within {float(near[trained_tokens].max()):.2f} of u (all tokens: up to {float(near.max()):.2f})")
    n_trained.append(int(trained_tokens.sum()))
assert n_trained == sorted(n_trained)  # a larger temperature never trains fewer tokens
