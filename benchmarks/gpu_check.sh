#!/usr/bin/env bash
# One prepared GPU check for a short stay on a GPU machine (under 8 minutes): GPU tests, the
# bench's target cases, JSON out. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh           # real GPU: logs + JSON to benchmarks/results/ (and $OUT if set)
#   bash benchmarks/gpu_check.sh --sim     # dry run of every step in the CUDA simulator at tiny shapes
#
# numpy: numba-cuda 0.30.4 fails with numpy 2.5 (`row_stack`); the project pins numpy<2.5. If
# .whl/ holds a numpy<2.5 wheel (see benchmarks/README.md) it is installed to /tmp/site first;
# otherwise, on numpy >= 2.5, benchmarks/numpy_compat/ (restores np.row_stack) goes on PYTHONPATH.
# Steps (each under its own timeout; a failing step does not stop the later ones):
#   1. MBQ_REAL_GPU=1 pytest -m gpu tests/cuda (incl. mbq eval/generate --device cuda) (<= 140 s)
#   2. decode targets: 14336x4096, 4096x14336, 4096x4096; T = 1, 2, 4, 8; bits 2, 4, 8;
#      fp16, gemv2 (11-29 best), gemv4, gemv5, fused-gemv6; call and kernel time    (<= 140 s)
#   3. mixed precision (3 and 5 average bits) on 4096x14336: the routed paths        (<= 45 s)
#   4. prefill T = 512 on 14336x4096 at 2.5 and 4 bits: fp16, gemm3, streams-gemm3     (<= 45 s)
#   5. end to end: decode tok/s + weight memory, fp16 vs packed at 2/4/6/8 bits and routed,
#      random Llama-2-7B-shaped and small models (mbq bench --e2e = mbq_ref.e2e)  (<= 100 s)
# Files: $OUT/gpu_check.log (every step's full output) and one JSON per bench step.
# Exit code: number of failed steps (0 = all passed).
set -u
cd "$(dirname "$0")/.."
SIM=0
[ "${1:-}" = "--sim" ] && SIM=1
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=benchmarks/results
LOGDIR=${OUT:-/tmp/gpu_check_$STAMP}
mkdir -p "$RES" "$LOGDIR"
LOG="$LOGDIR/gpu_check.log"
STEPS=$(mktemp -d)  # per-step logs (their text is appended to $LOG)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ls .whl/numpy-*.whl >/dev/null 2>&1; then
    say "installing carried wheels: $(ls .whl/*.whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! $PY -c 'import numpy, sys; sys.exit(0 if tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 5) else 1)'; then
    say "numpy >= 2.5 and no numpy<2.5 wheel: using benchmarks/numpy_compat (np.row_stack alias) for numba-cuda 0.30.4"
    export PYTHONPATH="$PWD/benchmarks/numpy_compat:$PYTHONPATH"
fi
$PY -c 'import numpy, numba, torch; from importlib.metadata import version as v; print("numpy", numpy.__version__, "numba", numba.__version__, "numba-cuda", v("numba-cuda"), "torch", torch.__version__)' 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$LOG"

FAILED=0
step() {  # step NAME TIMEOUT_S CMD...: run, log, count failures
    local name=$1 limit=$2
    shift 2
    say "step $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$STEPS/$name.log" 2>&1
    local rc=$?
    cat "$STEPS/$name.log" >>"$LOG"
    say "step $name: rc=$rc in $((SECONDS - t0)) s"
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    return 0
}

PYTEST_OPTS=(-q -o addopts="-p no:cacheprovider" -W ignore::DeprecationWarning)  # no nbval on the GPU image
if [ $SIM = 1 ]; then
    say "SIMULATOR DRY RUN: tiny shapes, correctness only, no JSON"
    step pytest 600 env NUMBA_ENABLE_CUDASIM=1 $PY -m pytest "${PYTEST_OPTS[@]}" tests/cuda/test_slice_gemv.py tests/cuda/test_slice_gemm.py tests/cuda/test_slice_linear.py -k "versions or every_case or fused"
    BENCH=($PY -m cuda_numba.bench --sim)
    SH_DEC=96x13 SH_MIX=64x11 SH_PRE=64x11 T_DEC=1,3 T_PRE=9 BITS_DEC=2,8
    E2E=(env NUMBA_ENABLE_CUDASIM=1 $PY -m mbq_ref.cli bench --e2e --sim --models tiny --prompt 2 --new-tokens 1 --settings 2)
else
    step pytest 140 env MBQ_REAL_GPU=1 $PY -m pytest "${PYTEST_OPTS[@]}" -m gpu tests/cuda
    BENCH=($PY -m cuda_numba.bench --no-plot --out-dir "$RES")
    SH_DEC=14336x4096,4096x14336,4096x4096 SH_MIX=4096x14336 SH_PRE=14336x4096 T_DEC=1,2,4,8 T_PRE=512 BITS_DEC=2,4,8
    E2E=($PY -m mbq_ref.cli bench --e2e --models small,llama2-7b --prompt 16 --new-tokens 32 --out-dir "$RES")
fi
step decode 140 "${BENCH[@]}" --shapes $SH_DEC --tokens $T_DEC --bits $BITS_DEC \
    --kernels fp16,gemv2,gemv4,gemv5,fused-gemv6 --reps 20 --time-budget 100
step mixed 45 "${BENCH[@]}" --shapes $SH_MIX --tokens $T_DEC --bits 3,5 \
    --kernels fp16,gemv5,streams-gemv5,fused-gemv6 --reps 20 --time-budget 25
step prefill 45 "${BENCH[@]}" --shapes $SH_PRE --tokens $T_PRE --bits 2.5,4 \
    --kernels fp16,gemm3,streams-gemm3 --reps 10 --time-budget 20
step e2e 100 "${E2E[@]}"

for s in decode mixed prefill e2e; do  # the JSON each step wrote ("wrote <path>")
    f=$(sed -n 's/^wrote //p' "$STEPS/$s.log" | tail -n 1)
    if [ -n "$f" ] && [ -f "$f" ]; then
        say "$s -> $f"
        [ -n "${OUT:-}" ] && cp "$f" "$OUT/$s.json"
    fi
done
rm -rf "$STEPS"
say "done: $FAILED failed step(s); log: $LOG"
exit $FAILED
