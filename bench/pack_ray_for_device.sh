#!/usr/bin/env bash
# Packs Ray for the GPU machine (Python 3.12, no network) into .devray/: the wheel is 79 MB
# and the device carries 64 MiB, so it goes unpacked, without ray/jars, rllib and the
# data/serve/train/tune/air libraries, xz-compressed (~30 MB), with its dependency wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
ver="${RAY_VERSION:-2.60.0}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$tmp" "ray==$ver"
mkdir -p "$tmp/site" .devray
(cd "$tmp/site" && unzip -q "$tmp"/ray-*.whl && rm -rf ray/jars ray/rllib ray/data ray/serve \
    ray/train ray/tune ray/air ray/llm && tar -cf - ray | xz -T0 -6 > "$OLDPWD/.devray/ray312.tar.xz")
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .devray \
    click filelock jsonschema msgpack packaging protobuf pyyaml requests
du -sh .devray
