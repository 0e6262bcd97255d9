"""When a background backend's worker pool starts: with the backend, or, where
AOTAutograd's cache could answer, at the first graph that misses it (a restart whose
graphs all hit then starts no worker). With the pool, Inductor's own compile pool in
this process, where a graph will compile here (``warm_for_here``).

    backend made ── waits_for_miss? ── no ──► pool.warmup(full=False) now, warm_for_here
                          │ yes
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
    from . import _compat

    if settings.base_mode == "serde" or executor.starting():
        _compat.warm_inductor_compile_pool()


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
