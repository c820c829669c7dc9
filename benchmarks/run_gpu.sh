#!/usr/bin/env bash
# The GPU half of the benchmarks in one go, each under its own time limit so that one failure leaves the rest:
# kd_loss_memory, sampling and step_throughput on the GPU (results/<name>_cuda.json), and the paper-size kd steps and
# MiniLLM rollouts (results/paper_size-<teacher>[-fused].json) with the logits whole and with the fused head. Run from
# the repository root on a machine with a CUDA GPU, kdbench and deepspeed installed; the output is also kept in LOG:
#     bash benchmarks/run_gpu.sh [LOG]
set -u
log=${1:-benchmarks/results/gpu.log}
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
run() {  # run LIMIT_SECONDS ARGS...: one benchmark; its output, less progress bars, goes to the log
    local limit=$1 started=$SECONDS
    shift
    echo "== $* (limit ${limit}s)"
    timeout "$limit" "$python" "$@" 2>&1 | grep -v -e "Loading weights" -e "Writing model shards"
    echo "== exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}
{
    run "${KD_LIMIT:-90}" benchmarks/kd_loss_memory.py --device cuda
    run "${PAPER_LIMIT:-120}" benchmarks/paper_size.py --teacher 760m --profile
    run "${PAPER_LIMIT:-120}" benchmarks/paper_size.py --teacher 760m --fused-head
    run "${SAMPLING_LIMIT:-60}" benchmarks/sampling.py
    run "${STEP_LIMIT:-90}" benchmarks/step_throughput.py
    run "${PAPER_LIMIT:-120}" benchmarks/paper_size.py --teacher 1.5b --fused-head
} 2>&1 | tee "$log"
