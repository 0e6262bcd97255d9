"""Whole graphs through the farm (``fxoffload.farm.graphs``): a client that compiled a
graph gives the farm its AOTAutograd cache entry with the files it loads; a later client,
with a cache dir of its own, finds it before tracing through AOTAutograd and Inductor's
front half: no request reaches the farm's workers or its store of responses, no kernel
is built, and every output equals stock's. Without the farm's graphs, the later client
is answered from the store of responses instead (tests/test_farm_single_flight.py).
Clients that miss at once wait for the one that leads (single-flight at this level)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from test_farm_single_flight import _assert_stock, _clients, _stock


def test_a_later_client_loads_the_whole_graph_from_the_farm(farm: Any,
                                                            tmp_path: Path) -> None:
    farm.reset()
    (first,) = _clients(farm, tmp_path / "first", 1, graphs=True)
    _assert_stock([first])
    stats = farm.stats()
    # one Dynamo graph: one AOTAutograd entry (forward and backward) given to the farm
    assert stats["compiles"] == 2 and stats["graphs_puts"] == 1, stats
    assert stats["graphs_misses"] == 1 and stats["graphs_hits"] == 0, stats
    assert first["stats"]["farm"] == {"compiled": 2}, first["stats"]["farm"]

    farm.reset(store=False)
    (later,) = _clients(farm, tmp_path / "later", 1, graphs=True)
    _assert_stock([later])
    stats = farm.stats()
    assert stats["graphs_hits"] == 1 and stats["graphs_puts"] == 0, stats
    # nothing asked of the store of responses, nothing compiled
    assert stats["requests"] == 0 and stats["compiles"] == 0, stats
    assert later["stats"]["farm"] == {"graphs_hit": 1}, later["stats"]["farm"]
    assert later["stats"]["aot_cache_hits"] == 1, later["stats"]
    assert later["stats"]["graphs_offloaded"] == 0
    # the CPU's vector ISAs came with the graphs (signed): the later client probed nothing
    assert later["stats"]["vec_isa_adopted"] == 1, later["stats"]
    # every kernel library the later client has came from the farm
    cache = tmp_path / "later" / "cache0"
    built = {f"inductor/{p.relative_to(cache)}" for p in cache.rglob("*.so")}
    assert built and built <= set(later["installed"]), built


def test_the_leader_gives_the_graphs_before_its_first_backward(farm: Any,
                                                                tmp_path: Path) -> None:
    """Other clients wait for the graphs a client leads: its backward compiles with the
    forward, so the farm has them after the backend call, not only after the first
    backward (lazily compiled, as stock does, the graphs would come that late, here
    never: this client runs no backward)."""
    farm.reset()
    (first,) = _clients(farm, tmp_path / "first", 1, graphs=True,
                        env={"FARM_CLIENT_FORWARD_ONLY": "1"})
    torch.testing.assert_close(first["result"][0], _stock()[0])
    stats = farm.stats()
    assert stats["compiles"] == 2 and stats["graphs_puts"] == 1, stats
    assert first["stats"]["farm"] == {"compiled": 2}, first["stats"]["farm"]

    farm.reset(store=False)
    (later,) = _clients(farm, tmp_path / "later", 1, graphs=True)
    _assert_stock([later])
    assert later["stats"]["farm"] == {"graphs_hit": 1}, later["stats"]["farm"]
    assert farm.stats()["compiles"] == 0


def test_clients_at_once_wait_for_the_one_that_compiles(farm: Any, tmp_path: Path) -> None:
    farm.reset()
    results = _clients(farm, tmp_path, 3, graphs=True)
    _assert_stock(results)
    stats = farm.stats()
    # one client traced the graph and asked the workers (forward, backward); the other
    # two waited for its graphs (or found them, if they came after it gave them)
    assert stats["requests"] == 2 and stats["compiles"] == 2, stats
    assert stats["graphs_puts"] == 1, stats
    assert stats["graphs_joins"] + stats["graphs_hits"] == 2, stats
    outcomes = sorted(str(sorted(r["stats"]["farm"].items())) for r in results)
    assert outcomes[0] == "[('compiled', 2)]", outcomes
    assert all(o in ("[('graphs_joined', 1)]", "[('graphs_hit', 1)]")
               for o in outcomes[1:]), outcomes
    assert sum(r["stats"]["graphs_offloaded"] for r in results) == 2


def test_clients_that_do_not_wait_join_the_compiles_instead(farm: Any,
                                                           tmp_path: Path) -> None:
    """``farm_graph_wait=0``: no client waits for another's graphs; each traces the graph
    and its requests join the one compile per request at the farm."""
    farm.reset()
    results = _clients(farm, tmp_path, 3, graphs=True,
                       env={"FXOFFLOAD_FARM_GRAPH_WAIT": "0"})
    _assert_stock(results)
    stats = farm.stats()
    assert stats["graphs_joins"] == 0 and stats["compiles"] == 2, stats
    assert stats["graphs_puts"] >= 1, stats
    # a client came after the graphs were given (a hit), or sent both its requests
    for r in results:
        farm_answers = r["stats"]["farm"]
        assert "graphs_joined" not in farm_answers, farm_answers
        assert farm_answers == {"graphs_hit": 1} or sum(farm_answers.values()) == 2, \
            farm_answers
