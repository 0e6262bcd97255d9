"""``subprocess``: a pool of warm worker processes.

    submit(bytes) ─► job queue ─► slot thread k ─► pipe ─► worker k (fxoffload.worker)
        ▲                              │                      │
        └──────── Future[bytes] ◄──────┴────── pipe ◄─────────┘

Each slot owns one worker process (``process.WorkerProcess``) and one thread in the
parent. The thread starts its worker (on first use), waits for READY, hands it a job that
is already waiting (the worker then skips its warm-up) or waits for WARM, then takes jobs
from the shared queue, one at a time. A worker that dies, hangs past the deadline, or
answers with bytes that are not an envelope fails *that* job's future with a typed
``WorkerError`` (naming the exit code or signal), is killed and reaped, and is replaced
before the slot takes its next job. If workers keep failing to start, the pool is broken:
that error fails every pending and later future, so callers fall back instead of waiting.

``ready_now()`` says whether a warm worker is free: a synchronous compile that finds none
is compiled by the parent itself, inside ``paused()``, in which no worker starts and the
starting ones stand still (SIGSTOP), so the pool never makes that compile slower.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from .. import timeline
from ..errors import (
    PoolClosed,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
)
from ..settings import Settings
from ..tally import STATS, Stats
from .base import Executor
from .process import WorkerProcess

log = logging.getLogger("fxoffload.pool")

MAX_STARTUP_FAILURES = 3
# After the parent's own compile (paused()), workers wait this long before they start.
RESUME_GRACE_S = 2.0


@dataclass
class _Job:
    request: bytes
    future: Future[bytes]
    timeout: float


# Not a compile: asks the slot that takes it to replace its worker if that one died idle
# (sent by ``warmup``, so a dead worker is replaced before the next compile needs one).
_PROBE = _Job(b"", Future(), 0.0)


class WorkerPool(Executor):
    name = "subprocess"
    out_of_process = True

    def __init__(self, settings: Settings, stats: Stats = STATS) -> None:
        self.settings = settings
        self.stats = stats
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._workers: dict[int, WorkerProcess] = {}
        self._closed = False
        self._broken: WorkerError | None = None
        self._startup_failures = 0
        # Workers warm up with a tiny compile, unless the pool was started only because a
        # compile is about to come (a background backend was made; warmup(full=False)).
        self._warm_compile = False
        self._holds = 0  # callers inside paused()
        self._paused = False  # from the first paused() until RESUME_GRACE_S after the last
        self._held_since = 0.0
        self._resume_timer: threading.Timer | None = None
        self._resumed = threading.Condition(self._lock)

    # -- public -------------------------------------------------------------------
    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        future: Future[bytes] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(PoolClosed("the fxoffload worker pool was shut down"))
                return future
            if self._broken is not None:
                future.set_exception(self._broken)
                return future
            self._start_locked()
            self._jobs.put(_Job(request, future, timeout or self.settings.timeout))
        return future

    def warmup(self, *, wait: bool = False, full: bool = True) -> None:
        with self._lock:
            self._warm_compile |= full
            if self._closed:
                raise PoolClosed("the fxoffload worker pool was shut down")
            self._start_locked()
            dead = sum(1 for w in self._workers.values() if w.ready and not w.alive())
        for _ in range(dead):
            self._jobs.put(_PROBE)
        if wait:
            # Every slot has a ready worker (a replacement counts only once it is ready).
            deadline = time.monotonic() + self.settings.startup_timeout
            while (len(self.worker_pids()) < self.settings.workers and self._broken is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The pids of the warm workers."""
        with self._lock:
            return [w.pid for w in self._workers.values() if w.warm and w.alive()]

    def ready_now(self) -> bool:
        with self._lock:
            return not self._closed and self._broken is None and any(
                w.warm and not w.busy and w.alive() for w in self._workers.values())

    def starting(self) -> bool:
        with self._lock:
            return not self._closed and self._broken is None and not any(
                w.warm and w.alive() for w in self._workers.values())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While the parent compiles a graph itself because no worker was warm: no worker
        starts, and those starting are stopped (SIGSTOP to their process group), their
        start-up deadlines moved by the time they stood. On a small machine a starting
        worker slowed that compile by 10-15% even in the idle CPU class (shared cores and
        caches). A stopped worker still dies with the thread that started it (worker.main:
        PR_SET_PDEATHSIG), and shutdown resumes it first."""
        with self._lock:
            self._holds += 1
            if self._resume_timer is not None:  # a compile soon after the last one
                self._resume_timer.cancel()
                self._resume_timer = None
            if not self._paused:
                self._paused = True
                self._held_since = time.monotonic()
                for worker in self._workers.values():
                    if not worker.warm and worker.alive():
                        worker.signal_group(signal.SIGSTOP)
        try:
            yield
        finally:
            with self._lock:
                if self._holds > 0:
                    self._holds -= 1
                    if self._holds == 0 and self._paused and not self._closed:
                        # Not at once: the compiled graph's first run follows, and often a
                        # backward's compile right after it.
                        self._resume_timer = threading.Timer(RESUME_GRACE_S, self._resume)
                        self._resume_timer.daemon = True
                        self._resume_timer.start()

    def _resume(self) -> None:
        with self._lock:
            if self._holds == 0:
                self._resume_locked()

    def _resume_locked(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        if not self._paused:
            return
        self._paused = False
        stood = time.monotonic() - self._held_since
        for worker in self._workers.values():
            if worker.stopped:
                worker.signal_group(signal.SIGCONT)
                worker.startup.extend(stood)
        self._resumed.notify_all()

    def shutdown(self, *, wait: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._holds = 0
            self._resume_locked()
            for _ in self._threads:
                self._jobs.put(None)
            workers = list(self._workers.values())
        self._fail_pending(PoolClosed("the fxoffload worker pool was shut down"))
        # An idle worker is stopped by its slot thread (it gets the stop signal); one that
        # compiles or starts up is killed here, and its slot thread, reading its pipes,
        # sees them close and ends it. Pipes are closed by their reader only.
        if wait:
            for worker in workers:
                if worker.busy or not worker.warm:
                    worker.terminate()
            for thread in self._threads:
                thread.join(10.0)
        for worker in workers:  # at exit; or a slot thread that did not end in time
            worker.terminate()


    # -- internals ----------------------------------------------------------------
    def _start_locked(self) -> None:
        if self._threads:
            return
        atexit.register(self.shutdown, wait=False)
        for index in range(self.settings.workers):
            thread = threading.Thread(target=self._slot, args=(index,), daemon=True,
                                      name=f"fxoffload-slot-{index}")
            self._threads.append(thread)
            thread.start()

    def _fail_pending(self, error: WorkerError) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
            elif job is None:
                self._jobs.put(None)  # keep the stop signal for the slot threads
                return

    def _spawn(self, index: int, replacing: bool) -> WorkerProcess | None:
        with self._lock:  # not while the parent compiles a graph itself (paused)
            while self._paused and not self._closed:
                self._resumed.wait()
        t0 = time.perf_counter()
        try:
            worker = WorkerProcess(self.settings, warm_compile=self._warm_compile)
            t1 = time.perf_counter()
            with self._lock:
                self._workers[index] = worker
                if self._paused:  # paused() began while it was being started
                    worker.signal_group(signal.SIGSTOP)
            import_s = worker.wait_ready(self.settings.startup_timeout)
        except WorkerStartupError as e:
            self._startup_failed(index, e)
            return None
        self.stats.add(worker_starts=1, worker_replacements=1 if replacing else 0)
        if (tl := timeline.get()) is not None:  # start-up, on the worker's own track
            t2 = time.perf_counter()
            tl.span(f"start worker {worker.pid}", t0, t2, track=worker.pid,
                    track_name=f"worker {worker.pid}", step="start-up", pid=worker.pid,
                    slot=index, replacing=replacing, popen_s=round(t1 - t0, 4),
                    interpreter_s=round(max(0.0, t2 - t1 - import_s), 4),
                    import_s=round(import_s, 4))
            tl.flush()
        return worker

    def _warm(self, index: int, worker: WorkerProcess) -> WorkerProcess | None:
        """Wait for a worker's WARM (no job was waiting when it came up)."""
        try:
            worker.wait_warm(worker.startup)
        except WorkerStartupError as e:
            self._startup_failed(index, e)
            return None
        with self._lock:
            self._startup_failures = 0
        return worker

    def _startup_failed(self, index: int, error: WorkerStartupError) -> None:
        with self._lock:
            self._workers.pop(index, None)
            if self._closed:  # killed by shutdown (e.g. at exit) while starting: no news
                log.debug("fxoffload: %s (the pool was shut down)", error)
                return
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES and self._broken is None:
                self._broken = WorkerStartupError(
                    f"the fxoffload pool is broken: {self._startup_failures} workers "
                    f"failed to start; last error: {error}")
                broken = self._broken
            else:
                broken = None
        log.warning("fxoffload: %s", error)
        self.stats.count_worker_failure(error.reason)
        if broken is not None:
            log.error("%s", broken)
            self._fail_pending(broken)

    def _take(self, index: int, worker: WorkerProcess | None
              ) -> tuple[_Job | None, WorkerProcess | None]:
        """The next job. A worker that is not warm yet gets a job already waiting at once
        (it then skips its warm-up); with none waiting, it is let warm up first."""
        if worker is not None and not worker.warm:
            try:
                return self._jobs.get_nowait(), worker
            except queue.Empty:
                worker = self._warm(index, worker)
        return self._jobs.get(), worker

    def _slot(self, index: int) -> None:
        worker: WorkerProcess | None = self._spawn(index, replacing=False)
        replacing = False
        while not self._closed:
            job, worker = self._take(index, worker)
            if job is None or self._closed:
                if job is not None and job.future.set_running_or_notify_cancel():
                    job.future.set_exception(PoolClosed("the fxoffload pool was shut down"))
                break
            if worker is not None and not worker.alive():  # died while idle
                code = worker.kill()
                self._note_failure(WorkerCrashed(worker.pid, code, "while idle"))
                worker, replacing = None, True
            if job is _PROBE:
                if worker is None:
                    worker = self._spawn(index, replacing)
                elif self._any_dead():  # meant for another slot's worker
                    self._jobs.put(_PROBE)
                    time.sleep(0.01)
                continue
            if worker is None:
                worker = self._spawn(index, replacing)
                if worker is None:
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(self._broken or WorkerStartupError(
                            "no fxoffload worker could be started for this compile"))
                    if self._broken is not None:
                        return
                    continue
            if not job.future.set_running_or_notify_cancel():
                continue
            # Read by background compiles for queue-wait stats and the timeline.
            job.future.started = time.perf_counter()  # type: ignore[attr-defined]
            job.future.worker_pid = worker.pid  # type: ignore[attr-defined]
            worker.busy = True
            try:
                job.future.set_result(worker.run(job.request, job.timeout))
            except WorkerError as e:
                self._note_failure(e)
                job.future.set_exception(e)
                worker, replacing = None, True
            except BaseException as e:  # noqa: BLE001 - never leave a future pending
                job.future.set_exception(WorkerError(f"unexpected pool failure: {e!r}"))
                worker.kill()
                worker, replacing = None, True
            else:
                worker.busy = False
                with self._lock:
                    self._startup_failures = 0
            if worker is None and not self._closed:
                # Replace now, not at the next job, so the next compile finds a warm worker.
                worker = self._spawn(index, replacing)
        if worker is not None:
            worker.stop()

    def _any_dead(self) -> bool:
        with self._lock:
            return any(w.ready and not w.alive() for w in self._workers.values())

    def _note_failure(self, error: WorkerError) -> None:
        if self._closed:  # shutdown killed it
            log.debug("fxoffload: %s (the pool was shut down)", error)
            return
        self.stats.count_worker_failure(error.reason)
        log.warning("fxoffload: %s; replacing the worker", error)
