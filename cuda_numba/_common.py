"""Small helpers shared by the kernel modules: host/device moves and launch geometry.

Arrays given to a dispatcher may be NumPy arrays, CPU torch tensors, Numba device arrays
or (on a real GPU) CUDA torch tensors. A dispatcher returns NumPy when its main input
was on the host and a Numba device array otherwise.
"""

from __future__ import annotations

import numpy as np
from numba import cuda


def real_gpu_available() -> bool:
    """True when Numba sees a real CUDA GPU (not the simulator)."""
    import numba

    if numba.config.ENABLE_CUDASIM:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - driver missing or broken
        return False


def is_device_array(a) -> bool:
    """True for Numba device arrays (simulated or real) and CUDA torch tensors."""
    if hasattr(a, "copy_to_host"):
        return True
    return bool(getattr(a, "is_cuda", False))


def to_host(a) -> np.ndarray:
    """Any supported array -> NumPy (copying from the device if needed)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "detach"):  # torch tensor
        return a.detach().cpu().numpy()
    return np.asarray(a)


def to_device(a, dtype=None, stream=0):
    """Any supported array -> Numba device array, optionally converting ``dtype`` on the host.

    A device array of the right dtype is returned as is (no copy).
    """
    if hasattr(a, "copy_to_host"):
        if dtype is None or a.dtype == np.dtype(dtype):
            return a
        a = a.copy_to_host()
    elif getattr(a, "is_cuda", False):  # CUDA torch tensor: zero-copy view when the dtype matches
        import torch

        if dtype is None or a.dtype == torch.from_numpy(np.zeros(0, dtype)).dtype:
            return cuda.as_cuda_array(a.contiguous())
        a = a.detach().cpu().numpy()
    elif hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(a, dtype=dtype)
    return cuda.to_device(a, stream=stream)


def device_view(t):
    """A Numba device array viewing a torch tensor's memory, without synchronising any stream.

    CUDA tensors: ``cuda.as_cuda_array(t, sync=False)`` (the default ``sync=True`` waits for the
    stream the tensor was produced on; the caller launches on that stream instead). Under
    Numba's simulator a CPU tensor stands for device memory: a simulated device array sharing
    its storage (no copy), so a kernel writes straight into the tensor as it would on a GPU.
    ``t`` must be contiguous.
    """
    if getattr(t, "is_cuda", False):
        return cuda.as_cuda_array(t, sync=False)
    import numba

    if not numba.config.ENABLE_CUDASIM:
        raise TypeError("device_view needs a CUDA tensor (or Numba's simulator)")
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return FakeCUDAArray(t.detach().numpy())


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def make_event():
    """A CUDA event that records timing on a GPU (the simulator's Event takes no arguments)."""
    try:
        return cuda.event(timing=True)
    except TypeError:
        return cuda.event()


def output_array(out, shape, dtype):
    """Device buffer for a kernel's output: a new one, or ``out`` (NumPy or device) moved to the device.

    Passing ``out`` pre-filled with a sentinel (NaN, 0xDEADBEEF, ...) lets a test check that
    the kernel writes every element: the sentinel travels to the device with it.
    """
    if out is None:
        return cuda.device_array(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or np.dtype(out.dtype) != np.dtype(dtype):
        raise ValueError(f"out must be {np.dtype(dtype)} {tuple(shape)}, got {out.dtype} {tuple(out.shape)}")
    if hasattr(out, "copy_to_host"):
        return out
    if not isinstance(out, np.ndarray) or not out.flags.c_contiguous:
        raise TypeError("out must be a C-contiguous NumPy array or a Numba device array")
    return cuda.to_device(out)


def finish(dout, out, on_device: bool):
    """Return the result the way the caller gave its input (``out`` filled in place if given)."""
    if out is not None and not hasattr(out, "copy_to_host"):
        dout.copy_to_host(out)
        return out
    return dout if (on_device or out is not None) else dout.copy_to_host()
