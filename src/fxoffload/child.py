"""The far side of the boundary: turn request bytes into response bytes.

    request bytes ─► envelope check ─► preamble (imports, cache dirs, custom ops)
                  ─► body unpickled into a fresh FakeTensorMode/ShapeEnv
                  ─► parent's state restored ─► Inductor's in-process compile
                  ─► graph + metric/counter deltas + logs + warnings + ShapeEnv
                  ─► response bytes

The same function runs in a worker process, in the ``serde`` and ``capture`` modes (in
the parent's own process), and under ``fxoffload replay``. A compile that raises becomes
an error response; only bytes that are not a valid request raise (``ProtocolError``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import time
import traceback
import warnings
from typing import Any

import torch

from . import kernel_reuse, protocol, triton_bundle, virtual_gpu
from ._compat import (
    clear_inductor_caches,
    ensure_process_groups,
    no_save_output_code,
    vec_isa_names,
)
from .protocol import CompileResponse, Preamble
from .state import captured_logs, restored


def prepare_process(preamble: Preamble) -> None:
    """Make this (worker) process look like the parent for the request: its import path,
    the modules that register its custom ops, and its Inductor and Triton cache dirs."""
    for path in reversed(preamble.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in preamble.imports:
        importlib.import_module(name)
    changed = False
    for var, value in (("TORCHINDUCTOR_CACHE_DIR", preamble.cache_dir),
                       ("TRITON_CACHE_DIR", preamble.triton_cache_dir)):
        if value and os.environ.get(var) != value:
            os.environ[var] = value
            changed = True
    if changed:
        # Inductor memoizes paths under the old dir (cpp_prefix_path, …).
        clear_inductor_caches()


def missing_custom_ops(preamble: Preamble) -> list[str]:
    missing = []
    for qualname in preamble.custom_ops:
        namespace, name = qualname.split("::", 1)
        try:
            getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            missing.append(qualname)
    return missing


def _counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items()}


def _counter_deltas(before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for group, values in _counters().items():
        old = before.get(group, {})
        delta = {k: v - old.get(k, 0) for k, v in values.items() if v != old.get(k, 0)}
        if delta:
            out[group] = delta
    return out


def _error(reason: str, summary: str, tb: str = "") -> CompileResponse:
    from torch._inductor.metrics import CachedMetricsHelper

    return CompileResponse(
        graph=None, error=(reason, summary, tb),
        metrics=CachedMetricsHelper().get_deltas(), counters={}, logs=[], warnings=[],
        shape_env=None, boxes={}, pid=os.getpid(), compile_s=0.0,
    )


def compile_request(data: bytes, *, in_parent: bool = False,
                    cache_dirs: tuple[str, str] | None = None) -> bytes:
    """Compile one request here. ``in_parent`` skips the process preparation that only
    a separate process needs. ``cache_dirs`` (Inductor's, Triton's) replace the ones the
    request names (``fxoffload replay`` compiles into a dir of its own)."""
    return compile_request_status(data, in_parent=in_parent, cache_dirs=cache_dirs)[0]


def compile_request_status(data: bytes, *, in_parent: bool = False,
                           cache_dirs: tuple[str, str] | None = None,
                           ) -> tuple[bytes, CompileResponse]:
    """``compile_request``, and the response before encoding (the farm stores only those
    that hold a graph, and sends the Triton kernels they name)."""
    response = _respond(data, in_parent=in_parent, cache_dirs=cache_dirs)
    return protocol.encode_response(response), response


def _respond(data: bytes, *, in_parent: bool,
             cache_dirs: tuple[str, str] | None) -> CompileResponse:
    preamble, body = protocol.split_request(data)
    if cache_dirs is not None:
        preamble = dataclasses.replace(preamble, cache_dir=cache_dirs[0],
                                       triton_cache_dir=cache_dirs[1])
    if not in_parent:
        try:
            prepare_process(preamble)
        except Exception as e:  # noqa: BLE001 - reported to the parent, not raised here
            return _error("worker_import_failed", f"{type(e).__name__}: {e}",
                          traceback.format_exc())
    if preamble.host_cpu is not None and preamble.host_cpu != protocol.cpu_fingerprint():
        return _error("cpu_mismatch", f"this worker's CPU ({protocol.cpu_fingerprint()}) is "
                      f"not the client's ({preamble.host_cpu}): C++ kernels built here "
                      "(-march=native) might not run there")
    try:
        ensure_process_groups(preamble.process_groups)
    except Exception as e:  # noqa: BLE001 - reported to the parent, not raised here
        return _error("process_group_unavailable", f"{type(e).__name__}: {e}",
                      traceback.format_exc())
    missing = missing_custom_ops(preamble)
    if missing:
        return _error(
            "custom_op_unavailable",
            f"custom op(s) {', '.join(missing)} are not registered in the worker; name the "
            "module that registers them in worker_imports / FXOFFLOAD_WORKER_IMPORTS",
        )
    gpu_less = bool(preamble.gpus) and torch.cuda.device_count() == 0
    if preamble.gpus and not gpu_less and (why := virtual_gpu.mismatch(preamble.gpus)):
        return _error("gpu_mismatch", why)
    # No GPU here: compile for the client's (virtual_gpu's docstring).
    with virtual_gpu.installed(preamble.gpus) if gpu_less else contextlib.nullcontext():
        response = _compile(body)
    response.gpu_less = gpu_less
    if preamble.host_cpu is not None and response.error is None and not in_parent:
        # What this CPU's vector ISAs probed to (cached by now): the parent, on a CPU with
        # the same flags, adopts it instead of building its own probes (1-9 s cold).
        response.vec_isa = vec_isa_names()
    if in_parent and response.graph is not None:
        # The parent's load of this very response can take the kernels just loaded.
        kernel_reuse.remember(response.graph)
    return response


def _compile(body: bytes) -> CompileResponse:
    from torch._inductor.compile_fx import _InProcessFxCompile
    from torch._inductor.debug import DebugContext
    from torch._inductor.metrics import CachedMetricsHelper
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    metrics = CachedMetricsHelper()
    counters_before = _counters()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            request = protocol.decode_request_body(body, fake_mode)
        except Exception as e:  # noqa: BLE001
            return _error("request_unpickle_failed", f"{type(e).__name__}: {e}",
                          traceback.format_exc())
        logs: list[Any] = []
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(restored(request.state, fake_mode))
                logs = stack.enter_context(captured_logs(request.state))
                stack.enter_context(torch._guards.tracing(request.tracing_context))
                if request.tracing_context is not None and request.state.fw_metadata:
                    request.tracing_context.fw_metadata = request.state.fw_metadata
                stack.enter_context(DebugContext())
                stack.enter_context(no_save_output_code())
                kernels = stack.enter_context(triton_bundle.capture())
                scheme = _InProcessFxCompile()
                scheme.compile_region_name = request.compile_region_name
                graph = scheme.codegen_and_compile(
                    request.gm, request.example_inputs, request.inputs_to_check,
                    request.graph_kwargs,
                )
        except Exception as e:  # noqa: BLE001
            response = _error("remote_compile_error", f"{type(e).__name__}: {e}",
                              traceback.format_exc())
            response.logs = logs
            return response
    return CompileResponse(
        graph=graph,
        error=None,
        metrics=metrics.get_deltas(),
        counters=_counter_deltas(counters_before),
        logs=logs,
        warnings=[(_portable(w.category), str(w.message), w.filename, w.lineno)
                  for w in caught],
        shape_env=fake_mode.shape_env,
        boxes=_boxes(request.graph_kwargs),
        pid=os.getpid(),
        compile_s=time.perf_counter() - start,
        triton_kernels=kernels,
    )


def _boxes(graph_kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("cudagraphs", "boxed_forward_device_index"):
        box = graph_kwargs.get(key)
        if box is not None and hasattr(box, "value"):
            out[key] = box.value
    return out


def _portable(category: type[Warning]) -> type[Warning]:
    """A warning class the parent can unpickle: one importable by name, else UserWarning."""
    module = sys.modules.get(category.__module__)
    if category.__module__ != "__main__" and getattr(module, category.__qualname__, None) \
            is category:
        return category
    return UserWarning
