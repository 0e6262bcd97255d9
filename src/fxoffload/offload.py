"""The parent's side of one compile: build the request, hand it to an executor, turn the
response back into the ``OutputCode`` Inductor expects, and replay what the child saw.

    compile_fx_inner (cache miss) ─► compile() ─► capture_state + encode_request
        ─► executor.submit ─► decode_response ─► after_deserialization ─► replay
           (metrics, counters, save_output_code, warnings, log records, boxes)

Anything that cannot cross, or fails on the other side, is compiled in-process instead
(``on_failure="fallback"``, the default) and counted under a named reason, with one
WARNING per reason; ``"eager"`` runs the graph eagerly instead, and ``"raise"`` raises the
typed error. Async and progressive modes hand over to ``background`` after the request
is built.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from . import _compat, compile_pool, device_index, kernel_reuse, naming, protocol, timeline
from .eager import EagerOutput
from .errors import FxOffloadError, NotOffloadable, RemoteCompileError
from .executors import get_executor
from .settings import Settings
from .state import capture_state
from .tally import STATS

log = logging.getLogger("fxoffload")


def current_fake_mode(example_inputs: Sequence[Any]) -> Any:
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return context.fake_mode
    mode = torch._guards.detect_fake_mode(example_inputs)
    if mode is not None:
        return mode
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv())


def check_offloadable(gm: torch.fx.GraphModule) -> None:
    from torch._higher_order_ops.triton_kernel_wrap import (
        triton_kernel_wrapper_functional,
        triton_kernel_wrapper_mutation,
    )

    wrappers = (triton_kernel_wrapper_functional, triton_kernel_wrapper_mutation)
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.target in wrappers:
                    raise NotOffloadable(
                        "user_triton_kernel",
                        "the graph calls a user-defined Triton kernel, which lives in a "
                        "process-local side table",
                    )


_COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional",
                                    "_c10d_functional_autograd", "c10d", "_dtensor"})


def has_collectives(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph (Dynamo's or AOTAutograd's) calls a collective."""
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket) \
                    and str(target).split(".", 1)[0] in _COLLECTIVE_NAMESPACES:
                return True
            if getattr(target, "__module__", "").startswith("torch.distributed"):
                return True
    return False


def for_graph(settings: Settings, gm: Any) -> Settings:
    """The settings ``gm`` compiles under: ``in_step``'s when it holds collectives (the one
    rule, applied to Dynamo's graph before the trace and to AOTAutograd's in the hook)."""
    return in_step(settings) if has_collectives(gm) else settings


def in_step(settings: Settings) -> Settings:
    """The settings a graph with collectives compiles under: synchronously, and never
    run eagerly on failure. Ranks that ran it eagerly while others ran compiled code
    could issue their collectives in another order (Inductor reorders them) and hang;
    compiled from the first call on every rank, and compiled to stock's code when the
    offload fails, every rank issues them in one order."""
    if not settings.background and settings.on_failure != "eager":
        return settings
    return dataclasses.replace(settings, mode=settings.base_mode,
                               on_failure=("fallback" if settings.on_failure == "eager"
                                           else settings.on_failure))


def uses_gpu(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type in ("cuda", "xpu")
               for t in example_inputs)


def in_process(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
               inputs_to_check: Sequence[int], graph_kwargs: dict[str, Any],
               compile_region_name: str | None) -> Any:
    from torch._inductor.compile_fx import _InProcessFxCompile

    scheme = _InProcessFxCompile()
    scheme.compile_region_name = compile_region_name
    with compile_pool.compiling():  # a farm client's fallback: its full compile threads
        return scheme.codegen_and_compile(gm, example_inputs, inputs_to_check, graph_kwargs)


def note_failure(reason: str, error: BaseException, action: str) -> None:
    """Count a failed offload under its reason; one WARNING per reason, then DEBUG."""
    if (tl := timeline.get()) is not None:
        tl.instant(f"fallback: {reason}", time.perf_counter(), error=str(error)[:500])
        tl.flush()
    if STATS.count_fallback(reason) == 1:
        log.warning("fxoffload: %s (%s): %s", action, reason, error)
    else:
        log.debug("fxoffload: %s (%s): %s", action, reason, error)


def fall_back(reason: str, error: BaseException, *args: Any) -> Any:
    note_failure(reason, error, "compiling in-process instead")
    return in_process(*args)


def build_request(settings: Settings, gm: torch.fx.GraphModule,
                  example_inputs: Sequence[Any], inputs_to_check: Sequence[int],
                  graph_kwargs: dict[str, Any], compile_region_name: str | None,
                  fake_mode: Any) -> bytes:
    """The request bytes for this compile, under the parent's current state and config;
    ``NotOffloadable`` when it cannot cross."""
    request = _new_request(gm, example_inputs, inputs_to_check, graph_kwargs,
                           compile_region_name, fake_mode)
    return protocol.encode_request(
        request, extra_imports=settings.worker_imports,
        rebind=device_index.plan(settings.executor, gm, example_inputs, graph_kwargs))


def build_requests(settings: Settings, gm: torch.fx.GraphModule,
                   example_inputs: Sequence[Any], inputs_to_check: Sequence[int],
                   graph_kwargs: dict[str, Any], compile_region_name: str | None,
                   fake_mode: Any) -> tuple[bytes, bytes | None]:
    """``build_request``'s bytes and, where they are written for the canonical CUDA device
    (``device_index``), the same compile written for this process's own: the one to
    compile here, where the canonical request would make a context on another rank's
    GPU. One request, state captured once, encoded once or twice."""
    request = _new_request(gm, example_inputs, inputs_to_check, graph_kwargs,
                           compile_region_name, fake_mode)
    rebind = device_index.plan(settings.executor, gm, example_inputs, graph_kwargs)
    shared = protocol.encode_request(request, extra_imports=settings.worker_imports,
                                     rebind=rebind)
    if rebind is None:
        return shared, None
    return shared, protocol.encode_request(request, extra_imports=settings.worker_imports)


def _new_request(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 inputs_to_check: Sequence[int], graph_kwargs: dict[str, Any],
                 compile_region_name: str | None, fake_mode: Any) -> protocol.CompileRequest:
    check_offloadable(gm)
    return protocol.CompileRequest(
        gm=gm, example_inputs=list(example_inputs), inputs_to_check=list(inputs_to_check),
        graph_kwargs=dict(graph_kwargs),
        tracing_context=torch._guards.TracingContext.try_get(),
        compile_region_name=compile_region_name,
        state=capture_state(fake_mode, gpu=uses_gpu(example_inputs)),
    )


def check_response(response: protocol.CompileResponse) -> None:
    """Raise the typed error a failed response carries."""
    if response.error is not None:
        reason, summary, tb = response.error
        raise RemoteCompileError(summary, tb, reason=reason)


def install(response: protocol.CompileResponse, gm: torch.fx.GraphModule,
            graph_kwargs: dict[str, Any], compile_region_name: str | None) -> Any:
    """Replay what the child saw, then make its graph callable here."""
    replay(response, foreign=not protocol.ran_here(response))
    check_response(response)
    from torch._inductor.output_code import CompiledFxGraph

    graph = load(response, gm)
    if isinstance(graph, CompiledFxGraph):
        graph.compile_region_name = compile_region_name
    for key, value in response.boxes.items():
        box = graph_kwargs.get(key)
        if box is not None and hasattr(box, "value"):
            box.value = value
    return graph


def load(response: protocol.CompileResponse, gm: torch.fx.GraphModule) -> Any:
    """The response's graph, loaded (its module, C++ and Triton kernels included), once:
    the part of an install that costs, which background modes do ahead of the swap. A
    copy is loaded, so ``response.graph`` stays ready to be written to the FX cache."""
    from torch._inductor.output_code import CompiledFxGraph, CompiledFxGraphConstantsWithGm

    if response.loaded is None:
        graph = response.graph
        if response.vec_isa is not None and _compat.adopt_vec_isa(response.vec_isa):
            STATS.add(vec_isa_adopted=1)
        if response.gpu_less:
            STATS.add(gpu_less_compiles=1)
        if response.rebound is not None:
            STATS.add(device_rebinds=1)
        if isinstance(graph, CompiledFxGraph):
            loaded = object.__new__(type(graph))
            loaded.__dict__.update(graph.__dict__)
            with kernel_reuse.reusing(graph.source_code) as reused:
                loaded.after_deserialization(CompiledFxGraphConstantsWithGm(gm))
            if reused:
                STATS.add(kernels_reused=len(reused))
            graph = loaded
        response.loaded = graph
    return response.loaded


def compile(settings: Settings, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
            inputs_to_check: Sequence[int], graph_kwargs: dict[str, Any],
            compile_region_name: str | None) -> Any:
    """A synchronous compile through ``settings``' executor (background modes:
    ``background.compile_in_background``; ``integration`` picks)."""
    assert not settings.background
    args = (gm, example_inputs, inputs_to_check, graph_kwargs, compile_region_name)
    fake_mode = current_fake_mode(example_inputs)
    executor = get_executor(settings)
    if not executor.ready_now():
        # No warm worker is free: waiting for one would make this compile slower than
        # stock's. Compile it here; the pool starts when this compile is done, for the
        # graphs to come (its workers start in the idle CPU class: see worker.main).
        STATS.count_in_process("no_warm_worker")
        if (tl := timeline.get()) is not None:
            tl.instant("compiling here: no warm worker yet", time.perf_counter())
        with contextlib.ExitStack() as stack:
            # The pool's start-up waits until this compile is done: it would slow it.
            # Inside a backend call, until that call is done (Inductor's post-compile work
            # and module load come after this function).
            scope = _compile_scope.get()
            (scope or stack).enter_context(executor.paused())
            executor.warmup(wait=False)
            return in_process(*args)
    t0 = time.perf_counter()
    try:
        data = build_request(settings, *args, fake_mode)
    except NotOffloadable as e:
        return handle_failure(settings, e.reason, e, args)
    t1 = time.perf_counter()

    try:
        future = submit(settings, data)
        raw = future.result()
        t2 = time.perf_counter()
        response = protocol.decode_response(raw, fake_mode, request=data)
        t3 = time.perf_counter()
        graph = install(response, gm, graph_kwargs, compile_region_name)
    except FxOffloadError as e:
        return handle_failure(settings, getattr(e, "reason", type(e).__name__), e, args)
    t4 = time.perf_counter()
    if (tl := timeline.get()) is not None:
        _trace(tl, settings, gm, response, t0, t1, t2, t4, data=data, raw=raw)
    started = getattr(future, "started", t1)  # when a worker took it
    STATS.add(graphs_offloaded=1, bytes_sent=len(data), bytes_received=len(raw),
              serialize_s=t1 - t0, compile_s=response.compile_s,
              queue_wait_s=max(0.0, started - t1),
              transfer_s=max(0.0, (t2 - max(t1, started)) - response.compile_s),
              deserialize_s=(t3 - t2) + (t4 - t3))
    return graph


def submit(settings: Settings, request: bytes) -> Future[bytes]:
    """Every compile request leaves through here, to ``settings``' executor: sync
    (``compile``), background stages, and a background graph's in-process fallback
    (``settings`` with mode ``serde``: compiled on the calling thread)."""
    return get_executor(settings).submit(request, timeout=settings.timeout)


_compile_scope: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "fxoffload_compile_scope", default=None)


@contextlib.contextmanager
def compile_scope() -> Iterator[None]:
    """A backend call: what a cold compile pauses stays paused until the call is done."""
    if _compile_scope.get() is not None:
        yield
        return
    with contextlib.ExitStack() as stack:
        token = _compile_scope.set(stack)
        try:
            yield
        finally:
            _compile_scope.reset(token)


def handle_failure(settings: Settings, reason: str, error: FxOffloadError,
                   args: tuple[Any, ...]) -> Any:
    """Apply ``on_failure`` to a compile that could not be offloaded or came back failed."""
    if settings.on_failure == "raise":
        from .integration import surfaced

        raise surfaced(error)
    if settings.on_failure == "eager":
        note_failure(reason, error, "running the graph eagerly instead")
        return EagerOutput(args[0])
    return fall_back(reason, error, *args)


def _trace(tl: timeline.Timeline, settings: Settings, gm: torch.fx.GraphModule,
           response: protocol.CompileResponse, t0: float, t1: float, t2: float,
           t4: float, *, data: bytes | None = None, raw: bytes | None = None) -> None:
    """A synchronous compile's spans, named by the graph's Dynamo compile id (this runs
    on the caller's thread, inside Dynamo's compile); ``data``/``raw``, when given, add
    the request's and response's sizes and the request's id."""
    graph = naming.identify(gm)
    name = f"graph {graph.label}"
    args = graph.args(stage=0, pid=response.pid,
                      bytes_sent=len(data) if data is not None else None,
                      bytes_received=len(raw) if raw is not None else None)
    if data is not None:
        try:
            args["request"] = protocol.split_request(data, check_torch=False)[0].request_id
        except Exception:  # noqa: BLE001 - a name for the timeline, nothing more
            pass
    tl.span(f"serialize {name}", t0, t1, track=0, track_name="parent", step="serialize",
            **args)
    tl.span(f"wait for {settings.base_mode} {name}", t1, t2, track=0, track_name="parent",
            step="wait", **args)
    if protocol.ran_here(response):  # serde/capture: the compile ran on this thread
        track, track_name = 1, "compile (in process)"
    else:
        track, track_name = response.pid, f"worker {response.pid}"
    tl.span(f"compile {name}", t2 - response.compile_s, t2, track=track,
            track_name=track_name, step="compile", **args)
    tl.span(f"deserialize + replay {name}", t2, t4, track=0, track_name="parent",
            step="deserialize + replay", **args)
    tl.flush()


def replay(response: protocol.CompileResponse, *, foreign: bool) -> None:
    """Make the parent look as if it had compiled: metrics, counters, output code hooks,
    warnings and log records. Metrics and counters moved already when the compile ran
    in this very process (``serde``/``capture``)."""
    from torch._inductor.graph import GraphLowering
    from torch._inductor.metrics import CachedMetricsHelper

    if foreign:
        CachedMetricsHelper.apply_deltas(response.metrics)
        from torch._dynamo.utils import counters

        for group, values in response.counters.items():
            for key, value in values.items():
                counters[group][key] += value
    source = getattr(response.graph, "source_code", None)
    if source is not None and GraphLowering.save_output_code is not None:
        GraphLowering.save_output_code(source)
    for category, message, filename, lineno in response.warnings:
        warnings.warn_explicit(message, category, filename, lineno)
    for record in response.logs:
        logging.getLogger(record.name).handle(record)
