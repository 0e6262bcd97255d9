"""Ranks stay in step: three gloo ranks (torchrun) run a step with a collective through
``async+farm``. A graph with collectives is compiled before its first call on every rank
(never eager on one rank and compiled on another: the order of collectives could differ
and hang the job); the farm compiles it once for all ranks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_ranks_share_one_compile_and_stay_in_step(farm: Any, tmp_path: Path) -> None:
    mode = "async+farm"  # the schedule that could let ranks drift apart; sync cannot
    farm.reset()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         "--log-dir", str(tmp_path / "torchrun"),  # else a /tmp/torchelastic_* stays
         str(HERE / "farm_rank.py"), mode, str(tmp_path)],
        env={**farm.env(), "OMP_NUM_THREADS": "1",
             "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r in ranks:
        assert r["same"], ranks
        assert r["eager_runs"] == 0, ranks  # compiled from the first call on every rank
        assert r["fallbacks"] == {}, ranks
        # one graph per rank: sent to the farm, or its whole graph (farm.graphs) taken
        # from the rank that sent it
        assert r["offloaded"] + r["farm"].get("graphs_joined", 0) \
            + r["farm"].get("graphs_hit", 0) == 1, ranks
    stats = farm.stats()
    assert stats["compiles"] == 1 and stats["compiles_per_key_max"] == 1, stats
    assert sorted(sum(r["farm"].values()) for r in ranks) == [1, 1, 1]
