"""The CPU this process's eager stand-ins use while compiles of ours run beside them.

In async and progressive modes a graph runs eagerly while its compile runs in a worker
process of this machine. If the graph runs on the CPU, its OpenMP parallel regions need
every intra-op thread at each barrier, and a thread that shares its core with the
worker's compiler stalls the whole region: measured on 2 cores, a tiny GPT-2 step took
112 ms (median) with 2 intra-op threads while a worker compiled, 0.95 ms with 1 (and
0.87 ms with 2 and no compile). Niceness does not help; leaving the workers their cores
does. So, for one eager run at a time, the intra-op threads are capped to the cores the
busy workers leave (at least one), and the user's setting comes back when the last
capped run returns. A ``torch.set_num_threads`` the user makes from another thread while
a capped run is in progress is overwritten when it ends.

Where the cores are scarce (fewer than two per compile or trace of ours in flight, plus
one for the user's loop), an eager stand-in also paces itself: after each run it sleeps
three times as long as the run took, so the user's loop uses a quarter of the CPU time it
would and the compile it waits for gets the rest. Measured on 2 cores (tiny GPT-2,
``async+subprocess`` cold, 2 fresh processes each): compiled code after 15.1 s instead of
20.4 s (stock's first call 13.6 s), 1,780 eager calls meanwhile instead of 11,329. With
cores to spare (16, the H100 machine) pacing changed nothing and is off.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

# Compiles in flight in worker processes of this machine (queued ones included: at most
# the largest pool's size of them run), and the intra-op thread count the user had
# before eager stand-ins capped it (restored when the last capped run returns).
_threads_lock = threading.Lock()
_worker_compiles = 0
_pool_workers = 0
_capped_runs = 0
_user_threads = 0
_here = 0  # traces and compiles on threads of ours in this process (pacing only)
# A paced eager run sleeps this many times its own duration.
_PACE = 3.0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)


def cores_are_scarce(busy: int) -> bool:
    """Fewer cores than two per compile (its Python and its kernel builds) for ``busy``
    compiles, plus one for the user's loop."""
    return busy > 0 and cores() < 2 * busy + 1


def here_started() -> None:
    """A trace or compile of ours started on a thread of this process: it paces the
    eager stand-ins where cores are scarce, but caps no intra-op threads (its kernel
    builds run in Inductor's compile workers, its Python shares our GIL)."""
    global _here
    with _threads_lock:
        _here += 1


def here_ended(_future: Any = None) -> None:
    global _here
    with _threads_lock:
        _here -= 1


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """A deferred trace runs on a front thread of ours meanwhile."""
    here_started()
    try:
        yield
    finally:
        here_ended()


def pace(elapsed: float) -> None:
    """After an eager stand-in's run of ``elapsed`` seconds: sleep ``_PACE`` times that
    where the cores are scarce (see the module docstring)."""
    with _threads_lock:
        busy = _busy_workers() + _here
    if cores_are_scarce(busy):
        time.sleep(elapsed * _PACE)


def _busy_workers() -> int:
    """Workers compiling now (queued compiles wait for a free one). Under _threads_lock."""
    return min(_worker_compiles, _pool_workers)


def compile_started(pool_workers: int) -> None:
    """A compile of ours started in a worker process of this machine's pool of
    ``pool_workers``."""
    global _worker_compiles, _pool_workers
    with _threads_lock:
        _worker_compiles += 1
        _pool_workers = max(_pool_workers, pool_workers)


def compile_ended(_future: Any) -> None:
    global _worker_compiles
    with _threads_lock:
        _worker_compiles -= 1


def user_threads() -> int:
    """The intra-op thread count the user set (not a cap of ours in force now)."""
    with _threads_lock:
        return _user_threads if _capped_runs else torch.get_num_threads()


@contextlib.contextmanager
def beside_workers() -> Iterator[None]:
    """Cap this process's intra-op threads to the cores the busy workers leave (at least
    one) for the duration of one eager run; the user's setting comes back afterwards."""
    global _capped_runs, _user_threads
    with _threads_lock:
        capped = _worker_compiles > 0
        if capped:
            if _capped_runs == 0:
                _user_threads = torch.get_num_threads()
            _capped_runs += 1
            torch.set_num_threads(max(1, min(_user_threads, cores() - _busy_workers())))
    try:
        yield
    finally:
        if capped:
            with _threads_lock:
                _capped_runs -= 1
                if _capped_runs == 0:
                    torch.set_num_threads(_user_threads)
