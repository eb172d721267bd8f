"""Test helpers shared across the suite (import as `from helpers import ...`)."""

from mbq_ref.zoo.random import random_llama  # noqa: F401  (re-exported: tests import it from here)


class small_mount:
    """A real tiny tmpfs mounted at a fresh folder (``size`` bytes, read-only if ``ro``), unmounted on exit.

    Reproduces a full or read-only filesystem for real; needs root (``pytest.skip`` otherwise).
    """

    def __init__(self, size: int = 64 * 1024, ro: bool = False):
        self.size, self.ro = size, ro

    def __enter__(self):
        import subprocess
        import tempfile
        from pathlib import Path

        import pytest

        self.path = Path(tempfile.mkdtemp(prefix="mbq-mount-"))
        opts = f"size={self.size}" + (",ro" if self.ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)], capture_output=True, check=False)
        if r.returncode:
            self.path.rmdir()
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
        return self.path

    def __exit__(self, *exc):
        import subprocess

        subprocess.run(["umount", str(self.path)], check=False)
        self.path.rmdir()
        return False
