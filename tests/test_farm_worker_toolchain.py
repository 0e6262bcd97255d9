"""A farm worker sends Inductor's CPU vector-ISA probe libraries with every CPU graph's
response, also when its warm-up compiled no CPU graph (a worker with a GPU warms up on
CUDA only), so no CPU client builds its own probes (tests/test_farm_single_flight.py
checks the clients). Before, such a worker built them in its first CPU compile and sent
them with that response alone: on an H200 machine, clients of its later compiles built 6
probe libraries each. The worker runs in a process of its own, without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from models import MLP

import fxoffload

_WORKER = """
import json, sys
from pathlib import Path
from fxoffload import signing
from fxoffload.farm import bundle
from fxoffload.farm.actors import REQUEST, RESPONSE, CompileWorker

key_path, work_dir, *requests = sys.argv[1:]
key = signing.create_key(Path(key_path))
worker = CompileWorker(key_path, work_dir)
report = {"phases": worker.phases, "responses": []}
for path in requests:
    ok, signed, _ = worker.compile(signing.sign(key, Path(path).read_bytes(), purpose=REQUEST))
    _, files = bundle.unpack(signing.verify(key, signed, purpose=RESPONSE))
    probes = sorted(name for name, data in files.items()
                    if name.endswith(".cpp") and b"_chk_kernel" in data)
    report["responses"].append({"ok": ok, "probes": probes})
print(json.dumps(report))
"""


def _capture(directory: Path, width: int) -> Path:
    torch._dynamo.reset()
    model = torch.nn.Sequential(MLP(), torch.nn.Linear(8, width), torch.nn.ReLU()).eval()
    with torch.no_grad():
        torch.compile(model, backend=fxoffload.backend(
            mode="capture", capture_dir=directory))(torch.randn(4, 16))
    (path,) = directory.glob("*.request.fxo")
    return path


def test_every_cpu_response_carries_the_isa_probes(tmp_path: Path) -> None:
    requests = [str(_capture(tmp_path / f"capture{w}", w)) for w in (8, 24)]
    # FXOFFLOAD_WARM_CPU=0 is what a worker with a GPU does: no CPU warm-up compile
    env = {**os.environ, "FXOFFLOAD_WARM_CPU": "0", "FXOFFLOAD_WARM_CUDA": "0"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "key"),
                           str(tmp_path / "work"), *requests], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "warm_cpu_s" not in report["phases"], report["phases"]
    first, second = report["responses"]
    assert first["ok"] and second["ok"], report
    assert first["probes"], report  # this CPU's probes: one C++ source per ISA checked
    assert second["probes"] == first["probes"], report
