"""Pickling graphs with GraphPickler, without its aten/fbgemm-only op allowlist.

Any ``torch.ops.<ns>`` operator crosses by name. For namespaces that torch does not
define itself we record the operator, find the module that registered it (ops made with
``torch.library.custom_op``) so that the worker can import it first, and refuse ops
defined in ``__main__``, which no other process can import.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ._compat import graph_pickler_options
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


def dumps(obj: Any, recorder: OpRecorder, *, lean: bool = True) -> bytes:
    """GraphPickler.dumps with our filter (by default through ``lean_pickler``, which
    GraphPickler.loads reads); pickling failures become NotOffloadable."""
    from torch._inductor.codecache import BypassFxGraphCache
    from torch.fx._graph_pickler import GraphPickler

    from .lean_pickler import LeanPickler

    pickler = LeanPickler if lean else GraphPickler
    try:
        return pickler.dumps(obj, graph_pickler_options(recorder))
    except NotOffloadable:
        raise
    except BypassFxGraphCache as e:
        raise NotOffloadable("uncacheable_graph", str(e)) from None
    except (pickle.PicklingError, AttributeError, TypeError, NotImplementedError) as e:
        raise NotOffloadable("unpicklable", f"{type(e).__name__}: {e}") from None


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
