#!/usr/bin/env bash
# Sets everything up, lints, and runs the test suite (what .ci/run runs). Extra arguments go
# to pytest: scripts/test.sh tests/test_wire.py -k truncated
# FXOFFLOAD_FAST=1 leaves out the slow tests too. The GPU suite (tests/test_gpu.py) runs on a
# GPU machine through scripts/device_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
.venv/bin/ruff check src tests bench
# pyproject admits what is tested (3.11 here, 3.12 on the GPU machine); the newest Python is
# checked by lint, and, where pyenv has one, by compiling and importing what needs no torch
# (torch wheels for it are CUDA builds of several GB, not fetched here).
.venv/bin/ruff check --target-version py313 src tests bench
py313="${PYENV_ROOT:-$HOME/.pyenv}/versions/3.13.0/bin/python3"
if [[ -x "$py313" ]]; then
    "$py313" -m compileall -q src
    PYTHONPATH=src "$py313" -c "import fxoffload, fxoffload.errors, fxoffload.settings, fxoffload.wire; fxoffload.Settings.resolve(env={})"
fi

markers="not gpu"
if [[ "${FXOFFLOAD_FAST:-0}" == "1" ]]; then
    markers="not slow and not gpu"
fi

# The farm tests start a Ray head: pytest runs where loopback is the only interface
# (scripts/loopback.sh). Without that, the farm tests skip and say why (fail under CI).
# Two test processes (pytest-xdist) by default: a test compiles mostly on one core, and
# CI has two. A file's tests stay in one process, the farm's tests all in one
# (tests/conftest.py). FXOFFLOAD_TEST_WORKERS=0 runs everything in this process.
workers="${FXOFFLOAD_TEST_WORKERS:-2}"
[[ "$workers" =~ ^[0-9]+$ ]] || { echo "test: FXOFFLOAD_TEST_WORKERS='$workers' is not a number" >&2; exit 2; }
pytest=(.venv/bin/python -m pytest -m "$markers" -q -p no:cacheprovider --timeout 900
        -n "$workers" --dist loadgroup "$@")
. scripts/loopback.sh
rc=0
in_loopback "${pytest[@]}" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test: pytest collected no tests (exit 5): that is a failure" >&2
    exit 1
fi
if [[ $rc -ne 0 ]]; then
    echo "test: pytest failed (exit $rc)" >&2
fi
exit $rc
