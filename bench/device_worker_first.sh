#!/usr/bin/env bash
# A farm worker's first compile on the GPU machine (bench/worker_first_compile.py), for
# the models in WFC_MODELS (default: llama gpt2), bench size; results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"; mkdir -p "$out"
export PYTHONPATH="$PWD/src"
nvidia-smi --query-gpu=name --format=csv,noheader
# what a worker that unpickles a model class by reference pays to import its library
python -c "import time, torch; t = time.perf_counter(); import transformers.models.llama.modeling_llama; print(f'import transformers (after torch): {time.perf_counter() - t:.2f} s')"
for model in ${WFC_MODELS:-llama gpt2}; do
    timeout "${WFC_TIMEOUT:-280}" python bench/worker_first_compile.py --device cuda --size bench \
        --model "$model" --variants "${WFC_VARIANTS:-current,training,other-shape}" \
        --out "$out/wfc_$model" 2>&1 | grep -v Warning | tail -6
done
