#!/usr/bin/env bash
# One GPU session: every benchmark in turn, each bounded in time, logs under $OUT.
# Usage on the device machine: bash benchmarks/run_gpu.sh [quick|full]
# Each script appends its run's line to $OUT/<script>.jsonl (results_log.py); append those lines to
# benchmarks/results/<script>.jsonl in the repository.
set -u
MODE=${1:-quick}
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OUT=${OUT:-/tmp/out}
export BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$OUT}
Q=""; [ "$MODE" = quick ] && Q="--quick"
run() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n 40 "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for job in ${JOBS:-quant fp8 moe study}; do
  case $job in
    quant) run bench_quant "${T_QUANT:-240}" python3 benchmarks/bench_quant.py $Q ${QUANT_ARGS:-} ;;
    fp8)   run bench_fp8 "${T_FP8:-240}" python3 benchmarks/bench_fp8.py $Q ;;
    moe)   run bench_moe "${T_MOE:-360}" python3 benchmarks/bench_moe.py $Q ;;
    tune)  run tune_fp8_grouped "${T_TUNE:-300}" python3 benchmarks/tune_fp8_grouped.py ;;
    profile) run profile_layers "${T_PROFILE:-180}" python3 benchmarks/profile_layers.py ;;
    study) run fp8_accuracy "${T_STUDY:-300}" python3 benchmarks/fp8_accuracy.py --steps "${STUDY_STEPS:-100}" ;;
    mla)   run bench_mla_decode "${T_MLA:-300}" python3 benchmarks/bench_mla_decode.py $Q ${MLA_ARGS:---no-baseline --fp8-convert-early --lazy} ;;
    groupeddecode) run bench_grouped_decode "${T_GDECODE:-150}" python3 benchmarks/bench_grouped_decode.py $Q ;;
    decode) run bench_decode "${T_DECODE:-420}" python3 benchmarks/bench_decode.py $Q ${DECODE_ARGS:---no-hf --breakdown} ;;
    # FP8 against BF16 at V3's width (FP8 layers as graph breaks, compiled + graphed; ~4 min)
    train) run bench_train "${T_TRAIN:-420}" python3 benchmarks/bench_train.py --model proxy-v3 --variants matched \
             --precisions bf16 fp8 --modes default --steps 15 --warmup 5 --batch-size 4 --seq-len 2048 \
             --timeout 150 --log-dir "$OUT" -- ${TRAIN_ARGS:-} ;;
    logfmt) run bench_logfmt "${T_LOGFMT:-300}" python3 benchmarks/bench_logfmt.py $Q ;;
    # kernels per training step of small (with and without MTP), for coscale analyze validate's records
    count) run count_step_kernels "${T_COUNT:-240}" bash -c "python3 tools/count_step_kernels.py --model small \
             --batch-size 16 --seq-len 512 --no-mtp && python3 tools/count_step_kernels.py --model small \
             --batch-size 16 --seq-len 512" ;;
    # one run of the FP8 study at V3's width (proxy-v3 as is at the default learning rate, 1.07e-4, where routing
    # stays balanced unlike runs 23-25 at 5e-4; 300 steps, ~4 min BF16 / ~5 min FP8 with
    # compilation; one run a call): STUDY_RUN="fp8 0", "bf16 0" or "bf16 1" (precision, seed); compare the
    # runs afterwards with `benchmarks/fp8_accuracy.py --from-metrics REF FP8 REF_OTHER_SEED`
    studyrun) set -- ${STUDY_RUN:-fp8 0}
             run "fp8_study_proxy_$1_seed$2" "${T_STUDYRUN:-560}" python3 -m coscale train --model proxy-v3                --steps 300 --batch-size 4 --seq-len 2048 --seed "$2" --precision "$1" --fp8-layers all                --eval-interval 0 --save-interval 0 --no-checkpoints --no-progress --no-tensorboard --log-interval 30                --out "$OUT/study/$1_seed$2" ;;
    # the kernels of proxy-v3's FP8 step, by time (tools/count_step_kernels.py; BENCHMARKS.md, run 22)
    profile8) run count_step_kernels_proxy_fp8 "${T_PROFILE8:-240}" python3 tools/count_step_kernels.py                --model proxy-v3 --batch-size 4 --seq-len 2048 --matched --precision fp8 --fp8-layers all --top 45 ;;
    # expert parallelism over a NCCL group of one rank (the all-to-all exchanging with itself)
    ep)    run ep_one_gpu "${T_EP:-90}" env COSCALE_EP_LOOPBACK=1 torchrun --nproc-per-node 1 tools/ep_one_gpu.py ;;
    # MTP acceptance: training small takes ~2.5 min with compilation; decoding needs ~1-2 more
    mtp)   run bench_mtp "${T_MTP:-420}" python3 benchmarks/bench_mtp.py --train-steps "${MTP_STEPS:-300}" --no-compile ;;
    # the tests that need the GPU, alone in one process with the compiler (other test modules force the
    # CPU interpreter at import)
    gputests) run gpu_tests "${T_TESTS:-300}" env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider \
                "tests/test_custom_ops.py::test_an_fp8_training_step_compiled_and_graphed_on_cuda_matches_eager" \
                "tests/test_custom_ops.py::test_a_cuda_graph_captures_fp8_forward_and_backward" \
                "tests/test_custom_ops.py::test_inductor_analyses_every_transparent_kernel" \
                "tests/test_train_step_runner.py::test_graphed_step_replays_what_it_captured_on_cuda" \
                tests/test_parallel_cuda.py "tests/test_mla_decode.py::test_gpu_fp8_convert_early_gives_what_the_plain_cast_gives" \
                "tests/test_mla_decode.py::test_gpu_lazy_rescaling_matches_the_reference" \
                "tests/test_mla_decode.py::test_gpu_combine_over_many_splits_ragged_columns_and_empty_splits" ;;
    # every quantization candidate on the hard inputs (signed zeros, infinities, near-ties), bit for bit, on the
    # GPU: the interpreter cannot see the GPU's own errors (run 31); compiling every candidate takes minutes
    quantbits) run quant_bits_on_gpu "${T_QUANTBITS:-150}" python3 tools/quant_bits_on_gpu.py
               run gpu_tests_quant "${T_TESTS_QUANT:-300}" env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider \
                 tests/test_quant.py -k "every_candidate or signed_zeros" ;;
  esac
done
