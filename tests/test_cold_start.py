"""Never slower than stock with a cold pool: a compile that finds no warm worker free
compiles here at once, synchronous or in the background (the pool warms up meanwhile for
later graphs); a worker that comes up with a request already waiting skips its warm-up;
and an exit while workers start is quiet."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import torch
from models import MLP

import fxoffload
from fxoffload.executors import get_executor


def _fresh(**kw: Any) -> fxoffload.Settings:
    # compile_threads=1 is in no other test's settings: a pool of its own, cold.
    return fxoffload.Settings.resolve(workers=1, compile_threads=1, **kw)


def test_sync_compile_with_a_cold_pool_runs_here_and_the_pool_warms_for_the_next() -> None:
    settings = _fresh(mode="subprocess")
    pool = get_executor(settings)
    assert not pool.ready_now()
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 16)
    start = time.monotonic()
    out = torch.compile(model, backend=fxoffload.backend(settings))(x)
    torch.testing.assert_close(out, model(x))
    snap = fxoffload.stats()
    assert dict(snap.compiled_in_process) == {"no_warm_worker": 1}, snap
    assert snap.graphs_offloaded == 0 and dict(snap.fallbacks) == {}
    assert time.monotonic() - start < 120
    pool.warmup(wait=True)  # started by that compile; now warm
    assert pool.ready_now() and len(pool.worker_pids()) == 1
    torch._dynamo.reset()
    out = torch.compile(model, backend=fxoffload.backend(settings))(x)
    torch.testing.assert_close(out, model(x))
    assert fxoffload.stats().graphs_offloaded == 1
    assert dict(fxoffload.stats().compiled_in_process) == {"no_warm_worker": 1}


def test_async_compile_with_a_cold_pool_runs_on_our_thread_and_the_pool_warms() -> None:
    """async+subprocess, no warm worker when the graph is ready: compiled on our
    in-process thread at once (a cold worker's start-up would come first), counted as
    compiled in-process, not offloaded; the next graph goes to the warmed pool."""
    settings = _fresh(mode="async+subprocess")
    pool = get_executor(settings)
    assert not pool.ready_now()
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend=fxoffload.backend(settings))
        torch.testing.assert_close(compiled(x), model(x))  # eagerly
        assert fxoffload.wait(300)
        torch.testing.assert_close(compiled(x), model(x))
    snap = fxoffload.stats()
    assert dict(snap.compiled_in_process) == {"no_warm_worker": 1}, snap
    assert snap.graphs_offloaded == 0 and snap.swaps == 1 and dict(snap.fallbacks) == {}
    assert snap.compiled_runs >= 1
    pool.warmup(wait=True)  # started by that graph
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend=fxoffload.backend(settings))
        compiled(x * 2)
        assert fxoffload.wait(300)
        torch.testing.assert_close(compiled(x * 2), model(x * 2))
    snap = fxoffload.stats()
    assert snap.graphs_offloaded + snap.fx_cache_hits + snap.aot_cache_hits >= 1, snap
    assert dict(snap.compiled_in_process) == {"no_warm_worker": 1}, snap


def test_on_scarce_cores_an_async_pool_starts_after_the_first_compile() -> None:
    """Where cores are scarce (2 on CI), an async backend starts no worker when it is
    made: a worker importing torch would take the core that the first call and the
    graph's trace need (first output 0.77-0.78x `eager` against 0.98-1.10x, bench/README).
    The first graph compiles here; the pool starts with it, for later graphs."""
    from fxoffload import cpu_threads, pool_start

    settings = _fresh(mode="async+subprocess", startup_timeout=301.0)  # a pool of its own
    if not pool_start.scarce_cores(settings):
        pytest.skip(f"{cpu_threads.cores()} cores are not scarce for one worker")
    pool = get_executor(settings)
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend=fxoffload.backend(settings))
        # A worker started with the backend would be warm by the time the graph is
        # ready, and would take it (a14a2f5: offloaded, not compiled here).
        time.sleep(3)
        torch.testing.assert_close(compiled(x), model(x))  # eagerly
        assert fxoffload.wait(300)
        torch.testing.assert_close(compiled(x), model(x))
    assert dict(fxoffload.stats().compiled_in_process) == {"no_warm_worker": 1}
    pool.warmup(wait=True)  # started by that graph
    assert len(pool.worker_pids()) == 1


def test_a_worker_that_comes_up_to_a_waiting_request_skips_its_warm_up(
        caplog: pytest.LogCaptureFixture) -> None:
    """progressive+subprocess with a cold pool: the first stage compiles here, the later
    stage waits for the starting worker, which skips its warm-up for it."""
    settings = _fresh(mode="progressive+subprocess", nice=0)
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 16)
    with caplog.at_level(logging.DEBUG, logger="fxoffload.pool"), torch.no_grad():
        compiled = torch.compile(model, backend=fxoffload.backend(settings))
        compiled(x)  # eagerly; the last stage waits for the worker, which is starting
        assert fxoffload.wait(300)
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    snap = fxoffload.stats()
    assert dict(snap.compiled_in_process) == {"no_warm_worker": 1}, snap
    assert snap.graphs_offloaded == len(settings.config_stages) - 1, snap
    assert any("warm-up skipped for a waiting request" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("mode", ["async+subprocess", "subprocess"])
def test_exit_while_workers_start_is_quiet(mode: str, tmp_path: Any) -> None:
    """Exit with a worker still starting (async without wait(); a sync first compile that
    ran here): nothing about killed workers is printed."""
    script = textwrap.dedent(f"""
        import torch, fxoffload
        f = torch.compile(lambda x: x.sin() * 2, backend=fxoffload.backend(mode={mode!r}))
        print(f(torch.randn(8)).shape)
    """)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([8])" in out.stdout
    assert "fxoffload" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _soon(predicate: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_starting_workers_stand_still_while_the_parent_compiles() -> None:
    """paused(): a worker that is starting is stopped (SIGSTOP) while the parent compiles
    a graph itself, resumed RESUME_GRACE_S after, and then warms up as usual; no worker
    starts meanwhile."""
    from fxoffload.executors import pool as pool_module

    pool = get_executor(_fresh(mode="subprocess", startup_timeout=123.0))  # its own pool
    pool.warmup(wait=False)
    deadline = time.monotonic() + 60
    while not pool._workers and time.monotonic() < deadline:
        time.sleep(0.01)
    (worker,) = pool._workers.values()
    with pool.paused():
        assert _soon(lambda: _state(worker.pid) == "T")  # stopped (signals are async)
        time.sleep(1.0)
        assert _state(worker.pid) == "T" and not worker.ready
    assert _state(worker.pid) == "T"  # the grace after the compile
    time.sleep(pool_module.RESUME_GRACE_S)
    assert _soon(lambda: _state(worker.pid) != "T")
    pool.warmup(wait=True)
    assert pool.worker_pids() == [worker.pid] and pool.ready_now()
