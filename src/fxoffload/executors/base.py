"""The one executor interface: ``submit(request bytes) -> Future[response bytes]``.

An executor moves bytes; it knows nothing of graphs. Its futures fail only with
``fxoffload.errors.WorkerError`` subclasses (or ``ProtocolError``)."""

from __future__ import annotations

import abc
import contextlib
from concurrent.futures import Future


class Executor(abc.ABC):
    name: str = "executor"
    # Compiles in other processes: the parent never loads its own compile's probes or
    # kernels before a response tells it what the worker found (offload.load).
    out_of_process: bool = False

    @abc.abstractmethod
    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        """Start compiling ``request`` (envelope bytes) and return its future response.
        ``timeout`` bounds the compile where the executor can enforce it."""

    def ready_now(self) -> bool:
        """Whether a request submitted now would start compiling at once (a warm worker is
        free). In-process executors always are."""
        return True

    def starting(self) -> bool:
        """Whether no worker is warm yet: a request would wait for a start-up (a cold
        pool), not for another compile to end. In-process executors never are."""
        return False

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """A block in which the executor takes no CPU for starting up (the parent
        compiles a graph itself meanwhile)."""
        return contextlib.nullcontext()

    def warmup(self, *, wait: bool = False, full: bool = True) -> None:
        """Start whatever the executor needs ahead of the first request; ``full=False``:
        only what a request about to come cannot do without (no warm-up compile)."""

    def shutdown(self, *, wait: bool = True) -> None:
        """Release workers; pending futures fail with ``PoolClosed``."""
