#!/usr/bin/env bash
# Diagnostic: which CPU vector-ISA probe libraries farm clients build themselves: a farm
# of two workers; three clients at once in fresh cache dirs (bench/isa_probe_trace.py),
# then three more with Inductor's compile pool not warmed (TORCH_WARM_POOL=0). Needs Ray.
st=/tmp/farm-isa; rm -rf $st
python -m fxoffload farm up --workers 2 --state-dir $st 2>&1 | grep -v network_util | head -1
FXOFFLOAD_FARM=$(python -c "import json;print(json.load(open('$st/farm.json'))['address'])")
export FXOFFLOAD_FARM FXOFFLOAD_FARM_KEY_FILE=$st/key FXOFFLOAD_FARM_GRAPHS=0  # requests, as tests/test_farm_single_flight.py
for pool in 1 0; do
    echo "== TORCH_WARM_POOL=$pool"
    for i in 1 2 3; do
        TORCH_WARM_POOL=$pool timeout 200 python bench/isa_probe_trace.py farm $((64 + pool)) \
            > $st/client$pool$i.log 2>&1 &
    done
    wait
    for i in 1 2 3; do
        grep "client probe\|^stats\|^libraries" $st/client$pool$i.log | grep -v "built nothing"
    done
done
python -m fxoffload farm down --state-dir $st 2>&1 | tail -1
rm -rf $st
