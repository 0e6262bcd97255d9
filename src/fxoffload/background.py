"""Async and progressive modes: the ``OutputCode`` that runs a graph eagerly while its
compile runs elsewhere, and swaps the compiled code in when it arrives.

    hook (FX cache miss) ─► one request per config stage ─► executor.submit (no wait)
         │                                                        │ executor thread
         ▼                                                        ▼
    BackgroundOutput ◄─ newest finished stage ◄─ decode + deferred cache save (receiver)
      __call__(args): install a finished stage if one is waiting, then run the
      compiled code, or the FX graph itself under no_grad while nothing has arrived

The receiver thread decodes each response, writes the cache entry (so the next process
gets a hit even if this one never calls the graph again) and loads the compiled module
(C++ and Triton kernels: measured 0.3 s for GPT-2 on the H200 and, with the first CPU
load's ISA probe, 1.2 s for a tiny GPT-2 on 2 cores, which a swap on the caller's thread
cost one step), under the context and CUDA device of the thread that made the output.
What the user sees (replayed logs, warnings and metrics, ``post_compile``) happens on the
caller's thread, at the first call after a stage arrives, with the install itself.

A graph that is ready while its pool has no warm worker yet (a cold start) is compiled on
our in-process thread instead (the ``serde`` executor; ``compiled_in_process
["no_warm_worker"]``): a worker's start-up and then its first compile come later than that.

While compiles of ours run on this machine, a graph on the CPU runs its eager stand-in
with fewer intra-op threads, and where cores are scarce the stand-ins pace themselves
(``cpu_threads``).

Eager and compiled halves of a training graph can meet (an eager forward's saved tensors
fed to a compiled backward, or the reverse), so the forward is compiled with the strides
of *all* its outputs pinned to eager's (``pin_output_strides``): Inductor may not pad or
re-layout tensors saved for backward, and the backward is compiled against eager strides.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch._inductor.output_code import OutputCode

from . import (
    compile_pool,
    cpu_threads,
    eager,
    isolation,
    naming,
    offload,
    pending,
    pool_start,
    progress,
    protocol,
    timeline,
    triton_bundle,
)
from ._compat import write_fx_cache_entry
from .errors import FxOffloadError, NotOffloadable, PoolClosed
from .settings import Settings
from .tally import STATS

log = logging.getLogger("fxoffload")

_POLICY_ACTIONS = {
    "fallback": "compiling in-process at the graph's next call",
    "eager": "running the graph eagerly from now on",
    "raise": "raising at the graph's next call",
}


def pin_output_strides(gm: torch.fx.GraphModule) -> None:
    """Make Inductor keep eager's strides for every output (see the module docstring)."""
    from torch.utils import _pytree as pytree

    node = gm.graph.find_nodes(op="output")[0]
    outputs = pytree.arg_tree_leaves(*node.args)
    node.meta["user_visible_output_idxs"] = [
        i for i, n in enumerate(outputs) if isinstance(n, torch.fx.Node)]


class _Stage:
    def __init__(self, index: int, overrides: dict[str, Any], request: bytes,
                 local_request: bytes | None = None) -> None:
        self.index = index
        self.overrides = overrides
        self.request = request
        # The same compile written for this process's device, where ``request`` names the
        # canonical one (device_index): compiled here, the canonical request would make a
        # context on cuda:0, the GPU of another rank.
        self.local_request = local_request
        self.submitted = time.perf_counter()
        self.response: protocol.CompileResponse | None = None
        self.job: progress.Job | None = None  # its line in the progress display
        self.rerouted = False  # here because no worker was warm yet (not offloaded)


class BackgroundOutput(OutputCode):
    def __init__(self, settings: Settings | None, gm: torch.fx.GraphModule,
                 graph_kwargs: dict[str, Any], compile_region_name: str | None,
                 fake_mode: Any, *, on_cpu: bool) -> None:
        # An instance attribute: AOTAutograd's wrappers (functools.wraps) copy __dict__.
        self._boxed_call = True
        self._settings = settings
        self._gm = gm
        self._graph_kwargs = graph_kwargs
        self._compile_region_name = compile_region_name
        self._fake_mode = fake_mode
        self._on_cpu = on_cpu
        self._lock = threading.Lock()
        self._compiled: Any = None
        self._installed = -1  # index of the installed stage
        self._ready: _Stage | None = None  # newest arrived stage, not installed yet
        self._outstanding = 0
        self._failure: tuple[str, FxOffloadError, _Stage] | None = None
        self._post_compile: tuple[Any, Any, Any] | None = None
        self._save: tuple[str, str | None, bool, Any] | None = None
        self._first_stage: _Stage | None = None  # the one compiled under the parent's config
        # The creating thread's context (its config, on torch versions where config is
        # context-local), for work done ahead of the swap on the receiver thread.
        self._context = contextvars.copy_context()
        self._cuda_device = isolation.caller_cuda_device(on_cpu)
        self._graph: naming.Graph | None = None  # named at the first start()
        self._ran_eagerly = False

    # -- OutputCode ---------------------------------------------------------------
    def __call__(self, args: list[Any]) -> Any:
        if self._ready is not None or self._failure is not None:
            self._advance()
        compiled = self._compiled
        if compiled is not None:
            STATS.add(compiled_runs=1)
            return compiled(args)
        first, self._ran_eagerly = not self._ran_eagerly, True  # no pause before a first output
        return eager.run(self._gm, args,
                         cpu_threads.beside_workers() if self._on_cpu else None,
                         None if first else cpu_threads.pace)

    def post_compile(self, example_inputs: Sequence[Any], constants: Any,
                     graph_kwargs: Any) -> None:
        # Runs at compile time, under the tracing context; the compiled graph's own
        # post_compile runs at its swap. Reporting no output strides here keeps the
        # backward compiled against eager strides (see pin_output_strides).
        self._post_compile = (example_inputs, constants, graph_kwargs)

    def set_triton_bundle(self, triton_bundle: Any) -> None:
        # The kernels are compiled in the worker; this process's bundle is empty.
        pass

    def prepare_for_serialization(self) -> None:
        raise NotImplementedError(
            "a graph still compiling in the background cannot be serialized")

    # -- background ---------------------------------------------------------------
    def start(self, stage: _Stage) -> None:
        assert self._settings is not None
        if stage.index == 0:
            self._first_stage = stage
        with self._lock:
            self._outstanding += 1
        pending.started()
        if self._graph is None:  # on the compiling thread, under Dynamo's compile context
            self._graph = naming.identify(self._gm, self._graph_kwargs)
        stage.job = progress.track(self._graph, progress.QUEUED,
                                   stage=stage.index if self._settings.progressive else None)
        settings = self._settings
        in_worker = settings.base_mode == "subprocess"  # a process beside us
        paused: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if in_worker and stage.index == 0 and not pending.exiting():
            # (At exit, a compile started here would still run in C++ at finalization.)
            cold = pool_start.cold_route(settings)
            if cold is not None:
                settings, paused = cold
                stage.rerouted = True
                if (tl := timeline.get()) is not None:
                    tl.instant("compiling here: no warm worker yet",
                               time.perf_counter(), **self._event_args(stage))
        here = settings.base_mode == "serde"  # on our in-process thread
        if here:
            cpu_threads.here_started()
        elif in_worker:
            cpu_threads.compile_started(settings.workers)
        with contextlib.ExitStack() as held:
            held.enter_context(paused)
            future = offload.submit(settings, stage.request)
            held = held.pop_all()  # closed when the compile is done
        progress.attach(stage.job, future)
        future.add_done_callback(lambda f: held.close())
        if here:
            future.add_done_callback(cpu_threads.here_ended)
        elif in_worker:
            future.add_done_callback(cpu_threads.compile_ended)
        future.add_done_callback(lambda f: pending.receive(self._receive, stage, f))

    def defer_save(self, key: str, guards_expr: str | None, local: bool,
                   remote_cache: Any) -> None:
        """Called for ``FxGraphCache._save_graph``: write the entry once stage 0 arrives."""
        self.guards_expr = guards_expr  # AOTAutograd's cache entry reads it
        with self._lock:
            self._save = (key, guards_expr, local, remote_cache)
            stage = self._first_stage
            if stage is not None and stage.response is not None:
                self._write_cache(stage.response)

    def _receive(self, stage: _Stage, future: Any) -> None:
        """On the receiver thread: decode; save stage 0 to the caches; offer it."""
        started = getattr(future, "started", stage.submitted)
        try:
            raw = future.result()
            t0 = time.perf_counter()
            response = protocol.decode_response(raw, self._fake_mode, request=stage.request)
            offload.check_response(response)
            self._context.run(self._load_here, response)
        except PoolClosed as e:  # shutdown or interpreter exit: nothing to report
            log.debug("fxoffload: background compile abandoned: %s", e)
            with self._lock:
                self._outstanding -= 1
            progress.drop(stage.job)
            pending.finished()
            return
        except FxOffloadError as e:
            if pending.exiting():  # e.g. Inductor's thread pools refused work at shutdown
                log.debug("fxoffload: background compile abandoned at exit: %s", e)
                with self._lock:
                    self._outstanding -= 1
                progress.drop(stage.job)
                pending.finished()
                return
            with self._about(stage):
                self._stage_failed(stage, e)
            progress.move(stage.job, progress.FAILED)
            pending.finished()
            return
        except BaseException as e:  # a receiver must not die
            log.exception("fxoffload: unexpected failure receiving a compile: %s", e)
            with self._lock:
                self._outstanding -= 1
            progress.move(stage.job, progress.FAILED)
            pending.finished()
            return
        t1 = time.perf_counter()
        STATS.add(graphs_offloaded=0 if stage.rerouted else 1, bytes_sent=len(stage.request),
                  bytes_received=len(raw), compile_s=response.compile_s,
                  queue_wait_s=max(0.0, started - stage.submitted),
                  deserialize_s=t1 - t0)
        with self._lock:
            self._outstanding -= 1
            stage.response = response
            if stage.index == 0 and self._save is not None:
                self._write_cache(response)
            if stage.index > self._installed and (
                    self._ready is None or stage.index > self._ready.index):
                self._ready = stage
        try:  # whatever the display and the timeline do, wait() must see this arrive
            progress.move(stage.job, progress.DONE)
            if (tl := timeline.get()) is not None:
                pid = getattr(future, "worker_pid", response.pid)
                name = self._span_name(stage)
                args = self._event_args(stage, pid=pid, bytes_sent=len(stage.request),
                                        bytes_received=len(raw),
                                        request=_request_key(stage.request))
                tl.span(f"queue {name}", stage.submitted, started, track=0, track_name="parent",
                        step="queue", **args)
                if protocol.ran_here(response):  # async+serde: our compile thread ran it
                    track, track_name = 1, "compile (in process)"
                else:
                    track, track_name = pid, f"worker {pid}"
                tl.span(f"compile {name}", t0 - response.compile_s, t0, track=track,
                        track_name=track_name, step="compile", **args)
                tl.span(f"decode {name}", t0, t1, track=2, track_name="receiver", step="decode",
                        **args)
                tl.flush()
        finally:
            pending.finished()

    # -- naming, for the timeline ---------------------------------------------------------
    def _span_name(self, stage: _Stage) -> str:
        label = self._graph.label if self._graph is not None else "?"
        assert self._settings is not None
        return f"graph {label}" + (f" stage {stage.index}" if self._settings.progressive
                                   else "")

    def _event_args(self, stage: _Stage | None, **more: Any) -> dict[str, Any]:
        if self._graph is None:
            return more
        return self._graph.args(stage=stage.index if stage is not None else None, **more)

    def _about(self, stage: _Stage | None) -> Any:
        """Events made inside (fallback instants of note_failure) name this graph."""
        return timeline.about(**self._event_args(stage))

    def _load_here(self, response: protocol.CompileResponse) -> None:
        """``_load`` inside the graph's context (torch 2.13's config patches live there),
        a farm client's with no compile pool for the farm's kernels."""
        assert self._settings is not None
        with compile_pool.loading_only_for(self._settings):
            self._load(response)

    def _load(self, response: protocol.CompileResponse) -> None:
        """Load the compiled module ahead of the swap. A failure here is left to the
        swap, which loads again on the caller's thread and reports it there."""
        try:
            with isolation.on_cuda_device(self._cuda_device):
                offload.load(response, self._gm)
        except Exception as e:  # noqa: BLE001 - retried, and reported, at the swap
            log.debug("fxoffload: loading a compiled graph ahead of its swap failed: %s", e)

    def _stage_failed(self, stage: _Stage, error: FxOffloadError) -> None:
        """Count the failure now; ``on_failure`` applies only once no stage is left that
        could still bring compiled code."""
        assert self._settings is not None
        reason = getattr(error, "reason", type(error).__name__)
        with self._lock:
            self._outstanding -= 1
            if self._installed >= 0 or self._ready is not None:
                action = f"stage {stage.index} failed; the previous stage keeps running"
            elif self._outstanding > 0:
                action = f"stage {stage.index} failed; other stages are still compiling"
            else:
                action = _POLICY_ACTIONS[self._settings.on_failure]
                self._failure = (reason, error, self._first_stage or stage)
        offload.note_failure(reason, error, action)

    def _write_cache(self, response: protocol.CompileResponse) -> None:
        assert self._save is not None
        key, guards_expr, local, remote_cache = self._save
        self._save = None
        try:
            kernels = triton_bundle.bundle(response.triton_kernels)
            if kernels is not None and hasattr(response.graph, "set_triton_bundle"):
                response.graph.set_triton_bundle(kernels)
            write_fx_cache_entry(key, response.graph, guards_expr, local, remote_cache)
        except Exception as e:  # noqa: BLE001 - a cache write never costs the user a step
            log.warning("fxoffload: could not save a background compile to the FX graph "
                        "cache: %s", e)

    def _advance(self) -> None:
        """On the caller's thread: install the newest stage, or apply ``on_failure``."""
        with self._lock:
            stage, self._ready = self._ready, None
            failure = self._failure if stage is None and self._compiled is None else None
            self._failure = None
        if stage is not None:
            assert stage.response is not None
            try:
                graph = offload.install(stage.response, self._gm, self._graph_kwargs,
                                        self._compile_region_name)
                if self._post_compile is not None:
                    graph.post_compile(*self._post_compile)
            except FxOffloadError as e:
                with self._about(stage):
                    offload.note_failure(getattr(e, "reason", "install_failed"), e,
                                         f"stage {stage.index} could not be installed")
                return
            self._compiled = graph
            self._installed = stage.index
            with self._lock:
                if self._outstanding == 0 and self._ready is None:
                    # Nothing can replace this code any more: the eager graph and the
                    # requests (kept for a fallback compile) are not needed.
                    self._first_stage = None
            STATS.add(swaps=1)
            if (tl := timeline.get()) is not None:
                tl.instant(f"swap {self._span_name(stage)}", time.perf_counter(),
                           step="swap", **self._event_args(stage))
                tl.flush()
        elif failure is not None:
            with self._about(failure[2]):
                self._apply_policy(*failure)

    def _apply_policy(self, reason: str, error: FxOffloadError, stage: _Stage) -> None:
        assert self._settings is not None
        policy = self._settings.on_failure
        if policy == "raise":
            raise error
        if policy == "eager":
            return
        # The serde path: the same request, compiled on this thread (at this call, the
        # tracing context and config it needs exist only in the request).
        here = dataclasses.replace(self._settings, mode="serde")
        try:
            request = stage.local_request or stage.request
            with isolation.turn:
                raw = offload.submit(here, request).result()
            stage.response = protocol.decode_response(raw, self._fake_mode, request=request)
        except FxOffloadError as e:
            offload.note_failure(getattr(e, "reason", "fallback_failed"), e,
                                 "the in-process compile failed too; running eagerly")
            return
        with self._lock:
            self._ready = stage
        self._advance()


def _request_key(request: bytes) -> str | None:
    try:
        return protocol.split_request(request, check_torch=False)[0].request_id
    except Exception:  # noqa: BLE001 - a name for the timeline, nothing more
        return None


def compile_in_background(settings: Settings, fake_mode: Any, gm: torch.fx.GraphModule,
                          example_inputs: Sequence[Any], inputs_to_check: Sequence[int],
                          graph_kwargs: dict[str, Any],
                          compile_region_name: str | None) -> OutputCode:
    from torch._inductor import config

    args = (gm, example_inputs, inputs_to_check, graph_kwargs, compile_region_name)
    pin_output_strides(gm)
    stages = []
    t0 = time.perf_counter()
    try:
        for index, overrides in enumerate(settings.config_stages):
            with config.patch(overrides):
                request, local = offload.build_requests(settings, *args, fake_mode)
            stages.append(_Stage(index, overrides, request, local))
    except NotOffloadable as e:
        return offload.handle_failure(settings, e.reason, e, args)
    STATS.add(serialize_s=time.perf_counter() - t0)
    output = BackgroundOutput(settings, gm, graph_kwargs, compile_region_name, fake_mode,
                              on_cpu=not offload.uses_gpu(example_inputs))
    for stage in stages:
        output.start(stage)
    return output
