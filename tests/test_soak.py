"""Soak: compiles (200 in the full run, 30 in CI) through a pool of two workers, one of them
SIGKILLed about every 8 jobs, at a random moment. Every result is correct, nothing hangs
(a hard time limit), every kill is noticed, counted and the worker replaced, no C++ build
is left half-written in the Inductor cache, and no process (nor anything in a worker's
process group) is left after shutdown.

Each compile is a distinct graph (its constant differs), so each one is a real Inductor
compile with its own C++ kernel build, in the worker or, after a kill mid-compile, in the
in-process fallback. CI runs 30 compiles (2-4 kills, about a minute on the 2-core
machine); FXOFFLOAD_SOAK=1 runs the full 200 (5.5-6.5 minutes there: about 1.1 s of C++
build per compile, one at a time), FXOFFLOAD_SOAK_N sets any number, FXOFFLOAD_SOAK_SEED
the random seed (default: a new one, printed on failure). It found a real bug: the pool
used to SIGKILL a dead worker's process group at once, and a linker killed mid-write left
a truncated .so in the shared Inductor cache, which the in-process fallback then loaded
("file too short"); see ``executors.process._drain_group``. A later CI run found a cut-off
library even so: a compiler whose pipe lost its reader dies of SIGPIPE mid-write
(tests/test_cut_builds.py; ``executors.process.remove_cut_builds``)."""

from __future__ import annotations

import glob
import logging
import os
import random
import signal
import threading
import time
from typing import Any

import pytest
import torch

import fxoffload
from fxoffload.executors import get_executor
from fxoffload.executors.process import _cut_off

WORKERS = 2


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie is dead for our purposes


def _in_groups(groups: set[int]) -> list[int]:
    """Live processes whose process group is one of ``groups`` (a worker and whatever it
    started: compilers, Inductor's compile pool)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            if stat[0] != "Z" and stat[1] in groups:
                found.append(int(entry))
    return found


def _libraries() -> set[str]:
    root = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return set(glob.glob(os.path.join(root, "**", "*.so"), recursive=True))


class _Crashes(logging.Handler):
    """The WorkerCrashed errors the pool noticed (it logs each one as it replaces the
    worker)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[fxoffload.WorkerCrashed] = []

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, fxoffload.WorkerCrashed):
                self.errors.append(arg)


@pytest.mark.slow
@pytest.mark.timeout(1200, method="thread")  # a hang dumps every stack and ends the run
def test_soak_with_random_worker_kills(monkeypatch: pytest.MonkeyPatch) -> None:
    # Replacements skip the warm-up compile: they are ready in a second or two, and a job
    # that finds its worker dead (killed while idle) waits for that much, not ~15 s.
    monkeypatch.setenv("FXOFFLOAD_WORKER_WARMUP", "0")
    full = os.environ.get("FXOFFLOAD_SOAK") == "1"
    n = int(os.environ.get("FXOFFLOAD_SOAK_N") or (200 if full else 30))
    seed = int(os.environ.get("FXOFFLOAD_SOAK_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    where = f"(FXOFFLOAD_SOAK_SEED={seed})"
    settings = fxoffload.Settings.resolve(mode="subprocess", workers=WORKERS,
                                          compile_threads=1)
    pool: Any = get_executor(settings)
    pool.warmup(wait=True)
    assert len(pool.worker_pids()) == WORKERS
    seen: set[int] = set(pool.worker_pids())
    killed: list[int] = []
    timers: list[threading.Timer] = []
    crashes = _Crashes()
    logging.getLogger("fxoffload.pool").addHandler(crashes)
    libraries_before = _libraries()
    backend = fxoffload.backend(settings)
    fxoffload.reset_stats()

    def kill_one() -> None:
        end = time.monotonic() + 120
        while not (pids := pool.worker_pids()) and time.monotonic() < end:
            time.sleep(0.05)  # both workers being replaced: kill the first one back
        if pids:
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    def compile_and_check(i: int) -> None:
        torch._dynamo.reset()

        def f(x: torch.Tensor, c: float = 1.0 + i / 7) -> torch.Tensor:
            return (x * c).sin() + c  # c is a constant in the graph: a new kernel each time

        compiled = torch.compile(f, backend=backend, fullgraph=True)
        for _ in range(2):  # the compiling call and a plain call of the compiled code
            x = torch.randn(4, 8)
            torch.testing.assert_close(compiled(x), f(x), msg=lambda m: f"compile {i}: {m}")
        seen.update(pool.worker_pids())

    start, cpu0 = time.monotonic(), _cpu_s()
    next_kill = rng.randint(4, 9)
    try:
        for i in range(n):
            if i == next_kill and i < n - 5:  # the last kills still have jobs after them
                timers.append(threading.Timer(rng.uniform(0.0, 1.0), kill_one))
                timers[-1].start()
                next_kill += rng.randint(5, 10)
            compile_and_check(i)
        for timer in timers:
            timer.join()
        # A worker killed while idle is noticed when its slot takes its next job; run a few
        # more compiles until every kill has been noticed.
        extra = 0
        while {e.pid for e in crashes.errors} != set(killed) and extra < 40:
            compile_and_check(n + extra)
            extra += 1
        assert len(pool.worker_pids()) == WORKERS or _wait_for_workers(pool)
        elapsed, cpu = time.monotonic() - start, _cpu_s() - cpu0
        snap = fxoffload.stats()
    finally:
        logging.getLogger("fxoffload.pool").removeHandler(crashes)
        seen.update(pool.worker_pids())
        fxoffload.shutdown()

    print(f"soak: {n} + {extra} compiles, {len(killed)} kills, {elapsed:.0f} s, {cpu:.0f} CPU s, "
          f"load {os.getloadavg()[0]:.1f}, {where}, "
          f"{snap.as_dict()}")
    total = n + extra
    assert len(killed) == len(timers) >= n // 14, where  # 2 for CI's 30: kills at <= 9, <= 19
    assert len(set(killed)) == len(killed), where  # each victim was a live worker
    # Every kill was noticed once, as a SIGKILL, and its worker replaced.
    assert sorted(e.pid for e in crashes.errors) == sorted(killed), where
    assert all(e.returncode == -signal.SIGKILL for e in crashes.errors), where
    assert dict(snap.worker_failures) == {"worker_crashed": len(killed)}, where
    assert snap.worker_replacements == len(killed), where
    # A kill mid-compile made that compile fall back; a kill of an idle worker did not.
    mid_compile = sum(e.during == "while compiling" for e in crashes.errors)
    assert dict(snap.fallbacks) == ({"worker_crashed": mid_compile} if mid_compile else {}), \
        where
    assert snap.graphs_offloaded + snap.fallback_count == total, where
    # Every compile built its own kernel, and none of the builds is cut off.
    new = _libraries() - libraries_before
    assert len(new) >= total, f"{len(new)} new kernel libraries for {total} compiles"
    assert not [p for p in new if _cut_off(p)], where
    # No worker, and nothing a worker started, is left.
    assert len(seen) >= WORKERS + len(killed), where
    assert not [p for p in seen if _alive(p)], where
    assert not _in_groups(seen), where


def _cpu_s() -> float:
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _wait_for_workers(pool: Any, seconds: float = 300) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if len(pool.worker_pids()) == WORKERS:
            return True
        time.sleep(0.1)
    return False
