"""What runs in the background, and waiting for it: the count of deferred traces and
background compiles in flight behind ``fxoffload.wait()``, and the receiver thread that
takes each compile's arrival off the executor's threads.

    deferred.Deferred / BackgroundOutput.start ─► started() ... finished() ─► wait() returns
    executor thread: future done ─► receive(handler, stage, future) ─► fxoffload-receiver
                                                     thread: handler(stage, future)

Nothing starts at import: the receiver thread starts with the first arrival.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .tally import STATS

log = logging.getLogger("fxoffload")

_idle = threading.Condition()


def wait(timeout: float | None = None) -> bool:
    """Block until no background compile is in flight; False if ``timeout`` ran out."""
    with _idle:
        return _idle.wait_for(lambda: STATS.background_pending == 0, timeout)


def started(**counts: int) -> None:
    with _idle:
        STATS.add(background_pending=1, **(counts or {"background_compiles": 1}))


def finished() -> None:
    with _idle:
        STATS.add(background_pending=-1)
        _idle.notify_all()


def exiting() -> bool:
    """The interpreter is exiting: the main thread has finished (a compile that fails now
    fails because torch is shutting down, and nobody will call the graph again)."""
    return not threading.main_thread().is_alive()


_receiver_lock = threading.Lock()
_receiver_queue: Any = None


def receive(handler: Callable[[Any, Any], None], stage: Any, future: Any) -> None:
    """Run ``handler(stage, future)`` on the receiver thread: one daemon thread, started on
    first use, so decoding is kept off the executor's threads, which go on to the next
    compile at once."""
    global _receiver_queue
    with _receiver_lock:
        if _receiver_queue is None:
            import queue

            _receiver_queue = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(_receiver_queue,), daemon=True,
                             name="fxoffload-receiver").start()
        _receiver_queue.put((handler, stage, future))


def _serve(jobs: Any) -> None:
    while True:
        handler, stage, future = jobs.get()
        try:
            handler(stage, future)
        except BaseException as e:  # a receiver must not die: later arrivals would wait
            log.exception("fxoffload: unexpected failure after receiving a compile: %s", e)
