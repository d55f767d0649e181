#!/usr/bin/env bash
# The accelerator part of the performance work, as one prepared call per stage: every benchmark
# writes its JSON and markdown (device, versions, date) into OUT, named for the device.
#
#   bash benchmarks/device_check.sh bench OUT          # throughput, training loop, evaluation,
#                                                     # train_many (about 4 minutes on one GPU)
#   bash benchmarks/device_check.sh table OUT DATA     # the Fashion-MNIST table, every run as one
#                                                     # program (DATA: the four IDX .gz files, 30 MB;
#                                                     # its own call: 10 models x 50 epochs and their
#                                                     # K = 5000 evaluations, not measured on a GPU yet)
#
# Sizes come from the environment, so a short smoke run on a CPU checks the script itself:
#   SMOKE=1 bash benchmarks/device_check.sh bench /tmp/device-smoke
# TABLE_STEPS (default 42969: 50 epochs of the table's 55,000 training images at batch 64), TABLE_EVAL_POINTS (default
# 10000, the whole test set) and BENCH_REPS (default 10) override the defaults. Each command has its own
# time limit (LIMIT_S seconds, default 540) and a failing one does not stop the others; the exit
# status is the number that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: device_check.sh bench|table OUT [DATA]}
out=${2:?usage: device_check.sh bench|table OUT [DATA]}
data=${3:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
limit=${LIMIT_S:-540}
failed=0
step() {
  local t0=$SECONDS
  echo "== device_check: $*" >&2
  timeout "$limit" "$@" || { echo "== device_check: FAILED ($?): $*" >&2; failed=$((failed + 1)); }
  echo "== device_check: $((SECONDS - t0)) s" >&2
}
# the devices, shown; the platform names the table's copies
platform=$(python -c "import sys, jax; print('devices:', jax.devices(), file=sys.stderr); print(jax.devices()[0].platform)")
if [ "${SMOKE:-0}" = 1 ]; then
  ks="1 8"; reps=2; eval_points=4; eval_k=500; tm_steps=20; table_steps=${TABLE_STEPS:-30}; table_points=${TABLE_EVAL_POINTS:-20}
  table_eval_k=100
else
  ks="1 8 64 512"; reps=${BENCH_REPS:-10}; eval_points=500; eval_k=5000; tm_steps=300
  table_steps=${TABLE_STEPS:-42969}; table_points=${TABLE_EVAL_POINTS:-10000}; table_eval_k=5000
fi
case "$stage" in
  bench)
    # shellcheck disable=SC2086  # $ks is a list of numbers
    step python benchmarks/throughput.py --objective iwae --estimator reparam dreg --num-samples $ks \
      --loop-num-samples $ks --repetitions "$reps" --no-snr --no-progress --out "$out"
    step python benchmarks/evaluation.py --num-points "$eval_points" --num-samples "$eval_k" \
      --repetitions 3 --out "$out"
    step python benchmarks/train_many.py --seeds 8 --num-samples 64 --steps "$tm_steps" --repetitions 3 \
      --out "$out"
    ;;
  table)
    step python benchmarks/train_table.py --dataset fashion-mnist --data-dir "$data" --stochastic-layers 1 2 \
      --seeds 0 --steps "$table_steps" --eval-num-points "$table_points" --eval-num-samples "$table_eval_k" \
      --runs together --no-progress --out "$out"
    for ext in md json png; do
      [ -f "$out/train_table_fashion-mnist.$ext" ] && \
        cp "$out/train_table_fashion-mnist.$ext" "$out/train_table_fashion-mnist-$platform.$ext"
    done
    ;;
  *) echo "unknown stage $stage (bench or table)" >&2; exit 2 ;;
esac
ls -l "$out"
exit "$failed"
