"""Output files that are either complete or absent: atomic writes, an early writability check, SIGTERM.

Every file mbq-ref writes (checkpoints, ``report.json``, ``report.md``, plots) goes
through :func:`atomic_write`: the content is written to a hidden temporary file in
the destination folder, fsynced, and renamed over the destination (``os.replace``
is atomic on POSIX and Windows because both names are on one filesystem). An
error or an interrupt at any point removes the temporary file and leaves any
previous file untouched. :func:`terminate_as_interrupt` turns SIGTERM into an
exception, so the same clean-up runs when a job scheduler stops the process as
when the user presses Ctrl-C. :func:`check_writable` finds an unusable output
location (read-only or full filesystem, a path through a file) *before* minutes of
calibration are spent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import MBQError

__all__ = ["OutputError", "Terminated", "atomic_write", "atomic_write_text", "check_writable", "terminate_as_interrupt"]


class OutputError(MBQError):
    """An output file cannot be written; the message names the path, the reason and the fix."""


class Terminated(KeyboardInterrupt):
    """Raised by :func:`terminate_as_interrupt` on SIGTERM; a ``KeyboardInterrupt`` so clean-up code treats both alike."""


def _write_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a writer raises when the disk is full or read-only: ``OSError``, and safetensors' own error
    (its Rust writer reports ``No space left on device`` as ``SafetensorError``, not ``OSError``)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError,)
    return (OSError, SafetensorError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full; free some space or choose another location"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return "the filesystem is read-only; choose a writable location"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a folder you can write to"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file, not a folder; choose another path"
    text = " ".join(str(exc).split())
    if "No space left" in text or "os error 28" in text:
        return "the disk is full; free some space or choose another location"
    return f"{text}; choose another location"


def check_writable(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Refuse an output ``path`` that cannot be written, before any expensive work; returns it as a ``Path``.

    Checks, without leaving anything behind: ``path`` is not a folder; its nearest
    existing ancestor is a folder (no component of the path is a file); a file can
    be created there (catches read-only filesystems and missing permissions, which
    ``os.access`` misses when running as root); and, if ``need_bytes`` is given, that
    the filesystem has that much free space.

    Raises:
        OutputError: with the reason and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'model.mbq.safetensors'}")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders below it are created when the file is written
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize if hasattr(os, "statvfs") else None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from exc
    if free is not None and need_bytes > free:
        raise OutputError(
            f"cannot write {path}: it needs about {need_bytes / 2**20:.1f} MiB but {folder} has "
            f"{free / 2**20:.1f} MiB free; free some space or choose another location"
        )
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], what: str = "file") -> Path:
    """Create ``path`` by ``write(tmp)`` on a temporary file in the same folder, then fsync and rename.

    Args:
        path: destination; its folder is created.
        write: writes the complete content to the path it is given (e.g. ``safetensors.torch.save_file``).
        what: a word for messages ("checkpoint", "report").
    Returns:
        ``path`` as a ``Path``.
    Raises:
        OutputError: the folder or the file cannot be written (full or read-only disk, a
            file in the way); the previous file at ``path``, if any, is unchanged.
    """
    path = Path(path)
    folder = path.parent
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # same folder = same filesystem, so the final rename cannot degrade into a copy
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:  # includes KeyboardInterrupt and Terminated: never leave the temporary file
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, _write_errors()):
            raise OutputError(f"could not write {what} {path}: {_reason(exc)} (any previous file there is unchanged)") from exc
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX; not possible on Windows)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within this block SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op).

    Python's default SIGTERM action kills the process without running ``finally``
    blocks, which would leave temporary files behind.
    """

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
