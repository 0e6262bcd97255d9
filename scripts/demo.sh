#!/usr/bin/env bash
# Sets everything up and runs the main job: compiles a tiny GPT-2 with stock Inductor and
# with fxoffload, each in a fresh process with an empty cache, and compares them.
# Extra arguments go to `fxoffload demo` (--model gpt2|block, --mode subprocess|serde,
# --workers N).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
exec .venv/bin/fxoffload demo "$@"
