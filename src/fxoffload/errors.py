"""The one error tree of fxoffload.

    FxOffloadError
    ├── ConfigError              a setting (keyword or FXOFFLOAD_* variable) is invalid
    ├── ProtocolError            bytes that are not a well-formed fxoffload envelope
    │   └── VersionMismatch      the envelope came from another protocol or torch version
    ├── Unauthenticated          a peer did not prove it holds the farm's key (signing.py)
    ├── NotOffloadable           this graph cannot cross the boundary (carries a reason)
    ├── TraceFailed              a deferred trace (AOTAutograd, Inductor's front half) raised
    └── WorkerError              the other side failed us
        ├── WorkerCrashed        the worker process died (exit code or signal named)
        ├── WorkerTimeout        the compile ran past its deadline; the worker was killed
        ├── WorkerStartupError   a worker could not be started or warmed up
        ├── RemoteCompileError   the compile raised on the other side (traceback carried)
        ├── PoolClosed           the executor was shut down before the job ran
        ├── CaptureWriteFailed   mode='capture' could not write a request or response file
        ├── FarmUnavailable      the compile farm cannot be reached (or has no registry)
        └── FarmCompileFailed    the farm could not compile it (worker lost twice, timeout)

Foreign errors (pickle, OSError on pipes, …) are translated into this tree at the
boundary where they occur; nothing else escapes from the executors.
"""

from __future__ import annotations

import signal


class FxOffloadError(Exception):
    """Base class of every error fxoffload raises."""


class ConfigError(FxOffloadError, ValueError):
    """A setting is invalid; the message names it and the allowed values."""


class ProtocolError(FxOffloadError):
    """Truncated, corrupted or foreign bytes where an fxoffload envelope was expected."""

    def __init__(self, message: str, reason: str = "corrupted_response") -> None:
        self.reason = reason
        super().__init__(message)


class VersionMismatch(ProtocolError):
    """The envelope was written by another protocol or torch version."""


class Unauthenticated(FxOffloadError):
    """Bytes from a peer that did not prove it holds the farm's key (unsigned, tampered,
    signed with another key or for another purpose); nothing of them was unpickled."""

    reason = "unauthenticated"


class NotOffloadable(FxOffloadError):
    """The graph cannot cross the boundary; ``reason`` is a short stable key for stats."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TraceFailed(FxOffloadError):
    """AOTAutograd or Inductor's front half raised on fxoffload's front thread (async
    modes); the original error is chained as ``__cause__``."""

    reason = "trace_failed"

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"tracing the graph on fxoffload's thread failed: "
                         f"{type(error).__name__}: {error}")


class WorkerError(FxOffloadError):
    """The compile did not come back from the other side. ``reason`` keys the stats."""

    reason = "worker_error"


class WorkerCrashed(WorkerError):
    reason = "worker_crashed"

    def __init__(self, pid: int, returncode: int | None, during: str) -> None:
        self.pid = pid
        self.returncode = returncode
        self.during = during
        super().__init__(f"worker pid {pid} died {during}: {describe_exit(returncode)}")


class WorkerTimeout(WorkerError):
    reason = "worker_timeout"

    def __init__(self, pid: int, seconds: float, during: str) -> None:
        self.pid = pid
        self.seconds = seconds
        super().__init__(
            f"worker pid {pid} did not finish {during} within {seconds:g} s; it was killed"
        )


class WorkerStartupError(WorkerError):
    reason = "worker_startup_failed"


class RemoteCompileError(WorkerError):
    """Inductor raised on the other side; ``remote_traceback`` is its formatted traceback."""

    reason = "remote_compile_error"

    def __init__(self, summary: str, remote_traceback: str, *,
                 reason: str = "remote_compile_error") -> None:
        self.reason = reason
        self.summary = summary
        self.remote_traceback = remote_traceback
        super().__init__(f"{summary}\n\n--- traceback in the worker ---\n{remote_traceback}")


class PoolClosed(WorkerError):
    reason = "pool_closed"


class CaptureWriteFailed(WorkerError):
    """A capture file could not be written (``path``; the ``OSError`` is ``__cause__``)."""

    reason = "capture_write_failed"

    def __init__(self, path: object, error: OSError) -> None:
        self.path = path
        super().__init__(f"could not write the capture file {path}: "
                         f"{type(error).__name__}: {error.strerror or error}")


class FarmUnavailable(WorkerError):
    """The farm's Ray cluster or its registry cannot be reached."""

    reason = "farm_unavailable"


class FarmCompileFailed(WorkerError):
    """The farm took the request but could not compile it; ``reason`` says why
    (``worker_crashed``, ``worker_timeout``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = f"farm_{reason}"
        super().__init__(f"the farm could not compile the graph ({reason}): {message}")


def describe_exit(returncode: int | None) -> str:
    """'exit code 3', 'signal 9 (SIGKILL)', or 'still running' for a live process."""
    if returncode is None:
        return "no exit status (still running or unknown)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exit code {returncode}"
