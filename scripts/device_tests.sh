#!/usr/bin/env bash
# Runs on the GPU machine (torch 2.11, no internet): the CUDA suite, then the CPU contract
# under torch 2.11. Usage: scripts/device_tests.sh [pytest selection...]
# The machine has no internet and may lack pytest: make .whl here first and carry it:
#   pip download pytest pytest-timeout --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fxoffload-out}"; mkdir -p "$OUT"
# Ray for the farm tests, where bench/pack_ray_for_device.sh packed it into .devray/.
if [[ -f .devray/ray312.tar.xz ]]; then
    . bench/device_ray_setup.sh
fi
if ! python3 -c "import pytest, pytest_timeout" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/fxoffload-inductor-cache
python3 - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import transformers; print("transformers", transformers.__version__)
except ImportError:
    print("transformers missing")
PY
pytest=(python3 -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 "$@")
# A Ray head binds every interface: the farm tests run where loopback is the only one.
. scripts/loopback.sh
LOOPBACK_FALLBACK=isolated in_loopback "${pytest[@]}" 2>&1 | tee "$OUT/tests.log"
