"""Shutting the pool down while its workers start up (the exit of a script whose pool
never got warm): no slot thread raises, and no worker outlives the shutdown.

Pipes are closed only by the thread that reads them. CI on 2026-12-04 caught a slot
thread reading a pipe that ``shutdown`` had closed under it (``OSError: [Errno 9] Bad
file descriptor``, printed as a thread traceback at exit): its ``select`` saw the killed
worker's stream end, and on a loaded 2-core machine the shutdown closed the descriptor
before the ``os.read`` that followed. That window is narrow (1 in 25 shutdowns here), so
the test holds it open: a slot thread whose ``select`` returns during the shutdown reads
only once the shutdown has returned, as a descheduled thread would."""

from __future__ import annotations

import select
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from test_faults import _alive, _wait_for

import fxoffload
from fxoffload import wire
from fxoffload.executors.pool import WorkerPool


@pytest.mark.parametrize("wait", [False, True])
def test_shutdown_while_workers_start(wait: bool, monkeypatch: Any) -> None:
    errors: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda a: errors.append(f"{a.thread.name}: {a.exc_value!r}"))
    in_shutdown, shut_down = threading.Event(), threading.Event()
    held: list[str] = []

    def slow_select(r: Any, w: Any, x: Any, timeout: float | None = None) -> Any:
        ready = select.select(r, w, x, timeout)
        name = threading.current_thread().name
        if in_shutdown.is_set() and name.startswith("fxoffload-slot"):
            held.append(name)
            shut_down.wait(5.0)  # bounded: shutdown(wait=True) joins this thread
        return ready

    monkeypatch.setattr(wire, "select", SimpleNamespace(select=slow_select))
    pids: set[int] = set()
    for delay in (0.05, 0.3, 1.0):  # from just after Popen to the worker's imports
        in_shutdown.clear()
        shut_down.clear()
        pool = WorkerPool(fxoffload.Settings.resolve(mode="subprocess", workers=2))
        pool.warmup()
        time.sleep(delay)
        with pool._lock:
            starting = [w for w in pool._workers.values() if not w.ready]
            pids |= {w.pid for w in pool._workers.values()}
        in_shutdown.set()
        pool.shutdown(wait=wait)
        shut_down.set()
        for thread in pool._threads:
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} did not end after shutdown"
        assert all(w.resp_r == -1 and w.req_w == -1 for w in starting), "a pipe left open"
    assert held, "no slot thread was reading a starting worker's pipe at shutdown"
    assert not errors, errors
    assert pids, "no worker was started"
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 10), \
        [p for p in pids if _alive(p)]
