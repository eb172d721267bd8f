"""The checkpoint file format and its integrity checks, shared by MoBiQuant and static checkpoints.

A checkpoint is a plain `safetensors <https://github.com/huggingface/safetensors>`_ file,
read without unpickling anything, with entries of our own in its header
(``__metadata__``, strings only)::

    format          the file kind (:class:`FileFormat`): "mbq-ref/mobiquant" or "mbq-ref/static";
                    anything else is a foreign file
    mbq_meta        JSON: ``format``, ``format_version``, ``created``, ``software``, ``base_model``
                    (id, architecture, dtype, the full HF config and its :func:`config_sha256`),
                    ``quantization`` (at least ``group_size`` and ``layers``: name, shape, bias),
                    ``tied``, the kind's own fields, and ``payload_sha256``
    tokenizer       JSON {file name: text} of the base model's tokenizer files (optional)
    meta_sha256     SHA-256 of mbq_meta + "\\0" + tokenizer: refuses damaged or hand-edited metadata

Tensors ``q.<layer>.codes/scale/zero[/bias]`` hold each quantized layer (their layout is the
kind's, :mod:`mbq_ref.checkpoint.mobiquant`, :mod:`mbq_ref.checkpoint.static`) and
``fp.<name>`` every tensor that is not quantized (embeddings, norms, lm_head stored once
when tied to the embeddings). :func:`payload_sha256` covers every tensor's name, dtype,
shape and bytes.

Saving (:func:`write_checkpoint`) writes a temporary file in the destination folder, fsyncs
it and renames it over the destination (``os.replace`` is atomic on POSIX and Windows), so
an interrupted save or a full disk leaves the previous file intact. Loading
(:func:`load_validated`) refuses, each with its own :class:`CheckpointError` subclass and a
one-line message: truncated files, edited files (hash mismatch), other format versions,
safetensors files that are not of the expected kind, and checkpoints made for another model
than ``expect_model``. The hashes give integrity, not authenticity (whoever edits the file
can recompute them), so every field is also cross-checked against the others and against
the tensors (:func:`_check_meta`, :func:`_check_tensors`, and the kind's own checks): a
loaded file is at least self-consistent. A consistent forgery with in-range values is not
detected (``docs/robustness.md``).

A kind of file is a :class:`FileFormat` (its name, version and own checks); the functions
outside ``__all__`` are the building blocks its module saves and loads with.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ..atomic import OutputError, atomic_write
from ..errors import MBQError

__all__ = [
    "CheckpointError",
    "TruncatedCheckpointError",
    "TamperedCheckpointError",
    "ForeignFileError",
    "VersionMismatchError",
    "ModelMismatchError",
    "CheckpointWriteError",
    "FileFormat",
    "config_sha256",
    "payload_sha256",
    "peek_format",
]

# safetensors refuses headers above 100 MB; a bigger length field means "not safetensors"
_MAX_HEADER = 100_000_000
#: deepest JSON nesting accepted in a header (ours is at most ~6 levels: mbq_meta -> base_model -> config ->
#: rope_parameters -> ...); a forged file nested 100,000 levels deep must be refused, not crash the parser
MAX_JSON_DEPTH = 32
#: the largest magnitude accepted in a stored float tensor and in a dequantized weight: the float16 range.
#: Real weights are orders of magnitude smaller; a forged norm weight of 3e38 (finite) makes every
#: activation inf/NaN, so it is refused on load instead of failing (or printing <pad>) later.
MAX_ABS_VALUE = 65504.0
# config keys that say how a model was loaded or saved, not what it computes
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "U32": torch.uint32,
    "U8": torch.uint8,
    "I8": torch.int8,
    "BOOL": torch.bool,
}


class CheckpointError(MBQError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


class TruncatedCheckpointError(CheckpointError):
    """The file is shorter than its header promises (an interrupted copy or download)."""


class TamperedCheckpointError(CheckpointError):
    """A hash or the tensor layout does not match: the file was modified or damaged after saving."""


class ForeignFileError(CheckpointError):
    """Not a safetensors file, or a safetensors file that is not an mbq-ref checkpoint of the expected kind."""


class VersionMismatchError(CheckpointError):
    """Written by another version of the checkpoint format."""


class ModelMismatchError(CheckpointError):
    """The checkpoint was made for another base model or architecture than the one expected."""


class CheckpointWriteError(CheckpointError, OutputError):
    """The checkpoint could not be written (full or read-only disk, a file in the way); nothing was changed."""


@dataclass(frozen=True)
class FileFormat:
    """One kind of checkpoint file: its header name, version and its own checks.

    Attributes:
        name: value of the ``format`` header entry (``"mbq-ref/mobiquant"``).
        version: the ``format_version`` this mbq-ref reads and writes; bumped whenever the
            tensor layout or the metadata schema changes incompatibly.
        what: the kind in words, for error messages ("MoBiQuant checkpoint").
        check_meta: ``(path, meta)``: the kind's own metadata fields (types, ranges, agreement).
        check_layer: ``(path, meta, info, tensors) -> names``: a layer's codes and the kind's
            own per-layer tensors; returns the names of those beyond codes/scale/zero/bias.
        check_model: ``(path, meta, tensors) -> names``: the kind's model-wide tensors.
        retired: ``{old version: what changed}``, named in the one-line refusal of such a file.
    """

    name: str
    version: int
    what: str
    check_meta: Callable[[Path, dict], None]
    check_layer: Callable[[Path, dict, dict, dict], set]
    check_model: Callable[[Path, dict, dict], set] = lambda path, meta, tensors: set()
    retired: dict[int, str] = field(default_factory=dict)


# --- hashes -----------------------------------------------------------------
def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def _config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}


def config_sha256(config) -> str:
    """SHA-256 of a model config (HF ``PretrainedConfig`` or its dict), ignoring how it was loaded.

    Keys such as ``_name_or_path``, ``dtype`` and ``transformers_version`` are
    dropped, so the same architecture loaded from a folder or from the hub, in
    fp32 or fp16, hashes the same; any architectural field (sizes, RoPE, vocab,
    tying) changes the hash.
    """
    return hashlib.sha256(_canonical_json(_config_dict(config)).encode()).hexdigest()


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor, in name order: name, dtype, shape, then the raw little-endian bytes.

    Independent of where safetensors places the tensors in the file, so it can be
    recomputed after loading.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _meta_sha256(meta_json: str, tokenizer_json: str) -> str:
    return hashlib.sha256((meta_json + "\0" + tokenizer_json).encode()).hexdigest()


# --- reading the header ---------------------------------------------------------
def _too_deep(obj, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` (parsed JSON) nests lists/objects deeper than ``limit`` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def load_json(text, path: Path, what: str, error=None):
    """``json.loads(text)`` with a depth limit of :data:`MAX_JSON_DEPTH`; ``error`` (a :class:`CheckpointError`
    class) is raised for nesting too deep for it or for the parser. Other parse errors propagate (``ValueError``)."""
    error = error or TamperedCheckpointError
    try:
        obj = json.loads(text)
    except RecursionError:
        obj = None
        deep = True
    else:
        deep = _too_deep(obj)
    if deep:
        raise error(f"{path}: {what} nests JSON deeper than {MAX_JSON_DEPTH} levels; not a file written by mbq-ref, "
                    "re-create it with `mbq quantize`")  # fmt: skip
    return obj



def read_header(path: Path, fmt: FileFormat) -> tuple[dict, dict, int]:
    """Parse and check the safetensors header of ``path`` (an ``fmt`` file) without loading tensors.

    Returns:
        ``(tensor_index, metadata, file_size)``; raises the matching :class:`CheckpointError`.
    """
    try:
        st = path.stat()  # follows symlinks; a loop or a dangling link fails here with its own errno
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link loop (it points back to itself); fix or remove the link") from exc
        if exc.errno == errno.ENOENT:
            raise CheckpointError(
                f"{path}: no such file; create one with `mbq quantize --model tiny-llama --out {path}`"
            ) from exc
        raise CheckpointError(f"cannot open {path} ({exc.strerror or exc}); check the path and its permissions") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a file")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TruncatedCheckpointError(f"{path} has only {size} bytes, not even a safetensors header; re-create it")
            (n,) = struct.unpack("<Q", head)  # safetensors: u64 little-endian header length, then JSON
            if n == 0 or n > _MAX_HEADER:
                raise ForeignFileError(f"{path} is not a safetensors file (header length field reads {n})")
            if 8 + n > size:
                raise TruncatedCheckpointError(
                    f"{path} is truncated: its header alone needs {8 + n} bytes but the file has {size}; "
                    "the copy or save was cut short, copy it again or re-run `mbq quantize`"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {path} ({exc.strerror or exc}); check its permissions (e.g. `chmod a+r {path}`)"
        ) from exc
    try:
        header = load_json(raw, path, "the safetensors header", ForeignFileError)
    except CheckpointError:
        raise
    except ValueError as exc:  # includes UnicodeDecodeError
        raise ForeignFileError(f"{path} is not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ForeignFileError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ForeignFileError(
            f"{path}: the safetensors __metadata__ must map strings to strings, found {type(meta).__name__}; "
            "not a file written by `mbq quantize`"
        )
    if any(not isinstance(v, dict) for v in header.values()):
        raise TamperedCheckpointError(f"{path}: malformed tensor index in the header")
    if meta.get("format") != fmt.name:
        found = f"its format is {meta['format']!r}" if meta.get("format") else "e.g. plain model weights"
        raise ForeignFileError(
            f"{path} is a safetensors file but not an mbq-ref {fmt.what} (no format {fmt.name!r} in its metadata; "
            f"{found}); make one with `mbq quantize`"
        )
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise TamperedCheckpointError(f"{path}: malformed tensor index in the header") from exc
    if 8 + n + end > size:
        raise TruncatedCheckpointError(
            f"{path} is truncated: the header promises {8 + n + end} bytes but the file has {size}; "
            "the copy or save was cut short, copy it again or re-run `mbq quantize`"
        )
    if 8 + n + end < size:
        raise TamperedCheckpointError(f"{path} has {size - 8 - n - end} unexpected bytes after the tensor data")
    return header, meta, size


def peek_format(path: str | os.PathLike) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (``"mbq-ref/static"``, ...), or None.

    For dispatching on the kind of file before loading it; never raises: an unreadable or
    foreign file gives None, and the loader of the expected kind then says what is wrong.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= _MAX_HEADER:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    return fmt if isinstance(fmt, str) else None


def read_meta(path: str | os.PathLike, fmt: FileFormat) -> dict:
    """The checked ``mbq_meta`` dict of an ``fmt`` file, from its header only (no tensor is read).

    Checks the format, the version, the metadata hash and every metadata field (not the
    tensor payload: :func:`load_validated` does that).
    """
    path = Path(path)
    _, raw, _ = read_header(path, fmt)
    return _parse_meta(path, raw, fmt)


def _parse_meta(path: Path, raw: dict, fmt: FileFormat) -> dict:
    try:
        meta = load_json(raw["mbq_meta"], path, "the mbq_meta header entry")
    except CheckpointError:
        raise
    except (KeyError, ValueError) as exc:
        raise TamperedCheckpointError(f"{path}: the mbq_meta header entry is missing or not JSON") from exc
    if not isinstance(meta, dict):
        raise TamperedCheckpointError(f"{path}: the mbq_meta header entry is a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if version != fmt.version:
        known = is_int(version) and version in fmt.retired  # any JSON value can stand here
        why = f" ({fmt.retired[version]})" if known else ""
        raise VersionMismatchError(
            f"{path} uses {fmt.what} format version {version}{why}, this mbq-ref reads version {fmt.version}; "
            "re-create it with this version's `mbq quantize` (or install the mbq-ref that wrote it)"
        )
    want = raw.get("meta_sha256")
    try:
        got = _meta_sha256(raw["mbq_meta"], raw.get("tokenizer", ""))
    except UnicodeEncodeError as exc:  # a lone surrogate (\ud800) is valid JSON but not text
        raise TamperedCheckpointError(f"{path}: the header holds text that is not valid Unicode; re-create the checkpoint") from exc
    if want != got:
        raise TamperedCheckpointError(
            f"{path}: metadata SHA-256 mismatch (stored {str(want)[:12]}..., computed {got[:12]}...); "
            "the header was edited after saving, re-create the checkpoint"
        )
    _check_meta(path, meta, fmt)
    return meta


# --- cross-checks: every field against the others and against the tensors ----------------
# The two hashes catch accidental damage (a flipped bit, a cut copy), but anyone who edits the
# file can recompute them (docs/robustness.md). These checks make sure that whatever is loaded
# is at least self-consistent: a field that disagrees with another field or with the tensors
# it describes is refused instead of silently changing what the model computes.
_CONFIG_INTS = {  # key: (lower bound, upper bound); far above any real Llama-family model
    "vocab_size": (1, 2**20),
    "hidden_size": (1, 2**16),
    "intermediate_size": (1, 2**18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "max_position_embeddings": (2, 2**24),
    "head_dim": (1, 2**12),
}
_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def bad(path: Path, what: str) -> TamperedCheckpointError:
    """The refusal of a field or tensor that disagrees with the rest of the file."""
    return TamperedCheckpointError(f"{path}: {what}; the file was edited or written by a broken tool, re-create it with `mbq quantize`")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_field(path: Path, v, what: str, lo: int, hi: int | None = None) -> int:
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise bad(path, f"{what} must be an integer {rng}, got {v!r}")
    return v


def dict_field(path: Path, d: dict, key: str, where: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise bad(path, f"{where}{key} must be a JSON object, got {type(v).__name__}")
    return v


def _check_config(path: Path, base: dict) -> None:
    """The stored HF config: known fields are integers in range, a known activation, a matching hash."""
    from transformers.activations import ACT2FN

    for key in ("id", "architecture", "config_sha256"):
        if not isinstance(base.get(key), str):
            raise bad(path, f"base_model.{key} must be a string, got {base.get(key)!r}")
    if base.get("dtype") not in _DTYPE_NAMES:
        raise bad(path, f"base_model.dtype must be one of {', '.join(_DTYPE_NAMES)}, got {base.get('dtype')!r}")
    cfg = dict_field(path, base, "config", "base_model.")
    if not isinstance(cfg.get("model_type", base.get("model_type")), str):
        raise bad(path, f"config model_type must be a string, got {cfg.get('model_type')!r}")
    for key, (lo, hi) in _CONFIG_INTS.items():
        if cfg.get(key) is not None:
            int_field(path, cfg[key], f"config {key}", lo, hi)
    # keys outside the config hash (how the model was loaded) still reach the model: check their types
    for key in _VOLATILE_CONFIG_KEYS & set(cfg):
        flag = key in ("use_cache", "output_attentions", "output_hidden_states", "return_dict")
        if not (isinstance(cfg[key], bool) if flag else (cfg[key] is None or isinstance(cfg[key], str))):
            raise bad(path, f"config {key} must be {'true or false' if flag else 'a string'}, got {cfg[key]!r}")
    _check_config_floats(path, cfg)
    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise bad(path, f"config hidden_act {act!r} is not an activation transformers knows")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise bad(path, f"config num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    try:
        got = config_sha256(cfg)
    except (TypeError, ValueError) as exc:
        raise bad(path, f"the stored config cannot be hashed ({exc})") from exc
    if got != base["config_sha256"]:
        raise bad(path, "base_model.config_sha256 does not match the stored config")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_config_floats(path: Path, cfg: dict) -> None:
    """RoPE base and norm epsilon: values that make every forward non-finite (``rope_theta=0`` divides by
    zero, ``rms_norm_eps<=0`` takes the root of a negative or zero mean square) are refused on load."""
    ropes = [("rope_theta", cfg.get("rope_theta"))]
    for key in ("rope_parameters", "rope_scaling"):
        sub = cfg.get(key)
        if isinstance(sub, dict):
            ropes.append((f"{key}.rope_theta", sub.get("rope_theta")))
            ropes += [(f"{key}.{k}", sub.get(k)) for k in ("factor", "original_max_position_embeddings") if k in sub]
    for name, v in ropes:
        if v is not None and not (_number(v) and math.isfinite(v) and v > 0):
            raise bad(path, f"config {name} must be a finite number > 0, got {v!r}")
    for name in ("rms_norm_eps", "layer_norm_eps", "norm_eps"):
        v = cfg.get(name)
        if v is not None and not (_number(v) and math.isfinite(v) and 0 < v < 1):
            raise bad(path, f"config {name} must be a number in (0, 1), got {v!r}")
    f = cfg.get("partial_rotary_factor")
    if f is not None and not (_number(f) and 0 < f <= 1):
        raise bad(path, f"config partial_rotary_factor must be in (0, 1], got {f!r}")


def check_magnitude(path: Path, name: str, t: torch.Tensor, limit: float = MAX_ABS_VALUE) -> None:
    """Refuse a float tensor holding finite values beyond ``±limit`` (see :data:`MAX_ABS_VALUE`)."""
    if t.is_floating_point() and t.numel():
        top = float(t.detach().abs().max())
        if top > limit:
            raise bad(path, f"tensor {name} holds values up to {top:.3g}, beyond ±{limit:g} (no trained weight "
                            "is that large; it would make the model's outputs inf/NaN)")  # fmt: skip


def check_dequant_range(path: Path, name: str, scale: torch.Tensor, zero: torch.Tensor, levels: int, step: float = 1.0) -> None:
    """Refuse scales and zero points whose dequantized weights ``s (q - z) / step`` (``q`` in ``0..levels-1``)
    can exceed :data:`MAX_ABS_VALUE`: finite but huge values (``scale=3e38``, ``zero=1e30``) that make the model
    non-finite. ``step`` is the ratio of ``scale`` to the grid of ``zero`` (MoBiSlice: ``2^(B_E - B_1)``)."""
    z = zero.double()
    reach = scale.double() * torch.maximum(z.abs(), (levels - 1 - z).abs()) / step
    top = float(reach.max()) if reach.numel() else 0.0
    if not top <= MAX_ABS_VALUE:
        raise bad(path, f"layer {name}: scale and zero points dequantize to weights up to {top:.3g}, beyond "
                        f"±{MAX_ABS_VALUE:g} (no trained weight is that large)")  # fmt: skip


def _check_layers(path: Path, q: dict, group_size: int) -> None:
    layers = q.get("layers")
    if not isinstance(layers, list) or not layers:
        raise bad(path, "quantization.layers must be a non-empty list")
    seen = set()
    for info in layers:
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
            raise bad(path, f"quantization.layers entry {info!r} has no name")
        name = info["name"]
        if name in seen:
            raise bad(path, f"layer {name} is listed twice")
        seen.add(name)
        shape = info.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise bad(path, f"layer {name}: shape must be [out, in], got {shape!r}")
        int_field(path, shape[0], f"layer {name} out_features", 1)
        k = int_field(path, shape[1], f"layer {name} in_features", 1)
        if k % group_size:
            raise bad(path, f"group_size {group_size} does not divide the input dimension {k} of layer {name}")
        if not isinstance(info.get("bias"), bool):
            raise bad(path, f"layer {name}: bias must be true or false, got {info.get('bias')!r}")


def _check_meta(path: Path, meta: dict, fmt: FileFormat) -> None:
    """Types, ranges and agreement of the metadata fields (the tensors come in :func:`_check_tensors`)."""
    base = dict_field(path, meta, "base_model", "")
    _check_config(path, base)
    q = dict_field(path, meta, "quantization", "")
    gs = int_field(path, q.get("group_size"), "quantization.group_size", 1)
    fmt.check_meta(path, meta)
    _check_layers(path, q, gs)
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise bad(path, "tied must map tensor names to tensor names")
    if not isinstance(meta.get("payload_sha256"), str):
        raise bad(path, "payload_sha256 is missing")


def check_finite(path: Path, name: str, t: torch.Tensor, allow_inf: bool = False) -> None:
    """Refuse NaN (and, unless ``allow_inf``, infinite) values in a float tensor."""
    if not t.is_floating_point() or not t.numel():
        return
    nonfinite = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
    if bool(nonfinite.any()):
        raise bad(path, f"tensor {name} holds {int(nonfinite.sum())} {'NaN' if allow_inf else 'NaN/inf'} values")


def _grid(q: dict) -> tuple[int, float]:
    """``(levels, step)`` of a layer's codes: MoBiSlice codes have ``2^B_E`` levels with the zero point on the
    finest grid, ``2^(B_E - B_1)`` times finer than the stored base scale; static codes ``2^b`` levels, step 1."""
    if "slice_bits" in q:
        sb = q["slice_bits"]
        return 2 ** sum(sb), float(2 ** (sum(sb) - sb[0]))
    return 2 ** q["bits"], 1.0


def _check_tensors(path: Path, meta: dict, tensors: dict[str, torch.Tensor], fmt: FileFormat) -> None:
    """Every tensor against the metadata: names, dtypes, shapes, code range (``fmt``'s checks), finite values."""
    q = meta["quantization"]
    cfg = meta["base_model"]["config"]
    gs = q["group_size"]
    expected = set()
    for info in q["layers"]:
        name, (n, k) = info["name"], info["shape"]
        p = f"q.{name}."
        try:
            scale, zero = (tensors[p + t] for t in ("scale", "zero"))
            tensors[p + "codes"]
        except KeyError as exc:
            raise TamperedCheckpointError(f"{path}: tensor {exc.args[0]!r} of layer {name} is missing") from exc
        expected |= {p + "codes", p + "scale", p + "zero"}
        expected |= fmt.check_layer(path, meta, info, tensors)
        for t, what in ((scale, "scale"), (zero, "zero")):
            if tuple(t.shape) != (n, k // gs):
                raise bad(path, f"layer {name}: {what} has shape {tuple(t.shape)}, expected {(n, k // gs)}")
        if not scale.is_floating_point():
            raise bad(path, f"layer {name}: scale has dtype {scale.dtype}")
        check_finite(path, p + "scale", scale)
        if bool((scale <= 0).any()):
            raise bad(path, f"layer {name}: scale has values <= 0")
        zf = zero.double()
        check_finite(path, p + "zero", zf)
        if bool((zf != zf.round()).any()):
            raise bad(path, f"layer {name}: zero points are not integers")
        check_dequant_range(path, name, scale, zero, *_grid(q))
        if info.get("bias"):
            expected.add(p + "bias")
            if p + "bias" not in tensors or tuple(tensors[p + "bias"].shape) != (n,):
                raise bad(path, f"layer {name}: bias missing or not of shape ({n},)")
            check_finite(path, p + "bias", tensors[p + "bias"])
    expected |= fmt.check_model(path, meta, tensors)
    fp = {key for key in tensors if key.startswith("fp.")}
    expected |= fp
    for alias, target in meta.get("tied", {}).items():
        if f"fp.{target}" not in tensors or f"fp.{alias}" in tensors:
            raise bad(path, f"tied tensor {alias} -> {target} does not match the stored tensors")
    for key in fp:
        check_finite(path, key, tensors[key])
        check_magnitude(path, key, tensors[key])
    extra = sorted(set(tensors) - expected)
    if extra:
        raise bad(path, f"unexpected tensors {extra[:3]}")
    # the config must describe the stored tensors (it decides how big a model is built)
    emb = tensors.get("fp.model.embed_tokens.weight")
    if emb is not None and (cfg.get("vocab_size"), cfg.get("hidden_size")) != tuple(emb.shape):
        raise bad(path, f"config vocab_size x hidden_size {cfg.get('vocab_size')} x {cfg.get('hidden_size')} "
                         f"disagrees with the embedding {tuple(emb.shape)}")  # fmt: skip
    blocks = {int(m.group(1)) for key in tensors for m in [re.search(r"\.layers\.(\d+)\.", key)] if m}
    if blocks and blocks != set(range(cfg.get("num_hidden_layers", -1))):
        raise bad(path, f"config num_hidden_layers {cfg.get('num_hidden_layers')!r} disagrees with the {len(blocks)} stored blocks")

# --- writing -------------------------------------------------------------------
def fp_tensors(model: nn.Module, quantized: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every state-dict tensor outside the quantized layers, with tied (shared-storage) tensors stored once."""
    prefixes = tuple(f"{q}." for q in quantized)
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]  # e.g. lm_head.weight tied to model.embed_tokens.weight
            continue
        if key is not None:
            seen[key] = k
        out[f"fp.{k}"] = v.detach().cpu().contiguous().clone()
    return out, aliases



def layer_entry(name: str, layer: nn.Module) -> dict:
    """A quantized layer in ``quantization.layers``: its path, ``[out, in]`` shape and whether it has a bias."""
    return {"name": name, "shape": [layer.out_features, layer.in_features], "bias": layer.bias is not None}


def file_meta(fmt: FileFormat, model: nn.Module, base_id: str | None) -> dict:
    """The first fields of every ``mbq_meta``: format, version, creation time, software and the base model.

    ``base_id`` is the id or folder the model was loaded from (else the config's
    ``_name_or_path``); the full HF config is stored with its :func:`config_sha256`,
    so a loaded file rebuilds the architecture and :func:`check_expected` can compare.
    """
    import transformers

    from .. import __version__

    cfg = model.config
    return {
        "format": fmt.name,
        "format_version": fmt.version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"mbq_ref": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "base_model": {
            "id": str(base_id or getattr(cfg, "_name_or_path", "") or "unknown"),
            "architecture": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config": cfg.to_dict(),
            "config_sha256": config_sha256(cfg),
        },
    }


def write_checkpoint(
    path: Path, fmt: FileFormat, meta: dict, tensors: dict[str, torch.Tensor], tokenizer_json: str = ""
) -> Path:
    """Write ``tensors`` and ``meta`` (plus its ``payload_sha256``) as an ``fmt`` file, atomically; returns ``path``.

    A temporary file in the same folder is fsynced, then renamed over ``path``
    (:mod:`mbq_ref.atomic`): an interrupted save leaves the previous file intact.

    Raises:
        CheckpointWriteError: the file could not be written; nothing was changed.
    """
    from safetensors.torch import save_file

    meta_json = json.dumps({**meta, "payload_sha256": payload_sha256(tensors)}, default=str, allow_nan=True)
    header = {"format": fmt.name, "mbq_meta": meta_json, "meta_sha256": _meta_sha256(meta_json, tokenizer_json)}
    if tokenizer_json:
        header["tokenizer"] = tokenizer_json
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), "checkpoint")
    except OutputError as exc:
        raise CheckpointWriteError(str(exc)) from exc
    return path


# --- loading -------------------------------------------------------------------
def check_expected(path: Path, meta: dict, expect) -> None:
    """Refuse (:class:`ModelMismatchError`) a file made for another model than ``expect``.

    ``expect``: ``None`` (no check), a model id/folder, an ``nn.Module`` or a HF config;
    compared by :func:`config_sha256`.
    """
    base = meta["base_model"]
    if expect is None:
        return
    if not isinstance(expect, (str, os.PathLike, nn.Module, dict)) and not hasattr(expect, "to_dict"):
        raise CheckpointError(
            f"expect_model must be a model id or folder, an nn.Module or a HF config, got {type(expect).__name__} "
            f"{expect!r:.40}; pass e.g. expect_model='tiny-llama' or None"
        )
    if isinstance(expect, (str, os.PathLike)):
        if str(expect) == base["id"]:
            return
        from ..zoo.load import _resolve

        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(_resolve(str(expect)))
        except MBQError:
            raise
        except Exception as exc:  # an unreachable id cannot be compared
            raise ModelMismatchError(
                f"{path} was made for {base['id']!r}; cannot load the config of {str(expect)!r} to compare ({type(exc).__name__})"
            ) from exc
    else:
        cfg = getattr(expect, "config", expect)
    got = config_sha256(cfg)
    if got != base["config_sha256"]:
        arch = (getattr(cfg, "architectures", None) or [type(expect).__name__])[0]
        raise ModelMismatchError(
            f"{path} was made for {base['id']!r} ({base['architecture']}, config {base['config_sha256'][:12]}...), "
            f"not for this model ({arch}, config {got[:12]}...); quantize this model with `mbq quantize`"
        )


def _check_fits(probe: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], path) -> None:
    """The file's tensors against the architecture its config builds (``probe``, on the meta device).

    Every quantized layer is an ``nn.Linear`` of the stored shape with a bias exactly when the file stores
    one (a config with ``attention_bias``/``mlp_bias`` that the layers do not follow is refused); every
    other tensor of the architecture is stored (directly or as a tied alias) with its exact shape.
    """
    q, tied = meta["quantization"], meta.get("tied", {})
    arch = meta["base_model"]["architecture"]
    fix = "the file was edited or written by a broken tool, re-create it with `mbq quantize`"
    quantized = [info["name"] for info in q["layers"]]
    for info in q["layers"]:
        name, (n, k) = info["name"], info["shape"]
        try:
            lin = probe.get_submodule(name)
        except AttributeError:
            raise ModelMismatchError(f"{path}: layer {name} does not exist in the {arch} its config builds; {fix}") from None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != (n, k):
            got = (lin.out_features, lin.in_features) if isinstance(lin, nn.Linear) else type(lin).__name__
            raise ModelMismatchError(f"{path}: layer {name} is {(n, k)} in the file but {got} in the {arch} its config builds; {fix}")
        if (lin.bias is not None) != info["bias"]:
            raise ModelMismatchError(
                f"{path}: layer {name} {'has a' if lin.bias is not None else 'has no'} bias in the {arch} its config "
                f"builds (attention_bias / mlp_bias) but the file stores {'one' if info['bias'] else 'none'}; {fix}"
            )
    prefixes = tuple(f"{name}." for name in quantized)
    sd = probe.state_dict()
    for key, t in sd.items():
        if key.startswith(prefixes):
            continue
        src = f"fp.{tied.get(key, key)}"
        if src not in tensors:
            raise ModelMismatchError(f"{path}: tensor {src} is missing; the {arch} its config builds needs it; {fix}")
        if tuple(tensors[src].shape) != tuple(t.shape):
            raise ModelMismatchError(f"{path}: tensor {src} has shape {tuple(tensors[src].shape)}, the {arch} its "
                                     f"config builds needs {tuple(t.shape)}; {fix}")  # fmt: skip
    extra = sorted(k for k in tensors if k.startswith("fp.") and k[3:] not in sd)
    if extra:
        raise ModelMismatchError(f"{path}: tensors {extra[:3]} do not exist in the {arch} its config builds; {fix}")


def build_skeleton(meta: dict, tensors: dict[str, torch.Tensor] | None = None, path=None) -> nn.Module:
    """The base architecture from the stored HF config (weights are overwritten afterwards).

    With ``tensors`` (the file's), the architecture is first built on the meta device and checked
    against them (:func:`_check_fits`) before any memory is allocated.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = meta["base_model"]
    # output switches are how a model was used, not what it computes (and outside the config hash): defaults
    runtime = ("use_cache", "output_attentions", "output_hidden_states", "return_dict")
    cfg_dict = {k: v for k, v in base["config"].items() if k not in runtime}
    model_type = cfg_dict.pop("model_type", base.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"unknown model type {model_type!r} in the checkpoint; upgrade transformers")
    dtype = getattr(torch, base.get("dtype", "float32"))
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = contextlib.nullcontext
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
        if tensors is not None:
            # the architecture on the meta device first (no memory): every tensor it needs must be in the file
            # with its shape, so a config that disagrees with the file is refused before anything is allocated
            with torch.device("meta"):
                probe = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            _check_fits(probe, meta, tensors, path)
        # random init of weights that are overwritten anyway costs minutes on an 8B model
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # the fields we know were checked in _check_meta; transformers validates the rest
        raise CheckpointError(
            f"the model config stored in the checkpoint cannot build a {model_type} model "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); re-create it with `mbq quantize`"
        ) from exc
    return model.eval()


def load_validated(path: Path, fmt: FileFormat, expect_model) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Header, metadata and tensors of an ``fmt`` file after every check; ``(meta, raw header metadata, tensors)``.

    Checks, in order: the file exists and is complete (truncation), it is an mbq-ref file of
    kind ``fmt`` (foreign files), its format version, the metadata hash and fields,
    ``expect_model`` (:func:`check_expected`), the tensor payload hash, and every tensor
    against the metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index, raw, _ = read_header(path, fmt)
    meta = _parse_meta(path, raw, fmt)
    check_expected(path, meta, expect_model)
    for name, spec in index.items():
        if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in _DTYPES:
            raise TamperedCheckpointError(f"{path}: tensor {name} has unsupported dtype {spec.get('dtype')!r}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise TamperedCheckpointError(f"{path}: safetensors cannot read the tensors ({exc})") from exc
    got = payload_sha256(tensors)
    if got != meta.get("payload_sha256"):
        raise TamperedCheckpointError(
            f"{path}: tensor payload SHA-256 mismatch (stored {str(meta.get('payload_sha256'))[:12]}..., "
            f"computed {got[:12]}...); the file was modified or damaged after saving, re-create it"
        )
    _check_tensors(path, meta, tensors, fmt)
    return meta, raw, tensors


def load_fp(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], quantized: list[str], path: Path) -> None:
    """Load the ``fp.*`` tensors; only the quantized layers' weights/biases and tied aliases may be missing."""
    fp = {k[3:]: v for k, v in tensors.items() if k.startswith("fp.")}
    prefixes = tuple(f"{q}." for q in quantized)
    missing, unexpected = model.load_state_dict(fp, strict=False)
    missing = [k for k in missing if not k.startswith(prefixes) and k not in meta.get("tied", {})]
    if missing or unexpected:
        raise ModelMismatchError(
            f"{path}: stored tensors do not fit {meta['base_model']['architecture']} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    sd = model.state_dict()
    for alias, target in meta.get("tied", {}).items():
        if alias not in sd or target not in sd or sd[alias].shape != sd[target].shape:
            raise ModelMismatchError(f"{path}: tied tensor {alias} -> {target} does not exist in {meta['base_model']['architecture']}")
        # a tied pair is one Parameter in a freshly built model; copy only if it is not
        if sd[alias].data_ptr() != sd[target].data_ptr():
            with torch.no_grad():
                model.get_parameter(alias).copy_(fp[target])



