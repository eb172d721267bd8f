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

__all__ = ["CACHE_ENV", "cache_root", "cached", "code_version", "entry_key", "files_sha256"]

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
        ``root/<name>-<digest>``; with ``MBQ_CACHE=0``, a fresh temporary build outside the cache.
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"cache entry name must be a plain word, got {name!r}")
    full = entry_key(name, key)
    digest = _digest(full)
    root = Path(root) if root is not None else cache_root()
    if os.environ.get(CACHE_ENV) == "0":
        tmp = root / f".uncached-{name}-{os.getpid()}"
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
