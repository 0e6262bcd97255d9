"""``subprocess``: a pool of warm worker processes.

    submit(bytes) ─► job queue ─► slot thread k ─► pipe ─► worker k (fxoffload.worker)
        ▲                              │                      │
        └──────── Future[bytes] ◄──────┴────── pipe ◄─────────┘

Each slot owns one worker process and one thread in the parent. The thread starts its
worker (on first use), waits for READY, then takes jobs from the shared queue, one at a
time. A worker that dies, hangs past the deadline, or answers with bytes that are not an
envelope fails *that* job's future with a typed ``WorkerError`` (naming the exit code or
signal), is killed and reaped, and is replaced before the slot takes its next job.
If workers keep failing to start, the pool is broken: that error fails every pending and
later future, so callers fall back instead of waiting.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .. import timeline, wire
from ..errors import (
    PoolClosed,
    ProtocolError,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
    WorkerTimeout,
)
from ..settings import Settings
from ..tally import STATS, Stats
from .base import Executor

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


class _Worker:
    """One live worker process and the parent's ends of its two pipes."""

    def __init__(self, settings: Settings, *, warm_compile: bool = True) -> None:
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        env = dict(os.environ)
        env.pop("TORCHINDUCTOR_FX_COMPILE_MODE", None)  # no pool inside the pool
        # No structured trace of its own: the parent's log gets its compiles (worker.py).
        env.pop("TORCH_TRACE", None)
        env["FXOFFLOAD_PARENT_PID"] = str(os.getpid())
        env["FXOFFLOAD_WORKER_NICE"] = str(settings.worker_nice)
        if not settings.background:  # see worker.main
            env["FXOFFLOAD_WORKER_IDLE_START"] = "1"
        # Inductor's compile pool in each worker: a cold start compiles one or two graphs
        # at once, so the cores are shared among two workers, not all of them.
        threads = settings.compile_threads or max(
            1, (os.cpu_count() or 1) // min(2, settings.workers))
        if not warm_compile:
            env["FXOFFLOAD_WORKER_WARMUP"] = "init"  # see worker._warm_up
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fxoffload.worker", str(req_r), str(resp_w)],
                pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL, env=env,
                # Its own process group: the compilers and compile pools it starts can be
                # killed with it, and the terminal's Ctrl-C goes to the parent alone.
                start_new_session=True,
            )
        except OSError as e:
            for fd in (req_r, self.req_w, self.resp_r, resp_w):
                os.close(fd)
            raise WorkerStartupError(f"could not start a worker: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                os.close(req_r)
                os.close(resp_w)
        self.pid = self.proc.pid
        # Until WARM: a start-up that the pool's pause (SIGSTOP) does not count against.
        self.startup = wire.Deadline(settings.startup_timeout)
        self.stopped = False  # SIGSTOPped by WorkerPool.paused
        self.ready = False  # READY came: imported, takes requests
        self.warm = False  # WARM came: warmed up, or skipped it for a waiting request
        self.busy = False  # compiling a request now

    def wait_ready(self, timeout: float) -> float:
        try:
            envelope = wire.read_message(self.resp_r, self.startup, expect=wire.Kind.READY)
        except wire.StreamTimeout:
            self.kill()
            raise WorkerStartupError(
                f"worker pid {self.pid} did not become ready within {timeout:g} s"
            ) from None
        except (wire.StreamClosed, ProtocolError) as e:
            code = self.kill()
            raise WorkerStartupError(
                f"worker pid {self.pid} failed during start-up "
                f"({WorkerCrashed(self.pid, code, 'during start-up')}); {e}"
            ) from None
        self.ready = True
        self.startup = wire.Deadline(timeout)  # for its warm-up
        info = pickle.loads(envelope.payload)
        log.debug("fxoffload: worker pid %d ready in %.2f s", self.pid, info["startup_s"])
        return float(info["startup_s"])

    def wait_warm(self, deadline: wire.Deadline) -> dict[str, Any]:
        """Read the WARM message that follows READY (once); its payload: start-up seconds,
        phases, and whether the warm-up was skipped for a request already waiting."""
        try:
            envelope = wire.read_message(self.resp_r, deadline, expect=wire.Kind.WARM)
        except wire.StreamTimeout:
            self.kill()
            raise WorkerStartupError(
                f"worker pid {self.pid} did not finish warming up in time") from None
        except (wire.StreamClosed, ProtocolError) as e:
            code = self.kill()
            raise WorkerStartupError(
                f"worker pid {self.pid} failed while warming up "
                f"({WorkerCrashed(self.pid, code, 'while warming up')}); {e}") from None
        self.warm = True
        info: dict[str, Any] = pickle.loads(envelope.payload)
        log.debug("fxoffload: worker pid %d warm in %.2f s %s%s", self.pid, info["startup_s"],
                  info.get("phases", {}), " (warm-up skipped for a waiting request)"
                  if info.get("skipped") else "")
        return info

    def run(self, request: bytes, timeout: float) -> bytes:
        deadline = wire.Deadline(timeout)
        try:
            wire.write_all(self.req_w, request, deadline)
            if not self.warm:  # sent before its warm-up: it skips it, and says so first
                self.wait_warm(self.startup)
            frame = wire.read_frame(self.resp_r, deadline)
        except wire.StreamTimeout:
            self.kill()
            raise WorkerTimeout(self.pid, timeout, "its compile") from None
        except wire.StreamClosed:
            code = self.kill()
            raise WorkerCrashed(self.pid, code, "while compiling") from None
        except ProtocolError as e:
            self.kill()
            raise _CorruptResponse(f"worker pid {self.pid} sent a corrupted response: {e}"
                                   ) from None
        return frame

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        """Signal the worker and what it started (its own process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        self.stopped = sig == signal.SIGSTOP

    def kill(self) -> int | None:
        """Kill (if needed), reap and close; returns the exit status."""
        if self.stopped:  # a stopped group would never drain
            self.signal_group(signal.SIGCONT)
        if self.proc.poll() is None:
            # Give a dying process a moment to report its own exit status first.
            try:
                self.proc.wait(0.2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait()
        _drain_group(self.pid)
        for fd in (self.req_w, self.resp_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.req_w = self.resp_r = -1
        return code

    def stop(self, timeout: float = 5.0) -> None:
        if self.req_w >= 0 and self.alive():
            with contextlib.suppress(Exception):
                wire.write_all(self.req_w, wire.encode(wire.Kind.SHUTDOWN, b""),
                               wire.Deadline(1.0))
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


# How long what a dead worker started may take to finish before it is killed.
GROUP_DRAIN_S = 30.0


def _drain_group(pgid: int) -> None:
    """Let what a dead worker started (its process group: g++, ld, Inductor's compile
    pool) finish, SIGKILL whatever is still there after ``GROUP_DRAIN_S``, and return only
    once all of it is gone, so that nothing of the worker writes into the cache while the
    parent compiles the same graph. Killing the group at once is worse: a linker killed
    while it writes leaves a truncated ``.so`` at its final path in the shared Inductor
    cache, and Inductor, which only checks that the file exists, loads it: the in-process
    fallback, and every later compile of that kernel with that cache, fails ("file too
    short"). SIGTERM does not help (ld leaves the file too). In-flight compiles finish in
    seconds; Inductor's compile pool exits with the worker."""
    deadline = time.monotonic() + GROUP_DRAIN_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is alive. Zombies count for ``killpg`` (an orphan
    waits for whoever adopted it to reap it), so on Linux look for a live member."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue
            if group == str(pgid) and state not in ("Z", "X"):
                return True
    return False


class _CorruptResponse(WorkerError):
    reason = "corrupted_response"


class WorkerPool(Executor):
    name = "subprocess"

    def __init__(self, settings: Settings, stats: Stats = STATS) -> None:
        self.settings = settings
        self.stats = stats
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._workers: dict[int, _Worker] = {}
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
        for worker in workers:
            worker.stop(timeout=5.0 if wait else 0.0)
        if wait:
            for thread in self._threads:
                thread.join(10.0)


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

    def _spawn(self, index: int, replacing: bool) -> _Worker | None:
        with self._lock:  # not while the parent compiles a graph itself (paused)
            while self._paused and not self._closed:
                self._resumed.wait()
        t0 = time.perf_counter()
        try:
            worker = _Worker(self.settings, warm_compile=self._warm_compile)
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

    def _warm(self, index: int, worker: _Worker) -> _Worker | None:
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

    def _take(self, index: int, worker: _Worker | None) -> tuple[_Job | None, _Worker | None]:
        """The next job. A worker that is not warm yet gets a job already waiting at once
        (it then skips its warm-up); with none waiting, it is let warm up first."""
        if worker is not None and not worker.warm:
            try:
                return self._jobs.get_nowait(), worker
            except queue.Empty:
                worker = self._warm(index, worker)
        return self._jobs.get(), worker

    def _slot(self, index: int) -> None:
        worker: _Worker | None = self._spawn(index, replacing=False)
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
