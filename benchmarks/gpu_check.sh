#!/usr/bin/env bash
# One prepared GPU check for a short stay on a bare GPU machine without network: under 5 minutes,
# so a rerun fits in 15 minutes of device time. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh           # real GPU: logs + JSON to $OUT (or /tmp/gpu_check_<time>)
#   bash benchmarks/gpu_check.sh --sim     # dry run in the CUDA simulator at tiny shapes (CI): the bench steps;
#                                          # SIM_FULL=1 adds the pytest and e2e steps (minutes)
#
# Installs first, from wheels only (benchmarks/gpu_wheels.txt lists them; the command that
# downloads them into .whl/ is at its top): each listed package that is missing, or numpy when it
# is >= 2.5 (numba-cuda 0.30.4 fails with numpy 2.5: `row_stack`), is installed from .whl/ with
# pip --no-index. Without a usable numpy<2.5 the script falls back to benchmarks/numpy_compat/
# (restores np.row_stack) and says so.
# Steps (each under its own timeout; a failing step does not stop the later ones):
#   1. MBQ_REAL_GPU=1 pytest -m gpu: the kernel cases and the packed model on CUDA        (<= 60 s)
#   2. decode: 14336x4096, 4096x14336, 4096x4096; T = 1, 8; bits 2, 4, 8;
#      fp16, gemv5, gemv7, fused-gemv6, fused-gemv7                                       (<= 90 s)
#   3. mixed precision (3 and 5 average bits) on 4096x14336: fused-gemv6/7                (<= 30 s)
#   4. end to end: decode tok/s, fp16 vs packed at 2/4/8 bits and routed (small model), and one
#      decode step of the packed projections captured as a CUDA graph (--graph)             (<= 60 s)
#   5. python -m cuda_numba.sass if the compilers are there (the static prediction)        (<= 40 s)
# Every bench case is appended to $OUT/cases.jsonl as soon as it is measured (nothing is lost
# if a later step times out); each step's JSON is copied to $OUT; times use a delay kernel
# before the start event (cuda_numba.bench). Exit code: number of failed steps (0 = all passed).
set -u
cd "$(dirname "$0")/.."
SIM=0
[ "${1:-}" = "--sim" ] && SIM=1
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGDIR=${OUT:-/tmp/gpu_check_$STAMP}
RES=$LOGDIR/results
mkdir -p "$RES"
LOG="$LOGDIR/gpu_check.log"
CASES="$LOGDIR/cases.jsonl"
STEPS=$(mktemp -d)
T_START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - T_START))s] $*" | tee -a "$LOG"; }

# --- install what is missing, from the carried wheels only -----------------------------------
MISSING=$($PY - <<'PYEOF'
import re
from importlib.metadata import PackageNotFoundError, version
need = []
for line in open("benchmarks/gpu_wheels.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line)
    try:
        have = version(name)
    except PackageNotFoundError:
        need.append(line)
        continue
    if name == "numpy" and tuple(int(v) for v in have.split(".")[:2]) >= (2, 5):
        need.append(line)
print(" ".join(need))
PYEOF
)
if [ -n "$MISSING" ]; then
    if [ $SIM = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
        say "installing from .whl/: $MISSING"
        $PY -m pip install -q --no-index --find-links .whl --no-cache-dir $MISSING 2>&1 | tail -n 3 | tee -a "$LOG"
    else
        say "missing: $MISSING (no .whl/ here, or --sim: nothing installed)"
    fi
fi
if ! $PY -c 'import numpy, sys; sys.exit(0 if tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 5) else 1)'; then
    say "numpy >= 2.5 and no numpy<2.5 wheel: using benchmarks/numpy_compat (np.row_stack alias) for numba-cuda 0.30.4"
    export PYTHONPATH="$PWD/benchmarks/numpy_compat:$PYTHONPATH"
fi
$PY -c 'import numpy, numba, torch; from importlib.metadata import version as v; print("numpy", numpy.__version__, "numba", numba.__version__, "numba-cuda", v("numba-cuda"), "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
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
    f=$(sed -n 's/^wrote //p' "$STEPS/$name.log" | tail -n 1)
    [ -n "$f" ] && [ -f "$f" ] && cp "$f" "$RES/$name.json" && say "$name -> $RES/$name.json"
    return 0
}

PYTEST_OPTS=(-q -o addopts="-p no:cacheprovider" -W ignore::DeprecationWarning)  # no nbval on the GPU image
if [ $SIM = 1 ]; then
    say "SIMULATOR DRY RUN: tiny shapes, correctness only"
    # the test suite runs these tests and the simulated e2e decode itself: the dry run checks the
    # script's own plumbing (bench cases streamed, JSON copied) unless SIM_FULL=1
    [ "${SIM_FULL:-0}" = 1 ] && step pytest 60 env NUMBA_ENABLE_CUDASIM=1 $PY -m pytest "${PYTEST_OPTS[@]}" tests/cuda/test_slice_gemv.py -k "factory"
    BENCH=($PY -m cuda_numba.bench --sim --jsonl "$CASES")
    SH_DEC=64x13 SH_MIX=64x11 T_DEC=1 BITS_DEC=2,8
    E2E=(env NUMBA_ENABLE_CUDASIM=1 $PY -m mbq_ref.cli bench --e2e --sim --models tiny --prompt 2 --new-tokens 1 --settings 2)
else
    step pytest 60 env MBQ_REAL_GPU=1 $PY -m pytest "${PYTEST_OPTS[@]}" -m gpu tests/cuda -k "slice_linear_large or lut_gemv or packed_model or graph"
    BENCH=($PY -m cuda_numba.bench --no-plot --out-dir "$RES" --jsonl "$CASES")
    SH_DEC=14336x4096,4096x14336,4096x4096 SH_MIX=4096x14336 T_DEC=1,8 BITS_DEC=2,4,8
    E2E=($PY -m mbq_ref.cli bench --e2e --models small --prompt 8 --new-tokens 16 --settings 2,4,8,routed --graph --out-dir "$RES")
fi
step decode 90 "${BENCH[@]}" --shapes $SH_DEC --tokens $T_DEC --bits $BITS_DEC \
    --kernels fp16,gemv5,gemv7,fused-gemv6,fused-gemv7 --reps 10 --time-budget 70
step mixed 30 "${BENCH[@]}" --shapes $SH_MIX --tokens $T_DEC --bits 3,5 \
    --kernels fp16,fused-gemv6,fused-gemv7 --reps 10 --time-budget 20
if [ $SIM = 0 ] || [ "${SIM_FULL:-0}" = 1 ]; then
    step e2e $([ $SIM = 1 ] && echo 240 || echo 60) "${E2E[@]}"  # the simulator runs a thread per CUDA thread
fi
if [ $SIM = 0 ]; then
    step sass 40 env NUMBA_ENABLE_CUDASIM=0 $PY -m cuda_numba.sass --versions 7 --out "$RES/sass.json"
fi
rm -rf "$STEPS"
say "done in $((SECONDS - T_START)) s: $FAILED failed step(s); log: $LOG; cases: $CASES"
exit $FAILED
