#!/usr/bin/env bash
# Issue 16's GPU checks still open, in one device call (machines are scarce: one call that
# comes gets them all). Carry .devray and .whl: run(carry=[".devray", ".whl"]).
#   1. the GPU-less farm compiles for the client's GPU, and a rank on another device index
#      rebinds the farm's code (tests/test_virtual_gpu.py -k farm_workers; prints the
#      stats and WARNINGs of each client before it compares code)
#   2. K=4 ranks at once, bench-size Llama: stock (separate cache dirs) against a cold farm
#      of 4 workers (bench/farm.py; PENDING_MODELS, PENDING_REPS, PENDING_CONFIGS)
# Results under $OUT (tests.log, gpu_farm.{json,md}, farm_traces/). About 450-550 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
timeout "${PENDING_TEST_TIMEOUT:-240}" bash scripts/device_tests.sh \
    tests/test_virtual_gpu.py -k farm_workers -s 2>&1 | tail -70
# a test killed by the timeout may leave its Ray head behind: the farm below starts its own
pkill -9 -f "raylet|gcs_server|ray::" 2>/dev/null; sleep 2
FARM_CHECK_MODELS= FARM_KERNEL_CHECK=0 FARM_BENCH_TIMEOUT="${PENDING_BENCH_TIMEOUT:-290}" \
FARM_BENCH_ARGS="--device cuda --size bench --k 4 --reps ${PENDING_REPS:-2} \
--models ${PENDING_MODELS:-llama} --configs ${PENDING_CONFIGS:-stock-separate,farm-cold} \
--farm-workers 4 --trace-dir $OUT/farm_traces" \
    bash bench/device_farm.sh 2>&1 | tail -45
