#!/usr/bin/env bash
# Issue 15's H200 numbers in one device call (torch 2.11 there): the default backend
# against stock, cold, 3 fresh processes each; and async+subprocess cold (first output
# and time until compiled) against eager and stock. Results under $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out" /tmp/ep/fxoffload-0.1.0.dist-info
# backend="fxoffload" is found through an entry point: a dist-info for the source tree.
printf 'Metadata-Version: 2.1\nName: fxoffload\nVersion: 0.1.0\n' \
    > /tmp/ep/fxoffload-0.1.0.dist-info/METADATA
printf '[torch_dynamo_backends]\nfxoffload = fxoffload.integration:fxoffload_backend\n' \
    > /tmp/ep/fxoffload-0.1.0.dist-info/entry_points.txt
export PYTHONPATH="/tmp/ep:$PWD/src"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 280 python bench/first_call.py --device cuda --size bench --reps 3 --models gpt2 \
    --configs stock-normal,fxoffload-default --out "$out/gpu_first_call_default" \
    2>&1 | tail -25
timeout 290 python bench/async_first.py --device cuda --size bench --reps 3 --models gpt2 \
    --configs eager,stock-normal,fxoffload-async-cold --out "$out/gpu_async_cold" \
    2>&1 | tail -25
