"""The messages: what a compile request and its response hold, and how each is turned
into envelope bytes (see ``wire``) and back.

A request's payload is a plain pickle of ``(Preamble, body)``. The preamble holds only
builtin types, so the worker can read it, import what it names and set its cache dirs
before it unpickles the body (a GraphPickler stream: graph, fake inputs, ShapeEnv, …).
A response's payload is a GraphPickler stream of ``CompileResponse``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import platform
import socket
import sys
import time
import uuid
from typing import Any

import torch

from . import device_index, pickling, virtual_gpu, wire
from ._compat import process_group_sizes
from .device_index import Rebind
from .errors import NotOffloadable, ProtocolError
from .state import CapturedState


@dataclasses.dataclass
class Preamble:
    request_id: str
    created: float
    torch_version: str
    sys_path: list[str]
    imports: list[str]
    custom_ops: list[str]
    cache_dir: str | None
    triton_cache_dir: str | None
    summary: dict[str, Any]
    # {name: size} of the process groups its collectives name: the worker makes
    # stand-ins (same for every rank, so ranks share one compile).
    process_groups: dict[str, int] = dataclasses.field(default_factory=dict)
    # The client's CPU (architecture and feature flags) when the graph runs on it: C++
    # kernels are built with -march=native, so a worker on another CPU must not build them.
    host_cpu: str | None = None
    # The client's CUDA devices the graph uses ({"0": properties}, ``virtual_gpu.describe``):
    # a worker without a GPU compiles for them; one with another GPU model refuses.
    gpus: dict[str, dict[str, Any]] | None = None
    # [canonical, real]: the body names the client's cuda:<real> as cuda:<canonical>, and
    # the client rebinds the response (``device_index``); not in the content key.
    cuda_rebind: list[int] | None = None


@dataclasses.dataclass
class CompileRequest:
    gm: torch.fx.GraphModule
    example_inputs: list[Any]
    inputs_to_check: list[int]
    graph_kwargs: dict[str, Any]
    tracing_context: Any
    compile_region_name: str | None
    state: CapturedState


@dataclasses.dataclass
class CompileResponse:
    graph: Any  # OutputCode, prepared for serialization; None when ``error`` is set
    error: tuple[str, str, str] | None  # (reason, summary, traceback)
    metrics: Any  # CachedMetricsDeltas
    counters: dict[str, dict[str, int]]
    logs: list[logging.LogRecord]
    warnings: list[tuple[Any, str, str, int]]
    shape_env: Any
    boxes: dict[str, Any]  # values of graph_kwargs' mutable boxes after the compile
    pid: int
    compile_s: float
    # The compiling process is (host, pid): pids of two machines (a farm) collide.
    host: str = dataclasses.field(default_factory=lambda: this_host())
    # The compiling process's usable CPU vector ISAs (Inductor's probe result), for a CPU
    # graph compiled in another process (see ``_compat.adopt_vec_isa``).
    vec_isa: tuple[str, ...] | None = None
    # (kernel hash, device index) of every Triton kernel the compile loaded: the FX cache
    # entry written after a background compile bundles their files (triton_bundle).
    triton_kernels: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    # Compiled for the client's GPU by a process that has none (virtual_gpu).
    gpu_less: bool = False
    # The graph loaded in the parent (``offload.load``), a copy: ``graph`` itself stays
    # ready to pickle for the FX graph cache entry. Never sent.
    loaded: Any = None
    # The rebind applied to it in the parent (``decode_response``). Never sent.
    rebound: Rebind | None = None


def this_host() -> str:
    return socket.gethostname()


def ran_here(response: CompileResponse) -> bool:
    """Whether this very process compiled ``response`` (serde, capture): its metrics and
    counters moved here already."""
    return response.pid == os.getpid() and response.host == this_host()


@functools.cache
def cpu_fingerprint() -> str:
    """This machine's architecture and CPU feature flags, hashed (``/proc/cpuinfo``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return f"{platform.machine()}-{digest}"


def _runs_on_cpu(example_inputs: list[Any]) -> bool:
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    return not devices or "cpu" in devices


def _cache_dirs() -> tuple[str | None, str | None]:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        inductor = cache_dir()
    except Exception:  # noqa: BLE001
        inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return inductor, os.environ.get("TRITON_CACHE_DIR")


def _compile_id() -> str | None:
    """Dynamo's compile id of the frame being compiled (``"0/0"``: frame 0, its first
    compile; ``"!1/0/0"`` under compiled autograd), as in TORCH_LOGS and tlparse; None
    outside a Dynamo compile."""
    try:
        compile_id = torch._guards.CompileContext.current_compile_id()
        return None if compile_id is None else str(compile_id)
    except Exception:  # noqa: BLE001 - an id torch cannot print is no id
        return None


def summarize(gm: torch.fx.GraphModule, example_inputs: list[Any],
              graph_kwargs: dict[str, Any], rebind: Rebind | None = None) -> dict[str, Any]:
    devices = sorted({str(_canonical(t.device, rebind)) for t in example_inputs
                      if isinstance(t, torch.Tensor)})
    return {
        "nodes": len(gm.graph.nodes),
        "inputs": len(example_inputs),
        "devices": devices,
        "is_backward": bool(graph_kwargs.get("is_backward", False)),
        "is_inference": bool(graph_kwargs.get("is_inference", False)),
        "compile_id": _compile_id(),
    }


def _canonical(device: torch.device, rebind: Rebind | None) -> torch.device:
    if rebind is None or device.type != "cuda":
        return device
    return torch.device("cuda", rebind.to_canonical(device.index))


def graph_kind(summary: dict[str, Any]) -> str:
    """``forward``, ``backward`` or ``inference``: which graph of its frame a request is."""
    if summary.get("is_backward"):
        return "backward"
    return "inference" if summary.get("is_inference") else "forward"


def encode_request(request: CompileRequest, *, extra_imports: tuple[str, ...] = (),
                   rebind: Rebind | None = None) -> bytes:
    """The request's bytes; with ``rebind``, written for the canonical CUDA device."""
    recorder = pickling.OpRecorder()
    pickling.share_stack_traces(request.gm)
    body = pickling.dumps(request, recorder, rebind=rebind)
    inductor_dir, triton_dir = _cache_dirs()
    summary = summarize(request.gm, list(request.example_inputs), request.graph_kwargs,
                        rebind)
    gpus = virtual_gpu.describe(
        [str(torch.device("cuda", rebind.real))] if rebind else summary["devices"])
    if rebind is not None and gpus is not None:
        gpus = {str(rebind.canonical): gpus[str(rebind.real)]}
    preamble = Preamble(
        request_id=uuid.uuid4().hex[:12],
        created=time.time(),
        torch_version=torch.__version__,
        sys_path=[p for p in sys.path if isinstance(p, str)],
        imports=sorted(recorder.modules | set(extra_imports)),
        custom_ops=sorted(recorder.custom_ops),
        cache_dir=inductor_dir,
        triton_cache_dir=triton_dir,
        summary=summary,
        process_groups=process_group_sizes(request.gm),
        host_cpu=cpu_fingerprint() if _runs_on_cpu(request.example_inputs) else None,
        gpus=gpus,
        cuda_rebind=[rebind.canonical, rebind.real] if rebind else None,
    )
    return join_request(preamble, body)


def join_request(preamble: Preamble, body: bytes) -> bytes:
    """The request bytes of a preamble and a pickled body (``split_request`` reversed)."""
    payload = pickling.plain_dumps((dataclasses.asdict(preamble), body))
    return wire.encode(wire.Kind.REQUEST, payload)


def split_request(data: bytes, *, check_torch: bool = True) -> tuple[Preamble, bytes]:
    """Validate the envelope and read the preamble; the body stays opaque bytes."""
    envelope = wire.decode(data, expect=wire.Kind.REQUEST, check_torch=check_torch)
    try:
        raw, body = pickle.loads(envelope.payload)
        return Preamble(**raw), body
    except Exception as e:  # noqa: BLE001 - any failure here means foreign bytes
        raise ProtocolError(f"request preamble is unreadable: {type(e).__name__}: {e}") from None


def decode_request_body(body: bytes, fake_mode: Any) -> CompileRequest:
    request = pickling.loads(body, fake_mode)
    if not isinstance(request, CompileRequest):
        raise ProtocolError(f"request body holds a {type(request).__name__}")
    # Subgraphs of higher-order ops (cond, while_loop, …) come back without generated
    # code; the fake-tensor propagation during lowering calls them.
    for name, module in request.gm.named_modules():
        if name and isinstance(module, torch.fx.GraphModule):
            module.recompile()
    return request


def encode_response(response: CompileResponse) -> bytes:
    from torch._inductor.output_code import CompiledFxGraph

    if isinstance(response.graph, CompiledFxGraph):
        response.graph.prepare_for_serialization()
    try:
        body = pickling.dumps(response, pickling.OpRecorder())
    except NotOffloadable as e:
        # The compile succeeded but its result cannot travel: report that, not a crash.
        failed = dataclasses.replace(
            response, graph=None, shape_env=None, logs=[], warnings=[],
            error=("unpicklable_result", f"compiled graph cannot be pickled: {e}", ""),
        )
        body = pickling.dumps(failed, pickling.OpRecorder())
    return wire.encode(wire.Kind.RESPONSE, body)


def rebind_of(request: bytes) -> Rebind | None:
    """The device rebind ``request`` was written with (``device_index``), if any."""
    preamble, _ = split_request(request, check_torch=False)
    if preamble.cuda_rebind is None:
        return None
    canonical, real = preamble.cuda_rebind
    return Rebind(canonical=canonical, real=real)


def decode_response(data: bytes, fake_mode: Any, *,
                    request: bytes | None = None) -> CompileResponse:
    """The response; given the ``request`` it answers, rebound to the client's device
    when the request was written for the canonical one (``device_index``)."""
    envelope = wire.decode(data, expect=wire.Kind.RESPONSE)
    try:
        response = pickling.loads(envelope.payload, fake_mode)
    except Exception as e:
        raise ProtocolError(f"response could not be unpickled: {type(e).__name__}: {e}",
                            reason="response_unpickle_failed") from e
    if not isinstance(response, CompileResponse):
        raise ProtocolError(f"response body holds a {type(response).__name__}")
    rebind = rebind_of(request) if request is not None else None
    if rebind is not None and response.error is None:
        device_index.rebind_response(response, rebind)
        response.rebound = rebind
    return response
