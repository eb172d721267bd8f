"""Fake-quantized linear layers for HF Llama-family decoders (static PTQ baseline, Sec. 3 and 5.1).

:class:`QuantLinear` keeps the frozen full-precision weight and quantizes it on
the fly (RTN or OmniQuant LWC, see :mod:`mbq_ref.quantizer`), so the same
module can be calibrated, evaluated at another bit-width, or run at a
per-token bit-width:

* **Changing the bit-width after calibration.** "Evaluate a model calibrated at
  ``b_c`` bits at ``b_i`` bits" (Fig. 1, the mismatch experiment) means here:
  keep the learned clipping factors ``σ(β), σ(γ)`` (so the clipped range
  ``[x_min, x_max]`` of every group is the one fitted at ``b_c``) and
  re-derive the grid ``s = (x_max - x_min) / (2^{b_i} - 1)``, ``z`` from it.
  That is all a static PTQ checkpoint can offer at another precision: its
  parameters are a range per group, and only the rounding grid depends on ``b``.
  :func:`set_bits` does it for a whole model.
* **Per-token bit-widths.** ``QuantLinear.token_bits`` is ``None`` (every token
  at ``bits``), a LongTensor of bits per token, or a policy
  ``f(layer, x) -> bits per token``. The layer then runs the input through the
  weight fake-quantized at each requested width and keeps, for each token, the
  row of the width it was given (the "retain top-10% outlier tokens at 3 bits,
  others at 4 bits" experiment of Sec. 3, see :mod:`mbq_ref.sensitivity`).

Only the q/k/v/o and gate/up/down projections of each decoder layer are
quantized; embeddings and ``lm_head`` stay full precision, as in the paper.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import (
    LearnableClip, QuantError, check_bits, check_weight, fake_quant, group_minmax, resolve_group_size,
)

__all__ = [
    "PROJECTIONS",
    "QuantLinear",
    "check_group_size",
    "decoder_layers",
    "modules_of_type",
    "quantizable_linears",
    "quantize_model",
    "quant_linears",
    "set_bits",
    "set_token_bits",
    "short_name",
]

#: ``(parent attribute, projection)`` of each quantized linear inside a decoder layer.
PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)

METHODS = ("rtn", "lwc")

TokenBits = torch.Tensor | Callable[["QuantLinear", torch.Tensor], torch.Tensor] | None


class QuantLinear(nn.Module):
    """A ``nn.Linear`` whose frozen weight is fake-quantized to ``bits`` bits per group.

    Args:
        linear: the layer to wrap; its weight ``[N, K]`` and bias ``[N]`` are
            shared (not copied) and frozen.
        bits: weight bit-width ``b`` in 1..8.
        group_size: ``g`` dividing ``K`` (App. C.1 uses 128); ``None``/``-1`` = per-channel.
        method: ``"rtn"`` (min/max range, nothing to learn) or ``"lwc"``
            (OmniQuant learnable weight clipping, trained by :mod:`mbq_ref.calibrate`).
        name: module path, used in error messages.
        clip_init: initial LWC logit (OmniQuant: 4.0).

    Calibration contract (``docs/design.md``): :meth:`calib_parameters`,
    :meth:`calib_loss` and the attribute ``calib_stage``. LWC logits are
    trained in every stage; RTN has nothing to train.
    """

    def __init__(
        self,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int | None = 128,
        method: str = "rtn",
        name: str | None = None,
        clip_init: float = 4.0,
    ):
        super().__init__()
        if method not in METHODS:
            raise QuantError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.name = name
        self.group_size = check_weight(linear.weight.detach(), group_size, name)
        self.bits = check_bits(bits, name)
        self.method = method
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.clip = (
            LearnableClip(self.out_features, self.in_features, self.group_size, clip_init).to(self.weight.device)
            if method == "lwc"
            else None
        )
        self.calib_stage: str | None = None
        self.token_bits: TokenBits = None

    # --- quantizer -------------------------------------------------------
    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Range ``(x_min, x_max)`` per group, float32 ``[N, K/g]``: learned (LWC) or min/max (RTN)."""
        if self.clip is not None:
            return self.clip(self.weight)
        return group_minmax(self.weight, self.group_size)

    def qweight(self, bits: int | None = None) -> torch.Tensor:
        """Fake-quantized weight ``Ŵ`` ``[N, K]`` at ``bits`` (default: ``self.bits``); differentiable in the clip."""
        bits = self.bits if bits is None else check_bits(bits, self.name)
        xmin, xmax = self.clip_range()
        return fake_quant(self.weight, xmin, xmax, bits, self.group_size)

    # --- forward ---------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x Ŵ^T + bias``; ``x`` ``[..., K]`` -> ``[..., N]``, per-token widths if ``token_bits`` is set."""
        if self.token_bits is None:
            return F.linear(x, self.qweight(), self.bias)
        bits = self.token_bits(self, x) if callable(self.token_bits) else self.token_bits
        bits = torch.as_tensor(bits, device=x.device)
        if bits.shape != x.shape[:-1]:
            raise QuantError(
                f"token_bits has shape {tuple(bits.shape)} but the input has tokens {tuple(x.shape[:-1])}"
                f"{' in layer ' + repr(self.name) if self.name else ''}"
            )
        widths = sorted(int(b) for b in torch.unique(bits))
        y = F.linear(x, self.qweight(widths[0]), self.bias)  # [..., N]
        for b in widths[1:]:
            # every token is computed at every width and only its own row is kept:
            # a simulation of token routing, not a fast kernel
            y = torch.where((bits == b).unsqueeze(-1), F.linear(x, self.qweight(b), self.bias), y)
        return y

    # --- calibration contract (docs/design.md) ---------------------------
    def calib_parameters(self, stage: str) -> list[dict]:
        """AdamW parameter groups for ``stage``: the LWC logits ``[γ, β]`` (group ``"lwc"``), or ``[]`` for RTN."""
        if self.clip is None:
            return []
        return [{"params": [self.clip.gamma, self.clip.beta], "name": "lwc"}]

    def calib_loss(self, stage: str) -> float:
        """No extra loss term: static PTQ trains on the block-output MSE alone."""
        return 0.0

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == self.in_features else self.group_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={g}, method={self.method}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers ``model.model.layers`` of a HF Llama-family causal LM (or of its base model)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise QuantError(
            f"{type(model).__name__} has no `model.layers` list; only HF Llama-family decoders "
            "(Llama, Mistral, Qwen2, ...) are supported"
        )
    return layers


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The q/k/v/o/gate/up/down projections of every decoder layer, by module path.

    Returns:
        ``{"model.layers.0.self_attn.q_proj": module, ...}`` in forward order
        (``nn.Linear`` before quantization, :class:`QuantLinear` after).
    """
    layers = decoder_layers(model)
    prefix = "model.layers" if getattr(model, "model", None) is not None else "layers"
    found: dict[str, nn.Module] = {}
    for i, layer in enumerate(layers):
        for parent, proj in PROJECTIONS:
            mod = getattr(getattr(layer, parent, None), proj, None)
            if mod is None:
                raise QuantError(
                    f"decoder layer {i} has no {parent}.{proj} ({type(layer).__name__}); "
                    "mixture-of-experts and fused-projection models are not supported"
                )
            found[f"{prefix}.{i}.{parent}.{proj}"] = mod
    return found


def short_name(path: str) -> str:
    """A projection's module path as a plot or table label: ``"model.layers.3.self_attn.q_proj"`` -> ``"L3.q"``.

    Paths that are not a decoder projection (:func:`quantizable_linears`) are returned unchanged.
    """
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)_proj", path)
    if m is None or (m.group(2), f"{m.group(3)}_proj") not in PROJECTIONS:
        return path
    return f"L{m.group(1)}.{m.group(3)}"


def check_group_size(model: nn.Module, group_size: int | None) -> int | None:
    """Check, before any quantization or calibration starts, that ``group_size`` divides every projection's input.

    A Llama-family model has two input dimensions: the hidden size (q/k/v/o,
    gate/up) and the FFN size (down). The paper's group 128 fits LLaMA (4096,
    11008 = 86 x 128) but not every model: SmolLM2-135M has hidden 576 = 4.5 x 128
    and runs with group 64. The packed CUDA kernels also need groups of whole
    32-bit words (:func:`cuda_numba.packing.check_groups`), so the suggested
    sizes are the multiples of 32 that divide every input dimension.

    Args:
        model: HF Llama-family causal LM (full precision or already swapped).
        group_size: ``g``, or ``None``/``-1`` for per-channel (always fits).
    Returns:
        ``group_size`` unchanged.
    Raises:
        QuantError: one line naming the first projection that does not fit, how many
            do not, and the group sizes that fit every projection.
    """
    dims = {name: int(mod.in_features) for name, mod in quantizable_linears(model).items()}
    if group_size is None or group_size == -1:
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        resolve_group_size(1, group_size)  # raises the one message for a value that is no group size
    bad = [name for name, k in dims.items() if k % group_size]
    if bad:
        ks = sorted(set(dims.values()))
        common = math.gcd(*ks)
        fits = [g for g in range(32, common + 1, 32) if common % g == 0]
        hint = f"use one of {', '.join(map(str, fits))} or" if fits else "no multiple of 32 fits; use"
        raise QuantError(
            f"group_size {group_size} does not divide the input dimension {dims[bad[0]]} of {bad[0]!r} "
            f"({len(bad)} of {len(dims)} projections; input dims {', '.join(map(str, ks))}): "
            f"{hint} group_size=None (per-channel)"
        )
    return group_size


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 128,
    method: str = "rtn",
    clip_init: float = 4.0,
) -> nn.Module:
    """Replace every quantizable projection by a :class:`QuantLinear`, in place.

    Args:
        model: HF Llama-family causal LM in full precision.
        bits, group_size, method, clip_init: see :class:`QuantLinear`.
    Returns:
        the same ``model`` (now fake-quantized; ``lm_head`` and embeddings untouched).
    """
    check_group_size(model, group_size)  # before any layer is swapped: all or nothing
    for name, mod in quantizable_linears(model).items():
        if isinstance(mod, QuantLinear):
            raise QuantError(f"{name} is already quantized; load a fresh full-precision model")
        if not isinstance(mod, nn.Linear):
            raise QuantError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
        model.set_submodule(name, QuantLinear(mod, bits, group_size, method, name, clip_init))
    return model


def modules_of_type(model: nn.Module, cls, missing: Exception | None = None) -> dict[str, nn.Module]:
    """Every submodule of ``model`` that is a ``cls`` (a class or tuple of classes), by module path.

    ``missing``: raised when there is none (``None``: return the empty dict).
    """
    found = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
    if not found and missing is not None:
        raise missing
    return found


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every :class:`QuantLinear` in ``model`` by module path (empty if not quantized)."""
    return modules_of_type(model, QuantLinear)


def _require_quantized(model: nn.Module) -> dict[str, QuantLinear]:
    return modules_of_type(model, QuantLinear, QuantError("model has no QuantLinear layers; call quantize_model first"))


def set_bits(model: nn.Module, bits: int) -> nn.Module:
    """Evaluate an already quantized (and possibly calibrated) model at ``bits`` bits.

    The learned clipping factors are kept and only the grid is rebuilt for
    ``bits`` (see the module docstring). Returns ``model``.
    """
    for name, m in _require_quantized(model).items():
        m.bits = check_bits(bits, name)
    return model


def set_token_bits(model: nn.Module, token_bits: TokenBits) -> nn.Module:
    """Install a per-token bit-width (tensor ``[B, T]`` or policy ``f(layer, x)``) in every QuantLinear.

    ``None`` restores one width for all tokens. Returns ``model``.
    """
    for m in _require_quantized(model).values():
        m.token_bits = token_bits
    return model
