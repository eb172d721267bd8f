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


def compile_sass(name: str, pyfunc, sig, cc=(9, 0), tools: dict | None = None) -> Sass:
    """Compile one kernel (``pyfunc`` with Numba types ``sig``) for ``sm_<cc>`` and read its SASS."""
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
        res = subprocess.run([tools["ptxas"], f"-arch={arch}", "-v", "-o", str(cubin), str(src)],
                             capture_output=True, text=True, check=False)  # fmt: skip
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
