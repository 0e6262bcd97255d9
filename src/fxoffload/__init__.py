"""fxoffload: TorchInductor's graph compilation, out of the process that runs the model.

    torch.compile(model, backend="fxoffload")
    torch.compile(model, backend=fxoffload.backend(mode="subprocess", workers=2))
    with fxoffload.enabled(mode="serde"): torch.compile(model)

Importing this package starts nothing and imports no torch internals; pools, threads and
hooks start on first use.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import (
    CaptureWriteFailed,
    ConfigError,
    FxOffloadError,
    NotOffloadable,
    PoolClosed,
    ProtocolError,
    RemoteCompileError,
    Unauthenticated,
    VersionMismatch,
    WorkerCrashed,
    WorkerError,
    WorkerStartupError,
    WorkerTimeout,
)
from .settings import Settings

if TYPE_CHECKING:
    from .tally import Snapshot

__version__ = "0.1.0"

__all__ = [
    "CaptureWriteFailed", "ConfigError", "FxOffloadError", "NotOffloadable", "PoolClosed",
    "ProtocolError", "RemoteCompileError", "Settings", "Unauthenticated", "VersionMismatch",
    "WorkerCrashed", "WorkerError", "WorkerStartupError", "WorkerTimeout", "backend",
    "enabled", "reset_stats", "shutdown", "stats", "wait", "warmup",
]


def _needs_torch(module: str) -> Any:
    """``fxoffload.<module>``; without torch, an ImportError that says how to install it
    (checked here: ``backend()`` and ``enabled()`` import torch only when first used)."""
    if importlib.util.find_spec("torch") is None:
        from .cli import torch_missing_message

        raise ImportError(torch_missing_message(), name="torch")
    return importlib.import_module(f".{module}", __name__)


def backend(settings: Settings | None = None, **kwargs: Any) -> Any:
    return _needs_torch("integration").backend(settings, **kwargs)


def enabled(settings: Settings | None = None, **kwargs: Any) -> Any:
    return _needs_torch("integration").enabled(settings, **kwargs)


def stats() -> Snapshot:
    from .tally import STATS

    return STATS.snapshot()


def reset_stats() -> None:
    from .tally import STATS

    STATS.reset()


def warmup(settings: Settings | None = None, *, wait: bool = True, device: str | None = None,
           **kwargs: Any) -> None:
    """Get ready for the first compile now, e.g. while data loads: start the executor for
    these settings (the worker pool) and prepare this process (Inductor's imports, its
    pattern tables for ``device`` — default cuda if available, else cpu — and the cache
    key's fixed parts: about 1.5-2 s, spent here in the calling thread). ``wait=True``
    also waits until the workers are ready."""
    prepare_parent = _needs_torch("prepare").prepare_parent
    from .executors import get_executor

    executor = get_executor(settings or Settings.resolve(**kwargs))
    executor.warmup(wait=False)
    # Out of process, the parent takes the worker's CPU vector-ISA probe result when it
    # loads the first graph (offload.load): no probe builds here.
    prepare_parent(device, probe_cpu_isa=not executor.out_of_process)
    if wait:
        executor.warmup(wait=True)


def wait(timeout: float | None = None) -> bool:
    """Block until every background compile (async/progressive modes) has arrived or
    failed; False if ``timeout`` seconds ran out first. Arrived code is swapped in at
    each graph's next call."""
    from .pending import wait as _wait

    return _wait(timeout)


def shutdown(*, wait: bool = True) -> None:
    """Stop every executor (worker pools) this process started, and put back what
    fxoffload replaced in torch (``patches``) that nothing running still needs. A backend
    made before keeps working: its next compile installs the hook again."""
    import sys

    from .executors import shutdown_all

    shutdown_all(wait=wait)
    if "fxoffload.integration" not in sys.modules:  # nothing was ever installed
        return
    from . import integration, isolation, private_config

    integration.release()
    if isolation.uninstall():  # no thread of ours runs: none reads a private config
        private_config.uninstall_overlay()
