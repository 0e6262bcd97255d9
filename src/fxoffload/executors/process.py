"""One worker process, as the pool's slot thread sees it: started in its own process
group with two pipes, READY (imported) then WARM (warmed up, or skipped it for a
request), one request at a time, stopped and resumed as a group (``WorkerPool.paused``),
and killed, reaped and drained, so that nothing it started outlives it."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from .. import wire
from ..errors import (
    ProtocolError,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
    WorkerTimeout,
)
from ..settings import Settings

log = logging.getLogger("fxoffload.pool")


class WorkerProcess:
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
        sent = time.time()
        try:
            wire.write_all(self.req_w, request, deadline)
            if not self.warm:  # sent before its warm-up: it skips it, and says so first
                self.wait_warm(self.startup)
            frame = wire.read_frame(self.resp_r, deadline)
        except wire.StreamTimeout:
            self.kill()
            remove_cut_builds(sent)
            raise WorkerTimeout(self.pid, timeout, "its compile") from None
        except wire.StreamClosed:
            code = self.kill()
            remove_cut_builds(sent)
            raise WorkerCrashed(self.pid, code, "while compiling") from None
        except ProtocolError as e:
            self.kill()
            raise CorruptResponse(f"worker pid {self.pid} sent a corrupted response: {e}"
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
        """Kill (if needed), reap and close; returns the exit status. Only the thread that
        reads the pipes (the worker's slot thread) may close them: closed under a reader,
        the reader gets EBADF, or worse, a reused descriptor; other threads ``terminate``."""
        code = self.terminate()
        for fd in (self.req_w, self.resp_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.req_w = self.resp_r = -1
        return code

    def terminate(self) -> int | None:
        """Kill (if needed) and reap, pipes left open: the slot thread reading them then
        sees the stream close and ends the worker itself."""
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


def remove_cut_builds(since: float, root: str | None = None) -> list[str]:
    """Remove the cut-off builds a dead worker left in the shared Inductor cache: ELF
    files (``.so``, ``.o``) written since ``since`` whose section header table, which the
    linker writes last, lies past their end. Draining the worker's group lets its builds
    finish, but not every one can: the compiler's output pipe lost its reader with the
    worker, and a tool that writes a diagnostic then dies of SIGPIPE, possibly with its
    output half written at the final path. Inductor only checks that the file exists, so
    the in-process fallback, and every later compile of that kernel, would load it ("file
    too short"). Removed, it is rebuilt. A file some live process has open (another
    worker's linker at work) is left alone. Returns what it removed."""
    if root is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = cache_dir()
    cut = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith((".so", ".o")):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):  # gone already
                    if os.stat(path).st_mtime >= since - 1.0 and _cut_off(path):
                        cut.append(path)
    removed = []
    if cut:
        in_use = _open_files()
        for path in cut:
            if os.path.realpath(path) not in in_use:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
    if removed:
        log.warning("fxoffload: removed %d cut-off build(s) a dead worker left in the "
                    "Inductor cache: %s", len(removed), ", ".join(removed))
    return removed


def _cut_off(path: str) -> bool:
    """Whether an ELF file ends before its section header table (a build cut off)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return True
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # ELF64
        (shoff,) = struct.unpack_from(order + "Q", head, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", head, 0x3A)
    else:  # ELF32
        (shoff,) = struct.unpack_from(order + "I", head, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", head, 0x2E)
    return bool(shoff + shentsize * shnum > os.path.getsize(path))


def _open_files() -> set[str]:
    """The files live processes have open (those of ours we can see, on Linux)."""
    found = set()
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        with contextlib.suppress(OSError):
                            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is alive. Zombies count for ``killpg`` (an orphan
    waits for whoever adopted it to reap it), so on Linux look for a live member. A
    process whose main thread has exited shows as a zombie while its other threads still
    run (or are being torn down): it counts as alive until they are gone."""
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
            if group == str(pgid) and (state not in ("Z", "X") or _threads_left(entry)):
                return True
    return False


def _threads_left(pid: str) -> bool:
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


class CorruptResponse(WorkerError):
    reason = "corrupted_response"
