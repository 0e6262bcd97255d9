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

from . import compile_pool, patches, pool_start
from .settings import Settings

log = logging.getLogger("fxoffload")
_active: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "fxoffload_active", default=None)
_enabled_stack: list[Settings] = []
_install_lock = threading.RLock()
_original: Callable[..., Any] | None = None
_original_save: Callable[..., Any] | None = None
_backend_made = False  # since the last release(): the hook stays after enabled() blocks


def install() -> None:
    """Put ``_hook`` in place of Inductor's ``fx_codegen_and_compile`` and ``_save_graph``
    in front of the FX graph cache's writer (idempotent; ``patches`` group "hook")."""
    global _original, _original_save
    if patches.is_installed("hook"):
        return
    with _install_lock:
        if patches.is_installed("hook"):
            return
        from torch._inductor import compile_fx
        from torch._inductor.codecache import FxGraphCache

        from ._compat import check_supported, use_torch_ptxas

        check_supported()
        use_torch_ptxas()
        _original = compile_fx.fx_codegen_and_compile
        _original_save = FxGraphCache._save_graph
        patches.replace("hook", FxGraphCache, "_save_graph", staticmethod(_save_graph))
        patches.replace("hook", compile_fx, "fx_codegen_and_compile", _hook)


def release() -> None:
    """Stock Inductor back, unless an ``enabled()`` block is open (``shutdown()``; leaving
    the last block when no backend was made since). A compile that starts later through a
    backend made before puts the hook back (``install`` at every backend compile)."""
    global _backend_made
    with _install_lock:
        _backend_made = False
        if not _enabled_stack:
            patches.uninstall("hook")


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

    settings = offload.for_graph(settings, gm)
    if settings.background:
        from .background import compile_in_background

        return compile_in_background(settings, offload.current_fake_mode(example_inputs), gm,
                                     example_inputs, inputs_to_check, graph_kwargs,
                                     compile_region_name)
    return offload.compile(settings, gm, example_inputs, inputs_to_check, graph_kwargs,
                           compile_region_name)


def _with_settings(settings: Settings, inner: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inner)
    def inner_compile(*args: Any, **kwargs: Any) -> Any:
        install()  # a backward compiled lazily, after a shutdown()
        token = _active.set(settings)
        try:
            # a farm client: also a backward compiled at its first call
            with compile_pool.loading_only_for(settings):
                return inner(*args, **kwargs)
        finally:
            _active.reset(token)

    return inner_compile


def backend(settings: Settings | None = None, **kwargs: Any) -> Callable[..., Any]:
    """A ``torch.compile`` backend that compiles with Inductor across fxoffload's boundary.

    ``fxoffload.backend(mode="subprocess", workers=2)``; keywords override ``FXOFFLOAD_*``
    variables. Invalid values raise ``ConfigError`` here, not at the first compile."""
    resolved = _checked(settings, kwargs)

    def compile_with_hook(g: Any, e: Any, options: dict[str, Any],
                          settings: Settings = resolved) -> Any:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        from .offload import compile_scope

        install()
        with counting_cache_hits(), compile_scope(), _farm_graphs(settings), \
                pool_start.on_miss(settings), compile_pool.loading_only_for(settings):
            return compile_fx(g, e, inner_compile=_with_settings(settings, compile_fx_inner),
                              **options)

    def fxoffload_backend(gm: Any, example_inputs: Any, **options: Any) -> Any:
        from .offload import for_graph

        settings = for_graph(resolved, gm)  # ranks stay in step (offload.in_step)
        if settings.background:
            from . import deferred, isolation

            isolation.install()  # again after a shutdown(); before anything traces
            reason = deferred.why_not(resolved, example_inputs)
            if reason is None:
                return deferred.Deferred(resolved, gm, example_inputs, functools.partial(
                    compile_with_hook, options=options))
            log.debug("fxoffload: tracing on the caller's thread (%s)", reason)
        try:
            return compile_with_hook(gm, example_inputs, options, settings)
        except Exception as e:
            ours = _ours(e)
            if ours is None:
                raise
            raise ours.with_traceback(e.__traceback__) from None

    fxoffload_backend.settings = resolved  # type: ignore[attr-defined]
    # Inductor's compile path is imported, and the hook put in place, now, as
    # torch.compile(backend="inductor") imports it when called: 0.4-0.6 s that would
    # otherwise fall on the first call.
    global _backend_made
    _backend_made = True
    install()
    if resolved.background:
        start_background(resolved)
    elif resolved.base_mode == "farm":
        # No Inductor compile pool (below): the farm's workers are up before any client,
        # which compiles only if the farm fails; the pool's processes (one per core, each
        # importing torch) were most of a GPU farm client's CPU time.
        from .executors import get_executor

        get_executor(resolved).warmup()  # joins the farm's cluster now
    else:
        # A synchronous backend may compile in this process (no warm worker yet): start
        # Inductor's Triton compile pool now, as torch.compile(backend="inductor") does.
        compile_pool.warm()
        from .prepare import probe_cpu_isa_ahead

        probe_cpu_isa_ahead(resolved.base_mode)
    return fxoffload_backend


def _farm_graphs(settings: Settings) -> contextlib.AbstractContextManager[None]:
    """AOTAutograd's cache shared through the farm (``farm.graphs``), in mode farm."""
    if settings.base_mode != "farm" or not settings.farm_graphs:
        return contextlib.nullcontext()
    from .executors import get_executor
    from .farm.graphs import serving

    return serving(get_executor(settings),
                   lease_s=min(settings.timeout, settings.farm_graph_wait))


@contextlib.contextmanager
def counting_cache_hits() -> Iterator[None]:
    """Count the FX graph cache's and AOTAutograd cache's hits inside the block (compiles
    of ours: a hit never reaches the hook) into ``stats()``."""
    from torch._dynamo.utils import counters

    from .tally import STATS

    fx, aot = counters["inductor"]["fxgraph_cache_hit"], \
        counters["aot_autograd"]["autograd_cache_hit"]
    try:
        yield
    finally:
        STATS.add(fx_cache_hits=counters["inductor"]["fxgraph_cache_hit"] - fx,
                  aot_cache_hits=counters["aot_autograd"]["autograd_cache_hit"] - aot)


def _checked(settings: Settings | None, kwargs: dict[str, Any]) -> Settings:
    """The settings for a backend or ``enabled`` block, with what they name on disk and
    in the environment checked now: bad input fails here, not at the first compile."""
    if settings is None:
        settings = Settings.resolve(**kwargs)
    elif kwargs:
        raise TypeError("pass either a Settings object or keywords, not both")
    elif not isinstance(settings, Settings):
        raise TypeError(f"settings must be fxoffload.Settings, not {type(settings).__name__}")
    if settings.base_mode == "capture" and settings.capture_dir is not None:
        _check_writable_dir(settings.capture_dir, "capture_dir / FXOFFLOAD_CAPTURE_DIR")
    if settings.base_mode == "farm":
        _check_farm(settings)
    from . import timeline

    check_trace = getattr(timeline, "check_env", None)
    if check_trace is not None:
        check_trace()
    _warn_overlap()
    return settings


def _check_farm(settings: Settings) -> None:
    """Ray installed, the farm key readable, an address known: else ``ConfigError``."""
    from . import farm, signing

    farm.import_ray()
    from .executors.farm import key_file_of

    key_file = key_file_of(settings)
    signing.load_key(key_file)
    farm.resolve_address(settings.farm, key_file)


def _check_writable_dir(path: Any, where: str) -> None:
    import os
    import tempfile

    from .errors import ConfigError

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{where}={str(path)!r} is not a writable directory: {e}") from None


_overlap_warned = False


def _warn_overlap() -> None:
    """Torch's own FX compile mode beside ours: ours takes the compiles it reaches first."""
    global _overlap_warned
    import os

    mode = os.environ.get("TORCHINDUCTOR_FX_COMPILE_MODE")
    if mode and mode.upper() != "NORMAL" and not _overlap_warned:
        _overlap_warned = True
        log.warning("fxoffload: TORCHINDUCTOR_FX_COMPILE_MODE=%s is set too: fxoffload "
                    "compiles every graph of its backends and enabled() blocks itself (torch's "
                    "mode never sees them); graphs compiled outside those follow torch's "
                    "mode. Unset it to avoid two offloading schemes in one process.", mode)


def _ours(error: BaseException) -> BaseException | None:
    """For ``on_failure="raise"``: fxoffload's own error inside the wrappers Inductor and
    Dynamo put around a backend's errors, as one Dynamo lets through unwrapped."""
    from .errors import FxOffloadError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FxOffloadError):
            return surfaced(error)
        error = (getattr(error, "inner_exception", None) or error.__cause__
                 or error.__context__)
    return None


_surfaced_types: dict[type, type] = {}


def surfaced(error: BaseException) -> BaseException:
    """``error`` as an instance of a subclass of its own type that Dynamo re-raises as is
    (its ``ShortenTraceback``): ``except fxoffload.WorkerTimeout`` catches it, where
    Dynamo would raise ``BackendCompilerFailed`` wrapping it."""
    from torch._dynamo.exc import ShortenTraceback

    if isinstance(error, ShortenTraceback):
        return error
    cls = type(error)
    if cls not in _surfaced_types:
        _surfaced_types[cls] = type(cls.__name__, (cls, ShortenTraceback), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__init__": BaseException.__init__, "__str__": cls.__str__})
    new = _surfaced_types[cls].__new__(_surfaced_types[cls], *error.args)
    new.__dict__.update(error.__dict__)
    new.args = error.args
    new.first_useful_frame = None
    new.__cause__ = error.__cause__
    return new


def start_background(settings: Settings) -> None:
    """Background modes start their workers early, so the first compile does not wait
    for them: at the first AOTAutograd cache miss (``pool_start``), else now, while
    Dynamo traces (where cores are scarce: at the first graph's compile); and draw their
    progress line if asked to."""
    from . import isolation, progress
    from .executors import get_executor

    isolation.install()  # here, on the caller's thread, before anything traces
    if settings.show_progress:
        progress.enable()
    if pool_start.waits_for_miss(settings):
        return
    # A compile is about to come: the workers only get their CUDA context and compile
    # pool ready, not a warm-up compile that the first request would wait behind.
    executor = get_executor(settings)
    if not pool_start.scarce_cores(settings):  # else the pool starts in cold_route
        executor.warmup(wait=False, full=False)
    pool_start.warm_for_here(settings, executor)


def __getattr__(name: str) -> Any:
    # ``backend="fxoffload"``: Dynamo loads this entry point in ``torch.compile(...)``, so
    # the FXOFFLOAD_* variables are read, and bad ones raise ConfigError, right there.
    if name == "fxoffload_backend":
        return _env_backend()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _env_backend() -> Callable[..., Any]:
    return backend()


@contextlib.contextmanager
def enabled(settings: Settings | None = None, **kwargs: Any) -> Iterator[Settings]:
    """Make stock ``torch.compile(model)`` (backend "inductor") offload inside the block;
    stock behaviour returns on exit."""
    settings = _checked(settings, kwargs)
    with _install_lock:
        install()
        _enabled_stack.append(settings)
    try:
        if settings.background:
            start_background(settings)
        with counting_cache_hits():
            yield settings
    finally:
        with _install_lock:
            _enabled_stack.remove(settings)
            if not _enabled_stack and not _backend_made:
                release()
