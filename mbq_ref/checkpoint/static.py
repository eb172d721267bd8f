"""Static per-bit checkpoints: one file per bit-width, the deployment a MoBiQuant file replaces (Sec. 4.1).

Serving 2, 3 and 4 bits with static PTQ (RTN or OmniQuant's LWC,
:class:`mbq_ref.fakequant.QuantLinear`) needs one file per width; this is that file, in
the shared format of :mod:`mbq_ref.checkpoint.format`. Each quantized layer stores::

    q.<layer>.codes   uint32  [b, N, ceil(K/32)]   the b-bit codes q as bit-planes, MSB plane first
                                                   (:func:`cuda_numba.packing.pack_bitplanes_ref`,
                                                   the layout the slice kernels read)
    q.<layer>.scale   float32 [N, K/g]             scale s per group
    q.<layer>.zero    uint8   [N, K/g]             integer zero point z (OmniQuant grid, Ŵ = s (q - z))
    q.<layer>.bias    [N]                          only for layers with a bias

A ``b``-bit file thus holds ``b`` bits per weight (padded to whole 32-bit words along K):
a quarter of the MoBiQuant file's 8-bit codes at 2 bits. ``mbq_meta["quantization"]``
holds ``method``, ``bits``, ``group_size`` and the layer list.

Format version 3 stores the bit-planes; versions 1 and 2 packed the codes as one MSB-first
byte stream (a second packer beside :mod:`cuda_numba.packing`) and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .format import (
    CheckpointError,
    FileFormat,
    TamperedCheckpointError,
    bad,
    build_skeleton,
    file_meta,
    fp_tensors,
    int_field,
    layer_entry,
    load_fp,
    load_validated,
    write_checkpoint,
)
from .mobiquant import Checkpoint

__all__ = ["STATIC_FORMAT", "STATIC_FORMAT_VERSION", "STATIC", "save_static_checkpoint", "load_static_checkpoint"]

#: Value of the ``format`` header entry of a static per-bit checkpoint.
STATIC_FORMAT = "mbq-ref/static"
#: Version 3: codes as the bit-planes of :mod:`cuda_numba.packing` (versions 1-2: one MSB-first byte stream).
STATIC_FORMAT_VERSION = 3


def _check_meta(path: Path, meta: dict) -> None:
    int_field(path, meta["quantization"].get("bits"), "quantization.bits", 1, 8)


def _check_layer(path: Path, meta: dict, info: dict, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The packed codes: uint32 bit-planes ``[b, N, ceil(K/32)]``."""
    from cuda_numba.packing import n_words

    name, (n, k) = info["name"], info["shape"]
    codes = tensors[f"q.{name}.codes"]
    want = (meta["quantization"]["bits"], n, n_words(k))
    if codes.dtype != torch.uint32 or tuple(codes.shape) != want:
        raise bad(path, f"layer {name}: packed codes are {codes.dtype} {tuple(codes.shape)}, expected uint32 {want}")
    return set()


#: The static per-bit kind of checkpoint file (:class:`mbq_ref.checkpoint.format.FileFormat`).
STATIC = FileFormat(
    STATIC_FORMAT, STATIC_FORMAT_VERSION, "static per-bit checkpoint", _check_meta, _check_layer,
    retired={v: f"version {v} packed the codes as one byte stream, not as bit-planes" for v in (1, 2)},
)


def save_static_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save a static per-bit PTQ model (:class:`mbq_ref.fakequant.QuantLinear`, RTN or LWC) as one file.

    Each layer stores its ``b``-bit codes as bit-planes (module docstring), a float32
    scale and a uint8 zero point per group; the rest as in
    :func:`mbq_ref.checkpoint.save_checkpoint`.

    Returns:
        the path written (atomically).
    """
    from cuda_numba.packing import pack_bitplanes_ref

    from ..fakequant import quant_linears
    from ..quantizer import quantize, scale_zero

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
    for name, m in layers.items():
        with torch.no_grad():
            xmin, xmax = m.clip_range()
            s, z = scale_zero(xmin, xmax, bits, ste=False)  # [N, K/g]
            q = quantize(m.weight, s, z, bits, m.group_size)  # uint8 [N, K]
        tensors[f"q.{name}.codes"] = torch.from_numpy(pack_bitplanes_ref(q.cpu().numpy(), bits))  # uint32 [b, N, W]
        tensors[f"q.{name}.scale"] = s.float().contiguous()
        tensors[f"q.{name}.zero"] = z.to(torch.uint8).contiguous()
        if m.bias is not None:
            tensors[f"q.{name}.bias"] = m.bias.detach().cpu().clone()
    fp, aliases = fp_tensors(model, list(layers))
    tensors.update(fp)
    first = next(iter(layers.values()))
    body = {
        **file_meta(STATIC, model, meta.pop("base_model", None)),
        "quantization": {
            "method": first.method,
            "bits": bits,
            "group_size": first.group_size,
            "layers": [layer_entry(name, m) for name, m in layers.items()],
        },
        "tied": aliases,
        "extra": meta,
    }
    return write_checkpoint(path, STATIC, body, tensors)


def load_static_checkpoint(path: str | os.PathLike, expect_model=None) -> Checkpoint:
    """Load a file from :func:`save_static_checkpoint` as a plain HF model holding the dequantized weights.

    Same checks as :func:`mbq_ref.checkpoint.load_checkpoint`. The quantized projections
    become ordinary ``nn.Linear`` layers with ``Ŵ = s (q - z)``: exactly what the
    ``QuantLinear`` model computed, at one bit-width only.
    """
    from cuda_numba.packing import unpack_bitplanes_ref

    from ..quantizer import dequantize

    path = Path(path)
    meta, _, tensors = load_validated(path, STATIC, expect_model)
    model = build_skeleton(meta, tensors, path)
    q = meta["quantization"]
    load_fp(model, meta, tensors, [i["name"] for i in q["layers"]], path)
    for info in q["layers"]:
        name, (n, k) = info["name"], info["shape"]
        try:
            planes, s, z = (tensors[f"q.{name}.{t}"] for t in ("codes", "scale", "zero"))
        except KeyError as exc:
            raise TamperedCheckpointError(f"{path}: a tensor of layer {name} is missing") from exc
        lin = model.get_submodule(name)
        codes = torch.from_numpy(unpack_bitplanes_ref(planes.numpy(), k))  # uint8 [N, K]
        with torch.no_grad():
            lin.weight.copy_(dequantize(codes, s, z.float(), q["group_size"]).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_(tensors[f"q.{name}.bias"].to(lin.bias.dtype))
    return Checkpoint(model=model.eval(), meta=meta, path=path)
