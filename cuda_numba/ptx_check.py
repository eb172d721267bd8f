"""Compile every kernel to PTX for a real GPU target, without a GPU: ``python -m cuda_numba.ptx_check``.

The CUDA simulator runs kernels as Python, so it never sees Numba's typing rules (e.g.
integer promotion, float16 stores). This check compiles each kernel with the argument
types the dispatchers pass (``cuda.compile_ptx``, NVVM only; no driver needed) and prints
one line per kernel. It needs NVVM/NVRTC (``pip install nvidia-cuda-nvcc-cu12
nvidia-cuda-nvrtc-cu12`` or a CUDA toolkit) and must run with ``NUMBA_ENABLE_CUDASIM=0``.
Exit code 0: all compiled; 1: a kernel failed; 2: no compiler available / simulator on.

``--lower-only`` stops before NVVM: Numba types each kernel and lowers it to LLVM IR
(``numba.cuda.compiler.compile_cuda``), which needs no CUDA library at all and still catches
the typing errors the simulator cannot see (e.g. a shared-array shape that is not a
compile-time constant).
"""

from __future__ import annotations

import argparse
import sys


def _signatures():
    from numba import types as nt

    from . import binary_matmul as bm
    from . import packing as pk
    from . import slice_gemm as sg
    from . import slice_gemv as sv
    from . import slice_linear as sl

    def arr(dtype, ndim):
        return nt.Array(dtype, ndim, "C")

    u8_2, u32_3, i32_1, i32_2 = arr(nt.uint8, 2), arr(nt.uint32, 3), arr(nt.int32, 1), arr(nt.int32, 2)
    f32_1, f32_2, f32_3, i64_1, i64_2 = (
        arr(nt.float32, 1),
        arr(nt.float32, 2),
        arr(nt.float32, 3),
        arr(nt.int64, 1),
        arr(nt.int64, 2),
    )
    i64 = nt.int64
    sigs = [
        ("packing.pack_kernel1", pk.pack_kernel1, (u8_2, u32_3)),
        ("packing.pack_kernel2", pk.pack_kernel2, (u8_2, u32_3)),
        ("packing.unpack_kernel1", pk.unpack_kernel1, (u32_3, u8_2)),
        ("binary_matmul.bmm_kernel1", bm.bmm_kernel1, (u32_3, u32_3, i32_1, i32_2, i64, i64, i64_2)),
        ("binary_matmul.group_sums_kernel", bm.group_sums_kernel, (u32_3, i64, i64, i64_2)),
        ("binary_matmul.bmm_kernel2", bm.bmm_kernel2, (u32_3, u32_3, i32_1, i32_2, i64_2, i64_2, i64, i64, i64_2)),
        ("binary_matmul.bmm_kernel3", bm.bmm_kernel3, (u32_3, u32_3, i32_1, i32_2, i64_2, i64_2, i64, i64, i64_2)),
        (
            "binary_matmul.blinear_kernel1",
            bm.blinear_kernel1,
            (u32_3, f32_1, i32_1, u32_3, i64, f32_2, i32_2, i64, i64, nt.float32, i64, f32_2),
        ),
        (
            "binary_matmul.blinear_kernel2",
            bm.blinear_kernel2,
            (u32_3, f32_1, i32_1, i64_2, u32_3, i64, f32_2, i32_2, i64_2, i64, i64, nt.float32, i64, f32_2),
        ),
    ]
    for xdt in (nt.float16, nt.float32):
        x2 = arr(xdt, 2)
        seg = (x2, i64, i64, u32_3, i64, i64, f32_2, i32_2, nt.float32, nt.float32, i64, i64)  # smul, zmul f32
        for mod, name in (("slice_gemm", "gemm_kernel1"), ("slice_gemv", "gemv_kernel2"), ("slice_gemv", "gemv_kernel3"),
                          ("slice_gemm", "gemm_kernel2"), ("slice_gemm", "gemm_kernel3")):
            kern = getattr(sg if mod == "slice_gemm" else sv, name)
            for odt in (nt.float32,) if xdt == nt.float32 else (nt.float16, nt.float32):
                sigs.append((f"{mod}.{name}[x={xdt}, out={odt}]", kern, seg + (arr(odt, 2),)))
        for odt in (nt.float32,) if xdt == nt.float32 else (nt.float16, nt.float32):
            o2 = arr(odt, 2)
            sigs.append((f"slice_gemv.gemv_kernel4[x={xdt}, out={odt}]", sv.gemv_kernel4, seg + (o2,)))
            sigs.append((f"slice_gemv.gemv_kernel5[x={xdt}, out={odt}]", sv.gemv_kernel5, seg + (o2, f32_3, i32_1)))
            for kt in (i64_1, i32_1):  # routed k_t: int64 from NumPy/torch, int32 from the host path
                sig6 = (x2, i64, i64, kt, i32_1, u32_3, f32_2, i32_2, i64, o2, f32_3, i32_1)
                sigs.append((f"slice_gemv.gemv_kernel6[x={xdt}, out={odt}, k_t={kt.dtype}]", sv.gemv_kernel6, sig6))
        if xdt == nt.float16:  # v7: one kernel per (tokens, bits, routed); the decode ones
            from .sass import v7_signature

            for T, nb, routed in ((1, 2, False), (1, 4, False), (1, 8, False), (2, 4, False), (1, 8, True)):
                kern7 = sv.gemv7_kernel(T, nb, routed, sim=False)
                sigs.append((f"slice_gemv.gemv7[T={T}, {nb} bits{', routed' if routed else ''}]", kern7,
                             v7_signature(routed)))  # fmt: skip
        sigs.append((f"slice_linear.gather_rows_kernel[{xdt}]", sl.gather_rows_kernel, (x2, i64_1, x2)))
        sigs.append(
            (f"slice_linear.combine_scatter_kernel[{xdt}]", sl.combine_scatter_kernel, (f32_3, i64_1, i64_1, x2))
        )
    return sigs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cuda_numba.ptx_check", description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="8.0", help="compute capability to target (default 8.0, A100)")
    ap.add_argument("--lower-only", action="store_true", help="type and lower to LLVM IR only (no NVVM needed)")
    args = ap.parse_args(argv)
    import numba
    from numba import cuda

    if numba.config.ENABLE_CUDASIM:
        print("ptx_check: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); run with NUMBA_ENABLE_CUDASIM=0")
        return 2
    cc = tuple(int(v) for v in args.cc.split("."))
    # Device functions called from a kernel are compiled for the *current device*'s compute
    # capability; without a GPU there is none, so this check pretends one of ``--cc`` exists.
    import numba.cuda.dispatcher as _dispatcher

    class _Device:
        compute_capability = cc

    _dispatcher.get_current_device = lambda: _Device
    failed = 0
    for i, (name, kernel, sig) in enumerate(_signatures()):
        try:
            if args.lower_only:
                from numba.core import types
                from numba.cuda import compiler

                compiler.compile_cuda(kernel.py_func, types.void, sig, cc=cc)
                print(f"ok   {name}: typed and lowered to LLVM IR")
                continue
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
            if i == 0 and "not found" in str(exc).lower() or "Failure finding" in str(exc):
                print(f"ptx_check: no NVVM/NVRTC available ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                  "pip install nvidia-nvvm nvidia-cuda-nvrtc")
                return 2
            print(f"FAIL {name}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
            failed += 1
            continue
        print(f"ok   {name}: {len(ptx.splitlines())} PTX lines")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
