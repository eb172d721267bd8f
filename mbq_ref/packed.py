"""Packed MoBiLinear: bit-planes, scales and zero points only, served by the bit-plane kernels (Sec. 4.3).

:class:`~mbq_ref.mobilinear.MoBiLinear` keeps the float weight and caches float slice
deltas for its torch matmuls (the reference: 20-40 bytes per weight at inference).
:class:`PackedMoBiLinear` keeps only what a deployment needs, per layer ``[N, K]``:

    planes  int32 [B_E, N, ceil(K/32)]   bit-planes of the codes Q_E, MSB first (uint32 bit patterns)
    scale   float32 [N, G]               base scale s per group of g inputs
    zero    int32 [N, G]                 zero point z_E on the finest (B_E-bit) grid
    bias, router                         unchanged (the router is a small MLP, Eq. 4)

that is ``B_E + 64 / g`` bits per weight (8.5 for slices 2,2,2,2 and g = 128). Precision k
reads the first ``B_k`` planes: ``Ŵ_k = s_k (Q_k - z_k + 1/2)``, ``s_k = s / 2^(B_k - b_1)``,
``z_k = z_E / 2^(B_E - B_k)`` (``cuda_numba/dequant.py``).

Forward (``backend``): ``"kernels"`` runs the bit-plane kernels (decode, T <= 8: the routed
GEMV v7 through a :class:`cuda_numba.slice_gemv.RoutedPlan` cached per layer and token count,
launched on torch's current stream with k_t, x and the output viewed in place: no host
synchronisation, no copy, no Numba allocation per call, so a decode step can be captured in a
CUDA graph; more tokens: :func:`cuda_numba.slice_linear.slice_linear` grouped GEMM v3, which
sorts the tokens on the host), ``"torch"`` dequantizes ``Ŵ_k`` from the planes and multiplies in torch
(the CPU reference), ``"auto"`` (default) = kernels for CUDA inputs, torch otherwise. Under
Numba's CUDA simulator ``"kernels"`` also runs on CPU tensors (that is how the tests check it).
Both layers are :class:`mbq_ref.mobilinear.RoutedSlices`: the same routing policy, checks,
statistics and forward; this one only supplies the backend, :meth:`PackedMoBiLinear.slice_matmul`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .fakequant import modules_of_type
from .mobilinear import MoBiError, MoBiLinear, RoutedSlices

__all__ = ["BACKENDS", "PackedMoBiLinear", "pack_model", "packed_layers"]

BACKENDS = ("auto", "kernels", "torch")
DECODE_MAX_T = 8  # up to this many tokens: the routed GEMV (one launch); more: grouped GEMM


class PackedMoBiLinear(RoutedSlices):
    """MoBiLinear inference from bit-planes (see the module docstring); build with :meth:`from_mobilinear`."""

    def __init__(self, planes, scale, zero, slice_bits, group_size, in_features, bias, router, tau_logit, name=None):
        super().__init__()
        self.name = name
        self.slice_bits = tuple(int(b) for b in slice_bits)
        self.group_size = int(group_size)
        self.in_features, self.out_features = int(in_features), int(planes.shape[1])
        self.register_buffer("planes", planes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.router = router
        self._init_routing(0.5)
        self.tau_logit = float(tau_logit)
        self.backend = "auto"
        self._packed = {}  # device -> cuda_numba PackedWeight viewing the buffers (no copy)
        self._plans = {}  # (device, T) -> cuda_numba RoutedPlan (the decode launch, prepared once)
        self._streams = {}  # CUDA stream handle -> Numba external stream

    @classmethod
    @torch.no_grad()
    def from_mobilinear(cls, layer: MoBiLinear) -> PackedMoBiLinear:
        """Pack a frozen MoBiLinear (its codes, scales and zero points) into bit-planes; the layer is not changed."""
        from cuda_numba.packing import pack_bitplanes_ref

        sw = layer.sliced if layer.sliced is not None else layer.freeze()
        codes = sw.codes.to(torch.int64).cpu()
        if sw.group_size % 32 and sw.group_size != layer.in_features:
            raise MoBiError(f"packed kernels need group_size % 32 == 0, got {sw.group_size} (layer {layer.name!r})")
        planes = pack_bitplanes_ref(codes.numpy().astype(np.uint8), bits=sum(sw.slice_bits))  # uint32 [B_E, N, W]
        dev = layer.weight.device
        return cls(
            torch.from_numpy(planes.view(np.int32)).to(dev),
            sw.scale.detach().float().cpu().clone().to(dev),
            sw.zero.detach().to(torch.int32).cpu().clone().to(dev),  # z_E, the integer zero on the finest grid
            sw.slice_bits,
            sw.group_size,
            layer.in_features,
            layer.bias,
            layer.router,
            layer.tau_logit,
            layer.name,
        )

    def _apply(self, fn, *args, **kwargs):
        self._packed, self._plans = {}, {}  # .to() / .half() / .cuda() give the buffers new storage: drop the views
        return super()._apply(fn, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight: planes + scales + zero points (bias and router not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.planes, self.scale, self.zero))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.out_features * self.in_features)

    def _weight(self, device):
        """cuda_numba PackedWeight viewing this layer's buffers on ``device`` (cached)."""
        key = str(device)
        if key not in self._packed:
            from numba import cuda

            from cuda_numba.packing import PackedWeight

            from cuda_numba._common import device_view

            s32 = self.scale.float().contiguous()  # float32 even after model.half(); cached below
            self._s32 = s32  # the views below do not keep the tensor alive
            if device.type == "cuda":
                planes = device_view(self.planes).view(np.uint32)
                scale, zero = device_view(s32), device_view(self.zero)
            else:
                planes, scale, zero = self.planes.numpy().view(np.uint32), s32.numpy(), self.zero.numpy()
            self._packed[key] = PackedWeight(planes, scale, zero, self.slice_bits, self.group_size, self.in_features)
        return self._packed[key]

    def _use_kernels(self, x: torch.Tensor) -> bool:
        if self.backend not in BACKENDS:
            raise MoBiError(f"unknown backend {self.backend!r}; choose from {BACKENDS} (layer {self.name!r})")
        if self.backend == "auto":
            return x.is_cuda
        return self.backend == "kernels"

    def _stream(self, device):
        """torch's current stream on ``device`` as a Numba stream (0 in the simulator)."""
        if device.type != "cuda":
            return 0
        from numba import cuda

        handle = torch.cuda.current_stream(device).cuda_stream
        if handle not in self._streams:
            self._streams[handle] = cuda.external_stream(handle)
        return self._streams[handle]

    def _decode(self, x2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """T <= 8 tokens: one routed GEMV v7 plan launch per 2 tokens, everything stays on the device."""
        from cuda_numba._common import device_view
        from cuda_numba.slice_gemv import RoutedPlan

        T = x2.shape[0]
        key = (str(x2.device), T)
        if key not in self._plans:
            self._plans[key] = RoutedPlan(self._weight(x2.device), T)
        xin = x2 if x2.dtype in (torch.float16, torch.float32) else x2.float()
        xin = xin.contiguous()
        y = torch.empty(T, self.out_features, dtype=xin.dtype, device=x2.device)
        k = counts.contiguous()
        self._plans[key](device_view(xin), device_view(k), device_view(y), self._stream(x2.device))
        return y.to(x2.dtype)

    def _kernels(self, x2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from cuda_numba.slice_linear import slice_linear

        if x2.shape[0] <= DECODE_MAX_T:
            return self._decode(x2, counts)
        w = self._weight(x2.device)
        xin = x2.contiguous() if x2.is_cuda else x2.contiguous().numpy()  # the simulator: host arrays
        y = slice_linear(xin, w, counts.cpu().numpy(), kind="gemm", version=3)  # prefill: sorts on the host
        return torch.as_tensor(y, device=x2.device)

    def _torch(self, x2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from cuda_numba.packing import unpack_bitplanes_ref
        from cuda_numba.slice_linear import slice_linear_ref

        codes = unpack_bitplanes_ref(self.planes.cpu().numpy().view(np.uint32), self.in_features)
        return slice_linear_ref(
            x2, torch.from_numpy(codes).to(x2.device), self.scale, self.zero, self.slice_bits, counts.cpu().numpy(),
            self.group_size,
        )  # fmt: skip

    @torch.no_grad()
    def slice_matmul(self, x2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Packed backend: ``[T, K]``, long ``[T]`` -> ``[T, N]`` in x's dtype (kernels or the torch reference), bias added."""
        y = self._kernels(x2, counts) if self._use_kernels(x2) else self._torch(x2, counts)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]``: ``y_t = x_t Ŵ_{k_t}^T + bias``, routed as every RoutedSlices layer (:meth:`serve`)."""
        return self.serve(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, slice_bits={self.slice_bits}, "
            f"group_size={self.group_size}, bits/weight={self.bits_per_weight:.2f}, backend={self.backend}"
        )


def packed_layers(model: nn.Module) -> dict[str, PackedMoBiLinear]:
    """Every :class:`PackedMoBiLinear` of ``model`` by module path."""
    return modules_of_type(model, PackedMoBiLinear)


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of every tensor a layer holds for inference (parameters, buffers, cached slice deltas)."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers()) + list(getattr(module, "_deltas", None) or [])
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def pack_model(model: nn.Module, backend: str = "auto") -> dict:
    """Replace every MoBiLinear of ``model`` by a PackedMoBiLinear, in place; returns a memory report.

    Report: ``layers``, ``weights`` (N x K summed), ``packed_bytes`` (planes + scales + zeros),
    ``packed_bits_per_weight``, ``torch_bytes`` (what the MoBiLinear layers held: weight,
    learnable clipping, cached float deltas, router, bias) and ``torch_bytes_per_weight``.
    Routers are shared with the replaced layers (not copied). Raises MoBiError without MoBiLinear layers.
    """
    layers = modules_of_type(model, MoBiLinear)
    if not layers:
        raise MoBiError("model has no MoBiLinear layers; call quantize_mobiquant first")
    if backend not in BACKENDS:
        raise MoBiError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    weights = packed = torch_bytes = 0
    new = {}
    for name, layer in layers.items():  # build all first: nothing is replaced if one layer fails
        p = PackedMoBiLinear.from_mobilinear(layer)
        p.fixed_k, p.token_slices, p.backend = layer.fixed_k, layer.token_slices, backend
        new[name] = p
        weights += layer.in_features * layer.out_features
        packed += p.nbytes
        torch_bytes += _tensor_bytes(layer)
    for name, p in new.items():
        model.set_submodule(name, p)
    return {
        "layers": len(new),
        "weights": weights,
        "packed_bytes": packed,
        "packed_bits_per_weight": 8 * packed / weights,
        "torch_bytes": torch_bytes,
        "torch_bytes_per_weight": torch_bytes / weights,
    }
