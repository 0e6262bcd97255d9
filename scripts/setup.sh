#!/usr/bin/env bash
# Sets up the project's environment in .venv, idempotently: a virtual environment on
# Python >= 3.11, torch pinned, then fxoffload (editable) with its test and farm (Ray) extras. A second run
# with nothing changed only checks and returns. Override the interpreter with
# PYTHON=/path/to/python3.11 (used only when .venv is created).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"   # pinned: an unpinned torch resolves to the newest CUDA build (GBs)
PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.fxoffload-setup"

fail() { echo "setup: error: $*" >&2; exit 1; }

check_python() {  # $1: interpreter; fails unless it runs and is >= 3.11
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null || fail "no Python interpreter '$PYTHON' (set PYTHON=...)"
    check_python "$PYTHON" \
        || fail "'$PYTHON' is $("$PYTHON" -V 2>&1 | head -n1); fxoffload needs Python >= 3.11 (set PYTHON=...)"
    echo "setup: creating $VENV with $("$PYTHON" -V 2>&1)"
    rm -rf "$VENV"  # a half-made one (no bin/python) is of no use
    "$PYTHON" -m venv "$VENV"
fi
check_python "$VENV/bin/python" || fail "$VENV runs $("$VENV/bin/python" -V 2>&1); fxoffload \
needs Python >= 3.11: remove $VENV and rerun (PYTHON=... to choose the interpreter)"

# What the environment was last set up for: the pin, the interpreter, the project's
# dependencies. The same stamp and a working install mean there is nothing to do.
want="torch==$TORCH_VERSION $("$VENV/bin/python" -V 2>&1) $(sha256sum pyproject.toml | cut -d' ' -f1)"
installed_ok() {  # the pinned torch, the test extra, and fxoffload from this src/
    "$VENV/bin/python" - "$TORCH_VERSION" "$PWD/src" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util as iu, os, sys
ok = md.version("torch").split("+")[0] == sys.argv[1]
ok &= all(iu.find_spec(m) for m in ("pytest", "pytest_timeout", "xdist", "transformers", "ray"))
spec = iu.find_spec("fxoffload")
ok &= bool(spec and spec.origin) and (os.path.realpath(os.path.dirname(os.path.dirname(
    spec.origin))) == os.path.realpath(sys.argv[2]))
sys.exit(0 if ok else 1)
PY
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && [[ -x "$VENV/bin/ruff" ]] && installed_ok; then
    echo "setup: $VENV is up to date (torch $TORCH_VERSION, fxoffload editable from src/)"
    exit 0
fi

rm -f "$STAMP"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# torch first, pinned explicitly; a satisfied pin installs nothing.
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
# The pin again, so that no dependency can move torch off it (that would fail loudly here).
"${PIP[@]}" install -q -e ".[test,farm]" "torch==$TORCH_VERSION"
installed_ok || fail "after installing, torch $TORCH_VERSION / fxoffload from $PWD/src / the \
test extra still do not import from $VENV"
echo "$want" > "$STAMP"
echo "setup: $VENV ready: $("$VENV/bin/python" -V 2>&1), torch $TORCH_VERSION, fxoffload \
editable from src/ with its test and farm extras"
