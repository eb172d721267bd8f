"""A cache for expensive, deterministic results that several chapters share (``runs/cache/``, git-ignored).

Chapters 3 and 4 both calibrate MoBiQuant and the static LWC baselines with the
same settings on the same windows; calibrating twice costs minutes on a CPU.
:func:`cached` keeps one result per *key*: a digest of

* the entry's name and its settings (any JSON-able dict, e.g. ``asdict(cfg)``),
* the **code version** (:func:`code_version`: every ``.py`` file of ``mbq_ref``), and
* the torch version (floating-point results may differ between builds),

so a change to the package, the settings or torch gives a new key and the entry is
rebuilt; stale entries of the same name are deleted when a new one is written. The
chapters add the model's weight files to the key (:func:`files_sha256`).

An entry is a folder that ``build(folder)`` fills; it is written under a temporary
name and renamed when complete, so an interrupted build never leaves an entry that
looks valid. Set ``MBQ_CACHE=0`` to always rebuild (nothing is read or written).

Entries may hold pickled torch modules (``torch.save(model)``): they are loaded only
from this machine's own ``runs/cache`` and only for the exact code version that wrote
them, never from elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

__all__ = [
    "CACHE_ENV",
    "cache_root",
    "cached",
    "cached_mobiquant",
    "cached_static",
    "code_version",
    "entry_key",
    "files_sha256",
    "model_key",
    "tensor_sha256",
]

#: ``MBQ_CACHE=0`` disables the cache (every call builds into a temporary folder).
CACHE_ENV = "MBQ_CACHE"
_MANIFEST = "cache_key.json"
_PACKAGE = Path(__file__).resolve().parent


def cache_root() -> Path:
    """``runs/cache`` in the checkout this package lives in (``/runs/`` is git-ignored)."""
    return _PACKAGE.parent / "runs" / "cache"


def files_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (sorted by name), hex."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (e.g. the calibration windows), hex."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_key(name: str) -> dict:
    """Key part for a model loaded by :func:`mbq_ref.zoo.load_model`: its name and, when bundled, its files' digest."""
    from .paths import model_dir

    folder = model_dir(name)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return {"model": name, "files": files_sha256(files) if files else None}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """SHA-256 of every ``mbq_ref/**/*.py`` source (path and bytes): any code change gives a new value."""
    h = hashlib.sha256()
    for p in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(p.relative_to(_PACKAGE)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def entry_key(name: str, key: dict) -> dict:
    """The full key of an entry: its name and settings plus the code and torch versions."""
    return {"name": name, "key": key, "code": code_version(), "torch": torch.__version__}


def _digest(full_key: dict) -> str:
    # canonical JSON: the same settings always give the same digest (default=str for paths, tuples stay lists)
    return hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(name: str, key: dict, build: Callable[[Path], None], root: str | os.PathLike | None = None) -> Path:
    """The folder of entry ``name`` for ``key``, built by ``build(folder)`` if it is missing or stale.

    Args:
        name: entry name (a file-name-safe word, e.g. ``"ch3-mobiquant"``).
        key: JSON-able settings that determine the result.
        build: fills an empty folder with the result files.
        root: cache folder (default :func:`cache_root`).
    Returns:
        ``root/<name>-<digest>``; with ``MBQ_CACHE=0``, a fresh build in ``root/.uncached-<name>``
        (never read back as an entry).
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"cache entry name must be a plain word, got {name!r}")
    full = entry_key(name, key)
    digest = _digest(full)
    root = Path(root) if root is not None else cache_root()
    if os.environ.get(CACHE_ENV) == "0":
        tmp = root / f".uncached-{name}"  # one scratch folder per name, replaced by the next uncached build
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        return tmp
    path = root / f"{name}-{digest}"
    manifest = path / _MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == json.loads(json.dumps(full, sort_keys=True, default=str)):
                return path
        except json.JSONDecodeError:
            pass  # damaged manifest: rebuild below
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".building-{name}-{digest}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        # the manifest is written last: a folder without it is never taken for a valid entry
        (tmp / _MANIFEST).write_text(json.dumps(full, sort_keys=True, indent=1, default=str))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob(f"{name}-*"):  # stale entries of this name (other code or settings)
        if old != path and old.is_dir() and old.name[len(name) + 1 :].isalnum():
            shutil.rmtree(old, ignore_errors=True)
    return path


def _load_entry(path: Path) -> dict:
    # our own pickle, written by this code version on this machine (see the module docstring)
    return torch.load(path, weights_only=False)


def cached_mobiquant(name: str, calib_ids: torch.Tensor, cfg) -> tuple[torch.nn.Module, dict]:
    """``load_model(name)`` calibrated by :func:`mbq_ref.mobiquant.quantize_mobiquant` on ``calib_ids``, cached.

    The MoBiQuant model (full-precision weights, clipping, routers, frozen slices) and
    the calibration log are pickled in one entry keyed by the model files, the
    windows, ``cfg`` and the code version; a hit or a miss returns the same
    unpickled objects. The model routes at its trained thresholds (``log["thresholds"]``).

    Args:
        name: model name for :func:`mbq_ref.zoo.load_model` (e.g. ``"tiny-llama"``).
        calib_ids: ``[nsamples, seqlen]`` calibration windows.
        cfg: :class:`mbq_ref.mobiquant.MoBiConfig`.
    Returns:
        ``(model, log)`` with ``log`` as :func:`quantize_mobiquant` returns it.
    """
    from dataclasses import asdict

    from .mobiquant import quantize_mobiquant
    from .zoo import load_model

    def build(folder: Path) -> None:
        model = load_model(name)
        log = quantize_mobiquant(model, calib_ids, cfg, progress=False)
        torch.save({"model": model, "log": log}, folder / "model.pt")

    key = {**model_key(name), "calib_ids": tensor_sha256(calib_ids), "config": asdict(cfg)}
    entry = _load_entry(cached("mobiquant", key, build) / "model.pt")
    return entry["model"], entry["log"]


def cached_static(name: str, calib_ids: torch.Tensor, bits: int, calib_cfg, group_size: int | None) -> torch.nn.Module:
    """``load_model(name)`` calibrated by :func:`mbq_ref.calibrate.calibrate_static` at ``bits`` (LWC), cached.

    Keyed like :func:`cached_mobiquant` (model files, windows, settings, code version).

    Args:
        calib_cfg: :class:`mbq_ref.calibrate.CalibConfig`.
        group_size: quantization group size (``None`` = per channel).
    Returns:
        the calibrated static model.
    """
    from dataclasses import asdict

    from .calibrate import calibrate_static
    from .zoo import load_model

    def build(folder: Path) -> None:
        model, _ = calibrate_static(load_model(name), calib_ids, bits, calib_cfg, group_size=group_size, progress=False)
        torch.save({"model": model}, folder / "model.pt")

    key = {**model_key(name), "calib_ids": tensor_sha256(calib_ids), "bits": bits, "config": asdict(calib_cfg),
           "group_size": group_size}  # fmt: skip
    return _load_entry(cached(f"lwc-w{bits}", key, build) / "model.pt")["model"]
