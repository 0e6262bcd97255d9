#!/usr/bin/env bash
# Sets everything up, lints, and runs the test suite (what .ci/run runs). Extra arguments go
# to pytest: scripts/test.sh tests/test_wire.py -k truncated
# FXOFFLOAD_FAST=1 leaves out the slow tests too. The GPU suite (tests/test_gpu.py) runs on a
# GPU machine through scripts/device_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
.venv/bin/ruff check src tests bench

markers="not gpu"
if [[ "${FXOFFLOAD_FAST:-0}" == "1" ]]; then
    markers="not slow and not gpu"
fi

rc=0
.venv/bin/python -m pytest -m "$markers" -q -p no:cacheprovider --timeout 900 "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test: pytest collected no tests (exit 5): that is a failure" >&2
    exit 1
fi
if [[ $rc -ne 0 ]]; then
    echo "test: pytest failed (exit $rc)" >&2
fi
exit $rc
