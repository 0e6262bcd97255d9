"""The torch integration.

Inductor's ``_compile_fx_inner`` looks up the FX graph cache and calls the module-level
``fx_codegen_and_compile`` only on a miss; then it fills the cache. That call is our
boundary: on first use we replace the module attribute with ``_hook``, which offloads
when an fxoffload compile is active and otherwise calls the original, untouched. So a
cache hit never reaches a worker, and a worker's compile fills the parent's caches as a
stock compile would.

"Active" means either:
- inside the ``inner_compile`` that ``backend()`` hands to ``compile_fx`` (a context
  variable, so it covers exactly our compiles, including the backward that AOTAutograd
  compiles lazily through the same ``inner_compile``); or
- inside ``with fxoffload.enabled(...)``, which makes stock ``torch.compile`` offload.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .settings import Settings

log = logging.getLogger("fxoffload")
_active: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "fxoffload_active", default=None)
_enabled_stack: list[Settings] = []
_install_lock = threading.Lock()
_original: Callable[..., Any] | None = None
_original_save: Callable[..., Any] | None = None


def install() -> None:
    """Put ``_hook`` in place of Inductor's ``fx_codegen_and_compile`` and ``_save_graph``
    in front of the FX graph cache's writer (idempotent)."""
    global _original, _original_save
    with _install_lock:
        if _original is not None:
            return
        from torch._inductor import compile_fx
        from torch._inductor.codecache import FxGraphCache

        from ._compat import check_supported

        check_supported()
        _original = compile_fx.fx_codegen_and_compile
        _original_save = FxGraphCache._save_graph
        compile_fx.fx_codegen_and_compile = _hook
        FxGraphCache._save_graph = staticmethod(_save_graph)  # type: ignore[method-assign]


def _save_graph(key: str, compiled_graph: Any, example_inputs: Any, local: bool,
                remote_cache: Any) -> None:
    """A graph still compiling in the background is saved when it arrives, under the key
    and guards computed now (see background.BackgroundOutput.defer_save)."""
    from .background import BackgroundOutput

    if isinstance(compiled_graph, BackgroundOutput):
        from ._compat import guards_expression

        compiled_graph.defer_save(key, guards_expression(example_inputs), local,
                                  remote_cache)
        return
    assert _original_save is not None
    _original_save(key, compiled_graph, example_inputs, local, remote_cache)


def _hook(gm: Any, example_inputs: Any, inputs_to_check: Any,
          compile_region_name: str | None = None, **graph_kwargs: Any) -> Any:
    assert _original is not None
    settings = _active.get() or (_enabled_stack[-1] if _enabled_stack else None)
    if settings is None or settings.base_mode == "inprocess":
        return _original(gm, example_inputs, inputs_to_check,
                         compile_region_name=compile_region_name, **graph_kwargs)
    from . import offload

    return offload.compile(settings, gm, example_inputs, inputs_to_check, graph_kwargs,
                           compile_region_name)


def _with_settings(settings: Settings, inner: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inner)
    def inner_compile(*args: Any, **kwargs: Any) -> Any:
        token = _active.set(settings)
        try:
            return inner(*args, **kwargs)
        finally:
            _active.reset(token)

    return inner_compile


def backend(settings: Settings | None = None, **kwargs: Any) -> Callable[..., Any]:
    """A ``torch.compile`` backend that compiles with Inductor across fxoffload's boundary.

    ``fxoffload.backend(mode="subprocess", workers=2)``; keywords override ``FXOFFLOAD_*``
    variables. Invalid values raise ``ConfigError`` here, not at the first compile."""
    if settings is None:
        settings = Settings.resolve(**kwargs)
    elif kwargs:
        raise TypeError("pass either a Settings object or keywords, not both")
    resolved = settings

    def fxoffload_backend(gm: Any, example_inputs: Any, **options: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        install()
        inner = _with_settings(resolved, compile_fx_inner)
        if resolved.background:
            from . import deferred

            reason = deferred.why_not(resolved, example_inputs)
            if reason is None:
                return deferred.Deferred(resolved, gm, example_inputs, lambda g, e: compile_fx(
                    g, e, inner_compile=inner, **options))
            log.debug("fxoffload: tracing on the caller's thread (%s)", reason)
        return compile_fx(gm, example_inputs, inner_compile=inner, **options)

    fxoffload_backend.settings = resolved  # type: ignore[attr-defined]
    if resolved.background:
        start_background(resolved)
    return fxoffload_backend


def start_background(settings: Settings) -> None:
    """Background modes start their workers now, while Dynamo traces, so the first
    compile does not wait for them; and draw their progress line if asked to."""
    from . import isolation, progress
    from .executors import get_executor

    isolation.install()  # here, on the caller's thread, before anything traces
    if settings.show_progress:
        progress.enable()
    get_executor(settings).warmup(wait=False)


_prepared: set[str] = set()


def prepare_parent(device: str | None = None) -> None:
    """Do now, once, the parent's share of a first compile that does not depend on the
    graph: import Inductor's compile path, register the joint-graph patterns for
    ``device``, hash torch's sources and read the system info (the FX cache key's parts);
    on the CPU, probe the vector ISAs that loading compiled code checks first.
    About 1.5-2 s of a cold process that would otherwise fall on the first call, which
    matters most in async modes, where that call should cost little more than eager.

    Called by ``fxoffload.warmup()`` in the caller's thread, never in a thread of ours:
    imports racing Dynamo's own imports of the same circular modules can deadlock.
    Best effort: a step that fails here simply happens at the first compile, as stock."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        from .errors import ConfigError

        raise ConfigError(f"fxoffload.warmup(device={device!r}): not a device ({exc})") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if str(dev) in _prepared:
        return
    _prepared.add(str(dev))
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("import compile_fx", lambda: __import__("torch._inductor.compile_fx")),
        ("torch_key", _torch_key),
        ("system info", _system_info),
        ("joint-graph patterns", lambda: _joint_graph_patterns(dev)),
    ]
    if dev.type == "cpu":  # loading compiled CPU code probes the CPU's vector ISAs first
        steps.append(("CPU vector ISAs", _cpu_isa))
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the first compile does it again, as stock
            log.debug("fxoffload: preparing %s failed (%s: %s); the first compile does it",
                      name, type(exc).__name__, exc)


def _torch_key() -> None:
    from torch._inductor.codecache import torch_key

    torch_key()


def _system_info() -> None:
    from torch._inductor.codecache import CacheBase

    CacheBase.get_system()


def _cpu_isa() -> None:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()


def _joint_graph_patterns(dev: Any) -> None:
    from torch._inductor.fx_passes.joint_graph import lazy_init

    lazy_init(dev)


def fxoffload_backend(gm: Any, example_inputs: Any, **options: Any) -> Any:
    """The ``backend="fxoffload"`` entry point: settings from the environment, read at
    the first compile."""
    return _env_backend()(gm, example_inputs, **options)


@functools.cache
def _env_backend() -> Callable[..., Any]:
    return backend()


@contextlib.contextmanager
def enabled(settings: Settings | None = None, **kwargs: Any) -> Iterator[Settings]:
    """Make stock ``torch.compile(model)`` (backend "inductor") offload inside the block;
    stock behaviour returns on exit."""
    if settings is None:
        settings = Settings.resolve(**kwargs)
    install()
    if settings.background:
        start_background(settings)
    _enabled_stack.append(settings)
    try:
        yield settings
    finally:
        _enabled_stack.remove(settings)
