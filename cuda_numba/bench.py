"""Benchmark every kernel version against torch fp16 (cuBLAS) on Llama layer shapes (Sec. 4.3, 5.4).

    python -m cuda_numba.bench                 # real GPU: full grid, JSON + plot in benchmarks/results/
    python -m cuda_numba.bench --shapes 4096x4096 --tokens 1,8 --bits 2,4 --kernels gemv2,gemv3,fp16
    python -m cuda_numba.bench --sim           # CUDA simulator demo: tiny shapes, correctness only

Shapes are ``KxN`` (in_features x out_features, weight stored [N, K]): 4096x4096 (q/k/v/o),
4096x11008 (Llama-2-7B gate/up), 4096x14336 (Llama-3-8B gate/up), 14336x4096 (its down).
An average bit-width becomes a token mix of slice counts: with slices 2,2,2,2, 3 bits means
half the tokens at k=1 (2 bits) and half at k=2 (4 bits), shuffled, so the routed kernels
must sort them. Each case is validated against a torch float32 reference before timing;
times are medians of CUDA-event intervals after warm-up, with the L2 cache flushed before
each repetition. Effective GB/s counts the packed-weight bytes a method must read (the
planes of every precision/slice it launches, plus scales and zero points), compared with
fp16 weights (2 bytes each) and with the HBM roofline ``bytes / peak bandwidth``.

Kernel names are the modules' public case lists: ``slice_linear.CASES`` (``gemv1-5`` and
``gemm1-3`` through ``slice_linear(method="grouped")``, ``streams-gemv2/-gemv5/-gemm2/-gemm3``
through ``method="streams"``, ``fused-gemv6``/``fused-gemv7``: one launch, k_t on the device, output
preallocated, the decode call path), ``binary_matmul.CASES`` (``bmm1-3``: integer AND+popcount,
8-bit activations pre-quantized and packed, all tokens at the precision nearest the average),
``packing.CASES`` (``pack1-2``: offline packing, once per shape), and ``fp16`` (``x @ W^T`` in torch).

Exit codes: 0 ok, 1 a kernel disagreed with the reference, 2 no real GPU (without ``--sim``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bench_env import REPO, device_info, enter_simulator, git_commit, slug, versions

__all__ = ["all_kernels", "main", "parse_shapes", "token_mix"]

DEFAULT_SHAPES = "4096x4096,4096x11008,4096x14336,14336x4096"
DEFAULT_TOKENS = "1,8,64,512,2048"
DEFAULT_BITS = "2,3,4,6,8"
SIM_SHAPES = "96x37"
SIM_TOKENS = "3"
SIM_BITS = "3"
GEMV_MAX_TOKENS = 8  # GEMV kernels are for decode; larger T is skipped unless --gemv-max-tokens says so


@dataclass(frozen=True)
class Kernel:
    name: str
    family: str  # "slice" | "bmm" | "pack" | "fp16"
    kind: str = ""  # "gemv" | "gemm" for slice kernels
    version: int = 0
    method: str = "grouped"


def all_kernels() -> str:
    """Every benchmark name, comma-separated: the modules' ``CASES`` and the fp16 baseline."""
    from . import binary_matmul, packing, slice_linear

    return ",".join([*slice_linear.CASES, *binary_matmul.CASES, *packing.CASES, "fp16"])


def _kernel(name: str) -> Kernel:
    from . import binary_matmul, packing, slice_linear

    if name == "fp16":
        return Kernel(name, "fp16")
    if name in slice_linear.CASES:
        method, kind, version = slice_linear.CASES[name]
        return Kernel(name, "slice", kind, version, method)
    for family, cases in (("bmm", binary_matmul.CASES), ("pack", packing.CASES)):
        if name in cases:
            return Kernel(name, family)
    raise argparse.ArgumentTypeError(f"unknown kernel {name!r}; choose from {all_kernels()}")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x11008,..."`` -> ``[(K, N), ...]`` (in_features, out_features)."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not m:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}; use KxN, e.g. 4096x11008")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def token_mix(T: int, avg_bits: float, slice_bits=(2, 2, 2, 2), seed: int = 0) -> np.ndarray:
    """Per-token slice counts k_t (1..E) whose bit-widths ``B_{k_t}`` average ``avg_bits``.

    Interpolates between the two neighbouring precisions (e.g. 3 bits of 2,2,2,2: half at
    B=2, half at B=4) and shuffles the tokens. With few tokens the mean is the nearest
    achievable one (T = 1 at 3 bits -> one token at 4 bits, rounding half up).
    """
    B = np.cumsum(slice_bits)
    if not B[0] <= avg_bits <= B[-1]:
        raise ValueError(f"average bits {avg_bits} outside [{B[0]}, {B[-1]}]")
    hi = int(np.searchsorted(B, avg_bits))  # first precision with B >= avg_bits (0-based)
    lo = hi if B[hi] == avg_bits else hi - 1
    frac = 0.0 if hi == lo else (avg_bits - B[lo]) / (B[hi] - B[lo])
    n_hi = int(np.floor(frac * T + 0.5))
    k_t = np.array([hi + 1] * n_hi + [lo + 1] * (T - n_hi), dtype=np.int64)
    return np.random.default_rng(seed).permutation(k_t)


# ---------------------------------------------------------------------------------------
# bytes each method must read


def weight_bytes(kern: Kernel, w, k_t) -> int:
    """Packed-weight bytes the launches of ``kern`` read for routing ``k_t`` (planes + scale/zero)."""
    N, K, G = w.N, w.K, w.n_groups
    plane = N * int(w.planes.shape[2]) * 4  # one bit-plane
    meta = N * G * (4 + 4)  # float32 scale + int32 zero, read once per launch
    ks = sorted({int(k) for k in k_t}) or [1]
    if kern.family == "fp16":
        return N * K * 2
    if kern.family == "pack":
        return N * K  # uint8 codes read (planes written: the same number of bytes)
    if kern.family == "bmm":
        return w.bits_at(_bmm_k(k_t, w)) * plane + N * G * 4
    if kern.method == "fused":  # one launch: the planes of the largest precision, read once
        return w.bits_at(max(ks)) * plane + meta
    if kern.method == "streams":  # every needed slice's planes once
        return w.bits_at(max(ks)) * plane + meta * max(ks)
    return sum(w.bits_at(k) * plane + meta for k in ks)  # grouped: B_k planes per precision


def _bmm_k(k_t, w) -> int:
    """bmm runs every token at one precision: the one nearest the mix's average bits."""
    B = np.cumsum(w.slice_bits)
    avg = float(np.mean(B[np.asarray(k_t) - 1])) if len(k_t) else float(B[0])
    return int(np.argmin(np.abs(B - avg))) + 1


# ---------------------------------------------------------------------------------------
# one case


class _Weights:
    """One random MoBiSlice layer (codes, scale, zero), packed on the device, plus cached references."""

    def __init__(self, K, N, group_size, slice_bits, seed, ref_device):
        from .packing import pack_mobislice

        rng = np.random.default_rng(seed)
        G = 1 if group_size >= K else K // group_size
        self.K, self.N, self.group_size, self.slice_bits = K, N, group_size, tuple(slice_bits)
        self.codes = rng.integers(0, 2 ** sum(slice_bits), (N, K), dtype=np.uint8)
        self.scale = (rng.random((N, G)) * 0.02 + 0.002).astype(np.float32)
        self.zero = rng.integers(0, 2 ** sum(slice_bits), (N, G)).astype(np.int32)  # z_E, finest grid
        self.packed = pack_mobislice(self.codes, self.scale, self.zero, slice_bits, group_size).to_device()
        self.ref_device = ref_device
        self.W = {}  # k -> float32 W_k on ref_device (torch), filled lazily
        self.w16 = None  # fp16 W_E on the GPU for the cuBLAS baseline
        self._torch = None

    def torch_params(self):
        import torch

        if self._torch is None:
            dev = self.ref_device
            self._torch = (
                torch.as_tensor(self.codes).to(dev),
                torch.as_tensor(self.scale).to(dev),
                torch.as_tensor(self.zero).to(dev),
            )
        return self._torch

    def reference(self, x: np.ndarray, k_t) -> np.ndarray:
        """float32 ``x[t] @ W_{k_t}^T`` computed with torch on ``ref_device``."""
        import torch

        from .slice_linear import slice_linear_ref

        codes, scale, zero = self.torch_params()
        xt = torch.as_tensor(x).to(self.ref_device).float()
        return slice_linear_ref(xt, codes, scale, zero, self.slice_bits, k_t, self.group_size, self.W).cpu().numpy()


def _int_matmul(a: np.ndarray, b: np.ndarray, device) -> np.ndarray:
    """Exact ``a @ b.T`` for integer matrices whose sums stay below 2^53, via float64 (GPU if available)."""
    import torch

    at = torch.as_tensor(a, dtype=torch.float64, device=device)
    bt = torch.as_tensor(b, dtype=torch.float64, device=device)
    return torch.round(at @ bt.T).to(torch.int64).cpu().numpy()


def _rel_check(got: np.ndarray, ref: np.ndarray) -> tuple[bool, float]:
    """fp16 outputs: max |got - ref| relative to max(1, max |ref|) below 1e-2."""
    if not ref.size:
        return True, 0.0
    err = float(np.abs(got.astype(np.float32) - ref).max()) / max(1.0, float(np.abs(ref).max()))
    return err < 1e-2, err


class _Case:
    """Inputs for one (shape, tokens, bits) case and, per kernel, runners and a checker."""

    def __init__(self, weights: _Weights, T, k_t, seed):
        from numba import cuda

        self.wt, self.w, self.k_t = weights, weights.packed, k_t
        self.x = np.random.default_rng(seed + T).standard_normal((T, weights.K)).astype(np.float16)
        self.dx = cuda.to_device(self.x)
        self.streams = [cuda.stream() for _ in weights.slice_bits]
        self._ref = None

    def slice_reference(self):
        if self._ref is None:
            self._ref = self.wt.reference(self.x, self.k_t)
        return self._ref

    def runner(self, kern: Kernel):
        """(call, kernels_only, check): ``call()`` launches one full call (async on a GPU) and returns
        its output; ``kernels_only()`` (or None) launches just the compute kernels on inputs sorted
        beforehand; ``check(out) -> (ok, err)``."""
        from numba import cuda

        from . import binary_matmul as bm
        from . import dequant as dq
        from . import packing as pk
        from . import slice_linear as sl

        w, wt = self.w, self.wt
        if kern.family == "slice":
            streams = self.streams if kern.method == "streams" else None
            T = self.x.shape[0]
            if kern.method == "fused":  # decode path: k_t from the router already on the device
                dk = cuda.to_device(np.asarray(self.k_t, np.int64))
                dout = cuda.device_array((T, w.N), np.float16)

                def call():
                    return sl.slice_linear(self.dx, w, dk, method="fused", kind="gemv", version=kern.version, out=dout)

                def kernels_only():
                    sl.run_kernels(kern.name, self.dx, w, self.k_t, out=dout, dk=dk)

                return call, kernels_only, lambda y: _rel_check(y.copy_to_host(), self.slice_reference())

            def call():
                return sl.slice_linear(
                    self.dx, w, self.k_t, method=kern.method, kind=kern.kind, version=kern.version, streams=streams
                )

            perm, _ = sl.route_permutation(self.k_t, len(wt.slice_bits))
            dxs = cuda.to_device(np.ascontiguousarray(self.x[perm]))  # sorted once, outside the timing
            ybuf = cuda.device_array((len(wt.slice_bits), T, w.N), np.float32)

            def kernels_only():
                sl.run_kernels(kern.name, dxs, w, self.k_t, ybuf, self.streams)

            return call, kernels_only, lambda y: _rel_check(y.copy_to_host(), self.slice_reference())
        if kern.family == "pack":
            dcodes = cuda.to_device(wt.codes)
            dplanes = cuda.device_array(w.planes.shape, np.uint32)
            launch = pk.CASES[kern.name]

            def call():
                launch(dcodes, dplanes)
                return dplanes

            def check(y):
                ok = bool(np.array_equal(y.copy_to_host(), w.planes.copy_to_host()))
                return ok, 0.0 if ok else 1.0

            return call, None, check
        if kern.family == "bmm":
            k = _bmm_k(self.k_t, w)
            xq, _, zx = bm.quantize_activations(self.x)
            dxp = cuda.to_device(pk.pack_bitplanes_ref(xq))
            dxz = cuda.to_device(zx)
            dwp = w.planes[: w.bits_at(k)]
            dout = cuda.device_array((self.x.shape[0], w.N), np.int64)
            gw = dq.group_words(w)
            launch = bm.CASES[kern.name]

            def call():
                launch(dxp, dwp, dxz, w.zero, w.K, gw, dout, block=(16, 8))
                return dout

            def check(y):
                g = wt.K if w.n_groups == 1 else wt.group_size
                wq = (wt.codes >> (sum(wt.slice_bits) - w.bits_at(k))).astype(np.int64)
                wq = wq - np.repeat(wt.zero.astype(np.int64), g, axis=1)[:, : wt.K]
                ref = _int_matmul(xq.astype(np.int64) - zx[:, None], wq, wt.ref_device)
                y = y.copy_to_host()
                return bool(np.array_equal(y, ref)), float(np.abs(y - ref).max()) if y.size else 0.0

            return call, None, check
        # fp16 cuBLAS: x @ W^T with the full-precision (k = E) weight in fp16, for every token
        import torch

        E = len(wt.slice_bits)
        if wt.w16 is None:
            codes, scale, zero = wt.torch_params()
            wt.w16 = dq.dequant_codes(codes, scale, zero, wt.slice_bits, E, wt.group_size).to("cuda", torch.float16)
        x16 = torch.as_tensor(self.x).to("cuda")
        w16 = wt.w16

        def call():
            return x16 @ w16.T

        ref = wt.reference(self.x, np.full(self.x.shape[0], E))
        return call, None, lambda y: _rel_check(y.float().cpu().numpy(), ref)


def _time(run, reps, warmup, flush, max_case_ms, delay=None) -> list[float]:
    """Milliseconds per call on a GPU: CUDA-event intervals, the L2 flushed before each.

    ``delay(us)`` (see :func:`_make_delay`) queues a kernel that keeps the GPU busy for ``us``
    microseconds right before the start event: the host enqueues the call's launches while it
    runs, so the interval holds the GPU work of the call, not the Python in front of it (without
    it, host work after the start event reads as 15-40 us extra on kernels under ~50 us). The
    delay is twice the host time of one call (measured here), at least 20 us and at most 20 ms.
    """
    from numba import cuda

    from ._common import make_event

    for _ in range(warmup):
        run()
    cuda.synchronize()
    start, end = make_event(), make_event()
    t0 = time.perf_counter()
    run()
    host_ms = (time.perf_counter() - t0) * 1e3  # enqueue time (the call returns before the GPU is done)
    cuda.synchronize()
    first_ms = (time.perf_counter() - t0) * 1e3
    n = reps if first_ms * reps <= max_case_ms else max(3, int(max_case_ms // max(first_ms, 1e-3)))
    delay_us = min(20000.0, max(20.0, 2e3 * host_ms))
    times = []
    for _ in range(n):
        if flush is not None:
            flush()
        if delay is not None:
            delay(delay_us)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(cuda.event_elapsed_time(start, end))
    return times


def _make_delay():
    """``delay(us)``: a one-thread kernel that sleeps about ``us`` microseconds on the default stream."""
    from numba import cuda

    @cuda.jit
    def _sleep(n_us):
        for _ in range(n_us):
            cuda.nanosleep(1000)  # at most ~1 us per call (the hardware may wake it earlier)

    def delay(us):
        _sleep[1, 1](int(us))

    return delay


def _make_flush(l2_bytes):
    from numba import cuda

    @cuda.jit
    def _fill(buf, v):
        i = cuda.grid(1)
        s = cuda.gridsize(1)
        for j in range(i, buf.shape[0], s):
            buf[j] = v

    buf = cuda.device_array(max(2 * l2_bytes, 64 * 2**20) // 4, dtype=np.int32)
    state = {"v": 0}

    def flush():
        state["v"] += 1
        _fill[1024, 256](buf, state["v"])

    return flush


# ---------------------------------------------------------------------------------------
# driver


def _run_grid(args, sim: bool) -> dict:
    kernels = [_kernel(k.strip()) for k in args.kernels.split(",") if k.strip()]
    shapes, tokens, bits = parse_shapes(args.shapes), _ints(args.tokens), _floats(args.bits)
    slice_bits = tuple(_ints(args.slice_bits))
    meta = {
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "simulator": sim,
        "argv": sys.argv[1:],
        "slice_bits": list(slice_bits),
        "group_size": args.group_size,
        "reps": args.reps,
        "warmup": args.warmup,
        "flush_l2": not args.no_flush,
        "timing": "wall clock of the CUDA simulator, NOT a performance number"
        if sim
        else (
            "median of CUDA-event intervals (L2 flushed before each): ms_median = one full call (host "
            "routing, allocations, gather, kernels, scatter); kernel_ms_median = the compute kernels "
            "alone on pre-sorted tokens; GB/s and roofline use the kernels-only time where there is one; "
            + ("a delay kernel before each start event hides the host's enqueue time (GPU time of the call)"
               if not args.no_delay else "no delay kernel: host enqueue time after the start event is included")
        ),
    }
    if sim:
        meta["device"] = {"name": "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"}
        flush = delay = None
    else:
        meta["device"] = device_info(args.peak_gbs)
        flush = None if args.no_flush else _make_flush(meta["device"]["l2_bytes"])
        delay = None if args.no_delay else _make_delay()
    try:
        import torch

        has_torch_cuda = (not sim) and torch.cuda.is_available()
        torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference, not tf32
    except ImportError:
        has_torch_cuda = False
    ref_device = "cuda" if has_torch_cuda else "cpu"
    peak = meta["device"].get("hbm_peak_gbs")
    results, failures, t_start = [], 0, time.perf_counter()
    jsonl = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115 - closed below
    label = "sim wall ms (NOT perf)" if sim else "call ms"
    print(f"# device: {meta['device']['name']}  |  {meta['timing']}")
    print(
        f"{'shape KxN':>12} {'T':>5} {'bits':>5} {'kernel':>14} {label:>22} {'kern ms':>9} {'GB/s':>8} "
        f"{'x fp16':>7} {'%roof':>6}  check"
    )
    truncated = False
    for K, N in shapes:
        if truncated:
            break
        weights = _Weights(K, N, args.group_size, slice_bits, args.seed, ref_device)
        packed_once = set()
        for T in tokens:
            for b in bits:
                if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                    truncated = True
                    break
                k_t = token_mix(T, b, slice_bits, seed=args.seed)
                case = _Case(weights, T, k_t, args.seed)
                fp16 = {}
                for kern in sorted(kernels, key=lambda k: k.family != "fp16"):  # fp16 first: the baseline
                    if kern.family == "fp16" and not has_torch_cuda:
                        continue
                    if kern.kind == "gemv" and T > args.gemv_max_tokens:
                        continue
                    if kern.family == "pack":
                        if kern.name in packed_once:
                            continue
                        packed_once.add(kern.name)
                    call, kernels_only, check = case.runner(kern)
                    if sim:  # one synchronous call: checked and timed
                        t0 = time.perf_counter()
                        out = call()
                        times = [(time.perf_counter() - t0) * 1e3]
                        ok, err = check(out)
                    else:
                        ok, err = check(call())  # validate before timing
                        times = _time(call, args.reps, args.warmup, flush, args.max_case_ms, delay)
                    kern_times = (
                        _time(kernels_only, args.reps, args.warmup, flush, args.max_case_ms, delay)
                        if (kernels_only is not None and not sim)
                        else None
                    )
                    failures += not ok
                    ms = float(np.median(times))
                    kms = float(np.median(kern_times)) if kern_times else None
                    nbytes = weight_bytes(kern, case.w, k_t)
                    t_bw = kms if kms else ms  # bandwidth from the kernels-only time where there is one
                    gbs = nbytes / (t_bw * 1e-3) / 1e9 if (t_bw > 0 and not sim) else None
                    row = {
                        "K": K,
                        "N": N,
                        "tokens": T,
                        "bits": b,
                        "kernel": kern.name,
                        "avg_bits_actual": float(np.mean(np.cumsum(slice_bits)[k_t - 1])) if T else None,
                        "k_hist": np.bincount(k_t, minlength=len(slice_bits) + 1)[1:].tolist(),
                        "ms_median": ms,
                        "ms_p20": float(np.percentile(times, 20)),
                        "ms_p80": float(np.percentile(times, 80)),
                        "reps": len(times),
                        "kernel_ms_median": kms,
                        "weight_bytes": nbytes,
                        "gbs_effective": gbs,
                        "check_ok": ok,
                        "check_err": err,
                    }
                    if kern.family == "fp16":
                        fp16 = {"ms": ms}
                    row["speedup_vs_fp16"] = fp16["ms"] / ms if (fp16 and not sim) else None
                    row["kernel_speedup_vs_fp16"] = fp16["ms"] / kms if (fp16 and kms and not sim) else None
                    row["roofline_ms"] = nbytes / (peak * 1e9) * 1e3 if peak else None
                    row["frac_of_roofline"] = row["roofline_ms"] / t_bw if (peak and not sim) else None
                    results.append(row)
                    if jsonl is not None:  # each case on disk as soon as it is measured
                        jsonl.write(json.dumps({**row, "device": meta["device"]["name"]}) + "\n")
                        jsonl.flush()
                    sp = f"{row['speedup_vs_fp16']:.2f}" if row["speedup_vs_fp16"] else "-"
                    fr = f"{100 * row['frac_of_roofline']:.0f}" if row["frac_of_roofline"] else "-"
                    print(
                        f"{K:>6}x{N:<5} {T:>5} {b:>5g} {kern.name:>14} {ms:>22.3f} "
                        f"{(f'{kms:.3f}' if kms else '-'):>9} {(f'{gbs:.1f}' if gbs else '-'):>8} {sp:>7} {fr:>6}  "
                        f"{'ok' if ok else 'MISMATCH'} ({err:.1e})",
                        flush=True,
                    )
    meta["truncated_by_time_budget"] = truncated
    if jsonl is not None:
        jsonl.close()
    return {"meta": meta, "results": results, "failures": failures}


def _write(report: dict, out_dir: Path, plot: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(report['meta']['device']['name'])}_{report['meta']['utc'][:10]}"
    path = out_dir / f"{stem}.json"
    n = 2
    while path.exists():  # never overwrite an earlier run
        path = out_dir / f"{stem}-{n}.json"
        n += 1
    path.write_text(json.dumps(report, indent=1) + "\n")
    if plot:
        _plot(report, path.with_suffix(".png"))
    return path


def _plot(report: dict, path: Path) -> None:
    """Time per call vs tokens, one panel per (bits, shape), one line per kernel (fp16 dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["kernel"][:4] != "pack"]
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    bits = sorted({r["bits"] for r in rows})
    if not shapes:
        return
    fig, axes = plt.subplots(len(bits), len(shapes), figsize=(4 * len(shapes), 3 * len(bits)), squeeze=False)
    for i, b in enumerate(bits):
        for j, (K, N) in enumerate(shapes):
            ax = axes[i][j]
            for name in sorted({r["kernel"] for r in rows}):
                pts = sorted(
                    (r["tokens"], r["ms_median"])
                    for r in rows
                    if r["kernel"] == name and (r["K"], r["N"]) == (K, N) and r["bits"] == b
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=name, ls="--" if name == "fp16" else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{K}x{N}, {b:g} bits", fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms per call (median)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{report['meta']['device']['name']} - {report['meta']['utc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser(prog: str | None = None, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench's options; ``parser_class`` lets ``mbq bench`` give its own one-line error format."""
    ap = parser_class(
        prog=prog or "python -m cuda_numba.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results are written by this script only; never edit them by hand."
        + ("\nmbq bench --e2e [--sim] [ARGS]: end-to-end decode tok/s and memory, fp16 vs packed "
           "(python -m mbq_ref.e2e; `mbq bench --e2e --help`)." if prog == "mbq bench" else ""),
    )
    ap.add_argument("--shapes", default=None, help=f"KxN list (default {DEFAULT_SHAPES}; --sim: {SIM_SHAPES})")
    ap.add_argument("--tokens", default=None, help=f"token counts (default {DEFAULT_TOKENS}; --sim: {SIM_TOKENS})")
    ap.add_argument("--bits", default=None, help=f"average bits (default {DEFAULT_BITS}; --sim: {SIM_BITS})")
    ap.add_argument("--kernels", default=None, help="comma-separated kernels (default: all)")
    ap.add_argument("--slice-bits", default="2,2,2,2", help="MoBiSlice slice widths (default 2,2,2,2)")
    ap.add_argument("--group-size", type=int, default=128, help="weights per scale/zero group (default 128)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per case (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first, incl. JIT compile (default 3)")
    ap.add_argument("--max-case-ms", type=float, default=3000.0, help="cut reps (min 3) for slow cases")
    ap.add_argument("--time-budget", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    ap.add_argument("--gemv-max-tokens", type=int, default=GEMV_MAX_TOKENS, help="largest T for gemv kernels")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between repetitions")
    ap.add_argument("--no-delay", action="store_true", help="no delay kernel before the start event (host time counts)")
    ap.add_argument("--jsonl", default=None, help="also append every case to this file as one JSON line, as it is measured")
    ap.add_argument("--peak-gbs", type=float, default=None, help="HBM peak GB/s (default: from the device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where the JSON and plot go")
    ap.add_argument("--no-write", action="store_true", help="print only, write no files")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON but no plot")
    ap.add_argument(
        "--sim",
        action="store_true",
        help="tiny correctness demo in the CUDA simulator (timings are NOT performance numbers)",
    )
    return ap


def _fail(prog: str, msg: str) -> int:
    """A bad option: one line ``PROG: error: ...`` on stderr (the format of every mbq command), exit code 2."""
    print(f"{prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _check_slice_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(_ints(text))
    except ValueError:
        bits = ()
    if not bits or any(not 1 <= b <= 8 for b in bits) or sum(bits) > 8:
        raise ValueError(f"--slice-bits {text!r}: give 1..8-bit slices totalling at most 8 bits (one byte per code), e.g. 2,2,2,2")
    return bits


def main(argv=None, prog: str | None = None, parser_class=argparse.ArgumentParser) -> int:
    """Entry point (``python -m cuda_numba.bench``, later ``mbq bench``); returns the exit code."""
    ap = build_parser(prog, parser_class)
    args = ap.parse_args(argv)
    import numba

    try:
        _check_slice_bits(args.slice_bits)
    except ValueError as exc:
        return _fail(ap.prog, exc)

    if args.sim and (rc := enter_simulator("cuda_numba.bench", argv)) is not None:
        return rc
    sim = bool(args.sim)
    args.kernels = args.kernels or all_kernels()
    if not args.sim:
        from . import _common

        if not _common.real_gpu_available():
            why = (
                "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1)"
                if numba.config.ENABLE_CUDASIM
                else "Numba sees no CUDA GPU"
            )
            return _fail(ap.prog, f"no real GPU ({why}); run it on a GPU machine, or pass --sim for a "
                                  "simulator demo (not a performance number)")  # fmt: skip
    if args.sim:
        args.shapes = args.shapes or SIM_SHAPES
        args.tokens = args.tokens or SIM_TOKENS
        args.bits = args.bits or SIM_BITS
        args.reps, args.warmup = 1, 0
        args.group_size = min(args.group_size, 32)
        args.kernels = ",".join(k for k in args.kernels.split(",") if k.strip() != "fp16")
        print(
            "SIMULATOR DEMO: kernels run as Python threads on the CPU; correctness is real, the times "
            "below are NOT performance numbers."
        )
    else:
        args.shapes = args.shapes or DEFAULT_SHAPES
        args.tokens = args.tokens or DEFAULT_TOKENS
        args.bits = args.bits or DEFAULT_BITS
    try:
        report = _run_grid(args, sim)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        return _fail(ap.prog, exc)
    failures = report.pop("failures")
    if not args.sim and not args.no_write:
        path = _write(report, Path(args.out_dir), plot=not args.no_plot)
        print(f"wrote {path}")
    print(f"{len(report['results'])} cases, {failures} mismatching the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
