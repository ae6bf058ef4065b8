#!/usr/bin/env bash
# The paper's previous-split MetaNet models (5-way, then 20-way) on one lent GPU, within
# ~9 minutes including compiles; each model is written to $OUT/<name>/ (params.npz,
# config.json, results.json) as soon as it is trained, and the log to $OUT/reproduce_gpu.log.
#
#   bash benchmarks/reproduce_gpu.sh                   # on the GPU machine
#   bash benchmarks/reproduce_gpu.sh --smoke           # seconds, on any CPU (needs the caches)
#   bash benchmarks/reproduce_gpu.sh --smoke --synthetic   # no data at all
#   bash benchmarks/reproduce_gpu.sh --budget_s=480 --meta_batch=16   # other settings
#   bash benchmarks/reproduce_gpu.sh --model_flags="--train_ways=5,10,15,20 --attention_scale=10"
#
# Needs the prepared Omniglot caches omniglot_{background,evaluation}_v2.npz in
# $METANET_DATA_DIR/cache (default: .cache/data/cache in this checkout, the folder the run
# tool carries; docs/SCALING.md). No network, no TensorFlow, no pip install: it runs from
# this source tree with PYTHONPATH. Arguments go to benchmarks/reproduce_gpu.py.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${METANET_DATA_DIR:-}" ] && [ -d .cache/data/cache ]; then
  export METANET_DATA_DIR="$PWD/.cache/data"
fi
OUTDIR="${OUT:-/tmp/metanet_reproduce_gpu/out}"
mkdir -p "$OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The driver keeps its own budget (--budget_s, default 540 s); this only guards against a hang.
timeout --signal=TERM --kill-after=20 "${REPRODUCE_TIMEOUT_S:-590}" \
  "$PY" benchmarks/reproduce_gpu.py --out="$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/reproduce_gpu.log"
status=${PIPESTATUS[0]}
echo "== exit status $status; models in $OUTDIR:"
ls -l "$OUTDIR"/*/ 2>/dev/null
exit "$status"
