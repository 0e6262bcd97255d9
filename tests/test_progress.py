"""The progress display: which graphs are tracing, queued, compiling, done or failed,
named by Dynamo's compile id and their frame; counts that add up; and output that never
lands in the user's lines (a kept terminal row; complete lines elsewhere)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import sys
import termios
import time
from typing import Any

import pytest
import torch
from conftest import settings_for

import fxoffload
from fxoffload import naming, progress
from fxoffload.naming import Graph
from fxoffload.progress import COMPILING, DONE, FAILED, LOADING, QUEUED, TRACING, Board


class _Future:
    """What the display reads of an executor's future: set once a worker takes the job."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.worker_pid: int | None = None
        self.finished = False

    def take(self, pid: int) -> None:
        self.worker_pid, self.started = pid, time.perf_counter()

    def done(self) -> bool:
        return self.finished


def _graph(compile_id: str, name: str = "forward", part: str = "") -> Graph:
    return Graph(compile_id, name, "model.py:12", 7, part)


def test_queued_is_not_compiling_and_counts_add_up() -> None:
    board = Board()
    jobs = [board.add(_graph(f"{i}/0"), QUEUED, 0.0) for i in range(7)]
    futures = [_Future() for _ in jobs]
    for job, future in zip(jobs, futures, strict=True):
        job.future = future
    futures[0].take(4242)  # one worker: it took one job
    assert board.poll(1.0) == 1 and board.poll(1.0) == 0
    assert jobs[0].state == COMPILING and jobs[0].pid == 4242
    assert board.summary() == "0 of 7 done, 1 compiling, 6 queued"
    futures[0].finished = True  # back from the worker: decoded and loaded here now
    seen: list[str] = []
    assert board.poll(1.5, lambda job: seen.append(job.state)) == 1
    assert seen == [LOADING] and jobs[0].state == LOADING
    assert board.summary() == "0 of 7 done, 1 loading, 6 queued"
    futures[1].take(4242)  # taken and back between two looks: both steps, in order
    futures[1].finished = True
    seen.clear()
    assert board.poll(1.6, lambda job: seen.append(f"{job.state}: {board.summary()}")) == 2
    assert seen == ["compiling: 0 of 7 done, 1 compiling, 1 loading, 5 queued",
                    "loading: 0 of 7 done, 2 loading, 5 queued"]
    board.move(jobs[1], DONE, 1.7)
    assert board.move(jobs[0], DONE, 2.0)
    assert not board.move(jobs[0], FAILED, 2.0)  # finished stays finished
    assert board.move(jobs[2], FAILED, 2.0)
    assert board.summary() == "2 of 7 done, 1 failed, 4 queued"
    for job in jobs[3:]:
        board.move(job, DONE, 3.0)
    assert board.summary() == "6 of 7 done, 1 failed" and not board.active()
    board.settle()  # idle: the next graphs are counted afresh
    assert board.jobs == [] and board.summary() == "0 of 0 done"
    assert not board.move(jobs[3], DONE, 4.0) and not board.drop(jobs[3])


def test_a_deferred_trace_gives_way_to_its_compiles() -> None:
    board = Board()
    trace = board.add(_graph("0/0"), TRACING, 0.0)
    forward = board.add(_graph("0/0"), QUEUED, 1.0)
    backward = board.add(_graph("0/0", part="backward"), QUEUED, 1.0)
    assert board.summary() == "0 of 3 done, 2 queued, 1 tracing"
    board.trace_ended(trace, ok=True, now=2.0)
    assert board.jobs == [forward, backward]  # counted once, as its compiles
    assert board.summary() == "0 of 2 done, 2 queued"
    hit = board.add(_graph("1/0"), TRACING, 3.0)  # a cache hit: nothing to compile
    board.trace_ended(hit, ok=True, now=4.0)
    broken = board.add(_graph("2/0"), TRACING, 3.0)
    board.trace_ended(broken, ok=False, now=4.0)
    assert (hit.state, broken.state) == (DONE, FAILED)


def test_lines_name_the_graphs() -> None:
    board = Board()
    tracing = board.add(Graph("1/0", "forward resumed", "model.py:18", 3), TRACING, 0.0)
    queued = board.add(_graph("0/0", part="backward"), QUEUED, 0.0, stage=1)
    compiling = board.add(_graph("0/0"), QUEUED, 0.0)
    compiling.future = _Future()
    compiling.future.take(77)
    board.poll(0.0)
    line = board.status_line(now=compiling.since + 3.2, width=500)
    assert line == ("fxoffload: 0 of 3 done | compiling 0/0 forward (model.py:12) 3s"
                    " | queued 0/0 forward (model.py:12) backward stage 1"
                    " | tracing 1/0 forward resumed (model.py:18)")
    short = board.status_line(now=0.0, width=40)
    assert len(short) == 40 and short.endswith("…")
    assert board.event_line(compiling) == (
        "fxoffload: 0/0 forward (model.py:12) compiling on worker 77 "
        "[0 of 3 done, 1 compiling, 1 queued, 1 tracing]")
    board.move(tracing, FAILED, 2.5)
    assert board.event_line(tracing).endswith("failed after 2.5 s [0 of 3 done, 1 failed, "
                                              "1 compiling, 1 queued]")
    assert queued.label == "0/0 backward stage 1"


def test_identify_names_the_frame_as_dynamo_does() -> None:
    seen: list[Graph] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        seen.append(naming.identify(gm))
        return gm

    def frame(x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    torch.compile(frame, backend=backend)(torch.randn(4))
    line = frame.__code__.co_firstlineno
    first, second = seen
    assert re.fullmatch(r"\d+/0", first.compile_id or "") and first.compile_id != \
        second.compile_id
    assert (first.name, first.where) == ("frame", f"test_progress.py:{line}")
    # Dynamo's resume function after the graph break starts at the break's line.
    assert (second.name, second.where) == ("frame resumed", f"test_progress.py:{line + 2}")
    assert first.nodes == 3 and first.part == ""


# -- the display ----------------------------------------------------------------------------


@pytest.fixture
def display(monkeypatch: Any) -> progress.Display:
    shown = progress.Display()
    monkeypatch.setattr(progress, "DISPLAY", shown)
    monkeypatch.setattr(progress, "_TICK_S", 0.02)
    return shown


def test_nothing_is_shown_unless_enabled(display: progress.Display, monkeypatch: Any) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    job = progress.track(_graph("0/0"), QUEUED)
    progress.move(job, DONE)
    assert job is None and err.getvalue() == ""


def test_off_a_terminal_each_change_is_one_whole_line(display: progress.Display,
                                                       monkeypatch: Any) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress.enable()
    job = progress.track(_graph("0/0"), QUEUED)
    future = _Future()
    progress.attach(job, future)
    future.take(99)
    _wait_for(lambda: "compiling" in err.getvalue())  # the ticker saw the worker take it
    progress.move(job, DONE)
    lines = err.getvalue().splitlines(keepends=True)
    assert [re.sub(r"after \d+\.\d s", "after T", x) for x in lines] == [
        "fxoffload: 0/0 forward (model.py:12) queued [0 of 1 done, 1 queued]\n",
        "fxoffload: 0/0 forward (model.py:12) compiling on worker 99 [0 of 1 done, "
        "1 compiling]\n",
        "fxoffload: 0/0 forward (model.py:12) done after T [1 of 1 done]\n"]
    assert display.board.jobs == []  # idle: settled


def test_on_a_terminal_the_status_keeps_the_last_row(display: progress.Display,
                                                     monkeypatch: Any) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    stream = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("TERM", "xterm")
    try:
        progress.enable()
        job = progress.track(_graph("0/0"), QUEUED)
        other = progress.track(_graph("1/0", name="g"), TRACING)
        progress.move(job, DONE)
        progress.trace_ended(other, ok=True)
        written = _read_all(master)
    finally:
        stream.close()
        os.close(master)
    # The rows above the last scroll; the status is drawn on row 24 with the cursor
    # saved and restored around it; once idle, the region is given back and the row
    # cleared. No carriage return, no newline: nothing of it is in the user's lines.
    assert written.startswith("\x1bD\x1b7\x1b[1;23r\x1b8\x1b[1A")
    assert "\x1b7\x1b[24;1H\x1b[2Kfxoffload: 0 of 1 done | queued 0/0 forward " \
           "(model.py:12)\x1b8" in written
    assert "tracing 1/0 g (model.py:12)" in written
    assert written.endswith("\x1b7\x1b[r\x1b[24;1H\x1b[2K\x1b8")
    assert "\r" not in written and "\n" not in written
    assert display._region is None and display.board.jobs == []


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out.decode()
        if not chunk:
            return out.decode()
        out += chunk


# -- a real background compile --------------------------------------------------------------


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2 + 1


def test_an_async_compile_shows_its_graph_going_through(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(progress, "DISPLAY", progress.Display())  # enabled by the backend
    # A warm worker first: with none free, the compile would run in this process (and the
    # board would name no worker).
    backend = fxoffload.backend(**settings_for("async+subprocess", workers=1, progress=True))
    compiled = torch.compile(_f, backend=backend)
    compiled(torch.randn(8))
    assert fxoffload.wait(300)
    compiled(torch.randn(8))
    _wait_for(lambda: not progress.DISPLAY.board.jobs)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err and err.endswith("\n")
    lines = [x for x in err.splitlines() if x.startswith("fxoffload: ")]
    where = f"(test_progress.py:{_f.__code__.co_firstlineno})"
    states = [re.fullmatch(rf"fxoffload: (\d+/0) _f {re.escape(where)} (\w+).*", x)
              for x in lines]
    assert all(states), lines
    assert [m[2] for m in states if m] == ["tracing", "queued", "compiling", "done"], lines
    assert len({m[1] for m in states if m}) == 1  # one compile id throughout
    assert re.search(r"compiling on worker \d+ \[0 of 1 done, 1 compiling\]$", lines[2])
    assert lines[-1].endswith("[1 of 1 done]")
