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
    q.<layer>.zero        uint8   [N, K/g]    base-slice integer zero point z (float32 if it does not fit)
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
    meta_sha256     SHA-256 of mbq_meta + "\\0" + tokenizer: refuses edited metadata

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
for another model than ``expect_model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

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
FORMAT_VERSION = 1

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
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; create one with `mbq quantize --model tiny-llama --out {path}`")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    size = path.stat().st_size
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
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ForeignFileError(f"{path} is not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ForeignFileError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
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
    return _parse_meta(path, raw)


def _parse_meta(path: Path, raw: dict) -> dict:
    try:
        meta = json.loads(raw["mbq_meta"])
    except (KeyError, ValueError) as exc:
        raise TamperedCheckpointError(f"{path}: the mbq_meta header entry is missing or not JSON") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise VersionMismatchError(
            f"{path} uses checkpoint format version {version}, this mbq-ref reads version {FORMAT_VERSION}; "
            "re-create it with this version's `mbq quantize` (or install the mbq-ref that wrote it)"
        )
    want = raw.get("meta_sha256")
    got = _meta_sha256(raw["mbq_meta"], raw.get("tokenizer", ""))
    if want != got:
        raise TamperedCheckpointError(
            f"{path}: metadata SHA-256 mismatch (stored {str(want)[:12]}..., computed {got[:12]}...); "
            "the header was edited after saving, re-create the checkpoint"
        )
    return meta


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
    # z is integer-valued (floor grid, rounded); uint8 is lossless when it fits, which it does for
    # any range containing 0 (z in 0..2^b1); otherwise keep it as float32
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


def _atomic_write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``path`` via a temporary file in the same folder: fsync, then ``os.replace``."""
    from safetensors.torch import save_file

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    # same folder = same filesystem, so the final rename cannot degrade into a copy
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write {path} ({exc}); any previous file there is unchanged") from exc
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX; not possible on Windows)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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
    cfg_dict = dict(base["config"])
    model_type = cfg_dict.pop("model_type", base.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"unknown model type {model_type!r} in the checkpoint; upgrade transformers")
    cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
    dtype = getattr(torch, base.get("dtype", "float32"))
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = contextlib.nullcontext
    # random init of weights that are overwritten anyway costs minutes on an 8B model
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
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


def _load_tokenizer(meta: dict, raw: dict):
    files = raw.get("tokenizer")
    if files:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, text in json.loads(files).items():
                (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
            return AutoTokenizer.from_pretrained(tmp)
    from .zoo import load_tokenizer

    return load_tokenizer(meta["base_model"]["id"])


def _load_validated(path: Path, fmt: str, expect_model) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Header, metadata and tensors of ``path`` after every check; ``(meta, raw header metadata, tensors)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index, raw, _ = _read_header(path, fmt)
    meta = _parse_meta(path, raw)
    _check_expected(path, meta, expect_model)
    for name, spec in index.items():
        if spec.get("dtype") not in _DTYPES:
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
    tok = _load_tokenizer(meta, raw) if with_tokenizer else None
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
