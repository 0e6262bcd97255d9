"""A farm worker carries Inductor's CPU vector-ISA probe libraries from its start, also
when its warm-up compiled no CPU graph (a worker with a GPU warms up on CUDA only): it
sends them with every CPU graph's response, so no CPU client builds its own probes
(tests/test_farm_single_flight.py checks the clients). Without this, only the response
to a worker's first CPU compile carried them: on an H200 machine, clients of its later
compiles built 6 probe libraries each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_WORKER = """
import json, sys
from pathlib import Path
from fxoffload import signing
from fxoffload.farm.actors import CompileWorker

key = Path(sys.argv[1])
signing.create_key(key)
worker = CompileWorker(str(key), sys.argv[2])
print(json.dumps({"toolchain": sorted(worker._toolchain), "phases": worker.phases}))
"""


def test_worker_without_cpu_warm_up_carries_isa_probes(tmp_path: Path) -> None:
    # FXOFFLOAD_WARM_CPU=0 is what a worker with a GPU does: no CPU warm-up compile
    env = {**os.environ, "FXOFFLOAD_WARM_CPU": "0", "FXOFFLOAD_WARM_CUDA": "0"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "key"),
                           str(tmp_path / "work")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "warm_cpu_s" not in report["phases"], report["phases"]
    libraries = [name for name in report["toolchain"] if name.endswith(".so")]
    assert libraries, report
