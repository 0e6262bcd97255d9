"""The CPU this process's eager stand-ins use while workers compile beside them.

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
"""

from __future__ import annotations

import contextlib
import os
import threading
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


def worker_compile_started(pool_workers: int) -> None:
    global _worker_compiles, _pool_workers
    with _threads_lock:
        _worker_compiles += 1
        _pool_workers = max(_pool_workers, pool_workers)


def worker_compile_ended(_future: Any) -> None:
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
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
            busy = min(_worker_compiles, _pool_workers)
            torch.set_num_threads(max(1, min(_user_threads, cores - busy)))
    try:
        yield
    finally:
        if capped:
            with _threads_lock:
                _capped_runs -= 1
                if _capped_runs == 0:
                    torch.set_num_threads(_user_threads)
