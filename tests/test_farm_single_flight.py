"""Single-flight and the store: K client processes asking for the same graphs at once
cause one compile per graph on the farm (its own counter), every output equal to stock's;
a client that comes later gets the stored result; what the farm stored is on disk for a
farm restarted on the same directory (which loads it: tests/test_farm_store.py). Async
clients sharing one compile: tests/test_farm_ranks.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from farm_client import step
from models import Block

HERE = Path(__file__).parent


def _stock() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 8, 32)
    torch._dynamo.reset()
    return step(torch.compile(model, backend="inductor"), x)


def _clients(farm: Any, tmp_path: Path, count: int, mode: str = "farm",
             graphs: bool = False, env: dict[str, str] | None = None) -> list[dict]:
    # Each client has a cache dir of its own, as ranks on other machines would: nothing
    # is shared but through the farm (the kernels come with the response). Whole graphs
    # (farm.graphs: AOTAutograd's entries) are shared only when ``graphs``: without
    # them every client sends its requests, which these tests are about.
    outs = [tmp_path / f"client{i}.pt" for i in range(count)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "farm_client.py"), str(out), mode],
                              env={**farm.env(), "FXOFFLOAD_FARM_GRAPHS": str(int(graphs)),
                                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"cache{i}"),
                                   **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    for proc in procs:
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, text[-4000:]
    return [torch.load(out, weights_only=False) for out in outs]


def _assert_stock(results: list[dict]) -> None:
    stock = _stock()
    for r in results:
        assert len(r["result"]) == len(stock)
        for ours, theirs in zip(r["result"], stock, strict=True):
            torch.testing.assert_close(ours, theirs)
        assert r["stats"]["fallbacks"] == {}, r["stats"]["fallbacks"]


def test_three_clients_one_compile_per_graph(farm: Any, tmp_path: Path) -> None:
    farm.reset()
    results = _clients(farm, tmp_path, 3)
    _assert_stock(results)
    stats = farm.stats()
    # forward and backward: two graphs, each compiled once for all three clients
    assert stats["compiles"] == 2, stats
    assert stats["compiles_per_key_max"] == 1, stats
    assert stats["hits"] + stats["joins"] == 4, stats
    outcomes = [r["stats"]["farm"] for r in results]
    assert sum(o.get("compiled", 0) for o in outcomes) == 2, outcomes
    assert all(r["stats"]["graphs_offloaded"] == 2 for r in results)
    # every client got the compiled kernels with the response, and the worker's CPU
    # vector-ISA probes: no client built a library of its own
    assert all(r["stats"]["farm_files_installed"] > 0 for r in results)
    for i, r in enumerate(results):
        built = {f"inductor/{p.relative_to(tmp_path / f'cache{i}')}"
                 for p in (tmp_path / f"cache{i}").rglob("*.so")}
        assert built and built <= set(r["installed"]), built - set(r["installed"])
        assert r["stats"]["vec_isa_adopted"] == 1
    # the farm was started with --store: what it compiled is on disk for a restarted farm
    assert len(list((farm.state_dir / "store").glob("*/*.fxr"))) >= 2

    # a client that comes later: both graphs from the store, nothing compiled
    farm.reset(store=False)
    (tmp_path / "later").mkdir()
    (later,) = _clients(farm, tmp_path / "later", 1)
    _assert_stock([later])
    stats = farm.stats()
    assert stats["compiles"] == 0 and stats["hits"] == 2, stats
    assert later["stats"]["farm"] == {"hit": 2}
