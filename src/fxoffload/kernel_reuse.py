"""Triton kernels of an in-process compile, handed to the parent's load of its response.

In ``serde``/``capture`` (and ``async+serde``) the child's compile runs in this very
process: it compiles every Triton kernel and loads it into the child's output module.
The response then crosses the boundary without them (``prepare_for_serialization``
drops the module), and the parent's load execs the same module source again. Inductor's
in-memory kernel cache has already forgotten those kernels (``AsyncCompile`` removes an
entry once its future is resolved), so each one was loaded a second time through
Inductor's compile-worker pool: 0.19-0.54 s per graph on the H200, most of what ``serde``
added to a compile after the lean pickler. Stock Inductor loads each kernel once.

    child (same process)                          parent's load
    compile ─► output module ─► remember(source,   reusing(source) ─► exec module source
               {kernel name: loaded kernel})          async_compile.triton(name, …)
                                                      ─► the remembered kernel

Only a module with the very source the child produced gets the child's kernels, and only
by the names that source gives them, on the thread doing that load. The child's module
is dropped with the response, so each kernel object moves to the parent; none is shared
between two live modules. Anything not remembered loads as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from . import patches

# Responses whose load never comes (an error, a capture replayed elsewhere) must not pin
# kernels forever: keep the newest few.
_MAX_PENDING = 16

_lock = threading.Lock()
_pending: OrderedDict[str, dict[str, Any]] = OrderedDict()
_local = threading.local()
_users = 0  # loads using ours now


def remember(graph: Any) -> None:
    """Keep the loaded Triton kernels of ``graph`` (a ``CompiledFxGraph`` compiled in this
    process, before ``prepare_for_serialization``) for the load of its response."""
    source = getattr(graph, "source_code", None)
    scope = getattr(getattr(graph, "current_callable", None), "__globals__", None)
    if not source or not isinstance(scope, dict):
        return
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:  # no Triton: nothing to reuse
        return
    kernels = {name: value for name, value in scope.items()
               if isinstance(value, CachingAutotuner)}
    if not kernels:
        return
    with _lock:
        _pending[source] = kernels
        _pending.move_to_end(source)
        while len(_pending) > _MAX_PENDING:
            _pending.popitem(last=False)


def pending() -> int:
    """How many compiled graphs' kernels wait for their load (for tests)."""
    with _lock:
        return len(_pending)


@contextlib.contextmanager
def reusing(source: str | None) -> Iterator[dict[str, Any]]:
    """Within the block, this thread's ``async_compile.triton(name, …)`` calls return the
    kernels remembered for ``source``, by name; yields ``{name: kernel}`` of those taken."""
    with _lock:
        kernels = _pending.pop(source, None) if source else None
    used: dict[str, Any] = {}
    if not kernels:
        yield used
        return
    _install()
    _local.kernels, _local.used = kernels, used
    try:
        yield used
    finally:
        _local.kernels = _local.used = None
        _uninstall()


def take(kernel_name: str) -> Any:
    """The kernel remembered under this name for the load running on this thread, once;
    None if there is none."""
    kernels = getattr(_local, "kernels", None)
    if kernels is None or kernel_name not in kernels:
        return None
    kernel = kernels.pop(kernel_name)
    _local.used[kernel_name] = kernel
    return kernel


def _install() -> None:
    global _users
    from torch._inductor.async_compile import AsyncCompile

    with _lock:
        _users += 1
        if _users > 1:
            return
        original = AsyncCompile.triton

        def triton(self: Any, kernel_name: str, source_code: str, *args: Any,
                   **kwargs: Any) -> Any:
            kernel = take(kernel_name)
            if kernel is not None:
                return kernel
            return original(self, kernel_name, source_code, *args, **kwargs)

        patches.replace("kernel_reuse", AsyncCompile, "triton", triton)


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            patches.uninstall("kernel_reuse")
