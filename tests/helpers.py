"""Test helpers shared across the suite (import as `from helpers import ...`)."""

from mbq_ref.zoo.random import random_llama  # noqa: F401  (re-exported: tests import it from here)


def ste_slices_reference(w, s, z, bits, gs, k=None):
    """MoBiSlice slices by autograd through the straight-through recursion of App. B (first ``k``, default all).

    The reference the closed-form gradient of :func:`mbq_ref.mobislice.slice_deltas` is checked against.
    """
    from mbq_ref.mobislice import _floor_ste, _residual_slices

    k = len(bits) if k is None else k
    gen = _residual_slices(w.reshape(w.shape[0], -1, gs), s, z, tuple(bits), _floor_ste)
    return [d.reshape_as(w) for _, (_, d) in zip(range(k), gen)]


def fake_quant_reference(w, xmin, xmax, bits, g):
    """Round-to-nearest fake quantization with straight-through rounding, differentiated by autograd."""
    from mbq_ref.quantizer import round_ste, scale_zero

    s, z = scale_zero(xmin, xmax, bits)
    s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    q = (round_ste(w.float().reshape(w.shape[0], -1, g) / s) + z).clamp(0, 2**bits - 1)
    return ((q - z) * s).reshape(w.shape).to(w.dtype)


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
