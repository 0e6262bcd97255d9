"""Executors: where a request is compiled. One module each.

- ``inprocess.InProcessExecutor`` (mode ``serde``): in the calling thread;
- ``capture.CaptureExecutor`` (mode ``capture``): ``serde`` plus files on disk;
- ``pool.WorkerPool`` (mode ``subprocess``): warm worker processes;
- ``farm.FarmExecutor`` (mode ``farm``): a shared compile farm on Ray.

``get_executor(settings)`` returns the process-wide executor for those settings,
creating it on first use; ``shutdown_all()`` stops them all.
"""

from __future__ import annotations

import threading
from typing import Any

from ..settings import Settings
from .base import Executor

_lock = threading.Lock()
_executors: dict[Any, Executor] = {}


def get_executor(settings: Settings) -> Executor:
    mode = settings.base_mode
    key: Any = (settings.pool_key if mode in ("subprocess", "farm")
                else (mode, settings.background, str(settings.capture_dir)))
    with _lock:
        executor = _executors.get(key)
        if executor is None:
            executor = _executors[key] = _create(settings)
        return executor


def _create(settings: Settings) -> Executor:
    mode = settings.base_mode
    if mode == "serde":
        from .inprocess import InProcessExecutor

        return InProcessExecutor(background=settings.background)
    if mode == "capture":
        from .capture import CaptureExecutor

        assert settings.capture_dir is not None
        return CaptureExecutor(settings.capture_dir, background=settings.background)
    if mode == "subprocess":
        from .pool import WorkerPool

        return WorkerPool(settings)
    if mode == "farm":
        from .farm import FarmExecutor

        return FarmExecutor(settings)
    raise ValueError(f"mode {settings.mode!r} has no executor")


def shutdown_all(*, wait: bool = True) -> None:
    with _lock:
        executors = list(_executors.values())
        _executors.clear()
    for executor in executors:
        executor.shutdown(wait=wait)
