"""Where a benchmark ran: commit, library versions, device, and the switch into the CUDA simulator.

Shared by ``cuda_numba.bench`` (kernel grid) and ``mbq_ref.e2e`` (end to end); every results
file records these so a number can be traced to the code and the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["KNOWN_PEAK_GBS", "REPO", "device_info", "enter_simulator", "git_commit", "slug", "versions"]

REPO = Path(__file__).resolve().parents[1]
# Peak HBM bandwidth (GB/s) by device name when the driver attributes are unavailable.
KNOWN_PEAK_GBS = {
    "H200": 4800.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "A100-PCIE-40GB": 1555.0,
}


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if sha.returncode:
            return "unknown (no commit)"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import numba
    import torch

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import version

        out["numba_cuda"] = version("numba-cuda")
    except Exception:  # noqa: BLE001 - optional
        out["numba_cuda"] = "not installed"
    return out


def device_info(peak_override: float | None) -> dict:
    from numba import cuda
    from numba.cuda.cudadrv import driver as drv

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    info = {"name": name, "compute_capability": ".".join(map(str, dev.compute_capability))}
    try:
        info["driver_version"] = ".".join(map(str, drv.driver.get_version()))
    except Exception as exc:  # noqa: BLE001
        info["driver_version"] = f"unknown ({exc.__class__.__name__})"
    try:
        info["cuda_runtime"] = ".".join(map(str, cuda.runtime.get_version()))
    except Exception:  # noqa: BLE001
        info["cuda_runtime"] = "unknown"
    try:
        info["l2_bytes"] = int(dev.L2_CACHE_SIZE)
    except Exception:  # noqa: BLE001
        info["l2_bytes"] = 64 * 2**20
    peak, source = peak_override, "--peak-gbs"
    if peak is None:
        try:  # DDR: two transfers per clock; clock in kHz, bus width in bits
            peak = 2 * int(dev.MEMORY_CLOCK_RATE) * 1e3 * int(dev.GLOBAL_MEMORY_BUS_WIDTH) / 8 / 1e9
            source = "device attributes (2 x memory clock x bus width)"
        except Exception:  # noqa: BLE001
            peak = next((v for k, v in KNOWN_PEAK_GBS.items() if k in name), None)
            source = "table of published peaks" if peak else "unknown"
    info["hbm_peak_gbs"] = peak
    info["hbm_peak_source"] = source
    return info


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def enter_simulator(module: str, argv) -> int | None:
    """Turn Numba's CUDA simulator on for a ``--sim`` run (it must be on before ``numba.cuda`` is imported).

    In this process when ``numba.cuda`` is not imported yet (returns None); otherwise re-runs
    ``python -m module argv`` in a child with it on and returns the child's exit code.
    """
    import numba

    if numba.config.ENABLE_CUDASIM:
        return None
    if "numba.cuda" in sys.modules or "numba_cuda" in sys.modules:  # too late to switch: re-run in a child
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        cmd = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    numba.config.reload_config()
    return None
