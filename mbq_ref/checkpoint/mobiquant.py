"""MoBiQuant checkpoints: one file serves every precision (paper Sec. 4.1), saved and loaded with checks.

A MoBiQuant model is deployed as *one* file whatever precision it will run at
(the paper's memory argument, Sec. 4.1: one nested model instead of one model
per bit-width). The file format, the hashes and the checks every kind of file
shares are in :mod:`mbq_ref.checkpoint.format`; this module adds the MoBiQuant
layout and its own checks.

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
    fp.<name>             model dtype         every tensor that is not quantized

``mbq_meta`` adds to the shared fields the quantization settings (slice bits, cumulative
bits, group size, router width, code dtype, the layer list), ``thresholds`` (targets and
achieved bits of the table), and the calibration settings and measured results given by
the caller. The threshold table is read back as a :class:`mbq_ref.thresholds.ThresholdTable`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .format import (
    CheckpointError,
    FileFormat,
    ModelMismatchError,
    TamperedCheckpointError,
    bad,
    build_skeleton,
    check_finite,
    dict_field,
    file_meta,
    fp_tensors,
    int_field,
    layer_entry,
    is_int,
    load_fp,
    load_validated,
    read_meta,
    write_checkpoint,
)

if TYPE_CHECKING:
    from ..thresholds import ThresholdTable

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MOBIQUANT", "Checkpoint", "estimate_checkpoint_bytes", "load_checkpoint",
    "read_metadata", "save_checkpoint",
]  # fmt: skip

#: Value of the ``format`` header entry of a MoBiQuant checkpoint.
FORMAT = "mbq-ref/mobiquant"
#: Version 2: ``q.<layer>.zero`` holds the MoBiSlice zero point ``z_E`` on the finest (B_E-bit) grid
#: (:mod:`mbq_ref.mobislice`); version 1 stored ``z_1`` on the base grid.
FORMAT_VERSION = 2
_CODE_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}


# --- checks of the MoBiQuant fields (the shared ones are in .format) ----------------------
def _check_meta(path: Path, meta: dict) -> None:
    """Slice bits against cumulative bits, the router width, the code dtype, the threshold-table fields."""
    q = meta["quantization"]
    if q.get("method") != "mobiquant":
        raise bad(path, f"quantization.method must be 'mobiquant', got {q.get('method')!r}")
    sb = q.get("slice_bits")
    if not isinstance(sb, list) or not 2 <= len(sb) <= 16 or not all(is_int(b) and 1 <= b <= 8 for b in sb):
        raise bad(path, f"quantization.slice_bits must list 2..16 integers of 1..8 bits, got {sb!r}")
    if sum(sb) > 16:
        raise bad(path, f"quantization.slice_bits {sb} total more than 16 bits")
    cum = [sum(sb[: i + 1]) for i in range(len(sb))]
    if q.get("cumulative_bits") != cum or not all(is_int(c) for c in q["cumulative_bits"]):
        raise bad(path, f"quantization.cumulative_bits {q.get('cumulative_bits')!r} disagrees with slice_bits {sb} (expected {cum})")
    int_field(path, q.get("router_hidden"), "quantization.router_hidden", 1)
    from ..mobilinear import ROUTINGS

    if q.get("routing", "per_slice") not in ROUTINGS:  # files written before the ladder have no field
        raise bad(path, f"quantization.routing must be one of {ROUTINGS}, got {q.get('routing')!r}")
    want = "uint8" if cum[-1] <= 8 else "int32"
    if not isinstance(q.get("code_dtype"), str) or q["code_dtype"] not in _CODE_DTYPES or (q["code_dtype"] == "uint8") != (want == "uint8"):
        raise bad(path, f"quantization.code_dtype {q.get('code_dtype')!r} does not fit {cum[-1]}-bit codes (expected {want})")
    th = dict_field(path, meta, "thresholds", "")
    targets, achieved = th.get("targets"), th.get("achieved", [])
    if not isinstance(targets, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in targets):
        raise bad(path, f"thresholds.targets must be a list of numbers, got {targets!r}")
    if not all(math.isfinite(t) for t in targets) or any(b <= a for a, b in zip(targets, targets[1:])):
        raise bad(path, f"thresholds.targets must be finite and strictly increasing, got {targets}")
    if not isinstance(achieved, list) or len(achieved) != len(targets) or not all(
        a is None or (isinstance(a, (int, float)) and not isinstance(a, bool)) for a in achieved
    ):
        raise bad(path, "thresholds.achieved must list one number per target")
    measured = [a for a in achieved if a is not None and math.isfinite(a)]
    if any(b < a for a, b in zip(measured, measured[1:])):
        # a row placed at the bits it measured: a reversed table would route 3 bits as 7 (Sec. 4.2 controller)
        raise bad(path, f"thresholds.achieved must not decrease as the targets increase, got {achieved}")


def _check_layer(path: Path, meta: dict, info: dict, tensors: dict[str, torch.Tensor]) -> set[str]:
    """One layer's codes (dtype, shape, range), its threshold logit and its router; returns the names checked."""
    q = meta["quantization"]
    name, (n, k) = info["name"], info["shape"]
    p = f"q.{name}."
    codes, bits = tensors[p + "codes"], sum(q["slice_bits"])
    if codes.dtype != _CODE_DTYPES[q["code_dtype"]] or tuple(codes.shape) != (n, k):
        raise bad(path, f"layer {name}: codes are {codes.dtype} {tuple(codes.shape)}, expected {q['code_dtype']} {(n, k)}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= 2**bits:
        raise bad(path, f"layer {name}: codes span {lo}..{hi}, outside 0..{2**bits - 1} for {bits}-bit slices {q['slice_bits']}")
    if p + "tau_logit" not in tensors:
        raise TamperedCheckpointError(f"{path}: tensor {p + 'tau_logit'!r} of layer {name} is missing")
    tau = tensors[p + "tau_logit"]
    if tau.numel() != 1:
        raise bad(path, f"layer {name}: tau_logit has shape {tuple(tau.shape)}")
    check_finite(path, p + "tau_logit", tau, allow_inf=True)
    router = {key for key in tensors if key.startswith(p + "router.")}
    fc1 = tensors.get(p + "router.fc1.weight")
    if fc1 is not None and tuple(fc1.shape) != (q["router_hidden"], k):
        raise bad(path, f"layer {name}: router fc1 has shape {tuple(fc1.shape)}, expected {(q['router_hidden'], k)}")
    for key in router:
        check_finite(path, key, tensors[key])
    return router | {p + "tau_logit"}


def _check_table(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The threshold-table tensors against ``meta["thresholds"]``; returns their names (none without a table)."""
    targets, n_layers = meta["thresholds"]["targets"], len(meta["quantization"]["layers"])
    if not targets:
        return set()
    t, u = tensors.get("thresholds.targets"), tensors.get("thresholds.tau_logit")
    if t is None or u is None:
        raise TamperedCheckpointError(f"{path}: the threshold table tensors are missing")
    if t.dtype != torch.float64 or t.tolist() != [float(x) for x in targets]:
        raise bad(path, "thresholds.targets in the tensors disagree with the metadata")
    if tuple(u.shape) != (len(targets), n_layers):
        raise bad(path, f"threshold table has shape {tuple(u.shape)}, expected {(len(targets), n_layers)}")
    check_finite(path, "thresholds.tau_logit", u, allow_inf=True)
    # more bits = a lower threshold: each layer's logit(τ) must not increase along the table (±inf included)
    rising = (u[1:] > u[:-1]).any(0) if len(u) > 1 else torch.zeros(n_layers, dtype=torch.bool)
    if bool(rising.any()):
        layer = meta["quantization"]["layers"][int(rising.nonzero()[0])]["name"]
        raise bad(path, f"the threshold table is not monotone: logit(τ) of layer {layer} rises with the target bits")
    return {"thresholds.targets", "thresholds.tau_logit"}


#: The MoBiQuant kind of checkpoint file (:class:`mbq_ref.checkpoint.format.FileFormat`).
MOBIQUANT = FileFormat(
    name=FORMAT,
    version=FORMAT_VERSION,
    what="MoBiQuant checkpoint",
    check_meta=_check_meta,
    check_layer=_check_layer,
    check_model=_check_table,
    retired={1: "version 1 stored the MoBiSlice zero point on the base grid"},
)


def read_metadata(path: str | os.PathLike) -> dict:
    """The checked ``mbq_meta`` dict of a MoBiQuant checkpoint, from its header only (no tensor is read).

    Checks the format, the version and the metadata hash (not the tensor payload:
    :func:`load_checkpoint` does that).
    """
    return read_meta(path, MOBIQUANT)


# --- saving ------------------------------------------------------------------
# --- saving ------------------------------------------------------------------
def _mobi_layers(model: nn.Module) -> dict:
    from ..mobiquant import mobi_layers

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
    from ..mobiroute import tau_to_logit

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
    from ..packed import PackedMoBiLinear

    path = Path(path)
    meta = dict(meta or {})
    layers = _mobi_layers(model)
    packed = [n for n, m in layers.items() if isinstance(m, PackedMoBiLinear)]
    if packed:  # bit-planes only: no codes in the stored layout (and nothing half-written)
        raise CheckpointError(f"layer {packed[0]!r} is packed (pack_model); save the model before packing it")
    vocab = getattr(model.config, "vocab_size", None)
    if tokenizer is not None and vocab is not None and _top_token_id(tokenizer) >= vocab:
        raise CheckpointError(f"the tokenizer produces token ids up to {_top_token_id(tokenizer)}, past the model's "
                              f"vocabulary of {vocab}; pass the model's own tokenizer")  # fmt: skip
    names = list(layers)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors.update(_layer_tensors(name, m))
    fp, aliases = fp_tensors(model, names)
    tensors.update(fp)
    table, achieved = _threshold_tensors(thresholds, names)
    tensors.update(table)
    first = layers[names[0]]
    body = {
        **file_meta(MOBIQUANT, model, meta.pop("base_model", None)),
        "quantization": {
            "method": "mobiquant",
            "slice_bits": list(first.slice_bits),
            "cumulative_bits": [sum(first.slice_bits[: i + 1]) for i in range(len(first.slice_bits))],
            "group_size": first.group_size,
            "router_hidden": first.router.fc1.out_features,
            "routing": first.routing,
            "code_dtype": str(tensors[f"q.{names[0]}.codes"].dtype).removeprefix("torch."),
            "layers": [layer_entry(name, m) for name, m in layers.items()],
        },
        "tied": aliases,
        "thresholds": {"targets": table["thresholds.targets"].tolist() if table else [], "achieved": achieved},
        "calibration": meta.pop("calibration", {}),
        "results": meta.pop("results", {}),
        "extra": meta,
    }
    return write_checkpoint(path, MOBIQUANT, body, tensors, _tokenizer_files(tokenizer))


def estimate_checkpoint_bytes(
    model: nn.Module, slice_bits=(2, 2, 2, 2), group_size: int = 128, router_hidden: int = 64,
    n_targets: int = 0, tokenizer=None,
) -> int:
    """The size in bytes of the file :func:`save_checkpoint` will write for ``model``, before calibrating it.

    Counts what the file stores (module docstring): per quantized projection ``[N, K]`` the codes
    (1 byte per weight, 4 above 8 bits), a float32 scale and a uint8 zero per group, the router
    (``fc1 [H, K]``, ``fc2 [E-1, H]``, biases, two scalars, float32), ``tau_logit`` and the bias;
    every other tensor at its dtype (tied tensors once); the threshold table; the tokenizer files
    and the header (config, layer list, one index entry per tensor). ``tests/test_checkpoint.py``
    checks it is within 10 % of the real size. ``mbq quantize`` and ``mbq tour`` refuse a disk
    with less free space before any work.
    """
    from ..fakequant import quantizable_linears

    layers = quantizable_linears(model)
    code_bytes = 1 if sum(slice_bits) <= 8 else 4
    e = len(slice_bits)
    total, n_tensors = 0, 0
    for m in layers.values():
        n, k = m.out_features, m.in_features
        router = router_hidden * k + router_hidden + (e - 1) * router_hidden + (e - 1) + 2
        total += n * k * code_bytes + n * (k // group_size) * (4 + 1) + 4 * router + 8
        n_tensors += 9
        if m.bias is not None:
            total += n * m.bias.element_size()
            n_tensors += 1
    prefixes = tuple(f"{q}." for q in layers)
    seen = set()
    for key, v in model.state_dict().items():
        if key.startswith(prefixes) or not v.numel():
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ident in seen:  # a tied tensor is stored once (fp_tensors)
            continue
        seen.add(ident)
        total += v.numel() * v.element_size()
        n_tensors += 1
    total += n_targets * 8 * (1 + len(layers))
    header = len(_tokenizer_files(tokenizer)) + len(json.dumps(model.config.to_dict(), default=str))
    header += sum(len(name) + 80 for name in layers) + 120 * n_tensors + 2048  # layer list, tensor index, fixed fields
    return total + header


# --- loading -----------------------------------------------------------------
def _real(value, what: str) -> float:
    """A real number as a float: Python and numpy numbers, ``Fraction``, ``Decimal``, a 0-d (one-element) tensor
    or array. Booleans, strings, complex numbers and anything else are refused by type (:class:`CheckpointError`)."""
    import numbers
    from decimal import Decimal

    item = value
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy" and hasattr(value, "ndim"):
        if (value.numel() if isinstance(value, torch.Tensor) else value.size) != 1:
            raise CheckpointError(f"{what} must be one real number, got an array of shape {tuple(value.shape)}")
        item = value.item() if isinstance(value, torch.Tensor) else value.reshape(()).item()
    if isinstance(item, bool) or not isinstance(item, (numbers.Real, Decimal)):
        raise CheckpointError(f"{what} must be a real number such as 3.0, got {type(value).__name__} {value!r:.40}")
    return float(item)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode, routing as saved), its metadata and tokenizer."""

    model: nn.Module
    meta: dict
    path: Path
    tokenizer: object | None = None
    table: ThresholdTable | None = None
    _layers: dict | None = field(default=None, repr=False)
    _packed: dict | None = field(default=None, repr=False)

    @property
    def cumulative_bits(self) -> list[int]:
        """Readable precisions ``[B_1, ..., B_E]`` (2/4/6/8 for slices 2,2,2,2)."""
        return list(self.meta["quantization"]["cumulative_bits"])

    def pack(self, backend: str = "auto") -> dict:
        """Serve the model from bit-planes: :func:`mbq_ref.packed.pack_model`, in place; returns its memory report.

        Call it before moving the model to a GPU (the float weights then never reach it);
        routing, thresholds and :meth:`set_bits` work on the packed layers unchanged.
        """
        from ..packed import pack_model

        if self._packed is not None:  # already served from bit-planes: packing again has nothing to do
            return self._packed
        report = pack_model(self.model, backend=backend)
        self._layers = None  # set_bits looks the (new) layers up again
        self._packed = report
        return report

    def set_bits(self, bits: float) -> dict[str, float]:
        """Route at target average ``bits`` with the threshold table (no recalibration); returns ``{layer: logit(τ)}``.

        Only thresholds change (one float per layer): weights, codes and any KV
        cache stay as they are, which is what makes switching cheap (Sec. 4.2).

        Raises:
            CheckpointError: ``bits`` outside ``[B_1, B_E]`` or no table stored.
        """
        lo, hi = self.cumulative_bits[0], self.cumulative_bits[-1]
        bits = _real(bits, "bits")
        if math.isnan(bits) or not lo <= bits <= hi:
            raise CheckpointError(f"bits must be in {lo}..{hi} for slices {self.meta['quantization']['slice_bits']}, got {bits:g}")
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


def _install_layers(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Replace each quantized ``nn.Linear`` by a frozen MoBiLinear rebuilt from codes/scale/zero/router."""
    from ..mobilinear import MoBiLinear
    from ..mobislice import SlicedWeight

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
            layer = MoBiLinear(lin, slice_bits, group_size, hidden, name, routing=q.get("routing", "per_slice"))
        try:
            layer.router.load_state_dict(router_sd, strict=True)
        except RuntimeError as exc:
            raise TamperedCheckpointError(f"{path}: router of layer {name} does not fit ({exc})") from exc
        layer.tau_logit = tau_logit
        # the codes come from the file (freeze() would derive them from the FP weight and the clipping)
        layer.set_sliced(sw)
        model.set_submodule(name, layer)


def _load_tokenizer(meta: dict, raw: dict, path: Path):
    """The embedded tokenizer (else the base model's); a broken embedded one is a :class:`CheckpointError`."""
    files = raw.get("tokenizer")
    if files:
        from transformers import AutoTokenizer

        try:
            texts = json.loads(files)
        except ValueError as exc:
            raise bad(path, "the embedded tokenizer is not JSON") from exc
        if not isinstance(texts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in texts.items()):
            raise bad(path, "the embedded tokenizer must map file names to texts")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                for name, text in texts.items():
                    if Path(name).name in ("", ".", ".."):
                        raise bad(path, f"the embedded tokenizer has a bad file name {name!r}")
                    (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
                tok = AutoTokenizer.from_pretrained(tmp)
            except CheckpointError:
                raise
            except Exception as exc:  # tokenizers raise many types (ValueError, OSError, Rust exceptions)
                raise bad(path, f"the embedded tokenizer does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from exc
    else:
        from ..zoo import load_tokenizer

        tok = load_tokenizer(meta["base_model"]["id"])
    top = _top_token_id(tok)
    vocab = meta["base_model"]["config"].get("vocab_size")
    if vocab is not None and top >= vocab:
        raise bad(path, f"the tokenizer produces token ids up to {top}, past the model's vocabulary of {vocab}")
    return tok


def _top_token_id(tokenizer) -> int:
    """The largest id of ``tokenizer``'s own vocabulary (added special tokens, which real models may number past
    ``vocab_size`` and never produce from text, are not counted); -1 if it cannot say."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return max(backend.get_vocab(with_added_tokens=False).values(), default=-1)
    return max(tokenizer.get_vocab().values(), default=-1) if hasattr(tokenizer, "get_vocab") else -1



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
    meta, raw, tensors = load_validated(path, MOBIQUANT, expect_model)
    model = build_skeleton(meta, tensors, path)
    quantized = [info["name"] for info in meta["quantization"]["layers"]]
    load_fp(model, meta, tensors, quantized, path)
    _install_layers(model, meta, tensors, path)
    model.eval()
    table = None
    if "thresholds.targets" in tensors:
        targets, logits = tensors["thresholds.targets"], tensors["thresholds.tau_logit"]
        if logits.shape != (len(targets), len(quantized)):
            raise TamperedCheckpointError(f"{path}: threshold table has shape {tuple(logits.shape)}")
        from ..thresholds import ThresholdTable

        achieved = [math.nan if a is None else float(a) for a in meta["thresholds"].get("achieved", [])]  # null: not measured
        table = ThresholdTable(targets, logits, quantized, achieved)
    tok = _load_tokenizer(meta, raw, path) if with_tokenizer else None
    return Checkpoint(model=model, meta=meta, path=path, tokenizer=tok, table=table)


