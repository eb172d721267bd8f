"""End-to-end decode speed and memory of the packed backend vs fp16 (Sec. 5.4, Table 1).

    python -m mbq_ref.e2e                      # real GPU: Llama-2-7B-shaped random model + a small one
    python -m mbq_ref.e2e --sim                # CUDA simulator: a tiny model, correctness of the loop only
    mbq bench --e2e [--sim] [ARGS...]             # the same, from the command line

A model with random weights (no hub access) is decoded greedily with a KV cache: the prompt
is prefilled, then ``--new-tokens`` tokens are generated one at a time and timed (CUDA
synchronised wall clock, the way a user sees it: router, Numba launches, attention, all of
it). Two backends:

* ``fp16``: the model as built, fp16 weights, torch (cuBLAS) linears;
* ``packed``: every q/k/v/o/gate/up/down projection is a :class:`mbq_ref.packed.PackedMoBiLinear`
  holding random bit-planes (codes), scales and zero points (nothing else), run by the
  routed GEMV v6 kernel; its precision is set with ``fixed_k`` (2/4/6/8 bits: static) or
  left to its (random) router (``routed``: the measured average bits are reported).

Reported per setting: tokens/s, ms per token, average bits actually read, and the GPU memory
of the weights (``torch.cuda.memory_allocated`` after building, before decoding). The paper's
LLaMA2-7B A100 decode speeds (404/311/256 tok/s at 2/3/4 bits, Table 1; see docs/paper.md) are
printed beside, for orientation only: different GPU, different kernels.
Writes ``benchmarks/results/e2e_<device>_<date>.json`` (never overwriting) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["MODELS", "PAPER_TOK_S", "build_model", "decode_tokens_per_s", "main", "pack_random", "paper_line"]

REPO = Path(__file__).resolve().parents[1]
# name -> (hidden, intermediate, layers, heads, kv heads, vocab)
MODELS = {
    "tiny": (64, 128, 1, 4, 2, 64),
    "small": (1024, 2816, 4, 16, 16, 32000),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
}
PAPER_TOK_S = {2: 404, 3: 311, 4: 256}  # MoBiQuant, LLaMA2-7B, A100 (paper, Table 1)


def build_model(name: str, device: str, seed: int = 0):
    """A random Llama of shape ``MODELS[name]`` in fp16 (fp32 on CPU), built on ``device`` without a CPU copy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, layers, heads, kv, vocab = MODELS[name]
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
    )  # fmt: skip
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs (a 7B model never passes through the CPU)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def pack_random(model, slice_bits=(2, 2, 2, 2), group_size: int = 128, seed: int = 0) -> dict:
    """Replace each projection by a PackedMoBiLinear with random codes (weight std ~0.02); returns sizes."""
    import torch

    from .fakequant import quantizable_linears
    from .mobiroute import MoBiRouter
    from .packed import PackedMoBiLinear

    BE, b1 = sum(slice_bits), slice_bits[0]
    packed = weights = 0
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, lin in quantizable_linears(model).items():
        N, K = lin.out_features, lin.in_features
        dev = lin.weight.device
        W = -(-K // 32)
        planes = torch.randint(-(2**31), 2**31 - 1, (BE, N, W), dtype=torch.int32, device=dev, generator=gen)
        if K % 32:  # bits beyond K are zero padding
            planes[..., -1] &= (1 << (K % 32)) - 1
        G = 1 if group_size >= K else K // group_size
        # Q_E uniform in [0, 2^B_E), z_E at the middle: W = s_E (Q_E - z_E + 1/2), std ~ 0.02
        s_E = 0.02 / (2**BE / 12**0.5)
        scale = torch.full((N, G), s_E * 2 ** (BE - b1), dtype=torch.float32, device=dev)
        zero = torch.full((N, G), 2 ** (BE - 1), dtype=torch.int32, device=dev)
        router = MoBiRouter(K, len(slice_bits) - 1).to(dev)  # scores ~1: tau_logit 1.0 below mixes slices
        layer = PackedMoBiLinear(planes, scale, zero, slice_bits, min(group_size, K), K, lin.bias, router, 1.0, name)
        model.set_submodule(name, layer)
        packed += layer.nbytes
        weights += N * K
    return {"packed_bytes": packed, "weights": weights, "bits_per_weight": 8 * packed / weights}


def decode_tokens_per_s(model, prompt_len: int, new_tokens: int, vocab: int, device: str) -> dict:
    """Greedy decode with a KV cache; times the ``new_tokens`` single-token steps (synchronised)."""
    import torch

    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        sec = time.perf_counter() - t0
    finite = bool(torch.isfinite(out.logits).all())
    return {"tok_s": new_tokens / sec, "ms_per_token": 1e3 * sec / new_tokens, "logits_finite": finite}


def projection_step(model, device: str, graph: bool = False, reps: int = 20) -> dict:
    """One decode step of every packed projection (one token each, the model's order), eager and as a CUDA graph.

    The packed decode path (:meth:`mbq_ref.packed.PackedMoBiLinear._decode`) never synchronises
    with the host, so a whole step can be captured by ``torch.cuda.graph`` and replayed with one
    launch from Python. Returns microseconds per step: ``eager_us`` and, with ``graph`` on a GPU,
    ``graph_us`` and ``graph_max_abs_diff`` (replayed outputs against eager ones). Inputs are
    random (the projections only, no attention or norms between them).
    """
    import torch

    from .packed import packed_layers

    layers = list(packed_layers(model).values())
    dtype = next(iter(layers)).scale.dtype if device != "cuda" else torch.float16
    gen = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(1, p.in_features, device=device, dtype=dtype, generator=gen) for p in layers]

    def step():
        return [p(x) for p, x in zip(layers, xs)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        ref = step()  # warm-up: compiles, plans, workspaces
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        out = {"projections": len(layers), "eager_us": 1e6 * (time.perf_counter() - t0) / reps}
        if graph and device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up on the capture stream (its own workspaces)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=side):  # the stream whose plans and workspaces were warmed up
                static = step()
            g.replay()
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                g.replay()
            sync()
            out["graph_us"] = 1e6 * (time.perf_counter() - t0) / reps
            out["graph_max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(static, ref))
    return out


def _settings(slice_bits, wanted: str):
    """(label, fixed_k or None) for ``wanted`` = "2,4,...,routed": static bits B_k and the router's own mix."""
    B = [int(b) for b in np.cumsum(slice_bits)]
    out = []
    for item in (w.strip() for w in wanted.split(",") if w.strip()):
        if item == "routed":
            out.append(("routed", None))
        elif item.isdigit() and int(item) in B:
            out.append((f"{item} bits", B.index(int(item)) + 1))
        else:
            raise ValueError(f"setting {item!r}: use bit-widths among {B} or 'routed'")
    return out


def _run_model(name, args, device, sim) -> list[dict]:
    import torch

    from .packed import packed_layers

    rows = []
    vocab = MODELS[name][5]
    cuda_dev = device == "cuda"
    if cuda_dev:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(name, device, args.seed)
    mem0 = torch.cuda.memory_allocated() if cuda_dev else None
    if not sim:  # the fp16 baseline (the simulator has no CUDA torch)
        r = decode_tokens_per_s(model, args.prompt, args.new_tokens, vocab, device)
        rows.append({"model": name, "backend": "fp16", "setting": "fp16", "avg_bits": 16.0, **r, "weights_mem_bytes": mem0})
        print(f"{name:>10} fp16      {r['tok_s']:9.1f} tok/s {r['ms_per_token']:8.2f} ms/token", flush=True)
    sizes = pack_random(model, seed=args.seed)
    if cuda_dev:
        torch.cuda.empty_cache()
    mem1 = torch.cuda.memory_allocated() if cuda_dev else None
    layers = packed_layers(model)
    for p in layers.values():
        p.backend = "kernels"
    for label, k in _settings((2, 2, 2, 2), args.settings):
        for p in layers.values():
            p.fixed_k = k
            p.reset_stats()
        r = decode_tokens_per_s(model, args.prompt, args.new_tokens, vocab, device)
        toks = sum(p.stats.tokens for p in layers.values())
        bits = sum(p.stats.bit_sum for p in layers.values()) / max(toks, 1)
        row = {"model": name, "backend": "packed", "setting": label, "avg_bits": bits, **r, "weights_mem_bytes": mem1}
        row.update({f"packed_{key}": v for key, v in sizes.items()})
        if getattr(args, "graph", False) and label == _settings((2, 2, 2, 2), args.settings)[0][0]:
            row["projection_step"] = projection_step(model, device, graph=not sim)
            print(f"{name:>10} packed projections, one decode step: {row['projection_step']}", flush=True)
        paper = PAPER_TOK_S.get(round(bits)) if name == "llama2-7b" and abs(bits - round(bits)) < 1e-9 else None
        row["paper_a100_tok_s"] = paper
        rows.append(row)
        tail = f"   (paper, A100: {paper} tok/s)" if paper else ""
        print(f"{name:>10} packed {label:>8} {r['tok_s']:9.1f} tok/s {r['ms_per_token']:8.2f} ms/token "
              f"{bits:5.2f} bits{tail}", flush=True)  # fmt: skip
    del model
    return rows


# defaults: (real GPU, --sim); the simulator runs Python threads, so its demo is one tiny model, a few tokens
DEFAULTS = {
    "models": ("small,llama2-7b", "tiny"),
    "prompt": (16, 2),
    "new_tokens": (32, 2),
    "settings": ("2,4,6,8,routed", "2,routed"),
}


def paper_line() -> str:
    """The paper's decode speeds, printed beside ours for orientation."""
    return "paper (MoBiQuant, LLaMA2-7B, A100): " + ", ".join(f"{b} bits {t} tok/s" for b, t in PAPER_TOK_S.items())


def _fail(prog: str, msg) -> int:
    """A bad option: one line ``PROG: error: ...`` on stderr (the format of every mbq command), exit code 2."""
    print(f"{prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def main(argv=None, prog: str | None = None, parser_class=argparse.ArgumentParser) -> int:
    """Entry point (``python -m mbq_ref.e2e``, ``mbq bench --e2e``); returns the exit code."""
    ap = parser_class(prog=prog or "python -m mbq_ref.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help=f"comma-separated, from {sorted(MODELS)} (default: "
                    f"{DEFAULTS['models'][0]}; --sim: {DEFAULTS['models'][1]})")  # fmt: skip
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens, prefilled, not timed (default 16; --sim: 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens, timed (default 32; --sim: 2)")
    ap.add_argument("--settings", default=None, help="static bit-widths and/or 'routed' (default "
                    f"{DEFAULTS['settings'][0]}; --sim: {DEFAULTS['settings'][1]})")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graph", action="store_true", help="also time one decode step of the packed projections "
                    "captured as a CUDA graph (GPU only)")  # fmt: skip
    ap.add_argument("--sim", action="store_true", help="CUDA simulator: tiny model, correctness only (NOT speed)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import numba

    from cuda_numba import bench_env

    if args.sim and (rc := bench_env.enter_simulator("mbq_ref.e2e", argv)) is not None:
        return rc
    for key, (gpu, sim_default) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, sim_default if args.sim else gpu)
    if args.prompt < 1 or args.new_tokens < 1:
        return _fail(ap.prog, f"--prompt and --new-tokens must be at least 1, got {args.prompt} and {args.new_tokens}")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # renamed in newer transformers
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        _settings((2, 2, 2, 2), args.settings)
    except ValueError as exc:
        return _fail(ap.prog, exc)
    bad = [m for m in names if m not in MODELS]
    if bad:
        return _fail(ap.prog, f"unknown model {bad[0]!r} in --models; choose from {', '.join(MODELS)}")
    sim = bool(numba.config.ENABLE_CUDASIM)
    if args.sim != sim:
        return _fail(ap.prog, "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): pass --sim, or unset it on a GPU")
    from cuda_numba import real_gpu_available

    if not sim and not real_gpu_available():
        return _fail(ap.prog, "no real GPU; run it on a GPU machine, or with --sim in the simulator")
    device = "cpu" if sim else "cuda"
    if sim:
        print("SIMULATOR: the times below are NOT performance numbers")
    print(paper_line(), flush=True)
    rows = []
    for name in names:
        rows += _run_model(name, args, device, sim)
    report = {
        "meta": {
            "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": bench_env.git_commit(),
            "versions": bench_env.versions(),
            "simulator": sim,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "device": {"name": "CUDA simulator"} if sim else bench_env.device_info(None),
            "method": "greedy decode with KV cache, random weights; tok/s = new tokens / synchronised wall time",
            "paper_a100_tok_s": {str(b): t for b, t in PAPER_TOK_S.items()},
        },
        "results": rows,
    }
    if not sim and not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"e2e_{bench_env.slug(report['meta']['device']['name'])}_{report['meta']['utc'][:10]}"
        path, n = out / f"{stem}.json", 2
        while path.exists():
            path, n = out / f"{stem}-{n}.json", n + 1
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    bad_rows = [r for r in rows if not r["logits_finite"]]
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
