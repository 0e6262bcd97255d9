"""``fxoffload.warmup()`` prepares the parent: after it, the first compile does not import
Inductor or build its pattern tables, and it still compiles exactly what stock does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxoffload

FRESH = textwrap.dedent("""
    import json, sys, time
    import torch
    import fxoffload
    warm = sys.argv[1] == "warm"
    if warm:
        fxoffload.warmup(mode="serde", device="cpu")
    prepared = "torch._inductor.compile_fx" in sys.modules
    from torch._inductor.fx_passes import joint_graph
    before = joint_graph.lazy_init.cache_info().currsize
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with torch.no_grad():
        ours = torch.compile(model, backend=fxoffload.backend(mode="serde"))(x)
        torch._dynamo.reset()
        stock = torch.compile(model)(x)
    print(json.dumps({"prepared": prepared, "patterns_before": before,
                      "patterns_after": joint_graph.lazy_init.cache_info().currsize,
                      "offloaded": fxoffload.stats().graphs_offloaded,
                      "equal": bool(torch.equal(ours, stock))}))
""")


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_warmup_prepares_the_parent(how: str, tmp_path: Path) -> None:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", FRESH, how], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["equal"] and got["offloaded"] == 1, got
    if how == "warm":
        assert got["prepared"] and got["patterns_before"] == 1, got
        assert got["patterns_after"] == 1, got  # the compile reused the warm-up's patterns
    else:
        assert not got["prepared"] and got["patterns_before"] == 0, got


def test_warmup_rejects_a_bad_device() -> None:
    with pytest.raises(fxoffload.ConfigError, match="device='gpu0'"):
        fxoffload.warmup(mode="serde", device="gpu0")
