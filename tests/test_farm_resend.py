"""A kernel a farm worker built for an earlier graph reaches the client of a later graph
that uses it: the worker's cache holds it already (nothing new is written), so it is sent
by the name the compile used. MLPs of 2, 3 and 4 equal layers are three graphs with the
same C++ kernels; asked one after another of a farm of two workers, the third lands on a
worker that built them for an earlier graph. Each client has a cache dir of its own and
must build no library itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

CLIENT = textwrap.dedent("""
    import sys, torch, fxoffload
    from fxoffload.executors.farm import INSTALLED
    layers = int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(
        torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.LayerNorm(32))
        for _ in range(layers)]).eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = torch.compile(model, backend=fxoffload.backend(mode="farm"))(x)
        torch.testing.assert_close(out, model(x))
    snap = fxoffload.stats()
    assert snap.graphs_offloaded == 1 and dict(snap.fallbacks) == {}, snap
    torch.save({"installed": sorted(INSTALLED)}, sys.argv[1])
""")


@pytest.mark.slow
def test_a_kernel_built_for_an_earlier_graph_is_sent_again(farm: Any,
                                                          tmp_path: Path) -> None:
    import torch

    farm.reset()
    for layers in (2, 3, 4):
        out, cache = tmp_path / f"client{layers}.pt", tmp_path / f"cache{layers}"
        done = subprocess.run([sys.executable, "-c", CLIENT, str(out), str(layers)],
                              env={**farm.env(), "TORCHINDUCTOR_CACHE_DIR": str(cache)},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        installed = set(torch.load(out, weights_only=False)["installed"])
        built = {f"inductor/{p.relative_to(cache)}" for p in cache.rglob("*.so")}
        assert built and built <= installed, (layers, built - installed)
    assert farm.stats()["compiles"] == 3
