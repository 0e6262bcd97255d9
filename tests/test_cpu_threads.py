"""While a worker compiles a CPU graph, the graph's eager stand-in runs with the intra-op
threads the worker leaves (one core fewer per busy worker, at least one), and the user's
thread count is back as soon as each call returns."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from extensions import THREADS_SEEN, WaitsForFile, record_threads

import fxoffload

CORES = len(os.sched_getaffinity(0))


def f(x: torch.Tensor) -> torch.Tensor:
    return record_threads(x.sin()) * 2


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to leave one to the worker")
def test_eager_stand_in_leaves_the_busy_worker_its_core(tmp_path: Any) -> None:
    user_threads = torch.get_num_threads()
    torch.set_num_threads(CORES)
    try:
        gate = tmp_path / "release"
        x = torch.randn(8, 8)
        THREADS_SEEN.clear()
        fxoffload.warmup(mode="async+subprocess", workers=1)  # else it compiles here
        with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile(str(gate))):
            compiled = torch.compile(f, backend=fxoffload.backend(mode="async+subprocess",
                                                                  workers=1))
            torch.testing.assert_close(compiled(x), f(x))  # eager: the compile waits
            # A deferred trace hands the graph to the worker after the first call:
            # call again once the worker compiles.
            deadline = time.monotonic() + 120
            while fxoffload.stats().background_compiles == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            THREADS_SEEN.clear()
            torch.testing.assert_close(compiled(x), f(x))  # eager beside the busy worker
        assert torch.get_num_threads() == CORES  # restored after the call
        assert fxoffload.stats().eager_runs == 2
        assert THREADS_SEEN[0] == CORES - 1, THREADS_SEEN  # the eager stand-in, capped
        gate.touch()
        assert fxoffload.wait(300)
        THREADS_SEEN.clear()
        torch.testing.assert_close(compiled(x), f(x))
        assert fxoffload.stats().compiled_runs == 1
        # the compiled code (and the reference call) run with the user's threads again
        assert THREADS_SEEN[0] == CORES and torch.get_num_threads() == CORES, THREADS_SEEN
    finally:
        torch.set_num_threads(user_threads)


def test_serde_compiles_do_not_cap_threads(tmp_path: Any) -> None:
    """A compile on this process's own thread (async+serde) is no worker beside us."""
    x = torch.randn(8, 8)
    THREADS_SEEN.clear()
    gate = tmp_path / "release"
    with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile(
            str(gate), serde_thread=True)):
        compiled = torch.compile(f, backend=fxoffload.backend(mode="async+serde"))
        compiled(x)
    gate.touch()
    assert fxoffload.wait(300)
    assert THREADS_SEEN[0] == torch.get_num_threads(), THREADS_SEEN


def test_eager_stand_ins_pace_themselves_only_where_cores_are_scarce(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a compile of ours in flight, an eager stand-in's run is followed by a pause
    of _PACE times its length where the cores are scarce; with cores to spare, none."""
    from fxoffload import cpu_threads

    def paused_for(cores: int) -> float:
        monkeypatch.setattr(cpu_threads, "cores", lambda: cores)
        t0 = time.perf_counter()
        cpu_threads.pace(0.05)
        return time.perf_counter() - t0

    assert paused_for(2) < 0.04  # nothing of ours in flight
    cpu_threads.here_started()
    try:
        assert paused_for(2) >= 0.05 * cpu_threads._PACE
        assert paused_for(16) < 0.04
    finally:
        cpu_threads.here_ended()
    with cpu_threads.tracing():
        assert paused_for(1) >= 0.05 * cpu_threads._PACE
    assert paused_for(1) < 0.04
