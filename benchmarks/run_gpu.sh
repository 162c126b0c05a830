#!/usr/bin/env bash
# One GPU session: every benchmark in turn, each bounded in time, logs under $OUT.
# Usage on the device machine: bash benchmarks/run_gpu.sh [quick|full]
# Each script appends its run's line to $OUT/<script>.jsonl (results_log.py); append those lines to
# benchmarks/results/<script>.jsonl in the repository.
set -u
MODE=${1:-quick}
export PYTHONPATH=src PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
export BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$OUT}
Q=""; [ "$MODE" = quick ] && Q="--quick"
run() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n 40 "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for job in ${JOBS:-quant fp8 moe study}; do
  case $job in
    quant) run bench_quant "${T_QUANT:-120}" python3 benchmarks/bench_quant.py $Q ${QUANT_ARGS:-} ;;
    fp8)   run bench_fp8 "${T_FP8:-240}" python3 benchmarks/bench_fp8.py $Q ;;
    moe)   run bench_moe "${T_MOE:-240}" python3 benchmarks/bench_moe.py $Q ;;
    tune)  run tune_fp8_grouped "${T_TUNE:-300}" python3 benchmarks/tune_fp8_grouped.py ;;
    profile) run profile_layers "${T_PROFILE:-180}" python3 benchmarks/profile_layers.py ;;
    study) run fp8_accuracy "${T_STUDY:-300}" python3 benchmarks/fp8_accuracy.py --steps "${STUDY_STEPS:-100}" ;;
    mla)   run bench_mla_decode "${T_MLA:-300}" python3 benchmarks/bench_mla_decode.py $Q ;;
    decode) run bench_decode "${T_DECODE:-420}" python3 benchmarks/bench_decode.py $Q ;;
  esac
done
