"""Output files are complete or absent, on real full and read-only filesystems too (mbq_ref.atomic)."""

import os
import signal
from pathlib import Path

import pytest
from helpers import small_mount

from mbq_ref.atomic import OutputError, Terminated, atomic_write, atomic_write_text, check_writable, terminate_as_interrupt
from mbq_ref.errors import MBQError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_atomically(tmp_path):
    p = atomic_write_text(tmp_path / "report.md", "new\n")
    assert p.read_text() == "new\n" and _names(tmp_path) == ["report.md"]
    assert p.stat().st_mode & 0o044, "readable like any other output"


def test_full_disk_is_a_clear_error_and_keeps_the_previous_file():
    with small_mount(size=64 * 1024) as mnt:
        target = mnt / "report.json"
        target.write_text("previous\n")
        with pytest.raises(OutputError, match="disk is full"):
            atomic_write_text(target, "x" * (1 << 20), "report")
        assert target.read_text() == "previous\n"
        assert _names(mnt) == ["report.json"], "temporary file left behind"


def test_full_disk_found_before_the_work():
    with small_mount(size=64 * 1024) as mnt:
        with pytest.raises(OutputError, match="MiB free"):
            check_writable(mnt / "model.safetensors", need_bytes=1 << 20)
        assert _names(mnt) == []


@pytest.mark.parametrize("sub", ["", "new/folder/"], ids=["folder", "new-folder"])
def test_read_only_filesystem_is_a_clear_error(sub):
    with small_mount(ro=True) as mnt:
        target = mnt / f"{sub}model.safetensors"
        with pytest.raises(OutputError, match="read-only"):
            check_writable(target)
        with pytest.raises(OutputError, match="read-only"):
            atomic_write_text(target, "x")
        assert _names(mnt) == []


def test_path_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub" / "model.safetensors"
    with pytest.raises(OutputError, match="is a file"):
        check_writable(target)
    with pytest.raises(OutputError, match="not a folder"):
        atomic_write_text(target, "x")
    assert _names(tmp_path) == ["afile"]


def test_check_writable_refuses_a_folder_and_leaves_nothing(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(tmp_path)
    assert check_writable(tmp_path / "a" / "b" / "m.safetensors") == tmp_path / "a" / "b" / "m.safetensors"
    assert _names(tmp_path) == [], "the check must not create folders or probe files"


def test_failed_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous\n")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(5, "Input/output error")

    with pytest.raises(OutputError, match="Input/output error"):
        atomic_write(target, fail, "report")
    assert target.read_text() == "previous\n" and _names(tmp_path) == ["report.json"]


def test_sigterm_during_write_leaves_no_temporary_file(tmp_path):
    """A real SIGTERM in the middle of a write: the clean-up runs as for Ctrl-C."""
    target = tmp_path / "model.safetensors"
    target.write_text("previous\n")

    def killed(tmp):
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_as_interrupt():
        atomic_write(target, killed)
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is restored"
    assert target.read_text() == "previous\n" and _names(tmp_path) == ["model.safetensors"]


def test_errors_are_mbq_errors():
    assert issubclass(OutputError, MBQError) and issubclass(Terminated, KeyboardInterrupt)


# --- outputs that must never be replaced, and names at the filesystem's limits -----------------
def _special_outputs(tmp_path):
    """A folder, a FIFO, a link loop and a link to nothing, each as an output path."""
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "loopB", tmp_path / "loopA")
    os.symlink(tmp_path / "loopA", tmp_path / "loopB")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    return {
        "dir": (tmp_path / "dir", "is a folder"),
        "fifo": (tmp_path / "fifo", "FIFO"),
        "loop": (tmp_path / "loopA", "symbolic link loop"),
        "dangling": (tmp_path / "dangling", "missing file"),
        "loop-folder": (tmp_path / "loopA" / "x.st", "symbolic link loop"),
        "dangling-folder": (tmp_path / "dangling" / "x.st", "symbolic link to a missing folder"),
    }


@pytest.mark.parametrize("which", ["dir", "fifo", "loop", "dangling", "loop-folder", "dangling-folder"])
def test_non_regular_outputs_are_refused_before_any_write(tmp_path, which):
    """Neither the early check nor the write itself replaces a folder, a FIFO or a link that goes nowhere."""
    path, match = _special_outputs(tmp_path)[which]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputError, match=match):
        check_writable(path)
    with pytest.raises(OutputError, match=match):
        atomic_write_text(path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "fifo").exists() and not (tmp_path / "fifo").is_file()


def test_device_node_is_never_replaced():
    """`--out /dev/null` as root used to replace the device node by a regular file."""
    st = os.stat("/dev/null")
    for f in (check_writable, lambda p: atomic_write_text(p, "x")):
        with pytest.raises(OutputError, match="character device"):
            f("/dev/null")
    assert os.stat("/dev/null").st_rdev == st.st_rdev and not Path("/dev/null").is_file()


def test_empty_path_is_refused():
    with pytest.raises(OutputError, match="empty"):
        atomic_write_text("", "x")
    with pytest.raises(OutputError, match="empty"):
        check_writable("")


def test_long_names(tmp_path):
    """A legal 245-byte name works (the temporary and probe names are shortened); a 300-byte one is refused."""
    ok = tmp_path / ("a" * 241 + ".txt")
    check_writable(ok)
    atomic_write_text(ok, "x")
    assert ok.read_text() == "x" and len(list(tmp_path.iterdir())) == 1
    long = tmp_path / ("b" * 300)
    with pytest.raises(OutputError, match="300 bytes"):
        check_writable(long)
    with pytest.raises(OutputError, match="300 bytes"):
        atomic_write_text(long, "x")
