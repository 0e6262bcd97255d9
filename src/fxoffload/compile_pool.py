"""Inductor's Triton compile pool in this process (one process per core, each importing
torch): started early where a graph will compile here, as stock's ``torch.compile``
does, and kept from starting where this process only loads kernels compiled elsewhere.

Inductor makes the pool at the first Triton kernel it meets if nobody warmed it, and uses
it only once it is ready; so a pool started by a load is not used by that load, and only
costs the CPU of starting it (a GPU farm client: about 8 of its 15 CPU-s, H100, bench
GPT-2 training step)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from .settings import Settings

# The compile threads ``loading_only`` held back, for a compile inside it (``compiling``).
_held_back: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fxoffload_compile_threads_held_back", default=None)


def warm() -> None:
    """Start the pool, as ``torch.compile(backend="inductor")`` does when called
    (``maybe_warm_pool``: a no-op without Triton or with one compile thread)."""
    from torch._inductor import async_compile

    warm_pool = getattr(async_compile, "maybe_warm_pool", None)
    if warm_pool is not None:
        warm_pool()


@contextlib.contextmanager
def loading_only() -> Iterator[None]:
    """In the block, kernels are loaded in the loading thread and no pool is started:
    Inductor's ``compile_threads`` is 1 meanwhile (a context variable in torch 2.13, so
    enter it in the context that loads; process-wide in 2.11, which is harmless: only a
    farm client, which compiles nothing itself unless the farm fails, uses this)."""
    from torch._inductor import config
    from torch._inductor.async_compile import get_compile_threads

    # Nested (a farm client's inner compile inside its backend call): keep what the
    # outer block held back, not the 1 it set.
    threads = _held_back.get()
    token = _held_back.set(get_compile_threads() if threads is None else threads)
    try:
        with config.patch(compile_threads=1):
            yield
    finally:
        _held_back.reset(token)


def loading_only_for(settings: Settings) -> contextlib.AbstractContextManager[None]:
    """``loading_only`` for a farm client (it loads kernels the farm compiled); else
    nothing."""
    return loading_only() if settings.base_mode == "farm" else contextlib.nullcontext()


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """A real compile in this process (a fallback inside ``loading_only``): the compile
    threads Inductor would have had."""
    threads = _held_back.get()
    if threads is None:
        yield
        return
    from torch._inductor import config

    token = _held_back.set(None)
    try:
        with config.patch(compile_threads=threads):
            yield
    finally:
        _held_back.reset(token)
