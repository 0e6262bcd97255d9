"""A Chrome-trace timeline of fxoffload's compiles (opens in Perfetto or chrome://tracing),
written to the path in ``FXOFFLOAD_TRACE`` when that variable is set.

One track for the parent and one per worker process: per graph, the parent's serialize,
its wait for the executor, the compile on the worker that ran it, and the parent's
deserialize and replay; fallbacks are instant events naming their reason. The file is
rewritten after every compile, so it is complete whenever the process stops.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_UNSET = object()
_timeline: Any = _UNSET
_lock = threading.Lock()
_EPOCH = time.perf_counter()


class Timeline:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.tracks: dict[int, str] = {}
        self._lock = threading.Lock()

    def span(self, name: str, start: float, end: float, *, track: int, track_name: str,
             **args: Any) -> None:
        with self._lock:
            self.tracks.setdefault(track, track_name)
            self.events.append({
                "name": name, "ph": "X", "pid": os.getpid(), "tid": track,
                "ts": round((start - _EPOCH) * 1e6, 1),
                "dur": round(max(0.0, end - start) * 1e6, 1), "args": args,
            })

    def instant(self, name: str, at: float, **args: Any) -> None:
        with self._lock:
            self.tracks.setdefault(0, "parent")
            self.events.append({"name": name, "ph": "i", "s": "t", "pid": os.getpid(),
                                "tid": 0, "ts": round((at - _EPOCH) * 1e6, 1), "args": args})

    def flush(self) -> None:
        with self._lock:
            meta = [{"name": "thread_name", "ph": "M", "pid": os.getpid(), "tid": tid,
                     "args": {"name": name}} for tid, name in sorted(self.tracks.items())]
            data = {"traceEvents": meta + self.events, "displayTimeUnit": "ms"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def get() -> Timeline | None:
    """The process's timeline, if ``FXOFFLOAD_TRACE`` is set (read on first use)."""
    global _timeline
    with _lock:
        if _timeline is _UNSET:
            path = os.environ.get("FXOFFLOAD_TRACE")
            _timeline = Timeline(Path(path).expanduser()) if path else None
        return _timeline
