#!/usr/bin/env bash
# One short check for a lent accelerator machine (no network, no TensorFlow/TFDS needed).
#
#   bash benchmarks/accelerator_check.sh            # tests + the throughput table (< 10 min)
#   bash benchmarks/accelerator_check.sh --smoke    # tiny, on any CPU (checks the script)
#   bash benchmarks/accelerator_check.sh --peak_bf16_tflops=989 --peak_tf32_tflops=494
#
#   CHECK_TOTAL_S=420 bash benchmarks/accelerator_check.sh   # a shorter budget (default 540 s)
#
# 1. tests/test_parallel.py on the CPU (4 forced host devices, 2 gloo processes, bfloat16),
#    only where there is no accelerator or with --cpu_tests (CI runs it anyway);
# 2. the in-process tests of tests/test_parallel.py again on the accelerator (bfloat16 loss
#    and training, the single-device sharded step, episode sampling);
# 3. benchmarks/accelerator_check.py: train episodes/s, FLOPs per episode and fraction of
#    peak for 5-way 1-shot at meta-batch 1/16/64 and 20-way 1-shot at 1/16, float32 and
#    bfloat16, synthetic episodes. Extra arguments go to it (peaks default to H100 SXM).
# Each step has its own timeout; the whole script stays under ~9 minutes. Results are also
# written to ${OUT:-/tmp}/accelerator_check.json.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUTDIR="${OUT:-/tmp}"
TOTAL_S="${CHECK_TOTAL_S:-540}"  # the whole script's budget in seconds
SMOKE=0
CPU_TESTS=0
args=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1; args+=("$a") ;;
    --cpu_tests) CPU_TESTS=1 ;;
    *) args+=("$a") ;;
  esac
done
status=0
start=$(date +%s)

echo "== environment"
"$PY" - <<'PY'
import jax
print("jax", jax.__version__, "| default backend:", jax.default_backend(), "|", jax.devices())
PY
ACCEL="$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo cpu)"
# JAX_PLATFORMS=gpu means "cuda,rocm" and fails on the missing one: name the real platform.
PLATFORM="$ACCEL"
if [ "$ACCEL" = "gpu" ]; then
  if command -v nvidia-smi >/dev/null; then PLATFORM=cuda; else PLATFORM=rocm; fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

if "$PY" -c "import pytest" 2>/dev/null; then
  if [ "$SMOKE" = 1 ]; then
    echo "== tests (smoke: the cheap in-process ones, CPU)"
    JAX_PLATFORMS=cpu timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_parallel.py \
      -k "keys or single_process" || status=1
  else
    # CI runs the whole file on CPU; here the CPU part only when asked (--cpu_tests), or when
    # there is no accelerator, so the lent machine's minutes go to the device.
    if [ "$ACCEL" = "cpu" ] || [ "$CPU_TESTS" = 1 ]; then
      echo "== tests/test_parallel.py on the CPU (4 host devices, 2 processes, bfloat16)"
      JAX_PLATFORMS=cpu timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_parallel.py \
        || status=1
    fi
    if [ "$ACCEL" != "cpu" ]; then
      echo "== in-process tests on the accelerator ($ACCEL)"
      JAX_PLATFORMS="$PLATFORM" timeout 150 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_parallel.py -k "bfloat16 or single_process or keys or sample" || status=1
    fi
  fi
else
  echo "== pytest is not installed here: tests skipped (carry wheels: pip download pytest -d" \
       "wheels/, then pip install --no-index --find-links wheels pytest)"
  status=1
fi

echo "== throughput ($(( $(date +%s) - start )) s so far)"
left=$(( TOTAL_S - ($(date +%s) - start) ))
[ "$left" -lt 60 ] && left=60
budget=$(( left - 90 ))  # no new setting after this; the last one may take ~90 s
[ "$budget" -lt 30 ] && budget=30
timeout "$left" "$PY" benchmarks/accelerator_check.py --budget_s="$budget" \
  --json="$OUTDIR/accelerator_check.json" ${args[@]+"${args[@]}"} || status=1
echo "== done in $(( $(date +%s) - start )) s, status $status"
exit $status
