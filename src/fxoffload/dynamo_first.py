"""Dynamo's compile lock, shared between the user's Dynamo and fxoffload's front threads
(``deferred``) so that the user's Dynamo comes first.

A front thread holds Dynamo's compile lock while it traces, as Dynamo's own compiles do:
much of torch's tracing machinery is process-global. But a model with graph breaks has
Dynamo convert its next frame right after the first graph's eager run, and that
conversion then waited for the whole of the previous graph's trace: the first call paid
for every graph's AOTAutograd trace but the last (measured on 2 cores: a 4-graph model's
first output at 1.42x ``aot_eager``'s). So:

    user's thread:  Dynamo frame 1 ─► eager 1 ─► Dynamo frame 2 ─► eager 2 ─► ... returns
    front 1:             lookup ─► (yields the lock while Dynamo is busy) ─► trace 1
    front 2:                                  lookup ─► (yields) ─────────────► trace 2

- After AOTAutograd's cache lookup misses (the first call has stopped waiting for it), a
  front thread releases the lock and takes it back once no Dynamo conversion has run on
  another thread for ``QUIET`` seconds (at most ``MAX_YIELD`` seconds of waiting).
- A first call does not wait for a lookup stuck behind another front thread's trace: it
  runs eagerly, and a cache hit is used at the next call after that trace.

The lock is released only at the lookup, where the front thread has not started tracing:
Dynamo's conversions run there as they would between two stock compiles.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

QUIET = 0.05
MAX_YIELD = 2.0

_cond = threading.Condition()
_busy = 0  # Dynamo conversions in progress on other threads than front threads
_idle_since = 0.0
_holders = 0  # front threads holding the compile lock (and not yielding it)
_installed = False


def acquire(lock: Any, is_front: Callable[[], bool], waited_behind_front: Callable[[], None]
            ) -> None:
    """Take ``lock`` for a front thread; call ``waited_behind_front`` once if another
    front thread holds it (rather than the user's Dynamo, which lets go at its
    conversion's end)."""
    global _holders
    install(is_front)
    told = False
    while not lock.acquire(timeout=0.01):
        if not told and _holders > 0:
            told = True
            waited_behind_front()
    with _cond:
        _holders += 1


def release(lock: Any) -> None:
    global _holders
    with _cond:
        _holders -= 1
    lock.release()


def yield_to_dynamo(lock: Any) -> None:
    """On a front thread that holds ``lock`` once, outside any trace: let the user's
    Dynamo conversions run until they have been quiet for ``QUIET`` seconds."""
    global _holders
    if not lock._is_owned():
        return
    with _cond:
        _holders -= 1
    state = lock._release_save()
    try:
        deadline = time.monotonic() + MAX_YIELD
        with _cond:
            while True:
                now = time.monotonic()
                quiet = _busy == 0 and now - _idle_since >= QUIET
                if quiet or now >= deadline:
                    break
                _cond.wait(min(deadline - now, QUIET))
    finally:
        lock._acquire_restore(state)
        with _cond:
            _holders += 1


def install(is_front: Callable[[], bool]) -> None:
    """Once: count Dynamo's conversions on threads that are not front threads (the
    callback Dynamo calls for a frame it has no cache entry for)."""
    global _installed
    if _installed:
        return
    _installed = True
    from torch._dynamo import convert_frame

    cls = convert_frame.CatchErrorsWrapper
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if is_front():
            return original(self, *args, **kwargs)
        _converting(+1)
        try:
            return original(self, *args, **kwargs)
        finally:
            _converting(-1)

    cls.__call__ = __call__  # type: ignore[method-assign]


def _converting(delta: int) -> None:
    global _busy, _idle_since
    with _cond:
        _busy += delta
        if _busy == 0:
            _idle_since = time.monotonic()
            _cond.notify_all()
