"""A background backend starts its worker pool at the first AOTAutograd cache miss, not
when the backend is made: a process whose graphs all hit the caches (a restart) starts
no worker, so no worker's start-up shares the cores with its compiled code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch, fxoffload
    sys.path.insert(0, {tests!r})
    from models import MLP
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    f = torch.compile(model, backend=fxoffload.backend(mode="async+subprocess", workers=1))
    with torch.no_grad():
        f(x)
        assert fxoffload.wait(timeout=300)
        out = f(x)
        time.sleep(1.0)  # a pool started at backend creation has spawned its worker by now
    children = sum(len(open(f"/proc/self/task/{{t}}/children").read().split())
                   for t in os.listdir("/proc/self/task"))
    deadline = time.monotonic() + 120
    while (sys.argv[1] == "cold" and fxoffload.stats().worker_starts == 0
           and time.monotonic() < deadline):
        time.sleep(0.1)  # the cold compile ran here; the pool starts after it
    s = fxoffload.stats()
    print(json.dumps({{"worker_starts": s.worker_starts, "offloaded": s.graphs_offloaded,
                      "in_process": dict(s.compiled_in_process), "children": children,
                      "aot_hits": s.aot_cache_hits, "compiled_runs": s.compiled_runs,
                      "fallbacks": dict(s.fallbacks), "out": out.tolist()}}))
    fxoffload.shutdown()
""")


def _run(cache: Path, which: str) -> dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    script = SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script, which], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stock() -> torch.Tensor:
    from models import MLP

    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="inductor")(x)


def test_a_process_whose_graphs_hit_the_cache_starts_no_worker(tmp_path: Path) -> None:
    # A cold start: no worker is warm when the graph is ready, so it compiles here; the
    # pool, started at that miss, comes up for the graphs to come.
    cold = _run(tmp_path / "cache", "cold")
    assert cold["in_process"] == {"no_warm_worker": 1} and cold["offloaded"] == 0, cold
    assert cold["worker_starts"] >= 1, cold
    assert cold["fallbacks"] == {}, cold

    warm = _run(tmp_path / "cache", "warm")  # a restart: same cache dir, a fresh process
    assert warm["aot_hits"] >= 1, warm
    assert warm["worker_starts"] == 0 and warm["children"] == 0, warm
    assert warm["offloaded"] == 0 and warm["fallbacks"] == {}, warm

    stock = _stock()
    for result in (cold, warm):
        torch.testing.assert_close(torch.tensor(result["out"]), stock)
