"""Pickling graphs with GraphPickler, without its aten/fbgemm-only op allowlist.

Any ``torch.ops.<ns>`` operator crosses by name. For namespaces that torch does not
define itself we record the operator, find the module that registered it (ops made with
``torch.library.custom_op``) so that the worker can import it first, and refuse ops
defined in ``__main__``, which no other process can import.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import re
import sys
from typing import Any

from ._compat import graph_pickler_options
from .device_index import Rebind
from .errors import NotOffloadable

# Namespaces that exist in every process that imported torch.
BUILTIN_NAMESPACES = frozenset({
    "aten", "prims", "prim", "fbgemm", "quantized", "quantized_decomposed", "higher_order",
    "_c10d_functional", "c10d_functional", "_dtensor", "inductor", "_inductor_test",
    "debugprims", "profiler", "rngprims", "symm_mem", "onednn", "mkldnn", "mkl", "_quantized",
    "torchvision",
})


class OpRecorder:
    """The ops filter handed to GraphPickler: accepts every op, remembers custom ones."""

    def __init__(self) -> None:
        self.custom_ops: set[str] = set()
        self.modules: set[str] = set()

    def __call__(self, name: str) -> bool:
        parts = name.split(".")
        if len(parts) < 4 or parts[:2] != ["torch", "ops"]:
            return True
        namespace, opname = parts[2], parts[3]
        if namespace in BUILTIN_NAMESPACES:
            return True
        qualname = f"{namespace}::{opname}"
        self.custom_ops.add(qualname)
        module = _defining_module(qualname)
        if module == "__main__":
            raise NotOffloadable(
                "custom_op_in_main",
                f"custom op {qualname} is defined in __main__, which a worker cannot "
                "import; define it in a module",
            )
        if module:
            self.modules.add(module)
        return True


def _defining_module(qualname: str) -> str | None:
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - layout differs on an unsupported torch
        return None
    opdef = OPDEFS.get(qualname)
    fn = getattr(opdef, "_init_fn", None)
    return getattr(fn, "__module__", None)


def dumps(obj: Any, recorder: OpRecorder, *, lean: bool = True,
          rebind: Rebind | None = None) -> bytes:
    """GraphPickler.dumps with our filter (by default through ``lean_pickler``, which
    GraphPickler.loads reads); pickling failures become NotOffloadable. With ``rebind``,
    the rank's CUDA device is written as the canonical one (``device_index``)."""
    from torch._inductor.codecache import BypassFxGraphCache
    from torch.fx._graph_pickler import GraphPickler

    from .lean_pickler import LeanPickler

    pickler = _deterministic(LeanPickler if lean else GraphPickler, rebind)
    try:
        return pickler.dumps(obj, graph_pickler_options(recorder))
    except NotOffloadable:
        raise
    except BypassFxGraphCache as e:
        raise NotOffloadable("uncacheable_graph", str(e)) from None
    except (pickle.PicklingError, AttributeError, TypeError, NotImplementedError) as e:
        raise NotOffloadable("unpicklable", f"{type(e).__name__}: {e}") from None


# --- the same graph, the same bytes ----------------------------------------------------
# The farm shares one compile among processes by a hash of the request (content_key.py),
# so two processes that pickle the same graph must write the same body. Diffing requests
# of fresh processes found four things that differ, all debug data that codegen does not
# read; they are rewritten here, in the stream only (the parent's objects stay as they are):
# - NodeSource provenance (node.meta["from_node"]): graph_id is id() of a graph, and the
#   target of a Python callable is its repr, "<function layer_norm at 0x7f...>";
# - node.meta["fwd_nn_module_stack"] (backward graphs): keyed by str(id(module)); Inductor
#   reads only its values (fx_passes/graph_view.py), whose classes travel by name;
# - ShapeEnv._expr_sym_node_id: id() of the SymNode evaluated last, for its logs;
# - CapturedState.logger_levels: in the order this process happened to create loggers.
# An id becomes its ordinal in the stream (ids equal in the stream stay equal); the logger
# levels are sorted by name. The rewrites go through the pickler's dispatch_table, which
# pickle consults only for the objects reducer_override leaves alone: no cost per object
# (a reducer_override wrapper cost 10% of a backward graph's dumps).
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _StreamIds:
    """The rewrites of one stream (``dispatch_table`` reducers and module stacks)."""

    def __init__(self, rebind: Rebind | None = None) -> None:
        self._rebind = rebind
        self._ordinals: dict[tuple[str, object], int] = {}
        self._stacks: dict[int, dict[str, Any]] = {}  # id(original) -> rewritten
        self._classes: dict[type, _ClassByName] = {}

    def _ordinal(self, kind: str, value: object) -> int:
        return self._ordinals.setdefault((kind, value), len(self._ordinals))

    def node_info(self, obj: Any) -> Any:
        return type(obj), (obj.name, _ADDRESS.sub("", obj.target),
                           self._ordinal("graph", obj.graph_id))

    def node_source(self, obj: Any) -> Any:  # its cached to_dict() repeats the above
        return copyreg.__newobj__, (type(obj),), {**obj.__dict__, "_dict": None}

    def captured_state(self, obj: Any) -> Any:
        levels = dict(sorted(obj.logger_levels.items()))
        return copyreg.__newobj__, (type(obj),), {**obj.__dict__, "logger_levels": levels}

    def shape_env(self, obj: Any) -> Any:  # GraphPickler's _ShapeEnvPickleData
        return copyreg.__newobj__, (type(obj),), {
            **obj.__dict__, "data": {**obj.data, "_expr_sym_node_id": None}}

    def device(self, obj: Any) -> Any:
        assert self._rebind is not None
        # torch.device's own reduction, index swapped: the same bytes as a request of a
        # rank on the canonical device (a shared "cuda" string would be memoized)
        func, args = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)[:2]
        if obj.type == "cuda" and len(args) == 2:
            args = (args[0], self._rebind.to_canonical(args[1]))
        return func, args

    def device_box(self, obj: Any) -> Any:  # graph_kwargs' boxed_forward_device_index
        assert self._rebind is not None
        state = dict(obj.__dict__)
        if isinstance(state.get("value"), int):
            state["value"] = self._rebind.to_canonical(state["value"])
        return copyreg.__newobj__, (type(obj),), state

    def stable_stack(self, stack: dict[str, Any]) -> dict[str, Any]:
        # One rewritten dict per original, so stacks that nodes share stay shared.
        stable = self._stacks.get(id(stack))
        if stable is None:
            stable = {str(self._ordinal("module", k)): self._by_name(v)
                      for k, v in stack.items()}
            self._stacks[id(stack)] = stable
        return stable

    def _by_name(self, entry: Any) -> Any:
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], type):
            ref = self._classes.get(entry[1])
            if ref is None:
                ref = self._classes[entry[1]] = _ClassByName(entry[1])
            return entry[0], ref
        return entry


class _ClassByName:
    """A module class in a stack, pickled by name and not imported on the way back
    (``module_class``). By global reference, a fresh farm worker's first backward graph
    imported the model's library to unpickle it: ``transformers``, 11.4 s on the H100
    machine's cold disk (0.75 CPU-s on 2 CPU cores with its files in the page cache)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __reduce__(self) -> tuple[Any, ...]:
        return module_class, (self.cls.__module__, self.cls.__qualname__)


def module_class(module: str, qualname: str) -> type:
    """The class, if its module is imported here; else a stand-in type of that name.
    Inductor reads the classes of a module stack only to name the nodes of a graph view
    (fx_passes/graph_view.py), so a worker need not import a model's library for them."""
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else _stand_in(module, qualname)


@functools.cache
def _stand_in(module: str, qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (), {
        "__module__": module, "__qualname__": qualname,
        "__doc__": "Stands in for a class whose module this process has not imported."})


class _Deterministic:
    """Mixed in before GraphPickler or LeanPickler (``_deterministic``)."""

    _reducers: dict[type, str]  # type -> name of the _StreamIds method that reduces it
    _rebind: Rebind | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ids = _StreamIds(self._rebind)
        self.dispatch_table = {**copyreg.dispatch_table,
                               **{t: getattr(self._ids, m) for t, m in self._reducers.items()}}

    def dump(self, obj: Any) -> None:
        # GraphModule's reduction copies each node's meta dict: swap stable stacks in
        # for the dump. A request's graphs are its ``gm`` and gm's submodules.
        import torch

        gm = getattr(obj, "gm", None)
        swapped = []
        if isinstance(gm, torch.fx.GraphModule):
            for module in gm.modules():
                if isinstance(module, torch.fx.GraphModule):
                    for node in module.graph.nodes:
                        stack = node.meta.get("fwd_nn_module_stack")
                        if stack:
                            swapped.append((node.meta, stack))
                            node.meta["fwd_nn_module_stack"] = self._ids.stable_stack(stack)
        try:
            super().dump(obj)  # type: ignore[misc]
        finally:
            for meta, stack in swapped:
                meta["fwd_nn_module_stack"] = stack


@functools.cache
def _deterministic(base: type, rebind: Rebind | None = None) -> type:
    import torch
    from torch._inductor.cudagraph_utils import BoxedDeviceIndex
    from torch.fx import _graph_pickler
    from torch.fx.traceback import NodeSource

    from .state import CapturedState

    reducers: dict[type, str] = {NodeSource.NodeInfo: "node_info", NodeSource: "node_source",
                                 CapturedState: "captured_state"}
    shape_env_data = getattr(_graph_pickler, "_ShapeEnvPickleData", None)
    if shape_env_data is not None:
        reducers[shape_env_data] = "shape_env"
    if rebind is not None:
        reducers.update({torch.device: "device", BoxedDeviceIndex: "device_box"})
    return type(f"Deterministic{base.__name__}", (_Deterministic, base),
                {"_reducers": reducers, "_rebind": rebind})


def share_stack_traces(gm: Any) -> None:
    """Make equal ``stack_trace`` strings one object, so pickle's memo writes each once.
    A layer repeated N times repeats its traces N times: on GPT-2 (12 layers) 739 traces
    are 45 distinct strings, and 1.2 MB of a 1.8 MB request."""
    import sys

    import torch

    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                trace = node.meta.get("stack_trace")
                if isinstance(trace, str):
                    node.meta["stack_trace"] = sys.intern(trace)


def loads(data: bytes, fake_mode: Any) -> Any:
    from torch.fx._graph_pickler import GraphPickler

    return GraphPickler.loads(data, fake_mode)


def plain_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()
