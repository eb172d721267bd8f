"""What the GPU would execute, read without a GPU: ``python -m cuda_numba.sass`` (a static SASS report).

Every decode kernel is compiled the way a GPU run compiles it (Numba -> NVVM -> PTX for
``sm_90``, then ``ptxas``) and disassembled (``nvdisasm``). From that machine code the report
reads, per kernel and bit-width:

* **registers**, **local memory** (stack frame, spill stores / loads) and static **shared
  memory**, from ``ptxas -v``;
* the **loops** (a branch back to an earlier address closes a loop) and the static instruction
  count of each; the **hot loop** is the innermost loop that reads the bit-planes;
* **instructions per weight**: the instructions one thread issues per weight it processes,
  from the loop bodies times their trip counts (:data:`MODELS`: what one iteration of each
  loop covers, from the kernel's launch geometry), divided by the weights they cover;
* a **predicted lower bound** on the kernel time for the bench shapes on A100, H100 and H200:

      t >= max( bytes / peak HBM bandwidth ,  weights * instructions per weight / issue rate )

  with ``issue rate = SMs * 4 schedulers * 32 lanes * boost clock`` thread-instructions per
  second (each SM sub-partition issues one warp instruction per clock). It is a *bound*, not
  a measurement: it ignores latency, occupancy, bank conflicts and instructions that issue at
  less than the full rate, and assumes the bytes stream at the datasheet peak.

Writes ``benchmarks/results/sass.json``: one row per (kernel, bits, shape, GPU) with ``kernel``,
``bits``, ``shape`` ("KxN"), ``gpu``, ``registers``, ``local_bytes``, ``spill_bytes``,
``shared_bytes``, ``hot_loop_instructions``, ``instructions_per_weight``, ``bytes``,
``predicted_us`` (and which bound it is). Exit codes: 0 ok, 1 a kernel failed to compile,
2 no compiler (a one-line reason).

**What it needs** (PyPI wheels; no GPU, no driver): ``nvidia-nvvm`` (NVVM, used by Numba's
``compile_ptx``), ``nvidia-cuda-nvrtc`` (Numba loads NVRTC for its C helpers), and
``nvidia-cuda-nvdisasm``, plus ``ptxas`` from a CUDA toolkit or the ``nvidia-cuda-nvcc`` wheel
(found on PATH or by ``cuda.pathfinder``). ``pip install "mbq-ref[sass]"`` installs the wheels.
Run with ``NUMBA_ENABLE_CUDASIM=0`` (the default outside pytest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GPUS",
    "MODELS",
    "Sass",
    "compile_sass",
    "find_tools",
    "instructions_per_weight",
    "main",
    "predict_us",
]

REPO = Path(__file__).resolve().parents[1]
SHAPES = ((14336, 4096), (4096, 14336), (4096, 4096))  # K x N: Llama-3-8B down, gate/up; q/k/v/o
BITS = (2, 4, 8)


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures of one GPU (sources in the comments of :data:`GPUS`)."""

    name: str
    cc: tuple
    sms: int
    boost_ghz: float
    hbm_gbs: float

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second: SMs x 4 sub-partitions x 32 lanes x clock."""
        return self.sms * 4 * 32 * self.boost_ghz * 1e9


# SMs and boost clocks: NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), table 3
# (A100 SXM4: 108 SMs, 1410 MHz); NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022),
# table 3 (H100 SXM5: 132 SMs; 1980 MHz is the SXM5 maximum boost in NVIDIA's H100 datasheet).
# H200 is the same GH100 chip (132 SMs, same clocks) with HBM3e. Memory bandwidth: NVIDIA
# A100 80GB datasheet (SXM: 2,039 GB/s), H100 datasheet (SXM: 3.35 TB/s), H200 datasheet
# (SXM: 4.8 TB/s). One instruction per clock per SM sub-partition (4 per SM): the CUDA C++
# Programming Guide, "Hardware Multithreading" and "Arithmetic Instructions" (compute
# capabilities 8.0 and 9.0).
GPUS = (
    Gpu("A100-SXM4-80GB", (8, 0), 108, 1.410, 2039.0),
    Gpu("H100-SXM5", (9, 0), 132, 1.980, 3350.0),
    Gpu("H200-SXM", (9, 0), 132, 1.980, 4800.0),
)


# ---------------------------------------------------------------------------------------
# Tools


class NoCompiler(RuntimeError):
    """NVVM / NVRTC / ptxas / nvdisasm missing: the report cannot be made on this machine."""


def _binary(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    try:
        from cuda import pathfinder

        return pathfinder.find_nvidia_binary_utility(name)
    except Exception:  # noqa: BLE001 - not installed, or an older cuda-pathfinder
        return None


def find_tools() -> dict:
    """``{"ptxas": path, "nvdisasm": path}``, or :class:`NoCompiler` naming what is missing."""
    tools = {name: _binary(name) for name in ("ptxas", "nvdisasm")}
    missing = [name for name, path in tools.items() if not path]
    if missing:
        raise NoCompiler(
            f"{' and '.join(missing)} not found (pip install nvidia-cuda-nvdisasm; ptxas comes with a CUDA "
            "toolkit or the nvidia-cuda-nvcc wheel)"
        )
    return tools


def _pretend_device(cc) -> None:
    """Device functions are compiled for the *current* device's compute capability; without a
    GPU there is none, so pretend one of ``cc`` exists (the same trick as ``ptx_check``)."""
    import numba.cuda.dispatcher as dispatcher

    class _Device:
        compute_capability = tuple(cc)

    dispatcher.get_current_device = lambda: _Device


# ---------------------------------------------------------------------------------------
# Compile and parse


@dataclass
class Loop:
    start: int  # address of the first instruction
    end: int  # address of the backward branch
    count: int  # static instructions in [start, end]
    shared_loads: int
    global_loads: int
    children: list = field(default_factory=list)

    def own(self) -> int:
        """Instructions in this loop but in none of its inner loops."""
        return self.count - sum(c.count for c in self.children)


@dataclass
class Sass:
    """One compiled kernel: ptxas' resource report and the loops of its machine code."""

    name: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    instructions: int
    loops: list  # top-level Loop objects (children nested)
    text: str = field(repr=False, default="")

    @property
    def local_bytes(self) -> int:
        """Local memory per thread: the stack frame (local arrays and spills live there)."""
        return self.stack_bytes

    def all_loops(self) -> list:
        out, todo = [], list(self.loops)
        while todo:
            lp = todo.pop(0)
            out.append(lp)
            todo = lp.children + todo
        return out

    def hot_loop(self) -> Loop | None:
        """The innermost loop that loads from global memory (the bit-planes) and has most instructions."""
        cands = [lp for lp in self.all_loops() if lp.global_loads and not any(c.global_loads for c in lp.children)]
        return max(cands, key=lambda lp: lp.count) if cands else None


_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)")


def parse_sass(text: str) -> tuple[list, list]:
    """nvdisasm text -> (instructions ``[(address, text)]``, loops as a nested tree of :class:`Loop`)."""
    ins, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            ins.append((addr, m.group(2)))
    spans = []
    for addr, txt in ins:
        m = _BRANCH.search(txt)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            spans.append((labels[m.group(1)], addr))
    spans = sorted(set(spans), key=lambda s: (s[0], -s[1]))
    loops = []
    for s, e in spans:
        ops = [_opcode(t) for a, t in ins if s <= a <= e]
        loops.append(Loop(s, e, len(ops), sum(o.startswith("LDS") for o in ops), sum(o.startswith("LDG") for o in ops)))
    roots = []
    for lp in sorted(loops, key=lambda lp: (lp.start, -lp.end)):  # nest by containment
        parent = None
        for cand in _walk(roots):
            if cand.start <= lp.start and lp.end <= cand.end and cand is not lp:
                parent = cand  # the innermost container is found last
        (parent.children if parent else roots).append(lp)
    return ins, roots


def _opcode(txt: str) -> str:
    """``@!P0 LDS.U8 R1, [R2]`` -> ``LDS.U8``."""
    parts = txt.split()
    return parts[1] if parts and parts[0].startswith("@") and len(parts) > 1 else (parts[0] if parts else "")


def _walk(loops):
    for lp in loops:
        yield lp
        yield from _walk(lp.children)


_PTXAS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers"
    r"(?:.*?(\d+) bytes smem)?",
    re.S,
)


def compile_sass(name: str, pyfunc, sig, cc=(9, 0), tools: dict | None = None, max_registers: int | None = None) -> Sass:
    """Compile one kernel (``pyfunc`` with Numba types ``sig``) for ``sm_<cc>`` and read its SASS.

    ``max_registers``: the kernel's ``cuda.jit(max_registers=...)`` (passed to ptxas as on a GPU).
    """
    from numba import cuda

    tools = tools or find_tools()
    _pretend_device(cc)
    try:
        ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=tuple(cc))
    except Exception as exc:  # noqa: BLE001 - NVVM / NVRTC missing shows up here
        msg = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        if "Failure finding" in msg or "not found" in msg.lower() or "libnvvm" in msg.lower():
            raise NoCompiler(f"no NVVM/NVRTC ({msg}); pip install nvidia-nvvm nvidia-cuda-nvrtc") from exc
        raise
    arch = f"sm_{cc[0]}{cc[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        cmd = [tools["ptxas"], f"-arch={arch}", "-v", "-o", str(cubin), str(src)]
        if max_registers:
            cmd.insert(1, f"--maxrregcount={int(max_registers)}")
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"ptxas failed for {name}: {res.stderr.strip().splitlines()[-1:]}")
        dis = subprocess.run([tools["nvdisasm"], "-c", str(cubin)], capture_output=True, text=True, check=False)
        if dis.returncode:
            raise RuntimeError(f"nvdisasm failed for {name}: {dis.stderr.strip()[:200]}")
    m = _PTXAS.search(res.stderr)
    if not m:
        raise RuntimeError(f"unexpected ptxas report for {name}: {res.stderr[-300:]}")
    stack, sst, sld, regs, smem = (int(v) if v else 0 for v in m.groups())
    ins, loops = parse_sass(dis.stdout)
    return Sass(name, regs, stack, sst, sld, smem, len(ins), loops, dis.stdout)


# ---------------------------------------------------------------------------------------
# The decode kernels and what one iteration of their loops covers


def _types():
    from numba import types as nt

    def arr(dtype, ndim):
        return nt.Array(dtype, ndim, "C")

    return nt, arr


def _seg_sig(extra=()):
    """The ladder's segment signature (``dequant`` module docstring), fp16 activations and outputs."""
    nt, arr = _types()
    x2 = arr(nt.float16, 2)
    seg = (x2, nt.int64, nt.int64, arr(nt.uint32, 3), nt.int64, nt.int64, arr(nt.float32, 2), arr(nt.int32, 2),
           nt.float32, nt.float32, nt.int64, nt.int64, arr(nt.float16, 2))  # fmt: skip
    return seg + tuple(extra)


def v7_signature(routed: bool = False):
    """Numba types of a v7 launch (``gemv7_kernel``'s arguments) with fp16 x and out, int64 k_t."""
    nt, arr = _types()
    kt = arr(nt.int64 if routed else nt.int32, 1)
    return (arr(nt.float16, 2), nt.int64, kt, arr(nt.int32, 1), arr(nt.uint32, 1), nt.int64, nt.int64, nt.int64,
            arr(nt.float32, 1), arr(nt.int32, 1), nt.int64, nt.int64, nt.float32, nt.float32, nt.float32, nt.int64,
            arr(nt.float32, 1), arr(nt.int32, 1), arr(nt.float16, 2))  # fmt: skip


def _ladder_kernel(version: int):
    from . import slice_gemm as sg
    from . import slice_gemv as sv

    nt, arr = _types()
    split = (arr(nt.float32, 3), arr(nt.int32, 1))
    if version == 1:
        return sg.gemm_kernel1, _seg_sig()
    if version in (2, 3, 4):
        return getattr(sv, f"gemv_kernel{version}"), _seg_sig()
    if version == 5:
        return sv.gemv_kernel5, _seg_sig(split)
    x2, i64, o2 = arr(nt.float16, 2), nt.int64, arr(nt.float16, 2)
    sig6 = (x2, i64, i64, arr(nt.int64, 1), arr(nt.int32, 1), arr(nt.uint32, 3), arr(nt.float32, 2),
            arr(nt.int32, 2), i64, o2) + split  # fmt: skip
    return sv.gemv_kernel6, sig6


@dataclass
class Row:
    kernel: str
    bits: int
    shape: str
    gpu: str
    registers: int
    local_bytes: int
    spill_bytes: int
    shared_bytes: int
    hot_loop_instructions: int | None
    instructions_per_weight: float | None
    bytes: int
    memory_us: float
    instruction_us: float | None
    predicted_us: float | None
    bound: str
    model: str
    tokens: int = 1


def packed_bytes(K: int, N: int, bits: int, group: int = 128) -> int:
    """Bytes a decode GEMV must read: ``bits`` planes of ``N x ceil(K/32)`` words + float32 scale and int32 zero per group."""
    W = -(-K // 32)
    return bits * N * W * 4 + N * max(1, K // group) * 8


def _other_loops(sass: Sass, hot: Loop) -> list:
    """Top-level loops that do not contain the hot loop."""
    return [lp for lp in sass.loops if not (lp.start <= hot.start and hot.end <= lp.end)]


def _straight_line(sass: Sass) -> tuple[int, int]:
    """(instructions outside every loop before the first barrier, and after it, up to the last EXIT).

    Code after the kernel's last ``EXIT`` is the compiler's subroutines (64-bit division slow
    paths, called only when an operand does not fit 32 bits): not counted.
    """
    ins, _ = parse_sass(sass.text)
    last_exit = max((a for a, t in ins if _opcode(t) == "EXIT"), default=None)
    if last_exit is not None:
        ins = [(a, t) for a, t in ins if a <= last_exit]
    in_loop = [any(lp.start <= a <= lp.end for lp in sass.loops) for a, _ in ins]
    first_bar = next((a for a, t in ins if _opcode(t).startswith("BAR")), None)
    before = sum(1 for (a, _), inl in zip(ins, in_loop) if not inl and first_bar is not None and a < first_bar)
    after = sum(1 for inl in in_loop if not inl) - before
    return before, after


def instructions_per_weight(version: int, sass: Sass, bits: int, K: int, N: int, gpu: Gpu) -> tuple:
    """(instructions per weight, hot-loop static count, how it was counted) for one kernel and shape, T = 1.

    v7 (bits and tokens are constants: the compiler unrolls every plane and nibble, so the
    machine code has one loop per row plus the epilogue): per block, in thread-instructions,

        32 x [ before + warps x ( after + hot x rows per warp + epilogue x its trips / K-blocks ) ]

    ``before``: code outside loops ahead of the first barrier (the table build, run by warp 0),
    ``after``: code outside loops after it (every warp), ``hot``: the row loop (one iteration =
    one row, 64 words per lane), the epilogue loop runs in the last block of a row group only.
    Summed over the grid of :func:`cuda_numba.slice_gemv.v7_geometry` and divided by N K.
    v1-v6 read the bit-width at run time; their loops are unrolled by factors the machine code
    does not state, so they are not modelled (None): the report gives their resources only.
    """
    from .slice_gemv import v7_geometry

    hot = sass.hot_loop()
    if version != 7:
        return None, hot.count if hot else None, "not modelled (run-time bit-width)"
    W = -(-K // 32)
    nkb, groups, rows, warps = v7_geometry(N, W, 1, sms=gpu.sms)
    before, after = _straight_line(sass)
    others = sum(lp.count for lp in _other_loops(sass, hot))
    per_warp = after + hot.count * -(-rows // warps) + others * -(-rows // (32 * warps)) / nkb
    total = 32 * (before + warps * per_warp) * nkb * groups
    return total / (N * K), hot.count, "v7 model: build (warp 0) + straight-line + hot loop x rows per warp + epilogue"


def report(versions=(1, 2, 3, 4, 5, 6, 7), bits_list=BITS, shapes=SHAPES, gpus=GPUS, log=print) -> list:
    """Compile each version (v7 once per bit-width) and return one :class:`Row` per (version, bits, shape, GPU)."""
    from .slice_gemv import gemv7_kernel

    tools = find_tools()
    rows = []
    cache = {}
    for v in versions:
        for bits in bits_list:
            if v == 7:
                kern = gemv7_kernel(1, bits, sim=False)
                key = (7, bits)
                if key not in cache:
                    cache[key] = compile_sass(f"gemv7[T=1, {bits} bits]", kern.py_func, v7_signature(), tools=tools)
            else:
                key = (v, 0)
                if key not in cache:
                    fn, sig = _ladder_kernel(v)
                    cache[key] = compile_sass(f"gemv{v}", fn.py_func, sig, tools=tools)
            sass = cache[key]
            log(f"gemv{v} {bits} bits: {sass.registers} registers, {sass.local_bytes} B local, "
                f"{sass.shared_bytes} B shared, hot loop {getattr(sass.hot_loop(), 'count', None)} instructions")  # fmt: skip
            for K, N in shapes:
                for gpu in gpus:
                    ipw, hot, model = instructions_per_weight(v, sass, bits, K, N, gpu)
                    nbytes = packed_bytes(K, N, bits)
                    mem_us = nbytes / (gpu.hbm_gbs * 1e9) * 1e6
                    ins_us = None if ipw is None else ipw * K * N / gpu.issue_rate * 1e6
                    pred = None if ins_us is None else max(mem_us, ins_us)
                    bound = "-" if ins_us is None else ("instructions" if ins_us > mem_us else "memory")
                    rows.append(Row(f"gemv{v}", bits, f"{K}x{N}", gpu.name, sass.registers, sass.local_bytes,
                                    sass.spill_store_bytes + sass.spill_load_bytes, sass.shared_bytes, hot,
                                    None if ipw is None else round(ipw, 3), nbytes, round(mem_us, 3),
                                    None if ins_us is None else round(ins_us, 3), None if pred is None else round(pred, 3),
                                    bound, model))  # fmt: skip
    return rows


def resources(cc=(9, 0), log=print) -> list:
    """Registers, local and shared memory of every kernel ``ptx_check`` compiles (no per-weight model)."""
    from .ptx_check import _signatures

    tools = find_tools()
    out = []
    for name, kernel, sig in _signatures():
        s = compile_sass(name, kernel.py_func, sig, cc=cc, tools=tools)
        out.append({"kernel": name, "registers": s.registers, "local_bytes": s.local_bytes,
                    "spill_bytes": s.spill_store_bytes + s.spill_load_bytes, "shared_bytes": s.shared_bytes,
                    "instructions": s.instructions})  # fmt: skip
        log(f"{name}: {s.registers} registers, {s.local_bytes} B local, {s.shared_bytes} B shared")
    return out


def table(rows, gpu: str = "H200-SXM") -> str:
    """Markdown table of the rows for one GPU: one line per (kernel, bits); per shape "instructions per weight / us"."""
    shapes = sorted({r.shape for r in rows}, key=lambda s: [-int(v) for v in s.split("x")])
    lines = ["| kernel | bits | registers | local B | " + " | ".join(f"{s}: instr./weight, us" for s in shapes) + " |",
             "|---|---|---|---|" + "---|" * len(shapes)]  # fmt: skip
    seen = {}
    for r in rows:
        if r.gpu == gpu:
            seen.setdefault((r.kernel, r.bits), {})[r.shape] = r
    for (kern, bits), by in sorted(seen.items(), key=lambda kv: (int(kv[0][0][4:]), kv[0][1])):
        r0 = next(iter(by.values()))
        cells = []
        for s in shapes:
            r = by.get(s)
            if r is None or r.predicted_us is None:
                cells.append("-")
            else:
                cells.append(f"{r.instructions_per_weight:.2f}, {r.predicted_us:.1f}")
        lines.append(f"| {kern} | {bits} | {r0.registers} | {r0.local_bytes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cuda_numba.sass", description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default="1,2,3,4,5,6,7", help="GEMV versions (default all)")
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="bit-widths (default 2,4,8)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN list")
    ap.add_argument("--resources", action="store_true", help="also every other kernel's registers / memory")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sass.json"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import numba

    if numba.config.ENABLE_CUDASIM:
        print("cuda_numba.sass: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); run with NUMBA_ENABLE_CUDASIM=0")
        return 2
    try:
        versions = [int(v) for v in args.versions.split(",") if v.strip()]
        bits = [int(b) for b in args.bits.split(",") if b.strip()]
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
        if any(v not in range(1, 8) for v in versions) or any(not 1 <= b <= 8 for b in bits):
            raise ValueError("versions are 1..7 and bits 1..8")
    except ValueError as exc:
        print(f"cuda_numba.sass: bad argument ({exc})")
        return 2
    try:
        rows = report(versions, bits, shapes)
        res = resources() if args.resources else None
    except NoCompiler as exc:
        print(f"cuda_numba.sass: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - a kernel failed to compile: say which, exit 1
        print(f"cuda_numba.sass: FAIL {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return 1
    print()
    print(table(rows))
    if not args.no_write:
        from .bench_env import git_commit, versions as lib_versions

        out = {
            "meta": {
                "what": "static prediction from compiled SASS (sm_90; A100 rows reuse it), NOT a measurement",
                "git_commit": git_commit(),
                "versions": lib_versions(),
                "ptxas": _tool_version("ptxas"),
                "argv": sys.argv[1:] if argv is None else list(argv),
                "tokens": 1,
                "group_size": 128,
                "gpus": [{"name": g.name, "sms": g.sms, "boost_ghz": g.boost_ghz, "hbm_gbs": g.hbm_gbs,
                          "issue_rate_per_s": g.issue_rate} for g in GPUS],  # fmt: skip
                "formula": "predicted_us = max(bytes / hbm_gbs, weights * instructions_per_weight / issue_rate)",
            },
            "rows": [r.__dict__ for r in rows],
        }
        if res is not None:
            out["resources"] = res
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _tool_version(name: str) -> str:
    path = _binary(name)
    if not path:
        return "not found"
    res = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return (res.stdout.strip().splitlines() or ["?"])[-1]


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    sys.exit(main())
