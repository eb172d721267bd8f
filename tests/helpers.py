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


def forge(src, dst, meta=None, tensors=None, header=None):
    """Copy checkpoint ``src`` to ``dst`` with edits, recomputing both hashes as a careful forger would.

    ``meta(d)`` edits the parsed ``mbq_meta`` dict, ``tensors(t)`` the ``{name: tensor}`` dict, and
    ``header(md)`` the raw ``__metadata__`` strings (after the other edits, before rehashing; it may
    replace ``md["mbq_meta"]`` by any text). Returns ``dst`` as a ``Path``.
    """
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mbq_ref.checkpoint import payload_sha256
    from mbq_ref.checkpoint.format import _meta_sha256

    with safe_open(str(src), "pt") as f:
        md = dict(f.metadata())
    t = load_file(str(src))
    if tensors is not None:
        tensors(t)
    m = json.loads(md["mbq_meta"])
    if meta is not None:
        meta(m)
    m["payload_sha256"] = payload_sha256(t)
    md["mbq_meta"] = json.dumps(m)
    if header is not None:
        header(md)
    md["meta_sha256"] = _meta_sha256(md["mbq_meta"], md.get("tokenizer", ""))
    save_file(t, str(dst), metadata=md)
    return Path(dst)
