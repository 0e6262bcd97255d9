"""A Chrome-trace timeline of fxoffload's compiles (opens in Perfetto or chrome://tracing),
written to the path in ``FXOFFLOAD_TRACE`` when that variable is set.

One track for the parent and one per worker process: per graph, the parent's serialize,
its wait for the executor, the compile on the worker that ran it, and the parent's
deserialize and replay; a worker's start-up on its own track; fallbacks are instant
events naming their reason. Every event's args name its graph the way Dynamo does
(``compile_id``, e.g. ``"0/0"``; see ``naming.identify``), with its config stage, node
count, bytes and worker pid where they apply; an event without a graph of its own takes
the compile id of the Dynamo compile it happens in. The file is rewritten after every
compile, so it is complete whenever the process stops; a path that cannot be written is
a ``ConfigError`` from ``check_env()`` up front, and a write that fails later is one
WARNING, never an error inside a compile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("fxoffload")

ENV = "FXOFFLOAD_TRACE"
_UNSET = object()
_timeline: Any = _UNSET
_lock = threading.Lock()
_EPOCH = time.perf_counter()
_about = threading.local()  # .args: what events made on this thread are about


def check_env() -> None:
    """Raise ``ConfigError`` naming ``FXOFFLOAD_TRACE`` and the OS error when the trace
    file it names cannot be written (its directory made, the file opened for append).
    What this check creates is removed again."""
    value = os.environ.get(ENV)
    if not value:
        return
    from .errors import ConfigError

    path = Path(value).expanduser()
    made: list[Path] = []
    try:
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        for directory in reversed(missing):
            directory.mkdir()
            made.append(directory)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise ConfigError(f"{ENV}={value!r} cannot be written: {e}") from None
    finally:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


@contextlib.contextmanager
def about(**args: Any) -> Iterator[None]:
    """Events made on this thread inside the block carry ``args`` (a graph's identity,
    for events made by code that does not know which graph it is working for)."""
    saved = getattr(_about, "args", None)
    _about.args = {**(saved or {}), **args}
    try:
        yield
    finally:
        _about.args = saved


def _context_args() -> dict[str, Any]:
    args = dict(getattr(_about, "args", None) or {})
    if "compile_id" not in args and "torch" in sys.modules:
        try:
            import torch

            compile_id = torch._guards.CompileContext.current_compile_id()
        except Exception:  # noqa: BLE001 - an event never fails for its args
            compile_id = None
        if compile_id is not None:
            args["compile_id"] = str(compile_id)
    return args


class Timeline:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.tracks: dict[int, str] = {}
        self._lock = threading.Lock()
        self._warned = False

    def span(self, name: str, start: float, end: float, *, track: int, track_name: str,
             **args: Any) -> None:
        args = {**_context_args(), **args}
        with self._lock:
            self.tracks.setdefault(track, track_name)
            self.events.append({
                "name": name, "ph": "X", "pid": os.getpid(), "tid": track,
                "ts": round((start - _EPOCH) * 1e6, 1),
                "dur": round(max(0.0, end - start) * 1e6, 1), "args": args,
            })

    def instant(self, name: str, at: float, **args: Any) -> None:
        args = {**_context_args(), **args}
        with self._lock:
            self.tracks.setdefault(0, "parent")
            self.events.append({"name": name, "ph": "i", "s": "t", "pid": os.getpid(),
                                "tid": 0, "ts": round((at - _EPOCH) * 1e6, 1), "args": args})

    def flush(self) -> None:
        """Rewrite the file. A failure is one WARNING (the first), never an exception:
        this runs inside compiles."""
        try:
            with self._lock:
                meta = [{"name": "thread_name", "ph": "M", "pid": os.getpid(), "tid": tid,
                         "args": {"name": name}} for tid, name in sorted(self.tracks.items())]
                text = json.dumps({"traceEvents": meta + self.events, "displayTimeUnit": "ms"},
                                  default=str)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except Exception as e:  # noqa: BLE001 - the timeline never fails a compile
            with self._lock:
                first, self._warned = not self._warned, True
            if first:
                log.warning("fxoffload: could not write the %s timeline to %s: %s (later "
                            "failures are not reported)", ENV, self.path, e)


def get() -> Timeline | None:
    """The process's timeline, if ``FXOFFLOAD_TRACE`` is set (read on first use)."""
    global _timeline
    with _lock:
        if _timeline is _UNSET:
            path = os.environ.get(ENV)
            _timeline = Timeline(Path(path).expanduser()) if path else None
        return _timeline
