"""Which graphs the background modes are working on, shown while they work:

    fxoffload: 1 of 4 done | compiling 0/0 forward (model.py:12) 3s | queued 0/0 forward
    (model.py:12) backward | tracing 1/0 forward resumed (model.py:18)

Each graph is named as Dynamo names it (``naming.identify``: compile id, frame, file and
line, ``backward``), then ``stage N`` for progressive mode's stages. A graph
is *tracing* while a deferred trace runs (deferred.py), *queued* once its request waits
for the executor, *compiling* once a worker took it (the executor sets
``future.started``), *loading* once the compiled graph is back and this process decodes
and loads it, then *done* or *failed*.

Shown only when ``Settings.show_progress`` (async/progressive with stderr a terminal, or
``FXOFFLOAD_PROGRESS=1`` / ``progress=True``), never otherwise. It never writes into the
user's output:

- stderr a terminal: the status line lives on the terminal's last row, kept out of the
  scroll region while anything is in flight (what the program prints scrolls above it,
  whichever stream and whichever thread prints it), redrawn in one ``write`` that saves
  and restores the cursor; once nothing is in flight the row is cleared and the scroll
  region given back (at exit too).
- forced on where stderr is not a terminal: one complete line per change of a graph's
  state, ending with a newline (no carriage returns, no escapes).

The state is one ``Board`` (pure: jobs and their states, the lines drawn from them); the
one ``Display`` of the process owns the board, the terminal and a ticker thread that
notices jobs a worker took and refreshes elapsed times while something is in flight.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .naming import Graph

TRACING, QUEUED, COMPILING, LOADING, DONE, FAILED = (
    "tracing", "queued", "compiling", "loading", "done", "failed")
ACTIVE = (COMPILING, LOADING, QUEUED, TRACING)  # shown in this order
_TICK_S = 0.5


# -- the state ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Job:
    """One piece of work for one graph: a deferred trace, or one compile request."""

    graph: Graph
    state: str
    since: float  # when it entered its state (time.perf_counter())
    stage: int | None = None  # progressive mode's config stage
    future: Any = None  # the executor's future: .started (and .worker_pid) once taken
    pid: int | None = None
    took: float | None = None  # seconds from its start to done/failed
    began: float = 0.0

    @property
    def label(self) -> str:
        stage = f" stage {self.stage}" if self.stage is not None else ""
        return f"{self.graph.label}{stage}"

    def describe(self) -> str:
        """'0/0 forward (model.py:12)', then 'backward' and 'stage 1' where they apply."""
        graph = self.graph
        base = graph.compile_id if graph.compile_id is not None else f"#{graph.serial}"
        extra = "".join(f" {x}" for x in (graph.part, f"stage {self.stage}"
                                          if self.stage is not None else "") if x)
        return f"{base} {graph.name} ({graph.where}){extra}"


class Board:
    """The jobs being shown and the lines that show them; no I/O, no clock of its own."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def add(self, graph: Graph, state: str, now: float, *, stage: int | None = None) -> Job:
        job = Job(graph, state, now, stage, began=now)
        self.jobs.append(job)
        return job

    def move(self, job: Job, state: str, now: float) -> bool:
        """False when nothing changed: not shown, already there, or already finished."""
        if job not in self.jobs or job.state == state or job.state in (DONE, FAILED):
            return False
        job.state, job.since = state, now
        if state in (DONE, FAILED):
            job.took = now - job.began
        return True

    def drop(self, job: Job) -> bool:
        if job in self.jobs:
            self.jobs.remove(job)
            return True
        return False

    def trace_ended(self, job: Job, ok: bool, now: float) -> bool:
        """A deferred trace ended. Its graph's compiles, queued by it, take its place;
        with none (a cache hit; a failure) the trace itself is the graph's outcome."""
        if job not in self.jobs:
            return False
        later = self.jobs[self.jobs.index(job) + 1:]
        if job.graph.compile_id is not None and any(
                j.graph.compile_id == job.graph.compile_id for j in later):
            return self.drop(job)
        return self.move(job, DONE if ok else FAILED, now)

    def poll(self, now: float, moved: Callable[[Job], None] = lambda job: None) -> int:
        """Queued jobs a worker has taken meanwhile are compiling now; compiles whose
        result came back are loading (decoded and loaded here, ahead of the swap).
        ``moved(job)`` is called after each step, in order; returns how many."""
        steps = 0
        for job in list(self.jobs):
            future = job.future
            if future is None:
                continue
            started = getattr(future, "started", None)
            if job.state == QUEUED and started is not None:
                job.pid = getattr(future, "worker_pid", None)
                self.move(job, COMPILING, now)
                job.since = min(now, started)  # both time.perf_counter()
                steps += 1
                moved(job)
            if job.state in (QUEUED, COMPILING) and future.done():
                self.move(job, LOADING, now)
                steps += 1
                moved(job)
        return steps

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs if j.state == state)

    def active(self) -> bool:
        return any(j.state in ACTIVE for j in self.jobs)

    def settle(self) -> None:
        """Once nothing is in flight, finished jobs are forgotten: the next graphs are
        counted afresh ("0 of 1 done"), not after every graph of the run."""
        if not self.active():
            self.jobs.clear()

    def summary(self) -> str:
        done, failed = self.count(DONE), self.count(FAILED)
        parts = [f"{done} of {len(self.jobs)} done"]
        if failed:
            parts.append(f"{failed} failed")
        parts += [f"{n} {state}" for state in ACTIVE if (n := self.count(state))]
        return ", ".join(parts)

    def status_line(self, now: float, width: int) -> str:
        """The terminal's one status line, cut to ``width`` characters."""
        done, failed = self.count(DONE), self.count(FAILED)
        head = f"fxoffload: {done} of {len(self.jobs)} done" + (
            f", {failed} failed" if failed else "")
        groups = []
        for state in ACTIVE:
            jobs = [j for j in self.jobs if j.state == state]
            if jobs:
                items = [j.describe() + (f" {now - j.since:.0f}s" if state == COMPILING
                                         else "") for j in jobs]
                groups.append(f"{state} " + ", ".join(items))
        line = " | ".join([head, *groups])
        return line if len(line) <= width else line[:max(0, width - 1)] + "…"

    def event_line(self, job: Job) -> str:
        """One line for a job's change of state, with the board's counts after it."""
        detail = ""
        if job.state == COMPILING and job.pid is not None:
            detail = f" on worker {job.pid}"
        elif job.state in (DONE, FAILED) and job.took is not None:
            detail = f" after {job.took:.1f} s"
        return f"fxoffload: {job.describe()} {job.state}{detail} [{self.summary()}]"


# -- the display ----------------------------------------------------------------------------


class _Region:
    """The terminal's last row, kept out of the scroll region for the status line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.rows = 0
        self.shown = ""

    def _write(self, text: str) -> None:
        os.write(self.fd, text.encode("utf-8", "replace"))  # one write: not interleaved

    def draw(self, board: Board, now: float) -> None:
        size = os.get_terminal_size(self.fd)
        if size.lines != self.rows:
            # Index (ESC D: down a row, scrolling at the bottom, same column), then the
            # scroll region (which homes the cursor: saved and restored around it), then
            # back up: the cursor is where it was, above the reserved row.
            self._write(f"\x1bD\x1b7\x1b[1;{size.lines - 1}r\x1b8\x1b[1A")
            self.rows, self.shown = size.lines, ""
        line = board.status_line(now, size.columns - 1)
        if line != self.shown:
            self._write(f"\x1b7\x1b[{self.rows};1H\x1b[2K{line}\x1b8")
            self.shown = line

    def close(self) -> None:
        if self.rows:
            self._write(f"\x1b7\x1b[r\x1b[{self.rows};1H\x1b[2K\x1b8")
            self.rows = 0


class Display:
    """The process's progress display: a board, where it is drawn, and its ticker."""

    def __init__(self) -> None:
        self.enabled = False
        self.board = Board()
        self._lock = threading.RLock()
        self._region: _Region | None = None
        self._ticker: threading.Thread | None = None
        self._hooked = False

    # -- events ------------------------------------------------------------------------
    def track(self, graph: Graph, state: str, *, stage: int | None = None) -> Job | None:
        if not self.enabled:
            return None
        with self._lock:
            job = self.board.add(graph, state, time.perf_counter(), stage=stage)
            self._changed([job])
        return job

    def attach(self, job: Job | None, future: Any) -> None:
        if job is not None:
            job.future = future  # the ticker sees when a worker takes it

    def move(self, job: Job | None, state: str) -> None:
        if job is None:
            return
        with self._lock:
            now = time.perf_counter()
            # A worker may have taken it since the ticker last looked: say so first.
            self.board.poll(now, self._moved)
            if self.board.move(job, state, now):
                self._changed([job])

    def drop(self, job: Job | None) -> None:
        if job is None:
            return
        with self._lock:
            if self.board.drop(job):
                self._changed([])

    def trace_ended(self, job: Job | None, ok: bool) -> None:
        if job is None:
            return
        with self._lock:
            if self.board.trace_ended(job, ok, time.perf_counter()):
                self._changed([job] if job in self.board.jobs else [])

    # -- drawing -----------------------------------------------------------------------
    def _moved(self, job: Job) -> None:
        self._changed([job])

    def _changed(self, jobs: list[Job]) -> None:
        """Under the lock: show the change, then forget finished work once idle."""
        try:
            self._draw(jobs)
        except (OSError, ValueError):  # a closed stream (at exit): nothing to draw on
            pass
        if self.board.active():
            self._tick_on()
        else:
            self.board.settle()
            self._close_region()

    def _draw(self, jobs: list[Job]) -> None:
        stream = sys.stderr
        if stream is None:
            return
        if self._region is None and self.board.active() and _terminal(stream):
            self._region = _Region(stream.fileno())
            if not self._hooked:
                atexit.register(self.close)
                self._hooked = True
        if self._region is not None:
            stream.flush()
            self._region.draw(self.board, time.perf_counter())
            return
        # Off a terminal, loading (short, and always followed by done or failed) gets
        # no line of its own.
        lines = [self.board.event_line(j) for j in jobs
                 if j in self.board.jobs and j.state != LOADING]
        if lines:
            stream.write("".join(line + "\n" for line in lines))
            stream.flush()

    def _close_region(self) -> None:
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_region()

    # -- the ticker --------------------------------------------------------------------
    def _tick_on(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True,
                                            name="fxoffload-progress")
            self._ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(_TICK_S)
            with self._lock:
                if not self.board.poll(time.perf_counter(), self._moved) and \
                        self._region is not None:
                    self._changed([])  # the elapsed seconds
                if not self.board.active():
                    self._ticker = None
                    return


def _terminal(stream: Any) -> bool:
    """A terminal that can keep a row for us."""
    try:
        if not stream.isatty() or os.environ.get("TERM", "") in ("", "dumb"):
            return False
        return os.get_terminal_size(stream.fileno()).lines >= 3
    except (AttributeError, OSError, ValueError):
        return False


DISPLAY = Display()


def enable() -> None:
    """Show progress from now on (``Settings.show_progress`` decided that it is wanted)."""
    DISPLAY.enabled = True


def track(graph: Graph, state: str, *, stage: int | None = None) -> Job | None:
    """Show a new job for ``graph``; None (and every later call a no-op) when disabled."""
    return DISPLAY.track(graph, state, stage=stage)


def attach(job: Job | None, future: Any) -> None:
    DISPLAY.attach(job, future)


def move(job: Job | None, state: str) -> None:
    DISPLAY.move(job, state)


def drop(job: Job | None) -> None:
    DISPLAY.drop(job)


def trace_ended(job: Job | None, ok: bool) -> None:
    DISPLAY.trace_ended(job, ok)
