"""``serde``: the whole serialize → compile → serialize path in this process.

Synchronous modes compile in the calling thread. Background modes (``async+serde``) need
the call to return at once, so they compile on one daemon thread, one request at a time;
that thread shares this process's Inductor config (see ``isolation`` for what is kept
apart from the user's thread). As a mode it is meant for tests and for debugging the
boundary; the background modes also use that thread for a graph that is ready while the
worker pool is still cold (``background.BackgroundOutput.start``)."""

from __future__ import annotations

import atexit
import queue
import threading
import time
from concurrent.futures import Future

from .. import isolation
from ..child import compile_request
from ..errors import PoolClosed
from .base import Executor


def _run(request: bytes, future: Future[bytes]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    future.started = time.perf_counter()  # type: ignore[attr-defined]
    try:
        future.set_result(compile_request(request, in_parent=True))
    except BaseException as e:  # noqa: BLE001 - delivered through the future
        future.set_exception(e)


class InProcessExecutor(Executor):
    name = "serde"

    def __init__(self, *, background: bool = False) -> None:
        self._background = background
        self._jobs: queue.SimpleQueue[tuple[bytes, Future[bytes]] | None] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            # A compile killed mid-way by interpreter teardown aborts the process from
            # C++; at exit, pending jobs are dropped and the current one ends. Registered
            # now (the executor is made on first use), before any deferred trace's exit
            # hook, so that hook runs first and its trace's compile is seen to here.
            atexit.register(self.shutdown)

    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        future: Future[bytes] = Future()
        if not self._background:
            _run(request, future)
            return future
        with self._lock:
            if self._closed:
                future.set_exception(PoolClosed("the fxoffload executor was shut down"))
                return future
            if self._jobs is None:
                from .._compat import import_before_threads

                import_before_threads()
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, args=(self._jobs,),
                                                daemon=True, name="fxoffload-serde")
                self._thread.start()
            self._jobs.put((request, future))
        return future

    def _serve(self, jobs: queue.SimpleQueue[tuple[bytes, Future[bytes]] | None]) -> None:
        while (job := jobs.get()) is not None:
            # Not at once with another trace or compile of ours (the FX node metadata is
            # process-global), and marked as ours: no RNG restore, no FX tracing flag or
            # patches seen by the user's thread (isolation). Dynamo's compile lock is not
            # taken: the user's next frames would wait for the whole compile.
            with isolation.turn, isolation.our_thread():
                _run(*job)

    def shutdown(self, *, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            jobs, self._jobs = self._jobs, None
        if jobs is None:
            return
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job[1].set_running_or_notify_cancel():
                job[1].set_exception(PoolClosed("the fxoffload executor was shut down"))
        jobs.put(None)
        if wait and self._thread is not None:
            self._thread.join()
