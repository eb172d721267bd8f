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
# This chapter builds those pieces in Numba CUDA (`cuda_numba/`), small enough to read:
#
# 1. **bit-planes**: the packing layout, and why "precision k" becomes "the first `B_k` planes";
# 2. the **popcount identity** that turns an integer dot product into AND + popcount, with zero points;
# 3. **slice-aware GEMV/GEMM** with fp16 activations (the paper's weight-only setting);
# 4. **token grouping** by routed precision, and the **streams** variant;
# 5. where the GPU numbers live (`python -m cuda_numba.bench`) — this notebook runs the
#    kernels in Numba's **CUDA simulator**, which checks correctness but says nothing about speed.
#
# Every kernel file follows one pattern (llm.c `dev/cuda` style): a NumPy/torch reference,
# numbered kernel versions, one dispatcher taking `version=`. Runtime: well under a minute
# on 2 CPU cores (the simulator runs each CUDA thread as a Python thread, so sizes stay tiny).

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

from cuda_numba import _common
from cuda_numba import binary_matmul as bm
from cuda_numba import packing as pk
from cuda_numba import slice_gemm as sg
from cuda_numba import slice_gemv as sv

SIM = bool(numba.config.ENABLE_CUDASIM)
print("CUDA simulator:", SIM, "| real GPU:", _common.real_gpu_available())
rng = np.random.default_rng(0)
SB = (2, 2, 2, 2)  # MoBiSlice slices: B_k = 2, 4, 6, 8 bits

# %% [markdown]
# ## 1. Bit-planes
#
# Chapter 2 stores one 8-bit integer `Q_E` per weight; precision `k` uses its top `B_k` bits,
# `Q_k = Q_E >> (8 - B_k)`, and dequantizes with one scale and zero point per group:
# `Ŵ_k = s_k (Q_k - z_k + 1/2)`, `s_k = s / 2^(B_k-2)`, `z_k = z_E / 2^(8-B_k)`. The stored zero
# point `z_E` is an integer on the finest (8-bit) grid, so `z_k` is a dyadic fraction, exact in
# float32.
#
# If the codes were stored as bytes, reading 2 of the 8 bits would still move the whole byte.
# **Bit-major** storage splits the codes into 8 one-bit *planes* and packs each plane 32
# weights to a `uint32` word:
#
# ```
# codes  uint8  [N, K]          planes uint32 [8, N, ceil(K/32)]
# planes[p, n, w] bit j  =  bit (7 - p) of codes[n, 32 w + j]     (plane 0 = MSB)
# ```
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
slice_colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
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
ax = fig.add_axes([0.76, 0.12, 0.22, 0.75])
w_demo = pk.pack_mobislice(codes_demo, np.ones((N_demo, 1), np.float32), np.zeros((N_demo, 1)), SB, K_demo)
kb = [w_demo.bits_at(k) * N_demo * planes_demo.shape[2] * 4 for k in (1, 2, 3, 4)]
ax.barh([f"k={k} ({2 * k} bit)" for k in (1, 2, 3, 4)], kb, color=slice_colors)
ax.set_xlabel("plane bytes read")
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
# Split unsigned integers into bit-planes, `x = Σ_i 2^i X_i` and `w = Σ_j 2^j W_j` with
# `X_i, W_j ∈ {0, 1}`. Then
#
# $$\langle x, w\rangle = \sum_i\sum_j 2^{i+j}\,\mathrm{popc}(X_i \wedge W_j),$$
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
# (`Σ_k x_q = Σ_i 2^i popc(X_i)`). Per weight group `g`:
#
# `Σ (x_q - z_x)(w_q - z_w) = ⟨x_q, w_q⟩ - z_w Σ x_q - z_x Σ w_q + z_x z_w · |g|`.
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
# integer by one power of two `D = 2^(9-B_k)` (`Q_k - z_k + 1/2 = (D Q_k - (2 z_E - D/2)) / D`).
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
y_float = sg.slice_linear_ref(x_hat.astype(np.float32), codes_w, scale_w, zero_w, SB, 2, g_b).numpy()
np.testing.assert_allclose(y_bin, y_float, rtol=1e-4, atol=1e-4 * np.abs(y_float).max())
print("binary_linear (A8, W at 4 bits) == dequantized float matmul; max |diff| =", np.abs(y_bin - y_float).max())

# %% [markdown]
# ## 3. Slice-aware GEMV and GEMM with fp16 activations
#
# In the paper's setting (weights only, activations fp16) there is nothing to AND the weight
# planes with. The kernels instead **rebuild the integer by shift-and-add** from the planes
# they read (`q = (q << 1) | bit` per plane, MSB first) and apply the scale once per group:
# `y = Σ_g s_k (Σ x·Q_k - (z_k - 1/2) Σ x)`. One kernel serves both uses below through the plane
# range `[lo, hi)` and two offsets:
#
# | use | planes | scale | zero |
# |---|---|---|---|
# | precision `k` | `[0, B_k)` | `s / 2^(B_k-2)` | `z_E / 2^(8-B_k)` |
# | residual slice `e` | `[B_{e-1}, B_e)` | `s / 2^(B_e-2)` | `2^(b_e-1)` (fixed mid-code) |
#
# The ladder of versions (all in `cuda_numba/slice_gemm.py`):
#
# | version | idea |
# |---|---|
# | v1 (GEMV = GEMM) | one thread per output `(t, n)`; plane words loaded once per 32 weights |
# | GEMV v2 | one block per output row, one thread per K-word; each weight decoded once for all ≤ 8 tokens; shared-memory tree reduction |
# | GEMV v3 | several rows per block, activations staged in (padded) shared memory and shared by the rows |
# | GEMM v2 | 16×16 output tiles; per K-word, stage x and the *dequantized* weights in shared memory, 32 FMAs per thread |
# | GEMM v3 | 64×64 tiles, each thread a 4×4 register sub-tile |
#
# Each is checked against a torch reference that dequantizes `W_k` and computes `x @ W_k^T`.

# %%
T_s, N_s, K_s, g_s = 3, 9, 96, 32
codes_s = rng.integers(0, 256, (N_s, K_s), dtype=np.uint8)
scale_s = (rng.random((N_s, K_s // g_s)) * 0.05 + 0.01).astype(np.float32)
zero_s = rng.integers(0, 256, (N_s, K_s // g_s)).astype(np.int32)  # z_E on the 8-bit grid
w_s = pk.pack_mobislice(codes_s, scale_s, zero_s, SB, g_s)
x_s = rng.standard_normal((T_s, K_s)).astype(np.float16)
rows = []
for k in (1, 3):
    ref = sg.slice_linear_ref(x_s, codes_s, scale_s, zero_s, SB, k, g_s).float().numpy()
    for fn in (sg.slice_gemv, sg.slice_gemm):
        for v in (1, 2, 3):
            out = np.full((T_s, N_s), np.nan, np.float16)  # poisoned: every element must be written
            t0 = time.perf_counter()
            y = fn(x_s, w_s, k, version=v, out=out)
            dt = time.perf_counter() - t0
            err = float(np.abs(y.astype(np.float32) - ref).max())
            assert not np.isnan(y).any() and err <= 4e-3 * max(1.0, np.abs(ref).max())
            rows.append((k, fn.__name__, v, err, dt))
print(f"{'k':>2} {'kernel':>11} {'v':>2} {'max |err|':>10} {'simulator s':>12}")
for k, name, v, err, dt in rows:
    print(f"{k:>2} {name:>11} {v:>2} {err:>10.2e} {dt:>12.2f}")
print("(fp16 outputs: errors are half-precision rounding; simulator seconds are not GPU speed)")

# %% [markdown]
# ## 4. Tokens routed to different precisions
#
# After MoBiRoute (chapter 3) every token has its own slice count `k_t`. Launching one kernel
# per token would be absurd; instead (Sec. 4.3) tokens are **stably sorted by `k_t`** so that
# each precision is a contiguous segment, the kernels run per segment, and the inverse
# permutation restores the order. Two ways to use the segments:
#
# * **grouped**: one launch per precision `k`, reading planes `[0, B_k)` — the base planes are
#   read once per segment;
# * **streams**: `x W_1^T` for *all* tokens on stream 0, and the residual `x ΔW_e^T` for the
#   suffix of tokens with `k_t ≥ e` on stream `e-1` — each slice's planes are read once, and
#   the launches can overlap. A final kernel sums the partial results and un-permutes.

# %%
T_r = 24
k_route = rng.choice([1, 2, 3, 4], size=T_r, p=[0.45, 0.3, 0.15, 0.1])
perm, starts = sg.route_permutation(k_route, 4)
cmap = plt.get_cmap("viridis", 4)
fig, axes = plt.subplots(3, 1, figsize=(9, 4.6), gridspec_kw={"height_ratios": [1, 1, 2.2]})
axes[0].imshow(k_route[None, :], cmap=cmap, vmin=0.5, vmax=4.5, aspect="auto")
axes[0].set_title("routed slice count k_t, in token order", fontsize=9)
axes[1].imshow(k_route[perm][None, :], cmap=cmap, vmin=0.5, vmax=4.5, aspect="auto")
axes[1].set_title("after the stable sort: one contiguous segment per precision", fontsize=9)
for ax in axes[:2]:
    ax.set_yticks([])
    ax.set_xticks(range(T_r))
    ax.tick_params(labelsize=6)
for s_ in starts[1:-1]:
    axes[1].axvline(s_ - 0.5, color="w", lw=2)
axes[1].set_xticklabels(perm, fontsize=6)
ax = axes[2]
for e in range(1, 5):  # streams: slice e runs on tokens [starts[e-1], T)
    ax.barh(e, T_r - starts[e - 1], left=starts[e - 1], color=slice_colors[e - 1], height=0.6)
    ax.text(T_r + 0.3, e, f"stream {e - 1}: planes {pk.slice_plane_range(SB, e)}", va="center", fontsize=8)
ax.set_xlim(-0.5, T_r + 9)
ax.invert_yaxis()
ax.set_yticks([1, 2, 3, 4])
ax.set_yticklabels([f"slice {e}" for e in (1, 2, 3, 4)], fontsize=8)
ax.set_xlabel("sorted token position")
ax.set_title("streams variant: the work each slice does (base slice for every token)", fontsize=9)
fig.tight_layout()
plt.show()
print("tokens per precision:", np.diff(starts).tolist(), "| avg bits:", np.mean(2 * k_route))

# %% [markdown]
# The two routed methods, with each kernel family, against the per-token reference:

# %%
T_m = 6
x_m = rng.standard_normal((T_m, K_s)).astype(np.float16)
k_m = rng.permutation(np.array([1, 4, 2, 1, 3, 4]))
ref_m = sg.slice_linear_ref(x_m, codes_s, scale_s, zero_s, SB, k_m, g_s).float().numpy()
for method, kind, v in [("grouped", "gemv", 2), ("grouped", "gemm", 3), ("streams", "gemv", 3), ("streams", "gemm", 2)]:
    y = sg.slice_linear(x_m, w_s, k_m, method=method, kind=kind, version=v, out=np.full((T_m, N_s), np.nan, np.float16))
    err = float(np.abs(y.astype(np.float32) - ref_m).max())
    assert not np.isnan(y).any() and err <= 4e-3 * max(1.0, np.abs(ref_m).max())
    print(f"slice_linear method={method:8s} kind={kind} v{v}: max |err| = {err:.1e}")

# %% [markdown]
# **Bytes.** For a 4096×4096 layer (group 128) the plane bytes a call must read, against fp16
# weights — the quantity the benchmark divides by time to get an effective bandwidth:

# %%
N_l, K_l, G_l = 4096, 4096, 4096 // 128
plane_bytes = N_l * (K_l // 32) * 4
meta_bytes = N_l * G_l * 8  # float32 scale + int32 zero
print(f"fp16 weights: {N_l * K_l * 2 / 2**20:6.1f} MiB")
for k in (1, 2, 3, 4):
    print(f"k={k} ({2 * k} bits): {(2 * k * plane_bytes + meta_bytes) / 2**20:6.1f} MiB")

# %% [markdown]
# ## 4b. Decode without rebuilding `Q`: look-up tables of activation sums (GEMV v4–v6)
#
# The shift-and-add kernels spend ~30 instructions per weight rebuilding `Q_k` (the 11-29 H200
# run in `benchmarks/results/` found GEMV v2/v3 bound by instructions, at the same time for 2, 4
# and 8 bits). Linearity removes the rebuild: with bits `bit_pj` of plane `p` (MSB first),
#
# `Σ_j x_j Q_j = Σ_p 2^(nb-1-p) Σ_j x_j bit_pj`,
#
# and one plane byte covers 8 activations. Build, once per block, a 256-entry table per 8
# activations, `tab[v] = Σ_i x_i · bit_i(v)`; then each plane byte is **one table read**, and a
# 32-weight word at `nb` planes costs `4·nb` reads plus `nb` shift-adds — work and bytes both
# fall with the bits read (`cuda_numba/slice_gemv.py`; Any-Precision LLM and LUT-GEMM use
# tables the same way). v5 adds split-K (more blocks than rows allow), v6 lets every token
# stop at its own `B_{k_t}` planes in the same launch, so a routed decode step needs no sort,
# gather or scatter (`slice_linear(..., method="fused")`). In NumPy, for one word:

# %%
x8 = rng.standard_normal(32).astype(np.float32)  # 32 activations of one K-word
q8 = rng.integers(0, 256, 32)  # their 8-bit codes
planes8 = pk.pack_bitplanes_ref(q8[None, :].astype(np.uint8))[:, 0, 0]  # 8 plane words, MSB first
bits8 = (np.arange(256)[:, None] >> np.arange(8)) & 1  # [v, i]: bit i of byte value v
tables = np.stack([bits8 @ x8[8 * b : 8 * b + 8] for b in range(4)])  # [4 bytes, 256]
acc = 0.0
for word in planes8:  # Horner over planes: acc = 2 acc + (4 table reads)
    acc = 2 * acc + sum(tables[b, (int(word) >> (8 * b)) & 255] for b in range(4))
assert np.isclose(acc, float(x8 @ q8), rtol=1e-5, atol=1e-4)
print(f"table look-ups: {acc:.5f}   direct x·q: {float(x8 @ q8):.5f}   (4 reads per plane, 32 reads in all)")

# %%
for v in (4, 5, 6):
    y = sv.gemv(x_s, w_s, 3, version=v, out=np.full((T_s, N_s), np.nan, np.float16))
    ref = sg.slice_linear_ref(x_s, codes_s, scale_s, zero_s, SB, 3, g_s).float().numpy()
    err = float(np.abs(y.astype(np.float32) - ref).max())
    assert not np.isnan(y).any() and err <= 4e-3 * max(1.0, np.abs(ref).max())
    print(f"GEMV v{v} (look-up tables{', split-K' if v > 4 else ''}{', per-token k' if v == 6 else ''}): "
          f"max |err| = {err:.1e}")
y = sg.slice_linear(x_m, w_s, k_m, method="fused", kind="gemv", version=6, out=np.full((T_m, N_s), np.nan, np.float16))
err = float(np.abs(y.astype(np.float32) - ref_m).max())
assert not np.isnan(y).any() and err <= 4e-3 * max(1.0, np.abs(ref_m).max())
print(f"slice_linear method=fused (one launch, k_t = {k_m.tolist()}): max |err| = {err:.1e}")

# %% [markdown]
# ## 5. On a GPU
#
# The simulator proves the kernels compute the right numbers; only a GPU can say whether
# reading fewer planes is faster. `python -m cuda_numba.bench` times every version and torch's
# fp16 matmul (cuBLAS) on Llama-7B/8B layer shapes for 1–2048 tokens and 2–8 average bits,
# validates each case first, and writes `benchmarks/results/<device>_<date>.json` plus a plot.
# (`python -m cuda_numba.ptx_check` compiles every kernel for a real GPU target without one,
# which catches typing problems the simulator cannot see.) Committed results, if any:

# %%
results_dir = Path(pk.__file__).resolve().parents[1] / "benchmarks" / "results"
reports = sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []
if not reports:
    print("No GPU results measured yet: run `python -m cuda_numba.bench` on a machine with a CUDA GPU "
          "(see benchmarks/README.md). Nothing here is a performance claim.")
for path in reports:
    rep = json.loads(path.read_text())
    dev = rep["meta"]["device"]
    print(f"{path.name}: {dev['name']} (driver {dev.get('driver_version')}), {rep['meta']['utc']}, "
          f"commit {rep['meta']['git_commit'][:12]}")
    best = {}
    for r in rep["results"]:
        if r.get("speedup_vs_fp16") and r["kernel"] != "fp16":
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

# %% [markdown]
# ## Summary
#
# * **Bit-major packing** (`uint32 [8, N, K/32]`, MSB plane first) turns "precision `k`" into
#   "the first `B_k` planes": a contiguous slab whose size is linear in the bits used.
# * **AND + popcount** computes integer dot products 32 elements per instruction; zero points
#   become row/column sums, themselves popcounts. `binary_matmul` is exact.
# * With **fp16 activations** the kernels rebuild `Q_k` by shift-and-add from the planes they
#   read and apply the shared scale once per group; the same kernel computes a residual slice.
# * **Look-up tables** of activation sums (GEMV v4–v6) replace the per-weight rebuild by four
#   table reads per plane word; v6 also serves each token at its own precision in one launch,
#   so a routed decode step needs no sort at all. Their GPU times are still to be measured.
# * **Routing** is handled by a stable sort by `k_t` (contiguous segments, inverse permutation
#   after): one launch per precision (*grouped*), or the base slice for all tokens plus one
#   residual launch per slice on its own stream (*streams*).
# * The simulator checks correctness only. Any speed-up must be measured on a GPU
#   (`python -m cuda_numba.bench`), and Numba has no tensor-core or packed-half2 access, so
#   these kernels are a readable baseline, not a rival to hand-written CUDA.
#
# ## Exercises
#
# 1. **Fuse the permutation.** `slice_linear` gathers the sorted activations into a new
#    buffer and scatters the result back. Pass `perm` to the segment kernels instead and index
#    `x[perm[t0 + i]]` / `out[perm[t0 + i]]` directly. Check against `slice_linear_ref`; on a
#    GPU, compare the call time in `cuda_numba.bench`.
# 2. **Signed weights.** Replace the zero-point correction in `binary_matmul` by two's-complement
#    planes (the MSB plane weighs `-2^(b-1)`) and check the identity with
#    `popcount_matmul_ref` on random signed inputs.
# 3. **Bit-serial GEMV without tables.** Write a GEMV that never rebuilds `Q` and keeps no
#    tables: for each plane `p` it sums the activations whose bit is set and adds
#    `2^(B_k-1-p)` times that sum (Sec. 4.3's "shift-add at bit-plane level"). Count its
#    instructions per weight against v3 (shift-and-add) and v4 (look-up tables).
