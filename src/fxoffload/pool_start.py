"""When a background backend's worker pool starts: with the backend, or, where
AOTAutograd's cache could answer, at the first graph that misses it (a restart whose
graphs all hit then starts no worker), or, where cores are scarce, with the first graph's
compile here. With the pool, Inductor's own compile pool in this process, where a graph
will compile here (``warm_for_here``); and where a graph ready before any worker is warm
compiles (``cold_route``: here).

    backend made ── waits_for_miss? ── no ──► scarce_cores? ── no ──► pool.warmup(full=False)
                          │ yes                    │ yes             now, warm_for_here
                          │                        └──► warm_for_here; the pool starts in
                          │                             cold_route, paused for that compile
    backend call ── on_miss(settings) ── AOTAutograd lookup ── miss ──► the same
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

from .settings import Settings

log = logging.getLogger("fxoffload")

# The background settings of the backend call in progress on this thread, whose pool
# starts at its first AOTAutograd cache miss (``waits_for_miss``).
_settings: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "fxoffload_pool_on_miss", default=None)


def _has_pool(settings: Settings) -> bool:
    return settings.background and settings.base_mode == "subprocess"


def waits_for_miss(settings: Settings) -> bool:
    """Whether ``settings``' worker pool waits for the first AOTAutograd cache miss
    instead of starting with the backend. A process whose graphs all hit the caches (a
    restart) then starts no worker: on 2 cores, a worker importing torch beside compiled
    code made its calls take 220 ms instead of 0.35 ms for about 2 s. A miss is known
    when the first graph's lookup is done, after its first eager call (bench/README.md,
    2026-12-04). Only where a hit is possible: an empty cache dir (a cold start) or a
    cache that is off starts the pool now, as does the farm (its workers are warm)."""
    if not _has_pool(settings):
        return False
    from . import _compat

    return _compat.cache_can_hit() and _compat.watch_aot_cache_lookup(_start_if_missed)


def scarce_cores(settings: Settings) -> bool:
    """Whether a worker of ``settings``' pool starting would take the cores that a compile
    here and the user's loop need (``cpu_threads.cores_are_scarce``; 2 cores: yes). Then
    an async backend starts no worker when it is made (one importing torch took the core
    that the first call and the graph's trace needed: first output 0.77-0.78x `eager`
    against 0.98-1.10x, bench/README.md 2026-12-07), and the pool is paused while a graph
    compiles here (``cold_route``)."""
    from . import cpu_threads

    return cpu_threads.cores_are_scarce(settings.workers + 1)


def _start_if_missed(hit: bool) -> None:
    settings = _settings.get()
    if hit or settings is None:
        return
    from .errors import FxOffloadError
    from .executors import get_executor

    try:
        executor = get_executor(settings)
        executor.warmup(wait=False, full=False)
    except FxOffloadError as e:  # the submit that follows reports it
        log.debug("fxoffload: pool not started at the cache miss: %s", e)
    else:
        warm_for_here(settings, executor)


def warm_for_here(settings: Settings, executor: Any) -> None:
    """A background graph compiles in this process where the executor is in-process
    (``serde``) or its pool has no warm worker yet (the cold route in background.py):
    start Inductor's Triton compile pool for it now, as stock's ``torch.compile`` does
    when called, so that its kernels build in parallel, not one by one on our thread
    (the pool is made at the first kernel otherwise, and used only once ready)."""
    from . import compile_pool

    if settings.base_mode == "serde" or executor.starting():
        compile_pool.warm()


@contextlib.contextmanager
def on_miss(settings: Settings) -> Iterator[None]:
    """Inside a backend call: a miss starts ``settings``' pool (a no-op once started)."""
    if not _has_pool(settings):
        yield
        return
    token = _settings.set(settings)
    try:
        yield
    finally:
        _settings.reset(token)


def cold_route(settings: Settings
               ) -> tuple[Settings, contextlib.AbstractContextManager[Any]] | None:
    """Where a background graph's first stage compiles while ``settings``' pool has no
    warm worker yet: a cold worker's start-up, then its first compile, reach compiled code
    later than compiling here would (H100, bench GPT-2: 15.2 s against 10.1 s; stock
    10.0 s). Then: the settings that compile it on our in-process thread (counted as
    ``compiled_in_process["no_warm_worker"]``), and the pool's pause for that compile,
    only where the pool's start-up would take the cores it needs
    (``scarce_cores``); on a larger machine the workers keep starting
    for the graphs to come. None: the pool's (warm workers that are all busy are waited
    for, as stock compiles its graphs one by one; a closed pool's submit says so)."""
    import dataclasses

    from .errors import PoolClosed
    from .executors import get_executor
    from .tally import STATS

    pool = get_executor(settings)
    if not pool.starting():
        return None
    try:
        pool.warmup(wait=False)
    except PoolClosed:
        return None
    STATS.count_in_process("no_warm_worker")
    here = dataclasses.replace(settings, mode="async+serde")
    if scarce_cores(settings):
        return here, pool.paused()
    return here, contextlib.nullcontext()
