"""One-file MoBiQuant checkpoints: safetensors tensors + JSON metadata, saved atomically, loaded with checks.

A MoBiQuant model is deployed as *one* file whatever precision it will run at
(the paper's memory argument, Sec. 4.1: one nested model instead of one model
per bit-width). The file is a plain `safetensors <https://github.com/huggingface/safetensors>`_
file, so it is read without unpickling anything, with two metadata entries
of our own in its header.

Tensors (names are module paths of the HF model)::

    q.<layer>.codes       uint8   [N, K]      Q_E, every slice of one weight in one byte, MSB first
                                              (slices 2,2,2,2: bits 7-6 slice 1, 5-4 slice 2, ...);
                                              int32 if the slices total more than 8 bits
    q.<layer>.scale       float32 [N, K/g]    base-slice scale s (shared by every slice, Sec. 4.3)
    q.<layer>.zero        uint8   [N, K/g]    integer zero point z_E on the finest (B_E-bit) grid
                                              (float32 if it does not fit; format version 2)
    q.<layer>.bias        [N]                 only for layers with a bias (Qwen2 q/k/v)
    q.<layer>.router.*    float32             MoBiRoute MLP (Eq. 4): fc1 [H, K], fc2 [E-1, H], in_scale []
    q.<layer>.tau_logit   float64 []          the layer's threshold logit(τ) when saved
    thresholds.targets    float64 [M]         the threshold table: target average bits ...
    thresholds.tau_logit  float64 [M, L]      ... and logit(τ) of each of the L layers (order: meta "layers")
    fp.<name>             model dtype         every tensor that is not quantized: embeddings, norms,
                                              lm_head (stored once when tied to the embeddings)

Header metadata (``__metadata__``, strings only)::

    format          "mbq-ref/mobiquant"         refuses foreign safetensors files
    mbq_meta        JSON, see below
    tokenizer       JSON {file name: text} of the base model's tokenizer files (optional)
    meta_sha256     SHA-256 of mbq_meta + "\\0" + tokenizer: refuses damaged or hand-edited metadata

``mbq_meta`` holds ``format_version``, the base model (id, architecture, the full
HF config and its SHA-256 :func:`config_sha256`), the quantization settings
(slice bits, group size, router width, the layer list), the calibration settings
and measured results given by the caller, and ``payload_sha256`` (:func:`payload_sha256`,
over every tensor's name, dtype, shape and bytes).

:func:`save_checkpoint` writes a temporary file in the destination folder, fsyncs
it and renames it over the destination (``os.replace`` is atomic on POSIX and
Windows), so an interrupted save or a full disk leaves the previous file intact.
:func:`load_checkpoint` refuses, each with its own :class:`CheckpointError`
subclass and a one-line message: truncated files, edited files (hash mismatch),
other format versions, safetensors files that are not ours, and checkpoints made
for another model than ``expect_model``. The hashes give integrity, not
authenticity (whoever edits the file can recompute them), so every field is also
cross-checked against the others and against the tensors (:func:`_check_meta`,
:func:`_check_tensors`): a loaded file is at least self-consistent. A consistent
forgery with in-range values is not detected (``docs/robustness.md``).
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
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .atomic import OutputError, atomic_write
from .errors import MBQError

__all__ = [
    "FORMAT",
    "STATIC_FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "TruncatedCheckpointError",
    "TamperedCheckpointError",
    "ForeignFileError",
    "VersionMismatchError",
    "ModelMismatchError",
    "CheckpointWriteError",
    "Checkpoint",
    "ThresholdTable",
    "config_sha256",
    "payload_sha256",
    "read_metadata",
    "save_checkpoint",
    "load_checkpoint",
    "pack_bits",
    "unpack_bits",
    "save_static_checkpoint",
    "load_static_checkpoint",
]

#: Value of the ``format`` header entry; anything else is a foreign file.
FORMAT = "mbq-ref/mobiquant"
#: The same for a static per-bit checkpoint (the baseline a MoBiQuant file replaces).
STATIC_FORMAT = "mbq-ref/static"
#: Bumped whenever the tensor layout or the metadata schema changes incompatibly.
#: Version 2: ``q.<layer>.zero`` holds the MoBiSlice zero point ``z_E`` on the finest (B_E-bit) grid
#: (:mod:`mbq_ref.mobislice`); version 1 stored ``z_1`` on the base grid.
FORMAT_VERSION = 2

# safetensors refuses headers above 100 MB; a bigger length field means "not safetensors"
_MAX_HEADER = 100_000_000
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
    """Not a safetensors file, or a safetensors file that is not an mbq-ref MoBiQuant checkpoint."""


class VersionMismatchError(CheckpointError):
    """Written by another version of the checkpoint format."""


class ModelMismatchError(CheckpointError):
    """The checkpoint was made for another base model or architecture than the one expected."""


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


# --- the threshold table ------------------------------------------------------
@dataclass
class ThresholdTable:
    """Per-layer thresholds ``logit(τ)`` for a list of target average bits (paper_spec 3.3, "a table of τ per B").

    Attributes:
        targets: ``[M]`` target average bits, ascending.
        tau_logit: ``[M, L]`` float64, ``logit(τ)`` of each layer (``±inf`` allowed:
            ``+inf`` = base slice only, ``-inf`` = all slices).
        layers: the ``L`` layer paths, in column order.
        achieved: ``[M]`` average bits measured on the calibration windows (or NaN).
    """

    targets: torch.Tensor
    tau_logit: torch.Tensor
    layers: list[str]
    achieved: list[float] = field(default_factory=list)

    #: ``logits_for`` refuses a target further than this from every bit-width the table measured.
    REACH_TOL = 0.1

    def logits_for(self, bits: float) -> dict[str, float]:
        """``{layer: logit(τ)}`` for ``bits``: the table row, or a linear blend of the two rows around it.

        Rows are placed at the bits they *measured* (``achieved``; the targets when a
        table has no measurements), so a row that missed its target is not mistaken for
        it. Between rows each layer's ``logit(τ)`` is interpolated linearly; an infinite
        end is replaced by the finite neighbour. The routed bits are measured afterwards,
        never assumed.

        Raises:
            CheckpointError: ``bits`` more than :attr:`REACH_TOL` outside the measured range
                (the table cannot reach it: a one-line error, never a silent neighbour).
        """
        t = self.targets.double()
        if not len(t):
            raise CheckpointError("the checkpoint has an empty threshold table; re-run `mbq quantize`")
        bits = float(bits)
        ach = torch.tensor(self.achieved, dtype=torch.float64) if len(self.achieved) == len(t) else t.clone()
        x = torch.where(torch.isfinite(ach), ach, t)  # where each row lands
        exact = (t - bits).abs() < 1e-9
        lo_b, hi_b = float(x.min()), float(x.max())
        if not lo_b - self.REACH_TOL <= bits <= hi_b + self.REACH_TOL:
            raise CheckpointError(
                f"the threshold table reaches {lo_b:.3f}..{hi_b:.3f} measured bits, not {bits:g}; "
                "re-build it with `mbq quantize` (more --threshold-windows)"
            )
        order = torch.argsort(x, stable=True)
        xs = x[order]
        if exact.any() and abs(float(x[int(exact.nonzero()[0])]) - bits) <= self.REACH_TOL:
            row = self.tau_logit[int(exact.nonzero()[0])]
        elif bits <= xs[0]:
            row = self.tau_logit[int(order[0])]
        elif bits >= xs[-1]:
            row = self.tau_logit[int(order[-1])]
        else:
            hi = int(torch.searchsorted(xs, torch.tensor([bits], dtype=xs.dtype))[0])
            lo = hi - 1
            w = (bits - float(xs[lo])) / max(float(xs[hi] - xs[lo]), 1e-12)
            a, b = self.tau_logit[int(order[lo])].clone(), self.tau_logit[int(order[hi])].clone()
            a = torch.where(torch.isfinite(a), a, b)
            b = torch.where(torch.isfinite(b), b, a)
            row = (1 - w) * a + w * b
        return {name: float(u) for name, u in zip(self.layers, row.tolist())}


# --- reading the header ---------------------------------------------------------
def _read_header(path: Path, fmt: str = FORMAT) -> tuple[dict, dict, int]:
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
        header = json.loads(raw)
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
    if meta.get("format") != fmt:
        what = "MoBiQuant checkpoint" if fmt == FORMAT else "static per-bit checkpoint"
        found = f"its format is {meta['format']!r}" if meta.get("format") else "e.g. plain model weights"
        raise ForeignFileError(
            f"{path} is a safetensors file but not an mbq-ref {what} (no format {fmt!r} in its metadata; "
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


def read_metadata(path: str | os.PathLike, fmt: str = FORMAT) -> dict:
    """The checked ``mbq_meta`` dict of a checkpoint, from its header only (no tensor is read).

    Checks the format, the version and the metadata hash (not the tensor payload:
    :func:`load_checkpoint` does that).
    """
    path = Path(path)
    _, raw, _ = _read_header(path, fmt)
    return _parse_meta(path, raw, fmt)


def _parse_meta(path: Path, raw: dict, fmt: str = FORMAT) -> dict:
    try:
        meta = json.loads(raw["mbq_meta"])
    except (KeyError, ValueError) as exc:
        raise TamperedCheckpointError(f"{path}: the mbq_meta header entry is missing or not JSON") from exc
    if not isinstance(meta, dict):
        raise TamperedCheckpointError(f"{path}: the mbq_meta header entry is a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        why = " (version 1 stored the MoBiSlice zero point on the base grid)" if version == 1 else ""
        raise VersionMismatchError(
            f"{path} uses checkpoint format version {version}{why}, this mbq-ref reads version {FORMAT_VERSION}; "
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
_CODE_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}


def _bad(path: Path, what: str) -> TamperedCheckpointError:
    return TamperedCheckpointError(f"{path}: {what}; the file was edited or written by a broken tool, re-create it with `mbq quantize`")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(path: Path, v, what: str, lo: int, hi: int | None = None) -> int:
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _bad(path, f"{what} must be an integer {rng}, got {v!r}")
    return v


def _dict_field(path: Path, d: dict, key: str, where: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise _bad(path, f"{where}{key} must be a JSON object, got {type(v).__name__}")
    return v


def _check_config(path: Path, base: dict) -> None:
    """The stored HF config: known fields are integers in range, a known activation, a matching hash."""
    from transformers.activations import ACT2FN

    for key in ("id", "architecture", "config_sha256"):
        if not isinstance(base.get(key), str):
            raise _bad(path, f"base_model.{key} must be a string, got {base.get(key)!r}")
    if base.get("dtype") not in _DTYPE_NAMES:
        raise _bad(path, f"base_model.dtype must be one of {', '.join(_DTYPE_NAMES)}, got {base.get('dtype')!r}")
    cfg = _dict_field(path, base, "config", "base_model.")
    if not isinstance(cfg.get("model_type", base.get("model_type")), str):
        raise _bad(path, f"config model_type must be a string, got {cfg.get('model_type')!r}")
    for key, (lo, hi) in _CONFIG_INTS.items():
        if cfg.get(key) is not None:
            _int_field(path, cfg[key], f"config {key}", lo, hi)
    # keys outside the config hash (how the model was loaded) still reach the model: check their types
    for key in _VOLATILE_CONFIG_KEYS & set(cfg):
        flag = key in ("use_cache", "output_attentions", "output_hidden_states", "return_dict")
        if not (isinstance(cfg[key], bool) if flag else (cfg[key] is None or isinstance(cfg[key], str))):
            raise _bad(path, f"config {key} must be {'true or false' if flag else 'a string'}, got {cfg[key]!r}")
    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise _bad(path, f"config hidden_act {act!r} is not an activation transformers knows")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise _bad(path, f"config num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    try:
        got = config_sha256(cfg)
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"the stored config cannot be hashed ({exc})") from exc
    if got != base["config_sha256"]:
        raise _bad(path, "base_model.config_sha256 does not match the stored config")


def _check_layers(path: Path, q: dict, group_size: int) -> None:
    layers = q.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _bad(path, "quantization.layers must be a non-empty list")
    seen = set()
    for info in layers:
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
            raise _bad(path, f"quantization.layers entry {info!r} has no name")
        name = info["name"]
        if name in seen:
            raise _bad(path, f"layer {name} is listed twice")
        seen.add(name)
        shape = info.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise _bad(path, f"layer {name}: shape must be [out, in], got {shape!r}")
        _int_field(path, shape[0], f"layer {name} out_features", 1)
        k = _int_field(path, shape[1], f"layer {name} in_features", 1)
        if k % group_size:
            raise _bad(path, f"group_size {group_size} does not divide the input dimension {k} of layer {name}")
        if not isinstance(info.get("bias"), bool):
            raise _bad(path, f"layer {name}: bias must be true or false, got {info.get('bias')!r}")


def _check_meta(path: Path, meta: dict, fmt: str) -> None:
    """Types, ranges and agreement of the metadata fields (the tensors come in :func:`_check_tensors`)."""
    base = _dict_field(path, meta, "base_model", "")
    _check_config(path, base)
    q = _dict_field(path, meta, "quantization", "")
    gs = _int_field(path, q.get("group_size"), "quantization.group_size", 1)
    if fmt == STATIC_FORMAT:
        _int_field(path, q.get("bits"), "quantization.bits", 1, 8)
    else:
        if q.get("method") != "mobiquant":
            raise _bad(path, f"quantization.method must be 'mobiquant', got {q.get('method')!r}")
        sb = q.get("slice_bits")
        if not isinstance(sb, list) or not 2 <= len(sb) <= 16 or not all(_is_int(b) and 1 <= b <= 8 for b in sb):
            raise _bad(path, f"quantization.slice_bits must list 2..16 integers of 1..8 bits, got {sb!r}")
        if sum(sb) > 16:
            raise _bad(path, f"quantization.slice_bits {sb} total more than 16 bits")
        cum = [sum(sb[: i + 1]) for i in range(len(sb))]
        if q.get("cumulative_bits") != cum or not all(_is_int(c) for c in q["cumulative_bits"]):
            raise _bad(path, f"quantization.cumulative_bits {q.get('cumulative_bits')!r} disagrees with slice_bits {sb} (expected {cum})")
        _int_field(path, q.get("router_hidden"), "quantization.router_hidden", 1)
        want = "uint8" if cum[-1] <= 8 else "int32"
        if not isinstance(q.get("code_dtype"), str) or q["code_dtype"] not in _CODE_DTYPES or (q["code_dtype"] == "uint8") != (want == "uint8"):
            raise _bad(path, f"quantization.code_dtype {q.get('code_dtype')!r} does not fit {cum[-1]}-bit codes (expected {want})")
        th = _dict_field(path, meta, "thresholds", "")
        targets, achieved = th.get("targets"), th.get("achieved", [])
        if not isinstance(targets, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in targets):
            raise _bad(path, f"thresholds.targets must be a list of numbers, got {targets!r}")
        if not all(math.isfinite(t) for t in targets) or any(b <= a for a, b in zip(targets, targets[1:])):
            raise _bad(path, f"thresholds.targets must be finite and strictly increasing, got {targets}")
        if not isinstance(achieved, list) or len(achieved) != len(targets) or not all(
            a is None or (isinstance(a, (int, float)) and not isinstance(a, bool)) for a in achieved
        ):
            raise _bad(path, "thresholds.achieved must list one number per target")
    _check_layers(path, q, gs)
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise _bad(path, "tied must map tensor names to tensor names")
    if not isinstance(meta.get("payload_sha256"), str):
        raise _bad(path, "payload_sha256 is missing")


def _check_finite(path: Path, name: str, t: torch.Tensor, allow_inf: bool = False) -> None:
    if not t.is_floating_point() or not t.numel():
        return
    bad = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        raise _bad(path, f"tensor {name} holds {int(bad.sum())} {'NaN' if allow_inf else 'NaN/inf'} values")


def _check_tensors(path: Path, meta: dict, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    """Every tensor against the metadata: names, dtypes, shapes, code range, finite values."""
    q = meta["quantization"]
    cfg = meta["base_model"]["config"]
    gs = q["group_size"]
    expected = set()
    bits = q["bits"] if fmt == STATIC_FORMAT else sum(q["slice_bits"])
    for info in q["layers"]:
        name, (n, k) = info["name"], info["shape"]
        p = f"q.{name}."
        try:
            codes, scale, zero = (tensors[p + t] for t in ("codes", "scale", "zero"))
        except KeyError as exc:
            raise TamperedCheckpointError(f"{path}: tensor {exc.args[0]!r} of layer {name} is missing") from exc
        expected |= {p + "codes", p + "scale", p + "zero"}
        if fmt == STATIC_FORMAT:
            if codes.dtype != torch.uint8 or tuple(codes.shape) != ((n * k * bits + 7) // 8,):
                raise _bad(path, f"layer {name}: packed codes have dtype {codes.dtype} and shape {tuple(codes.shape)}")
        else:
            if codes.dtype != _CODE_DTYPES[q["code_dtype"]] or tuple(codes.shape) != (n, k):
                raise _bad(path, f"layer {name}: codes are {codes.dtype} {tuple(codes.shape)}, expected {q['code_dtype']} {(n, k)}")
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= 2**bits:
                raise _bad(path, f"layer {name}: codes span {lo}..{hi}, outside 0..{2**bits - 1} for {bits}-bit slices {q['slice_bits']}")
        for t, what in ((scale, "scale"), (zero, "zero")):
            if tuple(t.shape) != (n, k // gs):
                raise _bad(path, f"layer {name}: {what} has shape {tuple(t.shape)}, expected {(n, k // gs)}")
        if not scale.is_floating_point():
            raise _bad(path, f"layer {name}: scale has dtype {scale.dtype}")
        _check_finite(path, p + "scale", scale)
        if bool((scale <= 0).any()):
            raise _bad(path, f"layer {name}: scale has values <= 0")
        zf = zero.double()
        _check_finite(path, p + "zero", zf)
        if bool((zf != zf.round()).any()):
            raise _bad(path, f"layer {name}: zero points are not integers")
        if info.get("bias"):
            expected.add(p + "bias")
            if p + "bias" not in tensors or tuple(tensors[p + "bias"].shape) != (n,):
                raise _bad(path, f"layer {name}: bias missing or not of shape ({n},)")
            _check_finite(path, p + "bias", tensors[p + "bias"])
        if fmt == STATIC_FORMAT:
            continue
        expected.add(p + "tau_logit")
        if p + "tau_logit" not in tensors:
            raise TamperedCheckpointError(f"{path}: tensor {p + 'tau_logit'!r} of layer {name} is missing")
        tau = tensors[p + "tau_logit"]
        if tau.numel() != 1:
            raise _bad(path, f"layer {name}: tau_logit has shape {tuple(tau.shape)}")
        _check_finite(path, p + "tau_logit", tau, allow_inf=True)
        router = {key for key in tensors if key.startswith(p + "router.")}
        expected |= router
        fc1 = tensors.get(p + "router.fc1.weight")
        if fc1 is not None and tuple(fc1.shape) != (q["router_hidden"], k):
            raise _bad(path, f"layer {name}: router fc1 has shape {tuple(fc1.shape)}, expected {(q['router_hidden'], k)}")
        for key in router:
            _check_finite(path, key, tensors[key])
    if fmt == FORMAT:
        targets = meta["thresholds"]["targets"]
        if targets:
            expected |= {"thresholds.targets", "thresholds.tau_logit"}
            t, u = tensors.get("thresholds.targets"), tensors.get("thresholds.tau_logit")
            if t is None or u is None:
                raise TamperedCheckpointError(f"{path}: the threshold table tensors are missing")
            if t.dtype != torch.float64 or t.tolist() != [float(x) for x in targets]:
                raise _bad(path, "thresholds.targets in the tensors disagree with the metadata")
            if tuple(u.shape) != (len(targets), len(q["layers"])):
                raise _bad(path, f"threshold table has shape {tuple(u.shape)}, expected {(len(targets), len(q['layers']))}")
            _check_finite(path, "thresholds.tau_logit", u, allow_inf=True)
    fp = {key for key in tensors if key.startswith("fp.")}
    expected |= fp
    for alias, target in meta.get("tied", {}).items():
        if f"fp.{target}" not in tensors or f"fp.{alias}" in tensors:
            raise _bad(path, f"tied tensor {alias} -> {target} does not match the stored tensors")
    for key in fp:
        _check_finite(path, key, tensors[key])
    extra = sorted(set(tensors) - expected)
    if extra:
        raise _bad(path, f"unexpected tensors {extra[:3]}")
    # the config must describe the stored tensors (it decides how big a model is built)
    emb = tensors.get("fp.model.embed_tokens.weight")
    if emb is not None and (cfg.get("vocab_size"), cfg.get("hidden_size")) != tuple(emb.shape):
        raise _bad(path, f"config vocab_size x hidden_size {cfg.get('vocab_size')} x {cfg.get('hidden_size')} "
                         f"disagrees with the embedding {tuple(emb.shape)}")  # fmt: skip
    blocks = {int(m.group(1)) for key in tensors for m in [re.search(r"\.layers\.(\d+)\.", key)] if m}
    if blocks and blocks != set(range(cfg.get("num_hidden_layers", -1))):
        raise _bad(path, f"config num_hidden_layers {cfg.get('num_hidden_layers')!r} disagrees with the {len(blocks)} stored blocks")


# --- saving ------------------------------------------------------------------
def _mobi_layers(model: nn.Module) -> dict:
    from .mobiquant import mobi_layers

    layers = mobi_layers(model)
    if not layers:
        raise CheckpointError("the model has no MoBiLinear layers; quantize it with quantize_mobiquant first")
    return layers


def _layer_tensors(name: str, m) -> dict[str, torch.Tensor]:
    """The deployable tensors of one frozen :class:`mbq_ref.mobilinear.MoBiLinear`."""
    sw = m.sliced if m.sliced is not None else m.freeze()
    out = {f"q.{name}.codes": sw.codes.detach().cpu().contiguous(), f"q.{name}.scale": sw.scale.detach().cpu().float()}
    z = sw.zero.detach().cpu()
    # z_E is integer-valued (finest grid); uint8 is lossless when it fits, which it does for any
    # range containing 0 with B_E <= 8 (z_E in 0..2^B_E - 1); otherwise keep it as float32
    fits = bool(((z >= 0) & (z <= 255) & (z == z.round())).all())
    out[f"q.{name}.zero"] = z.to(torch.uint8) if fits else z.float()
    if m.bias is not None:
        out[f"q.{name}.bias"] = m.bias.detach().cpu().clone()
    for k, v in m.router.state_dict().items():
        out[f"q.{name}.router.{k}"] = v.detach().cpu().clone()
    out[f"q.{name}.tau_logit"] = torch.tensor(float(m.tau_logit), dtype=torch.float64)
    return out


def _fp_tensors(model: nn.Module, quantized: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _tokenizer_files(tokenizer) -> str:
    """The tokenizer's text files as JSON ``{name: text}`` ("" if it has none or a binary one)."""
    if tokenizer is None:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(Path(tmp).iterdir()):
            try:
                files[p.name] = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                return ""  # e.g. a sentencepiece model: fall back to loading the base model's tokenizer
    return json.dumps(files)


def _threshold_tensors(thresholds, layer_names: list[str]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``thresholds``: ``{target bits: τ (float) | {layer: τ} | {"logits": {layer: logit}, "achieved": bits}}``."""
    from .mobiroute import tau_to_logit

    if not thresholds:
        return {}, []
    targets, rows, achieved = [], [], []
    for target in sorted(thresholds):
        entry = thresholds[target]
        ach = math.nan
        if isinstance(entry, dict) and "logits" in entry:
            ach = float(entry.get("achieved", math.nan))
            logits = entry["logits"]
            row = [float(logits[n]) for n in layer_names]
        elif isinstance(entry, dict):
            row = [tau_to_logit(entry[n]) for n in layer_names]
        else:
            row = [tau_to_logit(float(entry))] * len(layer_names)
        targets.append(float(target))
        rows.append(row)
        achieved.append(ach)
    return {
        "thresholds.targets": torch.tensor(targets, dtype=torch.float64),
        "thresholds.tau_logit": torch.tensor(rows, dtype=torch.float64),
    }, achieved


class CheckpointWriteError(CheckpointError, OutputError):
    """The checkpoint could not be written (full or read-only disk, a file in the way); nothing was changed."""


def _atomic_write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``path`` via a temporary file in the same folder: fsync, then ``os.replace`` (:mod:`mbq_ref.atomic`)."""
    from safetensors.torch import save_file

    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "checkpoint")
    except OutputError as exc:
        raise CheckpointWriteError(str(exc)) from exc


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    meta: dict | None = None,
    *,
    tokenizer=None,
    thresholds: dict | None = None,
) -> Path:
    """Save a calibrated MoBiQuant model as one self-contained safetensors file, atomically.

    Args:
        model: a HF Llama-family causal LM after :func:`mbq_ref.mobiquant.quantize_mobiquant`
            (its :class:`~mbq_ref.mobilinear.MoBiLinear` layers are frozen to codes if needed).
        path: destination; its folder is created. An existing file is replaced
            only once the new one is completely on disk.
        meta: caller information stored as JSON: ``base_model`` (the id or folder it
            was loaded from), ``calibration`` (settings), ``results`` (measured
            numbers); any other key is kept under ``extra``.
        tokenizer: the base model's tokenizer; its files are embedded so the
            checkpoint evaluates and generates without the base model.
        thresholds: the threshold table, ``{target bits: τ}`` with one global
            ``τ``, ``{layer: τ}``, or ``{"logits": {layer: logit(τ)}, "achieved": bits}``.
    Returns:
        the path written.
    Raises:
        CheckpointError: the model is not MoBiQuant-quantized, or the file could not be written.
    """
    import transformers

    from . import __version__

    path = Path(path)
    meta = dict(meta or {})
    layers = _mobi_layers(model)
    from .packed import PackedMoBiLinear

    packed = [n for n, m in layers.items() if isinstance(m, PackedMoBiLinear)]
    if packed:  # bit-planes only: no codes in the stored layout (and nothing half-written)
        raise CheckpointError(f"layer {packed[0]!r} is packed (pack_model); save the model before packing it")
    names = list(layers)
    tensors: dict[str, torch.Tensor] = {}
    layer_info = []
    for name, m in layers.items():
        tensors.update(_layer_tensors(name, m))
        layer_info.append({"name": name, "shape": [m.out_features, m.in_features], "bias": m.bias is not None})
    fp, aliases = _fp_tensors(model, names)
    tensors.update(fp)
    table, achieved = _threshold_tensors(thresholds, names)
    tensors.update(table)
    first = layers[names[0]]
    cfg = model.config
    base_id = meta.pop("base_model", None) or getattr(cfg, "_name_or_path", "") or "unknown"
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"mbq_ref": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "base_model": {
            "id": str(base_id),
            "architecture": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config": cfg.to_dict(),
            "config_sha256": config_sha256(cfg),
        },
        "quantization": {
            "method": "mobiquant",
            "slice_bits": list(first.slice_bits),
            "cumulative_bits": [sum(first.slice_bits[: i + 1]) for i in range(len(first.slice_bits))],
            "group_size": first.group_size,
            "router_hidden": first.router.fc1.out_features,
            "code_dtype": str(tensors[f"q.{names[0]}.codes"].dtype).removeprefix("torch."),
            "layers": layer_info,
        },
        "tied": aliases,
        "thresholds": {"targets": table["thresholds.targets"].tolist() if table else [], "achieved": achieved},
        "calibration": meta.pop("calibration", {}),
        "results": meta.pop("results", {}),
        "extra": meta,
        "payload_sha256": payload_sha256(tensors),
    }
    meta_json = json.dumps(body, default=str, allow_nan=True)
    tok_json = _tokenizer_files(tokenizer)
    header = {"format": FORMAT, "mbq_meta": meta_json, "meta_sha256": _meta_sha256(meta_json, tok_json)}
    if tok_json:
        header["tokenizer"] = tok_json
    _atomic_write(path, tensors, header)
    return path


# --- loading -----------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode, routing as saved), its metadata and tokenizer."""

    model: nn.Module
    meta: dict
    path: Path
    tokenizer: object | None = None
    table: ThresholdTable | None = None
    _layers: dict | None = field(default=None, repr=False)

    @property
    def cumulative_bits(self) -> list[int]:
        """Readable precisions ``[B_1, ..., B_E]`` (2/4/6/8 for slices 2,2,2,2)."""
        return list(self.meta["quantization"]["cumulative_bits"])

    def pack(self, backend: str = "auto") -> dict:
        """Serve the model from bit-planes: :func:`mbq_ref.packed.pack_model`, in place; returns its memory report.

        Call it before moving the model to a GPU (the float weights then never reach it);
        routing, thresholds and :meth:`set_bits` work on the packed layers unchanged.
        """
        from .packed import pack_model

        report = pack_model(self.model, backend=backend)
        self._layers = None  # set_bits looks the (new) layers up again
        return report

    def set_bits(self, bits: float) -> dict[str, float]:
        """Route at target average ``bits`` with the threshold table (no recalibration); returns ``{layer: logit(τ)}``.

        Only thresholds change (one float per layer): weights, codes and any KV
        cache stay as they are, which is what makes switching cheap (Sec. 4.2).

        Raises:
            CheckpointError: ``bits`` outside ``[B_1, B_E]`` or no table stored.
        """
        lo, hi = self.cumulative_bits[0], self.cumulative_bits[-1]
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or math.isnan(bits) or not lo <= bits <= hi:
            raise CheckpointError(f"bits must be in {lo}..{hi} for slices {self.meta['quantization']['slice_bits']}, got {bits}")
        if self.table is None:
            raise CheckpointError(f"{self.path} has no threshold table; re-create it with `mbq quantize`")
        if self._layers is None:
            self._layers = _mobi_layers(self.model)
        logits = self.table.logits_for(bits)
        for name, u in logits.items():
            layer = self._layers[name]
            layer.tau_logit = u  # stored exactly; τ itself is σ(u)
            layer.fixed_k = None  # the routers decide again
            layer.token_slices = None
        return logits


def _check_expected(path: Path, meta: dict, expect) -> None:
    base = meta["base_model"]
    if expect is None:
        return
    if isinstance(expect, (str, os.PathLike)):
        if str(expect) == base["id"]:
            return
        from .zoo.load import _resolve

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


def _build_skeleton(meta: dict) -> nn.Module:
    """The base architecture from the stored HF config (weights are overwritten afterwards)."""
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
        # random init of weights that are overwritten anyway costs minutes on an 8B model
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # the fields we know were checked in _check_meta; transformers validates the rest
        raise CheckpointError(
            f"the model config stored in the checkpoint cannot build a {model_type} model "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); re-create it with `mbq quantize`"
        ) from exc
    return model.eval()


def _install_layers(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Replace each quantized ``nn.Linear`` by a frozen MoBiLinear rebuilt from codes/scale/zero/router."""
    from .mobilinear import MoBiLinear
    from .mobislice import SlicedWeight

    q = meta["quantization"]
    slice_bits, group_size = tuple(q["slice_bits"]), q["group_size"]
    for info in q["layers"]:
        name = info["name"]
        try:
            codes = tensors[f"q.{name}.codes"]
            scale = tensors[f"q.{name}.scale"]
            zero = tensors[f"q.{name}.zero"].to(scale.dtype)
            tau_logit = float(tensors[f"q.{name}.tau_logit"])
        except KeyError as exc:
            raise TamperedCheckpointError(f"{path}: tensor {exc.args[0]!r} of layer {name} is missing") from exc
        n, k = info["shape"]
        if tuple(codes.shape) != (n, k) or tuple(scale.shape) != (n, k // group_size) or zero.shape != scale.shape:
            raise TamperedCheckpointError(f"{path}: layer {name} has tensors of the wrong shape")
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != (n, k):
            raise ModelMismatchError(f"{path}: layer {name} does not match the architecture in the checkpoint")
        sw = SlicedWeight(codes, scale, zero, slice_bits, group_size)
        with torch.no_grad():
            # the FP weight is gone; the linear keeps the widest reading Ŵ_E so that fp_forward still means something
            lin.weight.copy_(sw.dequant(None, torch.float32).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_(tensors[f"q.{name}.bias"].to(lin.bias.dtype))
        router_sd = {k2[len(f"q.{name}.router.") :]: v for k2, v in tensors.items() if k2.startswith(f"q.{name}.router.")}
        hidden = router_sd["fc1.weight"].shape[0] if "fc1.weight" in router_sd else q.get("router_hidden", 64)
        with torch.random.fork_rng(devices=[]):  # the router's random init is overwritten: leave the caller's RNG alone
            layer = MoBiLinear(lin, slice_bits, group_size, hidden, name)
        try:
            layer.router.load_state_dict(router_sd, strict=True)
        except RuntimeError as exc:
            raise TamperedCheckpointError(f"{path}: router of layer {name} does not fit ({exc})") from exc
        layer.tau_logit = tau_logit
        _set_frozen(layer, sw)
        model.set_submodule(name, layer)


def _set_frozen(layer, sw) -> None:
    """Install integer codes into a MoBiLinear exactly as ``MoBiLinear.freeze`` leaves them.

    ``freeze`` derives codes from the FP weight and the learned clipping, which a
    checkpoint does not keep; here the codes come from the file, and the per-slice
    float deltas are derived from them the same way (float64 readings, exact differences).
    """
    layer.sliced = sw
    full = [sw.dequant(k, torch.float64) for k in range(1, sw.num_slices + 1)]
    layer._deltas = [full[0]] + [full[k] - full[k - 1] for k in range(1, sw.num_slices)]


def _load_tokenizer(meta: dict, raw: dict, path: Path):
    """The embedded tokenizer (else the base model's); a broken embedded one is a :class:`CheckpointError`."""
    files = raw.get("tokenizer")
    if files:
        from transformers import AutoTokenizer

        try:
            texts = json.loads(files)
        except ValueError as exc:
            raise _bad(path, "the embedded tokenizer is not JSON") from exc
        if not isinstance(texts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in texts.items()):
            raise _bad(path, "the embedded tokenizer must map file names to texts")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                for name, text in texts.items():
                    if Path(name).name in ("", ".", ".."):
                        raise _bad(path, f"the embedded tokenizer has a bad file name {name!r}")
                    (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
                tok = AutoTokenizer.from_pretrained(tmp)
            except CheckpointError:
                raise
            except Exception as exc:  # tokenizers raise many types (ValueError, OSError, Rust exceptions)
                raise _bad(path, f"the embedded tokenizer does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from exc
    else:
        from .zoo import load_tokenizer

        tok = load_tokenizer(meta["base_model"]["id"])
    return tok


def _load_validated(path: Path, fmt: str, expect_model) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Header, metadata and tensors of ``path`` after every check; ``(meta, raw header metadata, tensors)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index, raw, _ = _read_header(path, fmt)
    meta = _parse_meta(path, raw, fmt)
    _check_expected(path, meta, expect_model)
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


def _load_fp(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], quantized: list[str], path: Path) -> None:
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


def load_checkpoint(path: str | os.PathLike, expect_model=None, with_tokenizer: bool = True) -> Checkpoint:
    """Load and validate a MoBiQuant checkpoint; rebuild the model (never unpickles anything).

    Checks, in order: the file exists and is complete (truncation), it is an
    mbq-ref checkpoint (foreign files), its format version, the metadata hash,
    ``expect_model``, the tensor payload hash, and the layout of every layer.

    Args:
        path: a file written by :func:`save_checkpoint`.
        expect_model: optional: a model id/folder (``"tiny-llama"``), an ``nn.Module``
            or a HF config; refuse the file if it was made for another model.
        with_tokenizer: also rebuild the tokenizer (embedded, else the base model's).
    Returns:
        :class:`Checkpoint`; its ``model`` routes with the thresholds it was saved with.
    Raises:
        TruncatedCheckpointError, ForeignFileError, VersionMismatchError,
        TamperedCheckpointError, ModelMismatchError (all :class:`CheckpointError`).
    """
    path = Path(path)
    meta, raw, tensors = _load_validated(path, FORMAT, expect_model)
    model = _build_skeleton(meta)
    quantized = [info["name"] for info in meta["quantization"]["layers"]]
    _load_fp(model, meta, tensors, quantized, path)
    _install_layers(model, meta, tensors, path)
    model.eval()
    table = None
    if "thresholds.targets" in tensors:
        targets, logits = tensors["thresholds.targets"], tensors["thresholds.tau_logit"]
        if logits.shape != (len(targets), len(quantized)):
            raise TamperedCheckpointError(f"{path}: threshold table has shape {tuple(logits.shape)}")
        table = ThresholdTable(targets, logits, quantized, list(meta["thresholds"].get("achieved", [])))
    tok = _load_tokenizer(meta, raw, path) if with_tokenizer else None
    return Checkpoint(model=model, meta=meta, path=path, tokenizer=tok, table=table)


# --- static per-bit checkpoints (what one MoBiQuant file replaces) -------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of ``bits`` bits densely, MSB first: ``[...]`` -> uint8 ``[ceil(numel * bits / 8)]``.

    Example, 3-bit codes ``5, 1, 7`` -> bits ``101 001 111`` -> bytes ``10100111 1_0000000``::

        pack_bits(torch.tensor([5, 1, 7]), 3) == tensor([0b10100111, 0b10000000])
    """
    if not 1 <= bits <= 8:
        raise CheckpointError(f"can pack 1..8-bit codes, not {bits}")
    flat = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    planes = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)  # [numel * bits], MSB first
    pad = (-planes.numel()) % 8
    planes = torch.cat([planes, planes.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
    return (planes.to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes, uint8 ``[numel]``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)
    planes = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    return (planes.reshape(numel, bits) * weights).sum(1).to(torch.uint8)


def save_static_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save a static per-bit PTQ model (:class:`mbq_ref.fakequant.QuantLinear`, RTN or LWC) as one file.

    The comparison point of Sec. 4.1: serving 2, 3 and 4 bits this way needs one file
    per width. Each layer stores its ``b``-bit codes bit-packed (:func:`pack_bits`),
    a float32 scale and a uint8 zero point per group (OmniQuant grid,
    ``Ŵ = s (q - z)``); the rest as in :func:`save_checkpoint`.

    Returns:
        the path written (atomically).
    """
    from . import __version__
    from .fakequant import quant_linears
    from .quantizer import quantize, scale_zero

    path = Path(path)
    meta = dict(meta or {})
    layers = quant_linears(model)
    if not layers:
        raise CheckpointError("the model has no QuantLinear layers; quantize it with quantize_model/calibrate_static first")
    widths = {m.bits for m in layers.values()}
    if len(widths) != 1:
        raise CheckpointError(f"a static checkpoint has one bit-width; the model mixes {sorted(widths)}")
    bits = widths.pop()
    tensors: dict[str, torch.Tensor] = {}
    info = []
    for name, m in layers.items():
        with torch.no_grad():
            xmin, xmax = m.clip_range()
            s, z = scale_zero(xmin, xmax, bits, ste=False)  # [N, K/g]
            q = quantize(m.weight, s, z, bits, m.group_size)  # uint8 [N, K]
        tensors[f"q.{name}.codes"] = pack_bits(q, bits)
        tensors[f"q.{name}.scale"] = s.float().contiguous()
        tensors[f"q.{name}.zero"] = z.to(torch.uint8).contiguous()
        if m.bias is not None:
            tensors[f"q.{name}.bias"] = m.bias.detach().cpu().clone()
        info.append({"name": name, "shape": [m.out_features, m.in_features], "bias": m.bias is not None})
    fp, aliases = _fp_tensors(model, list(layers))
    tensors.update(fp)
    cfg = model.config
    body = {
        "format": STATIC_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"mbq_ref": __version__, "torch": torch.__version__},
        "base_model": {
            "id": str(meta.pop("base_model", None) or getattr(cfg, "_name_or_path", "") or "unknown"),
            "architecture": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config": cfg.to_dict(),
            "config_sha256": config_sha256(cfg),
        },
        "quantization": {
            "method": next(iter(layers.values())).method,
            "bits": bits,
            "group_size": next(iter(layers.values())).group_size,
            "layers": info,
        },
        "tied": aliases,
        "extra": meta,
        "payload_sha256": payload_sha256(tensors),
    }
    meta_json = json.dumps(body, default=str, allow_nan=True)
    header = {"format": STATIC_FORMAT, "mbq_meta": meta_json, "meta_sha256": _meta_sha256(meta_json, "")}
    _atomic_write(path, tensors, header)
    return path


def load_static_checkpoint(path: str | os.PathLike, expect_model=None) -> Checkpoint:
    """Load a file from :func:`save_static_checkpoint` as a plain HF model holding the dequantized weights.

    Same checks as :func:`load_checkpoint`. The quantized projections become
    ordinary ``nn.Linear`` layers with ``Ŵ = s (q - z)``: exactly what the
    ``QuantLinear`` model computed, at one bit-width only.
    """
    from .quantizer import dequantize

    path = Path(path)
    meta, _, tensors = _load_validated(path, STATIC_FORMAT, expect_model)
    model = _build_skeleton(meta)
    q = meta["quantization"]
    _load_fp(model, meta, tensors, [i["name"] for i in q["layers"]], path)
    for info in q["layers"]:
        name, (n, k) = info["name"], info["shape"]
        try:
            packed, s, z = (tensors[f"q.{name}.{t}"] for t in ("codes", "scale", "zero"))
        except KeyError as exc:
            raise TamperedCheckpointError(f"{path}: a tensor of layer {name} is missing") from exc
        lin = model.get_submodule(name)
        codes = unpack_bits(packed, q["bits"], n * k).reshape(n, k)
        with torch.no_grad():
            lin.weight.copy_(dequantize(codes, s, z.float(), q["group_size"]).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_(tensors[f"q.{name}.bias"].to(lin.bias.dtype))
    return Checkpoint(model=model.eval(), meta=meta, path=path)
