"""Inductor's caches stay in the parent: a hit never reaches a worker, and a compile done
in a worker fills the parent's FX graph and AOTAutograd caches as a stock compile would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from conftest import settings_for
from models import MLP
from torch._dynamo.utils import counters

import fxoffload

SCRIPT = textwrap.dedent("""
    import json, sys, torch, fxoffload
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from models import MLP
    torch.manual_seed(0)
    fxoffload.warmup(mode={mode!r}, workers=1)  # else a cold pool's first compile stays here
    f = torch.compile(MLP(), backend=fxoffload.backend(mode={mode!r}, workers=1))
    with torch.no_grad():
        out = f(torch.ones(2, 16))
    f2 = torch.compile(MLP().train(), backend=fxoffload.backend(mode={mode!r}, workers=1))
    f2(torch.ones(2, 16)).sum().backward()
    print(json.dumps({{"offloaded": fxoffload.stats().graphs_offloaded,
                      "fallbacks": dict(fxoffload.stats().fallbacks),
                      "hits": fxoffload.stats().fx_cache_hits
                              + fxoffload.stats().aot_cache_hits,
                      "inductor": dict(counters["inductor"]),
                      "aot": dict(counters["aot_autograd"]), "sum": out.sum().item()}}))
    fxoffload.shutdown()
""")


def _run(mode: str, cache: str) -> dict[str, Any]:
    import json

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    script = SCRIPT.format(tests=os.path.dirname(__file__), mode=mode)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["serde", "subprocess"])
def test_second_process_hits_the_cache_and_offloads_nothing(mode: str, tmp_path: Any) -> None:
    cache = str(tmp_path / "cache")
    first = _run(mode, cache)
    assert first["offloaded"] == 3 and first["fallbacks"] == {}  # inference, fwd, bwd
    assert first["inductor"].get("fxgraph_cache_miss", 0) == 3
    second = _run(mode, cache)
    assert second["offloaded"] == 0
    hits = second["inductor"].get("fxgraph_cache_hit", 0) + second["aot"].get(
        "autograd_cache_hit", 0)
    assert hits >= 2
    assert second["hits"] == hits and first["hits"] == 0  # stats() shows them
    assert second["sum"] == first["sum"]


def test_in_process_hit_skips_the_executor(tmp_path: Any) -> None:
    with torch._inductor.config.patch(fx_graph_cache=True), \
            torch._inductor.utils.fresh_cache():
        x = torch.randn(2, 16)
        torch.manual_seed(0)
        backend = fxoffload.backend(**settings_for("serde", tmp_path))
        torch.compile(MLP(), backend=backend)(x)
        assert fxoffload.stats().graphs_offloaded == 1
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        torch.compile(MLP(), backend=backend)(x)
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        assert fxoffload.stats().graphs_offloaded == 1  # unchanged: the hit stayed here
