#!/usr/bin/env bash
# The farm on the GPU machine, in one device call: Ray set up from .devray, a farm of 4
# warm workers (in a loopback-only network namespace where the machine allows one), a GPU
# client with its own cache dir checked against stock (outputs; kernels it had to compile
# itself), then bench/farm.py with K=4 ranks sharing the H200. Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_ray_setup.sh
# exported: inner() runs in a child bash (until 2026-12-05 it wrote to /gpu_farm.*, and
# the JSON of the 12-04 run was lost with the device's root)
export out="${OUT:-bench/results}"; mkdir -p "$out"
inner() {
    ip link set lo up 2>/dev/null
    state=/tmp/farm-gpu; rm -rf $state
    export FXOFFLOAD_FARM_KEY_FILE=$state/key
    models="${FARM_CHECK_MODELS-gpt2 llama}"  # FARM_CHECK_MODELS= (empty): none
    if [[ -n "$models" ]]; then
        # FARM_UP_ENV="CUDA_VISIBLE_DEVICES=": workers that see no GPU (virtual_gpu)
        env ${FARM_UP_ENV:-} python -m fxoffload farm up --workers "${FARM_CHECK_WORKERS:-4}" \
            --state-dir $state 2>&1 | grep -v network_util
        export FXOFFLOAD_FARM=$(python -c "import json;print(json.load(open('$state/farm.json'))['address'])")
        for model in $models; do
            timeout 150 python bench/farm_gpu_check.py --model $model --size bench 2>&1 | grep -v network_util | tail -${FARM_CHECK_TAIL:-3}
        done
        python -m fxoffload farm status --state-dir $state 2>&1 | grep -v network_util
        python -m fxoffload farm down --state-dir $state 2>&1 | grep -v network_util
    fi
    # Kernels a worker built for an earlier graph reach a client of a later one
    # (FARM_KERNEL_CHECK=0 skips it).
    if [[ "${FARM_KERNEL_CHECK:-1}" == 1 ]]; then
        python -m fxoffload farm up --workers 1 --state-dir $state 2>&1 | grep -v network_util
        export FXOFFLOAD_FARM=$(python -c "import json;print(json.load(open('$state/farm.json'))['address'])")
        for model in mlp2 mlp3; do
            timeout 150 python bench/farm_gpu_check.py --model $model 2>&1 | grep -v network_util | tail -3
        done
        python -m fxoffload farm down --state-dir $state 2>&1 | grep -v network_util
    fi
    if [[ -n "${FARM_BENCH_ARGS:-}" ]]; then
        timeout "${FARM_BENCH_TIMEOUT:-300}" python bench/farm.py $FARM_BENCH_ARGS --out "$out/gpu_farm" 2>&1 | grep -v network_util | tail -40
    fi
    # a second run in the same call (e.g. other --rank-env), written to gpu_farm2.*
    if [[ -n "${FARM_BENCH_ARGS2:-}" ]]; then
        timeout "${FARM_BENCH_TIMEOUT2:-300}" python bench/farm.py $FARM_BENCH_ARGS2 --out "$out/gpu_farm2" 2>&1 | grep -v network_util | tail -40
    fi
}
export -f inner
. scripts/loopback.sh
LOOPBACK_FALLBACK=isolated in_loopback bash -c inner
