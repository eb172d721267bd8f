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
# # Chapter 5 — Numba CUDA kernels: read only the bits a token needs
#
# MoBiQuant's speed claim (Sec. 4.3 of [arXiv 2602.20191](https://arxiv.org/abs/2602.20191))
# rests on one idea: a static low-bit kernel loads every bit of every weight, but a
# MoBiSlice weight stored **bit-major** lets a kernel fetch only the slices a token was
# routed to, so memory traffic — the bottleneck of decoding — shrinks with the bits used.
# The paper computes on the packed bit-planes ("BMMA"), shifts the lower slice into the
# higher one at bit level, multiplies by the shared scale, permutes tokens so that tokens
# of the same precision are contiguous, and overlaps the base slice with the residual
# slices on separate CUDA streams.
#
# This chapter builds those pieces in Numba CUDA (`cuda_numba/`) and runs them on a **real
# layer** of the bundled model:
#
# 1. **bit-planes**: the packing layout, and why "precision k" becomes "the first `B_k` planes";
# 2. the **popcount identity** that turns an integer dot product into AND + popcount;
# 3. a real projection of `data/tiny-llama`, MoBiSlice-quantized, with its real activations;
# 4. **one kernel body**, written here in a dozen lines and checked against the package;
# 5. the two **kernel ladders** — decode GEMV (v1–v7, `slice_gemv.py`) and prefill GEMM
#    (v1–v3, `slice_gemm.py`) — on that layer;
# 6. **token grouping** by routed precision, the **streams** variant and the one-launch
#    **fused** decode (`slice_linear.py`);
# 7. where the GPU numbers live (`python -m cuda_numba.bench`), and what the compiled machine code
#    predicts for the decode kernels (`python -m cuda_numba.sass`).
#
# Every kernel file follows one pattern (llm.c `dev/cuda` style): a reference, numbered
# versions, one dispatcher taking `version=`. The kernels run here in Numba's **CUDA
# simulator** (one Python thread per CUDA thread), which checks correctness but says nothing
# about speed, so the shapes stay small: a few dozen rows of the layer, a few tokens.

# %%
import os
import sys

# The simulator must be chosen before numba.cuda is imported (pytest's conftest does the same).
if os.environ.get("MBQ_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
sys.setswitchinterval(5e-4)  # faster hand-over between the simulator's threads

import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numba
import numpy as np
import torch
from numba import cuda, float32

from cuda_numba import _common
from cuda_numba import binary_matmul as bm
from cuda_numba import dequant as dq
from cuda_numba import packing as pk
from cuda_numba import slice_gemm as sm
from cuda_numba import slice_gemv as sv
from cuda_numba import slice_linear as sl
from mbq_ref.chapter import setup_chapter

setup_chapter()  # one thread unless OMP_NUM_THREADS is set, seed 0, no progress bars (see mbq_ref.chapter)
SIM = bool(numba.config.ENABLE_CUDASIM)
print("CUDA simulator:", SIM, "| real GPU:", _common.real_gpu_available())
rng = np.random.default_rng(0)
SB = (2, 2, 2, 2)  # MoBiSlice slices: B_k = 2, 4, 6, 8 bits
REPO = Path(pk.__file__).resolve().parents[1]

# %% [markdown]
# ## 1. Bit-planes
#
# Chapter 2 stores one `B_E`-bit integer `Q_E` per weight (`B_E = 8` for slices 2,2,2,2);
# precision `k` uses its top `B_k = b_1 + … + b_k` bits and dequantizes with one scale and zero
# point per group (`cuda_numba/dequant.py`):
#
# $$\hat W_k = s_k\,(Q_k - z_k + \tfrac12),\qquad Q_k = \Big\lfloor \frac{Q_E}{2^{B_E-B_k}}\Big\rfloor,\qquad
#   s_k = \frac{s}{2^{B_k-b_1}},\qquad z_k = \frac{z_E}{2^{B_E-B_k}}.$$
#
# The stored zero point `z_E` is an integer on the finest grid, so `z_k` is a dyadic fraction,
# exact in float32.
#
# If the codes were stored as bytes, reading 2 of the 8 bits would still move the whole byte.
# **Bit-major** storage splits the codes into 8 one-bit *planes* and packs each plane 32
# weights to a `uint32` word:
#
# $$\text{bit } j \text{ of } \mathrm{planes}[p, n, w] \;=\; \text{bit } (B_E-1-p) \text{ of } \mathrm{codes}[n, 32w + j]
#   \qquad(\text{codes uint8 } [N, K] \to \text{planes uint32 } [B_E, N, \lceil K/32\rceil]).$$
#
# With the MSB plane first, precision `k` reads the contiguous slab `planes[:B_k]`, and slice
# `e` is `planes[B_{e-1}:B_e]`. Here is a tiny example: 3 weights.

# %%
codes = np.array([[0b10110100, 0b01100001, 0b11111111]], dtype=np.uint8)
planes = pk.pack_bitplanes_ref(codes)  # [8, 1, 1]
for p in range(8):
    word = int(planes[p, 0, 0])
    elems = "".join(str((word >> j) & 1) for j in range(3))  # element 0 first
    print(f"plane {p} (bit {7 - p}): elements 0,1,2 = {elems}   word written MSB..LSB = {word:#05b}")
q1 = pk.unpack_bitplanes_ref(pk.prefix_planes(planes, SB, 1), K=3)
print("Q_1 from planes 0-1:", [f"{v:02b}" for v in q1[0]], "== top 2 bits:", [f"{v >> 6:02b}" for v in codes[0]])
assert (q1 == codes >> 6).all()

# %% [markdown]
# A picture of the layout for a small weight (`N = 4` rows, `K = 48`, so 2 words per plane
# row, the second half-padded with zeros). Each panel is one plane; the colour band on the
# left shows which slice it belongs to, and the bars on the right how many bytes each
# precision reads.

# %%
N_demo, K_demo = 4, 48
codes_demo = rng.integers(0, 256, (N_demo, K_demo), dtype=np.uint8)
planes_demo = pk.pack_bitplanes_ref(codes_demo)  # [8, 4, 2]
bits_img = ((planes_demo[..., None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(8, N_demo, -1)  # [8, N, 64]

fig = plt.figure(figsize=(10, 4.2))
slice_colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray", "tab:olive"]
for p in range(8):
    ax = fig.add_axes([0.06, 0.9 - (p + 1) * 0.105, 0.62, 0.09])
    img = bits_img[p].astype(float)
    img[:, K_demo:] = 0.5  # padding bits
    ax.imshow(img, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(f"p{p}", rotation=0, labelpad=12, fontsize=8, color=slice_colors[p // 2])
    ax.axvline(31.5, color="tab:purple", lw=1)
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_color(slice_colors[p // 2])
        ax.spines[side].set_linewidth(2)
fig.text(0.06, 0.93, "planes[p] as [N rows x 64 bit positions] (grey = padding, | = word boundary)", fontsize=9)
ax = fig.add_axes([0.77, 0.17, 0.21, 0.68])  # right of the planes: its tick labels stay clear of them
w_demo = pk.pack_mobislice(codes_demo, np.ones((N_demo, 1), np.float32), np.zeros((N_demo, 1)), SB, K_demo)
kb = [w_demo.bits_at(k) * N_demo * planes_demo.shape[2] * 4 for k in (1, 2, 3, 4)]
ax.bar(range(1, 5), kb, color=slice_colors[:4])
ax.set_xticks(range(1, 5), [f"k={k}\n{2 * k} bit" for k in (1, 2, 3, 4)], fontsize=8)
ax.set_ylabel("plane bytes read", fontsize=8)
ax.tick_params(axis="y", labelsize=7)
ax.set_title("precision k reads planes[:2k]", fontsize=9)
plt.show()
print("bytes read per precision:", kb, "(linear in the bits used; fp16 would read", N_demo * K_demo * 2, ")")

# %% [markdown]
# The packing kernels (`pack_bitplanes`, versions 1–2) must agree bit for bit with the NumPy
# reference — including `K` not a multiple of 32. Version 1 uses one thread per output word
# (and so reads each code byte 8 times); version 2 uses one thread per `(row, word)` and builds
# all 8 words in registers from one read of its 32 codes.

# %%
codes_odd = rng.integers(0, 256, (7, 45), dtype=np.uint8)  # K = 45: 13 padding bits in word 1
for v in (1, 2):
    t0 = time.perf_counter()
    got = pk.pack_bitplanes(codes_odd, version=v)
    np.testing.assert_array_equal(got, pk.pack_bitplanes_ref(codes_odd))
    print(f"pack v{v}: equal to the reference ({time.perf_counter() - t0:.2f} s in the simulator)")
np.testing.assert_array_equal(pk.unpack_bitplanes(got, 45), codes_odd)
print("unpack(pack(codes)) == codes")

# %% [markdown]
# ## 2. The popcount identity
#
# Split unsigned `b_x`- and `b_w`-bit integers into bit-planes, MSB first,
# `x = Σ_i 2^(b_x-1-i) X_i` and `w = Σ_j 2^(b_w-1-j) W_j` with `X_i, W_j ∈ {0, 1}`. Then
#
# $$\langle x, w\rangle = \sum_{i<b_x}\sum_{j<b_w} 2^{(b_x-1-i)+(b_w-1-j)}\,\mathrm{popc}(X_i \wedge W_j),$$
#
# and one `popc` of an AND of two 32-bit words performs 32 one-bit multiply-adds. This is
# what binary tensor cores (`mma ... b1.and.popc`) accelerate. A worked example with 2-bit
# numbers, `x = [3, 1, 2]` and `w = [1, 3, 2]` (plane 0 = MSB, element j at bit j):

# %%
x_small = np.array([[3, 1, 2]], dtype=np.uint8)
w_small = np.array([[1, 3, 2]], dtype=np.uint8)
xp_s, wp_s = pk.pack_bitplanes_ref(x_small, 2), pk.pack_bitplanes_ref(w_small, 2)
total = 0
for i in range(2):
    for j in range(2):
        a, b = int(xp_s[i, 0, 0]), int(wp_s[j, 0, 0])
        weight = 2 ** ((1 - i) + (1 - j))
        term = weight * (a & b).bit_count()
        total += term
        print(f"X_{i}={a:03b} AND W_{j}={b:03b} = {a & b:03b}  popc={(a & b).bit_count()}  x{weight}  -> {term}")
print("sum =", total, "   direct: 3*1 + 1*3 + 2*2 =", int(x_small[0] @ w_small[0]))
assert total == int(x_small[0].astype(int) @ w_small[0].astype(int)) == bm.popcount_matmul_ref(xp_s, wp_s)[0, 0]

# %% [markdown]
# **Zero points.** Quantized values usually carry an offset: `x ≈ s_x (x_q - z_x)`. The
# offsets come out as row and column sums, which are themselves popcounts
# (`Σ_k x_q = Σ_i 2^(b_x-1-i) popc(X_i)`). Per weight group `g`:
#
# $$\sum_{k\in g} (x_q - z_x)(w_q - z_w) = \langle x_q, w_q\rangle_g - z_w \sum_{k\in g} x_q - z_x \sum_{k\in g} w_q + z_x z_w\,|g|.$$
#
# `binary_matmul` (versions 1–3) returns these integers **exactly**; we compare with an
# int64 NumPy matmul.

# %%
T_b, N_b, K_b, g_b = 3, 9, 96, 32
xq = rng.integers(0, 256, (T_b, K_b), dtype=np.uint8)
wq = rng.integers(0, 256, (N_b, K_b), dtype=np.uint8)
xz, wz = rng.integers(0, 256, T_b), rng.integers(0, 256, (N_b, K_b // g_b))
ref_int = bm.binary_matmul_ref(xq, wq, xz, wz, g_b)  # (xq - zx) @ (wq - zw)^T in int64
for v in (1, 2, 3):
    got = bm.binary_matmul(pk.pack_bitplanes_ref(xq), pk.pack_bitplanes_ref(wq), K_b, xz, wz, g_b, version=v)
    assert np.array_equal(got, ref_int)
    print(f"binary_matmul v{v}: exact ({got.dtype}, max |value| = {np.abs(got).max()})")

# %% [markdown]
# MoBiQuant itself keeps activations in fp16, so AND + popcount needs quantized activations on
# the other side too. `binary_linear` does that as an *option*: 8-bit per-token activations
# times the first `B_k` weight planes, with the fractional `z_k` and the mid-rise `+1/2` kept
# integer by one power of two `D = 2^(B_E-B_k+1)`:
#
# $$Q_k - z_k + \tfrac12 = \frac{D\,Q_k - (2 z_E - D/2)}{D},\qquad z_k = \frac{z_E}{2^{B_E-B_k}}.$$
#
# It equals the float computation on the dequantized activations:

# %%
codes_w = rng.integers(0, 256, (N_b, K_b), dtype=np.uint8)
scale_w = (rng.random((N_b, K_b // g_b)) * 0.05 + 0.01).astype(np.float32)
zero_w = rng.integers(0, 256, (N_b, K_b // g_b)).astype(np.int32)  # z_E on the 8-bit grid
w_b = pk.pack_mobislice(codes_w, scale_w, zero_w, SB, g_b)
x_b = rng.standard_normal((T_b, K_b)).astype(np.float32)
y_bin = bm.binary_linear(x_b, w_b, k=2)
xq_b, sx_b, zx_b = bm.quantize_activations(x_b)
x_hat = sx_b[:, None] * (xq_b.astype(np.float32) - zx_b[:, None])
y_float = sl.slice_linear_ref(x_hat.astype(np.float32), codes_w, scale_w, zero_w, SB, 2, g_b).numpy()
np.testing.assert_allclose(y_bin, y_float, rtol=1e-4, atol=1e-4 * np.abs(y_float).max())
print("binary_linear (A8, W at 4 bits) == dequantized float matmul; max |diff| =", np.abs(y_bin - y_float).max())

# %% [markdown]
# ## 3. A real layer of the bundled model
#
# The kernels below run on one projection of `data/tiny-llama` and on the activations that
# really reach it. If a calibrated checkpoint (`mbq quantize ... --out runs/<name>.mbq.safetensors`)
# exists under `runs/`, its codes and its trained router are used; otherwise the layer's float
# weight is MoBiSlice-quantized here (min/max clipping, chapter 2's starting point) and each
# token gets the slice count its own sensitivity asks for. Quantization acts on each output
# row separately, so the first `N_SUB` rows of the layer are a faithful small problem for the
# simulator.

# %%
from mbq_ref.checkpoint import load_checkpoint
from mbq_ref.data import load_corpus
from mbq_ref.mobilinear import MoBiLinear
from mbq_ref.zoo import load_model

LAYER = "model.layers.1.self_attn.q_proj"
GROUP = 128  # weights per (scale, zero) group, as in the paper
N_SUB = 37  # rows of the layer the simulator runs (an odd count: no tile divides it)

fp_model, tok = load_model("tiny-llama", with_tokenizer=True)
lin = dict(fp_model.named_modules())[LAYER]
sw, routed_layer, source = None, None, None
for path in sorted((REPO / "runs").glob("**/*.mbq.safetensors"), reverse=True):
    try:
        cand = dict(load_checkpoint(path).model.named_modules()).get(LAYER)
    except Exception as exc:  # noqa: BLE001 - another model or format version: try the next file
        print(f"skipping {path.name}: {exc.__class__.__name__}")
        continue
    if cand is not None and getattr(cand, "sliced", None) is not None and cand.sliced.codes.shape == lin.weight.shape:
        sw, routed_layer, source = cand.sliced, cand, f"calibrated checkpoint {path.relative_to(REPO)}"
        break
if sw is None:
    routed_layer = MoBiLinear(lin, SB, group_size=GROUP, name=LAYER).eval()
    sw = routed_layer.freeze()
    source = "MoBiSlice codes of the float weight (min/max clipping; no checkpoint under runs/)"
SB, GROUP = tuple(sw.slice_bits), int(sw.group_size)
E, B = len(SB), np.cumsum(SB)  # slices, cumulative bits B_1..B_E

captured = {}
hook = lin.register_forward_hook(lambda mod, args, out: captured.setdefault("x", args[0].detach()))
ids = tok(load_corpus("austen", "test")[:400], return_tensors="pt").input_ids[:, :16]
with torch.no_grad():
    fp_model(ids)
hook.remove()
x_all = captured["x"][0].float()  # [T, K] the layer's real inputs
N_full, K = sw.codes.shape
print(f"{LAYER}: [{N_full}, {K}] weight, {source}")
print(f"slices {SB}, group {GROUP}, {x_all.shape[0]} real tokens; the simulator runs rows 0..{N_SUB - 1}")

# the packed sub-layer, and the check that the kernels' reference dequantizes like the package
codes, scale, zero = sw.codes[:N_SUB].numpy().astype(np.uint8), sw.scale[:N_SUB].numpy(), sw.zero[:N_SUB].numpy()
w_real = pk.pack_mobislice(codes, scale, zero, SB, GROUP)
for k in range(1, E + 1):
    assert torch.equal(dq.dequant_codes(codes, scale, zero, SB, k, GROUP), sw.dequant(k)[:N_SUB])
print("planes", w_real.planes.shape, "| W_k from the planes' reference == the package's SlicedWeight.dequant(k)")

# %% [markdown]
# What a kernel must read at precision `k`, summed over every projection `[N, K]` of the model
# (shapes from the loaded model): the first `B_k` planes plus a float32 scale and an int32 zero
# point per group of `g` weights, against 2 bytes per weight in fp16,
#
# $$\text{bytes}_k = \sum_{\text{proj}} \Big( B_k\, N \,\lceil K/32\rceil \cdot 4 \;+\; N\,\frac{K}{g}\,(4 + 4) \Big)
#   \qquad\text{vs}\qquad \sum_{\text{proj}} 2NK .$$

# %%
projs = {n: m for n, m in fp_model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("proj")}
fp16_bytes = sum(m.weight.numel() * 2 for m in projs.values())


def packed_bytes(k: int) -> int:
    """Bytes read at precision k over all projections: B_k planes + scale and zero per group."""
    total = 0
    for m in projs.values():
        N_, K_ = m.weight.shape
        total += int(B[k - 1]) * N_ * pk.n_words(K_) * 4 + N_ * (K_ // GROUP) * (4 + 4)
    return total


print(f"{len(projs)} projections in {fp_model.config.num_hidden_layers} layers, "
      f"{sum(m.weight.numel() for m in projs.values()):,} weights; fp16: {fp16_bytes / 2**20:.2f} MiB")
for k in range(1, E + 1):
    print(f"  k={k} ({B[k - 1]} bits): {packed_bytes(k) / 2**20:.2f} MiB = {packed_bytes(k) / fp16_bytes:.2f} x fp16")

# %% [markdown]
# ## 4. One kernel body
#
# In the paper's setting (weights only, activations fp16) there is nothing to AND the weight
# planes with. A kernel instead **rebuilds the integer** of the planes it reads by
# shift-and-add (`q = (q << 1) | bit`, MSB plane first) and applies the scale once per group,
# folding the zero point in through the sum of the activations:
#
# $$y_{t,n} = \sum_{g} s_k \Big(\sum_{k'\in g} x_{t,k'}\, Q_{k,\,n k'} \;-\; \big(z_k - \tfrac12\big) \sum_{k'\in g} x_{t,k'}\Big).$$
#
# Here is the whole naive kernel — one thread per output `(t, n)` — in a dozen lines. Its
# device function is reused by the first exercise's solution.

# %%
@cuda.jit(device=True)
def row_dot(x, t, planes, nb, scale, zero, smul, zmul, gw, n):
    """y[t, n] of the equation above, reading the first nb planes of row n."""
    K, W = x.shape[1], planes.shape[2]
    y = float32(0.0)
    for g in range(scale.shape[1]):
        s_eff = float32(scale[n, g]) * smul  # s_k = s / 2^(B_k - b_1)
        z_eff = float32(zero[n, g]) * zmul - float32(0.5)  # z_k - 1/2, z_k = z_E / 2^(B_E - B_k)
        xq, xs = float32(0.0), float32(0.0)
        for w in range(g * gw, min((g + 1) * gw, W)):
            for j in range(min(32, K - 32 * w)):
                q = 0
                for p in range(nb):  # shift-and-add over the planes, MSB first
                    q = (q << 1) | ((planes[p, n, w] >> j) & 1)
                xv = float32(x[t, 32 * w + j])
                xq += xv * float32(q)
                xs += xv
        y += s_eff * (xq - z_eff * xs)
    return y


@cuda.jit
def naive_kernel(x, planes, nb, scale, zero, smul, zmul, gw, out):
    n, t = cuda.grid(2)
    if n < out.shape[1] and t < out.shape[0]:
        out[t, n] = row_dot(x, t, planes, nb, scale, zero, smul, zmul, gw, n)


# %% [markdown]
# Launch it on three real tokens at precision `k = 2` (4 bits), then compare with the torch
# reference and with the package's version 1 (`slice_gemm.gemm_kernel1`, the same arithmetic):

# %%
T_dec, k = 3, 2
x_dec = x_all[:T_dec].numpy()  # [3, K] float32
lo, hi, smul, zmul, zadd = dq.prefix_params(w_real, k)  # planes [0, B_k), s_k and z_k multipliers
dw = w_real.to_device()
d_out = cuda.device_array((T_dec, N_SUB), np.float32)
naive_kernel[(_common.cdiv(N_SUB, 16), _common.cdiv(T_dec, 4)), (16, 4)](
    cuda.to_device(x_dec), dw.planes, hi, dw.scale, dw.zero, np.float32(smul), np.float32(zmul), dq.group_words(dw), d_out
)
y_inline = d_out.copy_to_host()
y_ref = sm.slice_gemm_ref(x_dec, codes, scale, zero, SB, k, GROUP).numpy()
y_pkg = sm.slice_gemm(x_dec, w_real, k, version=1)
np.testing.assert_allclose(y_inline, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
np.testing.assert_allclose(y_inline, y_pkg, rtol=1e-6, atol=1e-6 * np.abs(y_ref).max())
print(f"inline kernel == package v1 == torch reference (max |y| = {np.abs(y_ref).max():.3f}, "
      f"max |inline - reference| = {np.abs(y_inline - y_ref).max():.1e})")

# %% [markdown]
# ## 5. Two ladders: decode GEMV and prefill GEMM
#
# The naive kernel re-reads and re-decodes a weight row in every token's thread. Each
# numbered version changes one thing (measured times and notes: `benchmarks/NOTES.md`):
#
# | file | version | what changes |
# |---|---|---|
# | `slice_gemv.py` | v1 | the naive kernel above (`slice_gemm` v1) |
# | | v2 | one block per row, one thread per K-word: each weight decoded once for all ≤ 8 tokens; shared-memory tree reduction |
# | | v3 | several rows per block; the activations staged once in (padded) shared memory for all of them |
# | | v4 | **look-up tables** of activation sums replace the per-weight rebuild (below) |
# | | v5 | v4 + split-K: more blocks than a layer has row blocks; the last block of a row block sums the partials |
# | | v6 | v5 + each token stops at its own `B_{k_t}` planes in the same launch (routed decode, no sort) |
# | | v7 | tables once per K-slice for many rows; lane = word slot (conflict-free tables); bits and tokens compile-time; warp shuffles + atomics |
# | `slice_gemm.py` | v1 | naive, one thread per output |
# | | v2 | 16×16 output tiles; x and the *dequantized* weights staged in shared memory per K-word |
# | | v3 | 64×64 tiles, each thread a 4×4 register sub-tile |
#
# **Look-up tables (v4–v6).** Rebuilding `Q_k` costs ~30 instructions per weight, and the
# 11-29 H200 run (`benchmarks/results/`) found GEMV v2/v3 bound by exactly that, at the same
# time for 2, 4 and 8 bits. Linearity removes the rebuild: with bit `bit_{pj}` of plane `p`,
#
# $$\sum_j x_j\, q_j = \sum_{p<n_b} 2^{\,n_b-1-p} \sum_j x_j\, \mathrm{bit}_{pj},
#   \qquad \mathrm{tab}[v] = \sum_{i<8} x_i\, \mathrm{bit}_i(v)\ \ (v = 0..255),$$
#
# so with one 256-entry table per 8 activations, each plane byte is **one table read**, and a
# 32-weight word at `n_b` planes costs `4 n_b` reads plus `n_b` shift-adds: work and bytes both
# fall with the bits read. In NumPy, for the first K-word of the layer's first row and the
# first real token:

# %%
x32 = x_all[0, :32].numpy()  # 32 real activations
q32 = codes[0, :32].astype(np.int64)  # their 8-bit codes Q_E
planes32 = pk.pack_bitplanes_ref(codes[:1, :32], int(B[-1]))[:, 0, 0]  # B_E plane words, MSB first
bits8 = (np.arange(256)[:, None] >> np.arange(8)) & 1  # [v, i]: bit i of byte value v
tables = np.stack([bits8 @ x32[8 * b : 8 * b + 8] for b in range(4)])  # [4 bytes, 256]
acc = 0.0
for word in planes32:  # Horner over planes: acc = 2 acc + (4 table reads)
    acc = 2 * acc + sum(tables[b, (int(word) >> (8 * b)) & 255] for b in range(4))
assert np.isclose(acc, float(x32 @ q32), rtol=1e-5, atol=1e-4)
print(f"table look-ups: {acc:.5f}   direct x·Q_E: {float(x32 @ q32):.5f}   ({4 * len(planes32)} reads)")

# %% [markdown]
# Every version of both ladders on the real sub-layer, at 4 bits, against the reference
# (fp16 activations, as the paper's setting; outputs poisoned with NaN first so an element a
# kernel forgets to write shows):

# %%
x16_dec = x_all[:T_dec].half().numpy()
x16_pre = x_all[:9].half().numpy()  # prefill: 9 tokens
rows = []
for ladder, fn, ref_fn, xin in ((sv, sv.slice_gemv, sv.slice_gemv_ref, x16_dec), (sm, sm.slice_gemm, sm.slice_gemm_ref, x16_pre)):
    ref = ref_fn(xin, codes, scale, zero, SB, k, GROUP).float().numpy()
    for v in ladder.VERSIONS:
        t0 = time.perf_counter()
        y = fn(xin, w_real, k, version=v, out=np.full(ref.shape, np.nan, np.float16))
        dt = time.perf_counter() - t0
        err = float(np.abs(y.astype(np.float32) - ref).max())
        assert not np.isnan(y).any() and err <= 4e-3 * max(1.0, np.abs(ref).max())
        rows.append((fn.__name__, v, xin.shape[0], err, dt))
print(f"{'dispatcher':>11} {'v':>2} {'T':>2} {'max |err|':>10} {'simulator s':>12}")
for name, v, T_, err, dt in rows:
    print(f"{name:>11} {v:>2} {T_:>2} {err:>10.2e} {dt:>12.2f}")
print("(fp16 outputs: errors are half-precision rounding; simulator seconds are not GPU speed)")

# %% [markdown]
# What the bits buy on this layer: the kernel's output at each precision against the float
# layer (`x Wᵀ` with the unquantized weight), next to the bytes each precision reads.

# %%
y_fp = (x_all[:T_dec] @ lin.weight[:N_SUB].detach().T).numpy()  # the unquantized layer
rel = []
for kk in range(1, E + 1):
    y_k = sv.slice_gemv(x_dec, w_real, kk, version=5)
    rel.append(float(np.linalg.norm(y_k - y_fp) / np.linalg.norm(y_fp)))
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.semilogy(B, rel, "o-", label="relative output error")
ax.set_xlabel("bits read (B_k)")
ax.set_ylabel("||y_k - y_fp|| / ||y_fp||")
ax2 = ax.twinx()
ax2.bar(B, [packed_bytes(kk) / fp16_bytes for kk in range(1, E + 1)], alpha=0.25, color="tab:orange", width=0.8)
ax2.set_ylabel("bytes read / fp16 (whole model)")
ax.set_title(f"{LAYER}, rows 0-{N_SUB - 1}, {T_dec} real tokens", fontsize=9)
fig.tight_layout()
plt.show()
print("relative error by precision:", {int(b): round(r, 4) for b, r in zip(B, rel)})
assert all(a > b for a, b in zip(rel, rel[1:])), "each slice should reduce the error"

# %% [markdown]
# ## 6. Tokens routed to different precisions
#
# After MoBiRoute (chapter 3) every token has its own slice count `k_t`, and the layer computes
#
# $$y_t = x_t\,\hat W_{k_t}^\top,\qquad \hat W_{k} = \hat W_1 + \Delta\hat W_2 + \dots + \Delta\hat W_k .$$
#
# Launching one kernel per token would be absurd; instead (Sec. 4.3) tokens are **stably
# sorted by `k_t`** so that each precision is a contiguous segment, the kernels run per
# segment, and the inverse permutation restores the order (`slice_linear.py`):
#
# * **grouped**: one launch per precision `k`, reading planes `[0, B_k)`;
# * **streams**: `x Ŵ_1ᵀ` for *all* tokens on stream 0, and the residual `x ΔŴ_eᵀ` for the
#   suffix of tokens with `k_t ≥ e` on stream `e-1` — each slice's planes are read once, and
#   the launches can overlap. A final kernel sums the partials and un-permutes;
# * **fused** (decode): GEMV v6, each token stops at its own planes inside one launch; no sort.
#
# The routing of the real tokens: the checkpoint's router when there is one; otherwise each
# token gets the slices its own output error asks for (`MoBiLinear.token_errors`: tokens whose
# 2-bit error is largest relative to the layer's get more slices, in four equal groups).

# %%
with torch.no_grad():
    if source.startswith("calibrated"):
        k_route = routed_layer.route(x_all).numpy()
    else:
        err = routed_layer.token_errors(x_all)[0]  # [T]: ||x_t (W - Ŵ_1)^T||^2
        k_route = 1 + np.searchsorted(np.quantile(err.numpy(), np.linspace(0, 1, E + 1)[1:-1]), err.numpy())
T_r = len(k_route)
perm, starts = sl.route_permutation(k_route, E)
cmap = plt.get_cmap("viridis", E)
fig, axes = plt.subplots(3, 1, figsize=(9, 4.6), gridspec_kw={"height_ratios": [1, 1, 2.2]})
strip = axes[0].imshow(k_route[None, :], cmap=cmap, vmin=0.5, vmax=E + 0.5, aspect="auto")
axes[0].set_title("routed slice count k_t of the real tokens, in token order", fontsize=9)
axes[1].imshow(k_route[perm][None, :], cmap=cmap, vmin=0.5, vmax=E + 0.5, aspect="auto")
key = fig.colorbar(strip, ax=axes[:2], ticks=range(1, E + 1), fraction=0.03, pad=0.01)  # the colour key
key.ax.set_yticklabels([f"k={k_} ({B[k_ - 1]} bit)" for k_ in range(1, E + 1)], fontsize=7)
axes[1].set_title("after the stable sort: one contiguous segment per precision", fontsize=9)
for ax in axes[:2]:
    ax.set_yticks([])
    ax.set_xticks(range(T_r))
    ax.tick_params(labelsize=6)
for s_ in starts[1:-1]:
    axes[1].axvline(s_ - 0.5, color="w", lw=2)
axes[1].set_xticklabels(perm, fontsize=6)
ax = axes[2]
for e in range(1, E + 1):  # streams: slice e runs on tokens [starts[e-1], T)
    ax.barh(e, T_r - starts[e - 1], left=starts[e - 1], color=slice_colors[e - 1], height=0.6)
    ax.text(T_r + 0.3, e, f"stream {e - 1}: planes {pk.slice_plane_range(SB, e)}", va="center", fontsize=8)
ax.set_xlim(-0.5, T_r + 9)
ax.invert_yaxis()
ax.set_yticks(range(1, E + 1))
ax.set_yticklabels([f"slice {e}" for e in range(1, E + 1)], fontsize=8)
ax.set_xlabel("sorted token position")
ax.set_title("streams variant: the work each slice does (base slice for every token)", fontsize=9)
plt.show()
print("tokens per precision:", np.diff(starts).tolist(), "| average bits:", float(np.mean(B[k_route - 1])))

# %% [markdown]
# Every case the benchmark times (`slice_linear.CASES`) on 7 real tokens with their routed
# precisions, against the per-token reference:

# %%
T_m = 7
x_m, k_m = x_all[:T_m].half().numpy(), k_route[:T_m]
ref_m = sl.slice_linear_ref(x_m, codes, scale, zero, SB, k_m, GROUP).float().numpy()
for case, (method, kind, v) in sl.CASES.items():
    y = sl.slice_linear(x_m, w_real, k_m, method=method, kind=kind, version=v, out=np.full(ref_m.shape, np.nan, np.float16))
    err = float(np.abs(y.astype(np.float32) - ref_m).max())
    assert not np.isnan(y).any() and err <= 4e-3 * max(1.0, np.abs(ref_m).max())
    print(f"{case:>14}: method={method:8s} {kind} v{v}  max |err| = {err:.1e}")
print("k_t =", k_m.tolist())

# %% [markdown]
# ## 7. On a GPU
#
# The simulator proves the kernels compute the right numbers; only a GPU can say whether
# reading fewer planes is faster. `python -m cuda_numba.bench` times every version and torch's
# fp16 matmul (cuBLAS) on Llama-7B/8B layer shapes for 1–2048 tokens and 2–8 average bits,
# validates each case first, and writes `benchmarks/results/<device>_<date>.json` plus a plot.
# (`python -m cuda_numba.ptx_check` compiles every kernel for a real GPU target without one,
# which catches typing problems the simulator cannot see.) Committed results, if any:

# %%
results_dir = REPO / "benchmarks" / "results"
reports = []  # the bench's files: a "results" list measured on a device (not sass.json, not e2e_*)
for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
    rep = json.loads(path.read_text())
    if "results" in rep and "device" in rep.get("meta", {}) and not path.name.startswith("e2e_"):
        reports.append((path, rep))
if not reports:
    print("No GPU results measured yet: run `python -m cuda_numba.bench` on a machine with a CUDA GPU "
          "(see benchmarks/README.md). Nothing here is a performance claim.")
measured_speedups = []  # every measured (kernel call) / (fp16 call) ratio shown below
for path, rep in reports:
    dev = rep["meta"]["device"]
    print(f"{path.name}: {dev['name']} (driver {dev.get('driver_version')}), {rep['meta']['utc']}, "
          f"commit {rep['meta']['git_commit'][:12]}")
    best = {}
    for r in rep["results"]:
        if r.get("speedup_vs_fp16") and r["kernel"] != "fp16":
            measured_speedups.append(r["speedup_vs_fp16"])
            key = (r["K"], r["N"], r["tokens"], r["bits"])
            if key not in best or r["speedup_vs_fp16"] > best[key][1]:
                best[key] = (r["kernel"], r["speedup_vs_fp16"], r.get("frac_of_roofline"))
    print(f"  {'KxN':>11} {'T':>5} {'bits':>4}  best kernel     x fp16  % of HBM roofline")
    for (K_, N_, T_, b_), (name, sp, fr) in sorted(best.items()):
        print(f"  {K_:>5}x{N_:<5} {T_:>5} {b_:>4g}  {name:<14} {sp:6.2f}  {'' if fr is None else f'{100 * fr:.0f}'}")
    png = path.with_suffix(".png")
    if png.exists():
        from IPython.display import Image, display

        display(Image(filename=str(png)))
if measured_speedups:
    top = max(measured_speedups)
    timed = sorted({r["kernel"] for _, rep in reports for r in rep["results"] if r["kernel"] != "fp16"})
    verdict = "is reproduced" if top > 1 else "is NOT reproduced"
    print(f"\nMeasured so far: the kernel calls ran at {min(measured_speedups):.3f}-{top:.3f}x the speed of torch "
          f"fp16 (the best one {1 / top:.0f}x slower). The paper's speed-up over fp16 (Sec. 5.4) {verdict} "
          f"by these measurements, which time only {', '.join(timed)}.")
fp16_us = {(r["K"], r["N"]): 1e3 * r["ms_median"] for _, rep in reports for r in rep["results"]
           if r["kernel"] == "fp16" and r["tokens"] == 1 and r["bits"] == 4}

# %% [markdown]
# ### What the compiler says: a prediction, not a measurement
#
# Without a GPU we can still read what one would execute. `python -m cuda_numba.sass` compiles
# each decode GEMV for `sm_90` (Numba → PTX → `ptxas`), disassembles it (`nvdisasm`) and counts:
# registers, local memory (spills), the instructions of the hot loop and, for v7 (whose bits and
# token count are compile-time constants, so every loop but the row loop is unrolled), the
# instructions per weight. The **predicted lower bound** is the larger of reading the packed
# bytes at the datasheet HBM bandwidth and issuing those instructions at 4 warp-instructions
# per clock per SM:
#
# $$t \ge \max\Big(\frac{\text{bytes}}{\text{bandwidth}},\ \frac{N K \cdot \text{instructions per weight}}{\text{SMs}\cdot 128\cdot f_\text{clock}}\Big).$$
#
# GEMV v7 builds its tables once per K-slice and reuses them for many rows, each lane reading
# only its own column of the tables (no bank conflicts), with unsigned 32-bit index arithmetic
# and the bit-width unrolled (`benchmarks/NOTES.md`). The table below is read from
# `benchmarks/results/sass.json`; v1-v6 read the bit-width at run time, and the report models
# their instruction counts not at all ("-"): their registers and local memory show why v7 was needed.

# %%
sass_path = results_dir / "sass.json"
if sass_path.exists():
    sass_rep = json.loads(sass_path.read_text())
    rows_h200 = [r for r in sass_rep["rows"] if r["gpu"] == "H200-SXM"]
    shapes_s = sorted({r["shape"] for r in rows_h200}, key=lambda s_: [-int(v) for v in s_.split("x")])
    print(f"PREDICTION for one H200 (T = 1 token), from {sass_path.name}: {sass_rep['meta']['formula']}")
    def cell(r):
        """'instructions per weight, predicted us' of one row ('-' where the report has no model)."""
        return "-" if r["predicted_us"] is None else f"{r['instructions_per_weight']:.2f}, {r['predicted_us']:.1f}"

    print("per shape: instructions per weight, predicted us")
    print(f"{'kernel':>7} {'bits':>4} {'regs':>4} {'local B':>7} " + " ".join(f"{s_:>16}" for s_ in shapes_s))
    by_k = {}
    for r in rows_h200:
        by_k.setdefault((r["kernel"], r["bits"]), {})[r["shape"]] = r
    for (kern, b_), by_s in sorted(by_k.items(), key=lambda kv: (int(kv[0][0][4:]), kv[0][1])):
        r0 = next(iter(by_s.values()))
        cells = " ".join(f"{cell(by_s[s_]):>16}" for s_ in shapes_s)
        print(f"{kern:>7} {b_:>4} {r0['registers']:>4} {r0['local_bytes']:>7} {cells}")
    v7_4 = by_k[("gemv7", 4)]["14336x4096"]
    fp = fp16_us.get((14336, 4096))
    print(f"\nv7 at 4 bits on 14336x4096: predicted >= {v7_4['predicted_us']:.1f} us ({v7_4['bound']}-bound)"
          + (f"; torch fp16 measured {fp:.0f} us per call in the run above (host time after the start event included)"
             if fp else "") + ". v7 on a GPU: pending.")
else:
    print("benchmarks/results/sass.json not found: run `python -m cuda_numba.sass` (needs the compilers, no GPU)")

# %% [markdown]
# ## Summary
#
# * **Bit-major packing** (`uint32 [B_E, N, ⌈K/32⌉]`, MSB plane first) turns "precision `k`"
#   into "the first `B_k` planes": a contiguous slab whose size is linear in the bits used.
# * **AND + popcount** computes integer dot products 32 elements per instruction; zero points
#   become row/column sums, themselves popcounts. `binary_matmul` is exact.
# * With **fp16 activations** the kernels rebuild `Q_k` by shift-and-add from the planes they
#   read and apply the shared scale once per group; the same kernel computes a residual slice.
#   On a real layer of the bundled model every version of both ladders matches the reference.
# * **Look-up tables** of activation sums (GEMV v4–v7) replace the per-weight rebuild by table
#   reads per plane word; v6 and v7 also serve each token at its own precision in one launch,
#   so a routed decode step needs no sort at all. v7's compiled code is predicted to meet the
#   memory/instruction bound at about 6 instructions per weight at 4 bits (section 7); its GPU
#   time, like v4–v6's, is still to be measured.
# * **Routing** is a stable sort by `k_t` (contiguous segments, inverse permutation after): one
#   launch per precision (*grouped*), or the base slice for all tokens plus one residual launch
#   per slice on its own stream (*streams*).
# * The simulator checks correctness only. Any speed-up must be measured on a GPU
#   (`python -m cuda_numba.bench`), and Numba has no tensor-core or packed-half2 access, so
#   these kernels are a readable baseline, not a rival to hand-written CUDA.
#
# ## Exercises
#
# 1. **Fuse the permutation.** `slice_linear` gathers the sorted activations into a new buffer
#    and scatters the result back. Write a kernel that takes `perm` and reads
#    `x[perm[t0 + i]]` / writes `out[perm[t0 + i]]` directly, launch it once per precision
#    segment, and check it against `slice_linear_ref`.
# 2. **Signed weights.** Replace the zero-point correction of the popcount identity by
#    two's-complement planes (the MSB plane weighs `-2^(b-1)`) and check the identity on random
#    signed inputs.
# 3. **Bit-serial GEMV without tables.** For each plane `p` sum the activations whose bit is
#    set, `S_p = Σ_j x_j bit_pj`, and return `Σ_p 2^(n_b-1-p) S_p` (Sec. 4.3's "shift-add at
#    bit-plane level"). Check it on the real layer, and count its operations per weight against
#    shift-and-add (v1–v3) and look-up tables (v4).
#
# Worked solutions follow; try the exercises first.

# %% [markdown]
# ### Solution 1: the permutation inside the kernel
#
# The kernel is the naive one with two indices changed: token `i` of a segment is row
# `perm[t0 + i]` of both `x` and `out`. No gathered copy of `x`, no partial buffer, no scatter
# launch; the price is uncoalesced row reads, which matter only on a GPU.

# %%
@cuda.jit
def permuted_kernel(x, perm, t0, tseg, planes, nb, scale, zero, smul, zmul, gw, out):
    n, i = cuda.grid(2)
    if n < out.shape[1] and i < tseg:
        t = perm[t0 + i]
        out[t, n] = row_dot(x, t, planes, nb, scale, zero, smul, zmul, gw, n)


perm_m, starts_m = sl.route_permutation(k_m, E)
d_perm, d_x = cuda.to_device(perm_m), cuda.to_device(x_m)
d_y = cuda.to_device(np.full((T_m, N_SUB), np.nan, np.float32))
for kk in range(1, E + 1):  # one launch per precision segment
    t0, t1 = int(starts_m[kk - 1]), int(starts_m[kk])
    if t1 > t0:
        _, hi_k, smul_k, zmul_k, _ = dq.prefix_params(w_real, kk)
        grid = (_common.cdiv(N_SUB, 16), _common.cdiv(t1 - t0, 4))
        permuted_kernel[grid, (16, 4)](
            d_x, d_perm, t0, t1 - t0, dw.planes, hi_k, dw.scale, dw.zero, np.float32(smul_k), np.float32(zmul_k),
            dq.group_words(dw), d_y,
        )
y_perm = d_y.copy_to_host()
np.testing.assert_allclose(y_perm, ref_m, rtol=4e-3, atol=4e-3 * np.abs(ref_m).max())
print(f"permuted kernel, {len(np.unique(k_m))} launches, no gather/scatter: max |err| = {np.abs(y_perm - ref_m).max():.1e}")

# %% [markdown]
# ### Solution 2: two's-complement planes
#
# A signed `b`-bit integer is `w = -2^(b-1) W_0 + Σ_{j≥1} 2^(b-1-j) W_j` over the planes of its
# unsigned bit pattern `w mod 2^b`. Each plane pair still contributes one popcount; only the
# MSB plane's weight changes sign, so no zero-point sums are needed:
#
# $$\langle x, w\rangle = \sum_{i,j} c^{x}_i\, c^{w}_j\,\mathrm{popc}(X_i \wedge W_j),\qquad
#   c_0 = -2^{b-1},\ c_j = 2^{b-1-j}\ (j \ge 1).$$

# %%
def signed_popcount_matmul(xs, ws, bx, bw):
    """<x, w> of signed bx-/bw-bit integers [T, K], [N, K] from two's-complement planes."""
    xp = pk.pack_bitplanes_ref((xs % 2**bx).astype(np.uint8), bx)  # planes of the unsigned patterns
    wp = pk.pack_bitplanes_ref((ws % 2**bw).astype(np.uint8), bw)
    cx = np.array([-(2 ** (bx - 1))] + [2 ** (bx - 1 - i) for i in range(1, bx)])
    cw = np.array([-(2 ** (bw - 1))] + [2 ** (bw - 1 - j) for j in range(1, bw)])
    out = np.zeros((xs.shape[0], ws.shape[0]), np.int64)
    for i in range(bx):
        for j in range(bw):
            both = xp[i][:, None, :] & wp[j][None, :, :]  # [T, N, W]
            out += cx[i] * cw[j] * np.bitwise_count(both).sum(-1, dtype=np.int64)
    return out


for bx, bw in ((8, 2), (4, 4), (3, 8)):
    xs = rng.integers(-(2 ** (bx - 1)), 2 ** (bx - 1), (3, 45))
    ws = rng.integers(-(2 ** (bw - 1)), 2 ** (bw - 1), (5, 45))
    assert np.array_equal(signed_popcount_matmul(xs, ws, bx, bw), xs @ ws.T)
print("two's-complement popcount identity == int64 matmul (8x2, 4x4, 3x8 bits, K = 45)")

# %% [markdown]
# ### Solution 3: bit-serial GEMV, and what each decode costs
#
# Per plane the kernel adds the activations whose bit is set (`S_p`), then shifts: one bit
# test and one add per weight and plane. Counting the inner-loop operations per weight and
# token at `n_b` planes: shift-and-add (v1–v3) extracts and merges a bit per plane (shift, and,
# shift, or: `4 n_b`) and then converts and multiply-adds (`+2`); bit-serial does `2 n_b`; a
# table (v4) reads one entry per byte, 4 reads and 3 adds per 32 weights and plane, plus one
# Horner step per plane (`(4 + 3 + 2) n_b / 32`).

# %%
def bit_serial_gemv(x, planes, K):
    """y[t, n] = Σ_p 2^(nb-1-p) S_p[t, n],  S_p = Σ_k x[t, k] bit_p[n, k]  (integer codes only)."""
    nb = planes.shape[0]
    bits = ((planes[..., None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(nb, planes.shape[1], -1)[..., :K]
    S = np.einsum("tk,pnk->ptn", x.astype(np.float64), bits.astype(np.float64))  # [nb, T, N]
    return sum(2.0 ** (nb - 1 - p) * S[p] for p in range(nb))


nb = int(B[k - 1])
xq_serial = bit_serial_gemv(x_dec, pk.prefix_planes(w_real.planes, SB, k), K)  # Σ_k x Q_k, [T, N]
Qk = codes.astype(np.int64) >> (int(B[-1]) - nb)
np.testing.assert_allclose(xq_serial, x_dec.astype(np.float64) @ Qk.T, rtol=1e-9, atol=1e-9)
print(f"bit-serial Σ x·Q_k on the real layer == x @ Q_k^T ({nb} planes)")
for n_b in B:
    print(f"  n_b = {n_b}: ops per weight and token  shift-and-add {4 * n_b + 2:>3}  bit-serial {2 * n_b:>3}"
          f"  look-up tables {(4 + 3 + 2) * n_b / 32:.2f}")
