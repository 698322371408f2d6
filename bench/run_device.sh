#!/usr/bin/env bash
# One call on the GPU machine: install, versions, then the chosen steps, each under its own timeout.
#
#   bash bench/run_device.sh [STEP...] [-- ARGS FOR conv_bench.py OR model_bench.py]
#
# STEP: tests     python -m pytest -m cuda -q --durations=15 [-n PYTEST_WORKERS, default 6, where pytest-xdist
#                 is installed] tests/ -> $OUT/pytest_cuda.log
#       seed      bench/seed_bench.py --out $OUT               -> $OUT/<date>-<gpu>-seed.{json,md}, log in $OUT/bench.log
#       conv      bench/conv_bench.py --out $OUT [ARGS]        -> $OUT/<date>-<gpu>.{json,md,png}, log in $OUT/bench.log
#       examples  every examples/*.py but _*.py                      -> $OUT/examples.log
#       models    bench/model_bench.py --out $OUT --stop-after S [ARGS] -> $OUT/<date>-<gpu>-models.{json,md,png},
#                 log in $OUT/models.log; no model starts after S seconds (MODELS_STOP, default: the step's
#                 limit less 200 s, the longest a model's three configs take on cold caches)
#       smoke     conv_bench.py --smoke (default --problems kb80,kb82,rn50-stem) and seed_bench.py --smoke:
#                 tiny shapes on the GPU, a quick check of the harness (results in /tmp, log in $OUT/bench.log)
# Default: tests seed conv examples. At most 8 files land in $OUT (3 logs + 5 results).
#
# Environment: OUT (default /tmp/tritonconv_out), PYTHON (default python), BUDGET (seconds for the whole
# call, default 570: every step's timeout is cut to what is left), T_TESTS / T_SEED / T_CONV / T_EXAMPLES /
# T_SMOKE / T_MODELS (per-step limits, seconds).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/tritonconv_out}
PY=${PYTHON:-python}
BUDGET=${BUDGET:-570}
START=$SECONDS
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install fails

steps=()
conv_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; conv_args=("$@"); break ;;
    tests|seed|conv|examples|smoke|models) steps+=("$1"); shift ;;
    *) echo "unknown step '$1' (steps: tests seed conv examples smoke models; bench args after --)"; exit 2 ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(tests seed conv examples)

echo "== install"
if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . >/tmp/tritonconv_pip.log 2>&1; then
  echo "pip install -e . failed (using PYTHONPATH=$PWD instead); last lines:"
  tail -n 5 /tmp/tritonconv_pip.log
fi

HEADER=$(
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1; else echo "nvidia-smi not found"; fi
  "$PY" - <<'EOF' 2>&1
import torch, triton
v = torch.backends.cudnn.version()
cudnn = f"{v // 10000}.{(v % 10000) // 100}.{v % 100}" if v and v >= 90000 else str(v)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, cuDNN {cudnn}; {gpu}")
EOF
)
echo "$HEADER"

declare -A started
results=()

left() { echo $(( BUDGET - (SECONDS - START) )); }

# run_step NAME LOGFILE DEFAULT_TIMEOUT CMD... : output to stdout and appended to LOGFILE.
run_step() {
  local name=$1 log=$2 limit=$3; shift 3
  local remain; remain=$(( $(left) - 15 ))
  if [ "$remain" -lt 20 ]; then
    echo "== $name: skipped (call budget spent)" | tee -a "$log"
    results+=("$name: skipped (budget)")
    return
  fi
  [ "$limit" -gt "$remain" ] && limit=$remain
  if [ -z "${started[$log]:-}" ]; then
    echo "$HEADER" >>"$log"
    started[$log]=1
  fi
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local msg="$name: rc=$rc in $(( SECONDS - t0 ))s"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && msg="$msg (TIMED OUT after ${limit}s)"
  echo "== $msg" | tee -a "$log"
  results+=("$msg")
}

for step in "${steps[@]}"; do
  case "$step" in
    tests)
      # Compiling every config is most of the suite's time, and it runs on the CPUs: spread it with xdist.
      xdist=()
      "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-6}")
      run_step tests "$OUT/pytest_cuda.log" "${T_TESTS:-240}" "$PY" -m pytest -m cuda -q --durations=15 \
        ${xdist[@]+"${xdist[@]}"} tests/ ;;
    seed)
      run_step seed "$OUT/bench.log" "${T_SEED:-150}" "$PY" bench/seed_bench.py --out "$OUT" ;;
    conv)
      run_step conv "$OUT/bench.log" "${T_CONV:-540}" "$PY" bench/conv_bench.py --out "$OUT" ${conv_args[@]+"${conv_args[@]}"} ;;
    models)
      limit=${T_MODELS:-540}
      [ "$limit" -gt $(( $(left) - 15 )) ] && limit=$(( $(left) - 15 ))
      run_step models "$OUT/models.log" "$limit" "$PY" bench/model_bench.py --out "$OUT" \
        --stop-after "${MODELS_STOP:-$(( limit > 260 ? limit - 200 : 60 ))}" ${conv_args[@]+"${conv_args[@]}"} ;;
    smoke)
      smoke_args=(${conv_args[@]+"${conv_args[@]}"})
      [ ${#smoke_args[@]} -eq 0 ] && smoke_args=(--problems kb80,kb82,rn50-stem)
      run_step smoke-conv "$OUT/bench.log" "${T_SMOKE:-120}" "$PY" bench/conv_bench.py --smoke ${smoke_args[@]+"${smoke_args[@]}"}
      run_step smoke-seed "$OUT/bench.log" "${T_SMOKE:-120}" "$PY" bench/seed_bench.py --smoke ;;
    examples)
      shopt -s nullglob
      examples=(examples/*.py)
      shopt -u nullglob
      if [ ${#examples[@]} -eq 0 ]; then
        echo "== examples: none found" | tee -a "$OUT/examples.log"
        results+=("examples: none found")
      fi
      for f in "${examples[@]}"; do
        case "$(basename "$f")" in _*) continue ;; esac  # helpers such as examples/_common.py
        run_step "example $(basename "$f")" "$OUT/examples.log" "${T_EXAMPLES:-240}" "$PY" "$f"
      done ;;
  esac
done

echo
echo "== summary ($(( SECONDS - START ))s)"
printf '  %s\n' "${results[@]}"
echo "== files in $OUT:"
ls -l "$OUT"
n=$(find "$OUT" -type f | wc -l)
[ "$n" -gt 8 ] && echo "warning: $n files in $OUT (the transfer keeps 8)"
exit 0
