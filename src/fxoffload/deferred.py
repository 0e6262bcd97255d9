"""Async modes, one level up: AOTAutograd's trace, Inductor's front half and the
request's pickling run on a thread of ours, so a static graph's first call costs Dynamo's
trace and an eager run of Dynamo's own graph, as with ``backend="eager"``.

    Dynamo ─► backend(gm) ─► Deferred ─────────────► caller: gm(*args), eagerly
                               │ fxoffload-front thread, under Dynamo's compile lock
                               ▼
              compile_fx(gm) ─► AOTAutograd cache ── hit ──► ready: the first call waits
                                  │ miss: the first call stops waiting, runs eagerly
                                  ▼
              AOT trace ─► FX cache ─► BackgroundOutput (background.py) ─► ready
      later calls: what compile_fx returned, whose outputs run eagerly until their
      worker's compile arrives, then compiled

When no cache can answer (AOTAutograd's cache off, or its directory empty and no remote
cache: a cold start), the first call does not wait for the lookup, and the trace starts
only once that first eager call has run: beside the trace it would wait on the GIL.

The thread holds Dynamo's compile lock, as Dynamo's own compiles do, so it never traces
beside Dynamo: much of the tracing machinery (node metadata, the metrics context) is
process-global. A frame Dynamo must convert meanwhile waits for it, as it would wait
for a stock compile.

The thread compiles under the config the caller had when Dynamo called the backend: in
a copy of the caller's context where config patches are context variables (2.13); where
they are process-global (2.11), in a private view of the config (``private_config``), so
a ``config.patch`` inside the compile on our thread never restores over values the
user's thread changed meanwhile.

A graph is deferred only when the compile cannot add guards that Dynamo, having
returned, would no longer install: no symbolic shapes, no aliased inputs; and only under
thread-local state we can reproduce on our thread (grad mode; no autocast, inference
mode or torch-function mode). Anything else compiles on the caller's thread, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import (
    _compat,
    cpu_threads,
    isolation,
    naming,
    offload,
    pending,
    prepare,
    private_config,
    progress,
    timeline,
)
from .errors import PoolClosed, TraceFailed
from .settings import Settings
from .tally import STATS

log = logging.getLogger("fxoffload")

_local = threading.local()  # .job: the Deferred whose compile this thread runs
# While a front thread traces beside the caller's eager steps, the interpreter switches
# threads every 0.5 ms instead of 5: each torch op releases the GIL, and at 5 ms the
# caller would wait up to 5 ms for it back after every op.
_SWITCH_INTERVAL = 0.0005
_switch_lock = threading.Lock()
_fronts = 0
_user_interval = 0.0


def why_not(settings: Settings, example_inputs: Sequence[Any]) -> str | None:
    """None when this graph's compile can be deferred; else the reason it cannot."""
    if not settings.defer_trace:
        return "off"
    if not private_config.config_can_be_private():
        return "this torch's config cannot be given a thread of its own"
    if getattr(_local, "job", None) is not None:
        return "nested"
    if torch.is_inference_mode_enabled():
        return "inference mode"
    if any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
        return "autocast"
    if torch._C._len_torch_function_stack() > 0:
        return "torch-function mode"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "functorch transform"
    from torch._inductor import config

    if config.triton.cudagraphs:
        return "cudagraphs"
    fake_mode = offload.current_fake_mode(example_inputs)
    if _compat.has_symbols(getattr(fake_mode, "shape_env", None)):
        return "symbolic shapes"
    storages: set[Any] = set()
    for t in example_inputs:
        if not isinstance(t, torch.Tensor):
            if isinstance(t, torch.SymInt | torch.SymFloat | torch.SymBool):
                return "symbolic shapes"
            continue
        key = t.untyped_storage()._cdata
        if key in storages:
            return "aliased inputs"
        storages.add(key)
    return None


class Deferred:
    """What the backend hands Dynamo for a deferred graph: Dynamo's graph, run eagerly,
    until ``compile_fx``'s result is ready on the front thread."""

    def __init__(self, settings: Settings, gm: torch.fx.GraphModule,
                 example_inputs: Sequence[Any], compile: Callable[[Any, Any], Any]) -> None:
        self._settings = settings
        self._gm = gm
        self._on_cpu = not offload.uses_gpu(example_inputs)
        self._eager: Callable[..., Any] | None = None
        self._compiled: Callable[..., Any] | None = None
        self._error: BaseException | None = None
        self._decided = threading.Event()  # the first call may run eagerly, or _done
        self._done = threading.Event()
        self._grad = torch.is_grad_enabled()
        self._cuda_device = isolation.caller_cuda_device(self._on_cpu)
        self._private_config = private_config.config_snapshot()
        self._tracing = torch._guards.TracingContext.try_get()
        self._compile_ctx = torch._guards.CompileContext.try_get()
        # The trace starts once the first call has run (or after _FIRST_CALL_WAIT): beside
        # the trace, on the GIL, that call would take twice as long.
        self._first_ran = threading.Event()
        if not _compat.cache_can_hit():
            # No cache can answer this graph (an empty cache dir: a cold start), so the
            # first call need not wait for the lookup: it runs a copy eagerly at once (the
            # front thread's compile_fx rewrites the graph it is given).
            self._eager = torch.fx.GraphModule(gm, _copy_graph(gm.graph))
            self._decided.set()
        else:  # a hit's first call runs compiled: the trace starts at once
            self._first_ran.set()
        # Named now, on the caller's thread, while Dynamo's translator is there to ask.
        self._graph = naming.identify(gm)
        self._job = progress.track(self._graph, progress.TRACING)
        pending.started(background_traces=1)
        # Config patches are context variables on torch 2.13: the thread starts in a
        # copy of the caller's context, so it compiles under the config Dynamo saw.
        context = contextvars.copy_context()
        _compat.import_before_threads()
        thread = threading.Thread(target=context.run,
                                  args=(self._run, compile, list(example_inputs)),
                                  daemon=True, name="fxoffload-front")
        _running(thread)
        thread.start()

    # -- the caller's side ------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            if not self._decided.is_set():
                self._decided.wait()
            compiled = self._compiled
            if compiled is None:
                error = self._error
                if error is not None:  # on_failure="raise": once; then eager, as "eager"
                    self._error = None
                    raise error
                return self._run_eagerly(args)
        return compiled(*args)

    def _run_eagerly(self, args: tuple[Any, ...]) -> Any:
        STATS.add(eager_runs=1)
        assert self._eager is not None
        threads = cpu_threads.beside_workers() if self._on_cpu else contextlib.nullcontext()
        first = not self._first_ran.is_set()  # the first output is not held back
        t0 = time.perf_counter()
        try:
            with threads:
                out = self._eager(*args)
        finally:
            self._first_ran.set()
        if not first:
            cpu_threads.pace(time.perf_counter() - t0)
        return out

    # -- the front thread -------------------------------------------------------------
    def _run(self, compile: Callable[[Any, Any], Any], example_inputs: list[Any]) -> None:
        from torch._dynamo.convert_frame import compile_lock

        t0 = t1 = time.perf_counter()
        _local.job = self
        try:
            self._first_ran.wait(_FIRST_CALL_WAIT)
            with contextlib.ExitStack() as locks:
                locks.enter_context(compile_lock)
                t1 = time.perf_counter()
                if self._eager is None:
                    # The caller runs a copy: compile_fx rewrites the graph it is given.
                    self._eager = torch.fx.GraphModule(self._gm, _copy_graph(self._gm.graph))
                if not isolation.turn.acquire(blocking=False):
                    # async+serde compiles on another of our threads now (isolation:
                    # the FX node metadata). Wait for it without Dynamo's lock, the
                    # caller running this graph eagerly meanwhile.
                    locks.close()
                    self._decided.set()
                    isolation.turn.acquire()
                    locks.callback(isolation.turn.release)
                    locks.enter_context(compile_lock)
                else:
                    locks.callback(isolation.turn.release)
                if not _compat.watch_aot_cache_lookup(_looked_up):
                    self._decided.set()
                if self._on_cpu:
                    # The first output is out: Inductor's CPU vector-ISA probes (C++
                    # builds its first kernel would wait for) run beside the trace.
                    prepare.probe_cpu_isa_ahead(self._settings.base_mode)
                with private_config.private_config(self._private_config), _state(self), \
                        isolation.our_thread(), _fast_switching(), cpu_threads.tracing():
                    compiled = compile(self._gm, example_inputs)
                self._compiled = compiled
        except PoolClosed as e:  # shutdown or interpreter exit: nothing to report
            log.debug("fxoffload: deferred compile abandoned: %s", e)
        except BaseException as e:  # noqa: BLE001 - reported to the caller's thread
            if pending.exiting():
                log.debug("fxoffload: deferred compile abandoned at exit: %s", e)
                return
            error = TraceFailed(e)
            error.__cause__ = e
            if self._settings.on_failure == "raise":
                self._error = error
            else:
                with timeline.about(**self._graph.args()):
                    offload.note_failure(error.reason, error, "running the graph eagerly "
                                         "from now on")
        finally:
            _local.job = None
            if self._eager is None:  # the copy failed: run Dynamo's graph itself
                self._eager = self._gm
            self._done.set()
            self._decided.set()
            progress.trace_ended(self._job, ok=self._compiled is not None)
            if (tl := timeline.get()) is not None:
                label, graph = self._graph.label, self._graph.args
                tl.span(f"wait for Dynamo graph {label}", t0, t1, track=3,
                        track_name="front (AOTAutograd + Inductor front half)",
                        **graph(step="wait for Dynamo"))
                tl.span(f"trace graph {label}", t1, time.perf_counter(), track=3,
                        track_name="front (AOTAutograd + Inductor front half)",
                        **graph(step="trace"))
                tl.flush()
            STATS.add(trace_s=time.perf_counter() - t1)
            pending.finished()
            with _threads_lock:
                _threads.discard(threading.current_thread())


# At most this long the trace waits for the graph's first (eager) call to finish.
_FIRST_CALL_WAIT = 5.0
_threads: set[threading.Thread] = set()
_threads_lock = threading.Lock()
_EXIT_WAIT = 120.0


def _running(thread: threading.Thread) -> None:
    """Track a front thread; the first one registers the exit hook."""
    with _threads_lock:
        if not _threads and not getattr(_running, "hooked", False):
            import atexit

            atexit.register(_join_at_exit)
            _running.hooked = True  # type: ignore[attr-defined]
        _threads.add(thread)


def _join_at_exit() -> None:
    """Let traces in flight finish before the interpreter finalizes: a daemon thread
    stopped inside torch's C++ code aborts the process ("terminate called without an
    active exception"). A trace takes seconds; one stuck past ``_EXIT_WAIT`` is left."""
    deadline = time.monotonic() + _EXIT_WAIT
    with _threads_lock:
        threads = list(_threads)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _looked_up(hit: bool) -> None:
    job = getattr(_local, "job", None)
    if job is not None and not hit:
        job._decided.set()


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph(owning_module=None, tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = graph._codegen
    return new


@contextlib.contextmanager
def _state(job: Deferred) -> Iterator[None]:
    """On the front thread: the caller's grad mode, CUDA device, tracing and compile
    contexts (its config comes with ``private_config``). And a training graph's
    backward is handed to the hook now, not at the first backward through the compiled
    forward: the first steps ran Dynamo's graph, so that backward would only come after
    the trace, one step later."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(job._grad))
        stack.enter_context(isolation.on_cuda_device(job._cuda_device))
        if job._tracing is not None:
            stack.enter_context(torch._guards.tracing(job._tracing))
        if job._compile_ctx is not None:
            stack.enter_context(torch._guards.compile_context(job._compile_ctx))
        stack.enter_context(_compat.backward_compiled_at_once())
        yield


@contextlib.contextmanager
def _fast_switching() -> Iterator[None]:
    global _fronts, _user_interval
    with _switch_lock:
        if _fronts == 0:
            _user_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_user_interval, _SWITCH_INTERVAL))
        _fronts += 1
    try:
        yield
    finally:
        with _switch_lock:
            _fronts -= 1
            if _fronts == 0:
                sys.setswitchinterval(_user_interval)
