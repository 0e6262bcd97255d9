#!/usr/bin/env bash
# Ray on the GPU machine (no network there): the cp312 wheel unpacked without its jars,
# rllib, data/serve/train/tune/air libraries, xz-packed in .devray/ (gitignored; made by
# bench/pack_ray_for_device.sh), plus the dependency wheels the image lacks. Source it:
#   . bench/device_ray_setup.sh   -> PYTHONPATH has Ray, fxoffload's src and its entry point
set -uo pipefail
site=/tmp/raysite
if [[ ! -d $site/ray && ! -f .devray/ray312.tar.xz ]]; then
    # .devray is gitignored: the device call must carry it (carry=[".devray"]). Stop here
    # rather than run the farm benchmarks without Ray (that cost 5 device minutes once).
    echo "device_ray_setup: .devray/ray312.tar.xz is missing: run bench/pack_ray_for_device.sh here and pass carry=[\".devray\"] to the device call" >&2
    exit 3
fi
if [[ ! -d $site/ray ]]; then
    mkdir -p $site && tar -xJf .devray/ray312.tar.xz -C $site
fi
missing=()
for pair in click:click filelock:filelock jsonschema:jsonschema msgpack:msgpack \
        packaging:packaging google.protobuf:protobuf yaml:pyyaml requests:requests; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    pip install -q --no-index --find-links .devray --target /tmp/raydeps "${missing[@]}" \
        2>&1 | tail -2
fi
mkdir -p /tmp/ep/fxoffload-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: fxoffload\nVersion: 0.1.0\n' \
    > /tmp/ep/fxoffload-0.1.0.dist-info/METADATA
printf '[torch_dynamo_backends]\nfxoffload = fxoffload.integration:fxoffload_backend\n[console_scripts]\nfxoffload = fxoffload.cli:main\n' \
    > /tmp/ep/fxoffload-0.1.0.dist-info/entry_points.txt
export PYTHONPATH="/tmp/ep:$PWD/src:$site:/tmp/raydeps"
python -c "import ray; print('ray', ray.__version__, 'missing deps installed:', '${missing[*]:-none}')"
