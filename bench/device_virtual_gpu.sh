#!/usr/bin/env bash
# CUDA graphs compiled where no GPU is visible (fxoffload.virtual_gpu), on the GPU machine
# in one device call. 1: graphs captured on the GPU (an MLP training step, bench-size
# GPT-2 and Llama inference) are replayed with CUDA_VISIBLE_DEVICES empty; replay says
# whether the generated code equals the GPU compile's. 2: a farm whose workers see no GPU
# (`CUDA_VISIBLE_DEVICES= fxoffload farm up`), and GPU clients checked against stock
# (outputs; kernels the client had to compile itself). Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export out="${OUT:-bench/results}"; mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python - > "$out/sources.txt" 2>&1 <<'PY'
import inspect, torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
from triton.backends.nvidia import driver as nv
from torch._subclasses import fake_tensor
from torch._inductor.runtime import triton_heuristics, triton_helpers
for obj in (nv.CudaDriver, triton_helpers.set_driver_to_gpu,
            triton_heuristics.CachingAutotuner.precompile,
            getattr(fake_tensor, "init_gpu_context", None),
            getattr(fake_tensor, "init_cuda_context", None)):
    if obj is not None:
        print("=" * 20, getattr(obj, "__qualname__", obj)); print(inspect.getsource(obj)[:4000])
PY
cap=/tmp/vg-capture; rm -rf $cap /tmp/vg-cache-*; mkdir -p $cap
TORCHINDUCTOR_CACHE_DIR=/tmp/vg-cache-gpu FXOFFLOAD_MODE=capture FXOFFLOAD_CAPTURE_DIR=$cap \
    timeout 300 python - <<'PY' 2>&1 | tail -5
import torch, fxoffload
from _child import build_model
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.LayerNorm(256),
                          torch.nn.Linear(256, 64)).cuda()
x = torch.randn(64, 256, device="cuda")
torch.compile(mlp, backend=fxoffload.backend())(x).sum().backward()
for name in ("gpt2", "llama"):
    model, make = build_model(name, "bench", "cuda", torch.bfloat16, False)
    with torch.no_grad():
        torch.compile(model, backend=fxoffload.backend())(**make())
print("captured; stats", fxoffload.stats().as_dict().get("fallbacks"))
PY
ls $cap | sed 's/^/  /'
for f in $cap/*.request.fxo; do
    CUDA_VISIBLE_DEVICES= TORCHINDUCTOR_CACHE_DIR=/tmp/vg-cache-cpu timeout 300 \
        python -m fxoffload replay "$f" > "$out/replay_$(basename "$f" .request.fxo).txt" 2>&1
    echo "replay rc=$? $(basename "$f")"
    grep -E "^(compile|kernels|result|generated code|code)" "$out/replay_$(basename "$f" .request.fxo).txt" | head -6
    grep -E "Error|error" "$out/replay_$(basename "$f" .request.fxo).txt" | tail -3
done
# 2: the GPU test (a farm of one GPU-less worker, a training step against stock)
if [[ "${VG_TESTS:-1}" == 1 ]]; then
    bash scripts/device_tests.sh tests/test_virtual_gpu.py 2>&1 | tail -15
fi
# 3: bench-size models through a GPU-less farm
if [[ "${VG_FARM:-1}" == 1 && -f .devray/ray312.tar.xz ]]; then
    FARM_UP_ENV="CUDA_VISIBLE_DEVICES=" FARM_CHECK_WORKERS="${VG_WORKERS:-2}" \
        FARM_CHECK_MODELS="${VG_MODELS:-gpt2 llama}" FARM_KERNEL_CHECK=0 FARM_CHECK_TAIL=12 bash bench/device_farm.sh
fi
