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
import stat
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
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return "a name in the path is too long for the filesystem; choose a shorter name"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "a part of the path is a symbolic link loop; fix or remove the link"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file, not a folder; choose another path"
    text = " ".join(str(exc).split())
    if "No space left" in text or "os error 28" in text:
        return "the disk is full; free some space or choose another location"
    return f"{text}; choose another location"


#: the longest temporary-name prefix taken from the destination's name: ``.NAME.`` + 8 random
#: characters + ``.tmp`` must fit the 255-byte name limit of common filesystems for any legal NAME
_TMP_PREFIX_CHARS = 200


def _tmp_prefix(path: Path) -> str:
    return f".{path.name[:_TMP_PREFIX_CHARS]}."


def _check_destination(path: Path) -> None:
    """Refuse a destination that must not be replaced by a regular file, or that cannot be named.

    ``os.replace`` replaces *whatever* has the name (as root even ``/dev/null``), so anything
    that exists and is not a regular file (a folder, a device node, a FIFO, a socket) is refused,
    as are symbolic link loops, links to a missing file, and names longer than the filesystem allows.
    """
    if not str(path) or str(path) == ".":
        raise OutputError("the output path is empty; give a file name such as model.mbq.safetensors")
    try:
        st = os.stat(path)  # follows symbolic links: the thing that would be replaced
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"cannot write {path}: it is a symbolic link loop; fix or remove the link") from exc
        if exc.errno == errno.ENAMETOOLONG:
            longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
            raise OutputError(f"cannot write {path}: a name in it is too long for the filesystem "
                              f"({longest} bytes); choose a shorter name") from exc  # fmt: skip
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise OutputError(f"cannot write {path}: it is a symbolic link to a missing file "
                              f"({os.readlink(path)}); fix or remove the link") from exc  # fmt: skip
        return  # ENOENT / ENOTDIR: the folder checks below name the problem
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'model.mbq.safetensors'}")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")  # fmt: skip
        raise OutputError(f"{path} is {kind}, not a regular file; it is never replaced, give the path of a file")


def _existing_folder(path: Path) -> Path:
    """The nearest existing ancestor of ``path``; refuses links to nothing, link loops and files on the way."""
    folder = path.absolute().parent
    while True:
        try:
            st = os.stat(folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"cannot write {path}: {folder} is a symbolic link loop; fix or remove the link") from exc
            if exc.errno == errno.ENAMETOOLONG:
                raise OutputError(f"cannot write {path}: a folder name is too long for the filesystem; choose shorter names") from exc
            if exc.errno == errno.ENOTDIR:
                raise OutputError(f"cannot write {path}: a part of {folder} is a file, not a folder; choose another path") from exc
            if os.path.islink(folder):
                raise OutputError(f"cannot write {path}: {folder} is a symbolic link to a missing folder "
                                  f"({os.readlink(folder)}); create the folder or fix the link")  # fmt: skip
            if folder == folder.parent:
                raise OutputError(f"cannot write {path}: no folder of it exists") from exc
            folder = folder.parent  # the folders below it are created when the file is written
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
        return folder


def _check_name_length(path: Path, folder: Path) -> None:
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    n = len(os.fsencode(path.name))
    if n > limit:
        raise OutputError(f"cannot write {path}: its name has {n} bytes, the filesystem allows {limit}; choose a shorter name")


def check_writable(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Refuse an output ``path`` that cannot be written, before any expensive work; returns it as a ``Path``.

    Checks, without leaving anything behind: ``path`` is empty or a regular file (never a
    folder, device node, FIFO, link loop or link to nothing: those would be replaced); its name
    fits the filesystem; its nearest existing ancestor is a folder (no component of the path is
    a file, a link loop or a link to nothing); a file can be created there (catches read-only
    filesystems and missing permissions, which ``os.access`` misses when running as root); and,
    if ``need_bytes`` is given, that the filesystem has that much free space.

    Raises:
        OutputError: with the reason and the fix.
    """
    path = Path(path)
    _check_destination(path)
    folder = _existing_folder(path)
    _check_name_length(path, folder)
    try:
        # a short probe name: a legal 255-byte output name must not make the probe's name too long
        fd, probe = tempfile.mkstemp(prefix=".mbq-probe-", dir=folder)
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
    _check_destination(path)  # a folder, device node or FIFO is never replaced (nothing is written)
    _check_name_length(path, _existing_folder(path))
    folder = path.parent
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # same folder = same filesystem, so the final rename cannot degrade into a copy
        fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        _check_destination(path)  # again: something may have appeared there during the write
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
