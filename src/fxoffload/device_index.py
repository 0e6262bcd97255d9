"""One farm compile for ranks that differ only in their CUDA device index.

Inductor writes the device index into everything it generates (``_DeviceGuard(3)``,
``get_raw_stream(3)``, ``device(type='cuda', index=3)``, each kernel's
``DeviceProperties(index=3, ...)``), so ranks on cuda:0..7 of one machine would ask the
farm for eight compiles of one graph. Instead a rank's request names a canonical index,
and the rank rebinds the result to its own device when it arrives:

    rank on cuda:3                                  farm
    plan() -> Rebind(canonical=0, real=3)
    request: every torch.device cuda:3 pickled as cuda:0
      (pickling), the summary and the GPU
      description as cuda:0; preamble.cuda_rebind
      = [0, 3], which the content key leaves out ──► one compile for cuda:0, shared by
                                                     every rank whose request is the same
    decode_response(request=...): rebind() ◄──────── response (code for cuda:0)
      the generated code (device guards, streams,
      device literals, kernels' DeviceProperties),
      device_idxs, the forward's device box, the
      kernels' device; the kernel files go to
      Triton's dir for cuda:3 (executors.farm)

The rebound code is meant to be the code stock Inductor generates on cuda:3: the GPU
test compiles for cuda:1 and rebinds to cuda:0 on one GPU against stock's (tests/
test_virtual_gpu.py; not yet passed on a GPU, see README). Only the farm plans a rebind,
for a graph whose tensors are on one CUDA device and the CPU, with Inductor's Python
wrapper (not ``cpp_wrapper``, AOT mode or ``wrap_inductor_compiled_regions``, whose
artifacts hold the index elsewhere). A response whose code still names the canonical
device after the rewrite is refused (``ProtocolError``, reason ``device_rebind_failed``)
and the rank compiles for itself: a rebind that is not sure never runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ProtocolError

# Tests on a machine with one GPU compile for cuda:1 and rebind to cuda:0 (private).
CANONICAL_ENV = "FXOFFLOAD_CANONICAL_CUDA_INDEX"


@dataclasses.dataclass(frozen=True)
class Rebind:
    canonical: int  # the index the request and the farm's code name
    real: int  # this rank's device

    def to_canonical(self, index: int | None) -> int | None:
        return self.canonical if index == self.real else index

    def to_real(self, index: int | None) -> int | None:
        return self.real if index == self.canonical else index


def canonical_index() -> int:
    return int(os.environ.get(CANONICAL_ENV, "0") or 0)


def plan(executor: str, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
         graph_kwargs: dict[str, Any]) -> Rebind | None:
    """The rebind a request of this graph is sent with, or None (sent as it is)."""
    from torch._inductor import config

    if executor != "farm" or graph_kwargs.get("aot_mode") or graph_kwargs.get("cpp_wrapper"):
        return None
    if config.cpp_wrapper or getattr(config, "wrap_inductor_compiled_regions", False):
        return None
    if not any(isinstance(t, torch.Tensor) and t.device.type == "cuda"
               for t in example_inputs):
        return None  # a CPU graph (sent as it is: no scan of its nodes)
    devices = _devices(gm, example_inputs)
    if ("cuda", None) in devices and torch.cuda.is_available():
        # 'cuda' without an index is the current device, at trace time and at run time
        devices = {*(devices - {("cuda", None)}), ("cuda", torch.cuda.current_device())}
    if len(devices) != 1:
        return None
    (kind, index), = devices
    canonical = canonical_index()
    if kind != "cuda" or index is None or index == canonical:
        return None
    return Rebind(canonical=canonical, real=index)


def _devices(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> set[tuple[str, Any]]:
    """The (type, index) of every non-CPU device the graph's inputs, values and
    arguments name (arguments one list deep: where aten and custom ops take devices)."""
    found: set[tuple[str, Any]] = set()
    kinds = (torch.Tensor, torch.device, str)

    def note(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.device
        elif isinstance(value, str):
            if not value.startswith(("cuda", "xpu", "hip", "mps")):
                return
            try:  # a device named by a string, as a custom op may take one
                value = torch.device(value)
            except RuntimeError:
                return
        if isinstance(value, torch.device) and value.type not in ("cpu", "meta"):
            found.add((value.type, value.index))

    for t in example_inputs:
        note(t)
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            for value in (node.meta.get("val"), *node.args, *node.kwargs.values()):
                if isinstance(value, kinds):
                    note(value)
                elif isinstance(value, (list, tuple)):
                    for item in value:
                        if isinstance(item, kinds):
                            note(item)
    return found


def canonical_fx_code(code: str, rebind: Rebind) -> str:
    """A graph module's FX code as the same graph on the canonical device prints it
    (``torch.device``'s repr in its arguments), for the request's body (lean_pickler)."""
    return re.sub(rf"(?<=device\(type='cuda', index=){rebind.real}(?=\))",
                  str(rebind.canonical), code)


# --- the response, rebound to this rank's device ----------------------------------------
# Where Inductor's Python wrapper and Triton kernels name a device index (torch 2.11-2.13):
# device guards and set_device, the raw stream and its variable, device literals in
# fallback calls and benchmark harnesses, and each kernel's triton_meta.
_SITES = (
    r"(?<=_DeviceGuard\()({i})(?=\))",
    r"(?<=set_device\()({i})(?=\))",
    r"(?<=get_raw_stream\()({i})(?=\))",
    r"(?<=\bstream)({i})\b",  # the stream's variable (torch 2.11)
    r"(?<=\braw_stream)({i})\b",  # (torch 2.13)
    r"(?<=default_generators\[)({i})(?=\])",
    r"(?<=type='cuda', index=)({i})\b",
    r"(?<=type=\"cuda\", index=)({i})\b",
    r"(?<=['\"]cuda:)({i})(?=['\"])",
    r"(?<=['\"]cuda['\"], )({i})(?=\))",
)
# What would name the canonical device in a form the sites above do not know: refused.
_LEFTOVER = (r"cuda:{i}\b", r"index={i}\b", r"_DeviceGuard\({i}\)", r"set_device\({i}\)",
             r"get_raw_stream\({i}\)", r"\b(raw_)?stream{i}\b", r"device\({i}\)",
             r"default_generators\[{i}\]",
             r"['\"]device['\"]: {i}\b", r"['\"]cuda['\"], {i}\b")


def rebind_code(source: str, rebind: Rebind) -> str:
    """``source`` (a wrapper module with its kernels) naming ``rebind.real`` where it
    named ``rebind.canonical``; ``ProtocolError`` when some mention is left."""
    real = str(rebind.real)
    out = source
    for site in _SITES:
        out = re.sub(site.format(i=rebind.canonical), real, out)
    left = [m.group(0) for pattern in _LEFTOVER
            for m in re.finditer(pattern.format(i=rebind.canonical), out)]
    if left:
        raise ProtocolError(
            f"the farm's code for cuda:{rebind.canonical} could not be rebound to "
            f"cuda:{rebind.real}: it still names {sorted(set(left))[:5]}",
            reason="device_rebind_failed")
    return out


def rebind_response(response: Any, rebind: Rebind) -> None:
    """Rebind a decoded ``CompileResponse`` (in place) to this rank's device."""
    from torch._inductor.codecache import get_hash
    from torch._inductor.output_code import CompiledFxGraph

    graph = response.graph
    if graph is not None:
        if not isinstance(graph, CompiledFxGraph):
            raise ProtocolError(f"a {type(graph).__name__} cannot be rebound to "
                                f"cuda:{rebind.real}", reason="device_rebind_failed")
        source = rebind_code(graph.source_code, rebind)
        graph.source_code = source
        graph.cache_key = get_hash(source.strip())  # PyCodeCache's key of this source
        graph.device_idxs = type(graph.device_idxs)(
            rebind.to_real(i) for i in graph.device_idxs)
    box = response.boxes.get("boxed_forward_device_index")
    if isinstance(box, int):
        response.boxes["boxed_forward_device_index"] = rebind.to_real(box)
    response.triton_kernels = [(h, rebind.to_real(d)) for h, d in response.triton_kernels]


def kernel_file(name: str, rebind: Rebind) -> str:
    """A farm bundle's file name, with a Triton file moved to this rank's device's dir
    (``inductor/triton/<index>/...``: Triton's cache keys hold no device index)."""
    parts = name.split("/", 3)
    if len(parts) == 4 and parts[:2] == ["inductor", "triton"] and parts[2].isdigit():
        return f"inductor/triton/{rebind.real}/{parts[3]}"
    return name
