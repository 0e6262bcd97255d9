"""A faster GraphPickler: the same stream and unpickle state, leaner encodings for the
two things a compile request holds most of.

GraphPickler spends a request's time on two per-item paths. Every node goes through
``pytree.tree_map_only`` twice (pickle and unpickle) to swap ``Node`` references, and
every fake tensor (each node's ``meta["val"]``, each input) goes through
``MetaTensorDescriber.describe_tensor`` — a ~45-field description built twice per
tensor — and ``MetaConverter.meta_tensor`` on the way back. On bench-size GPT-2 that is
~1100 tensors and ~900 nodes, most of the boundary's cost, and most of the memory it
touches for the first time (page faults dominated its first call on a GPU host).

Here a node's references are swapped by FX's own ``map_arg``/``map_aggregate`` (C++),
and a *plain* fake tensor (static sizes, dense, strided, no autograd state, no
conj/neg/zero bits, no constant) is written
as its storage id, sizes, strides, offset, dtype and device; a view of one as its base
plus ``as_strided`` arguments, so it comes back a view (``_is_view()``) of the same
storage, as Inductor's lowering checks. Storage ids come from GraphPickler's describer
and land in its converter's storage memo, so lean and described tensors that share a
storage still share it after unpickling. Anything else takes GraphPickler's own path.
The unpickling side is GraphPickler's (``GraphPickler.loads``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx._graph_pickler import (
    GraphPickler,
    _GraphModulePickleData,
    _OpPickleData,
)
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.node import map_aggregate, map_arg

from .device_index import Rebind, canonical_fx_code


class _Ref(int):
    """A node reference inside another node's args: the referenced node's index."""

    __slots__ = ()


class _LeanGraph:
    """A graph's nodes as tuples: (op, name, target, args, kwargs, type, meta)."""

    def __init__(self, graph: torch.fx.Graph, options: Any) -> None:
        self.tracer_cls = graph._tracer_cls
        self.tracer_extras = graph._tracer_extras
        self._codegen = graph._codegen
        keep = options.node_metadata_key_filter
        index: dict[torch.fx.Node, int] = {}

        def ref(node: torch.fx.Node) -> _Ref:
            return _Ref(index[node])

        nodes = []
        for i, node in enumerate(graph.nodes):
            index[node] = i
            meta = node.meta if not keep else {k: v for k, v in node.meta.items() if keep(k)}
            nodes.append((node.op, node.name, _OpPickleData.pickle(node.target, options),
                          map_arg(node.args, ref), map_arg(node.kwargs, ref), node.type, meta))
        self.nodes = nodes

    def unpickle(self, gm: torch.fx.GraphModule, unpickle_state: Any) -> torch.fx.Graph:
        graph = torch.fx.Graph(gm, self.tracer_cls, self.tracer_extras)
        made: list[torch.fx.Node] = []

        def node_of(x: Any) -> Any:
            return made[x] if type(x) is _Ref else x

        for op, name, target, args, kwargs, type_, meta in self.nodes:
            node = graph.create_node(op, target.unpickle(unpickle_state),
                                     map_aggregate(args, node_of), map_aggregate(kwargs, node_of),
                                     name, type_)
            node.meta = meta
            made.append(node)
        graph._codegen = self._codegen
        return graph


class _LeanGraphModule(_GraphModulePickleData):
    def __init__(self, gm: torch.fx.GraphModule, options: Any,
                 rebind: Rebind | None = None) -> None:
        # The code must match the graph (it travels in gm's __dict__). GraphPickler always
        # regenerates and recompiles it, 30% of a request's encode on BERT; a lazy module
        # knows whether its code is current, and the post-AOTAutograd graph's always is.
        if isinstance(gm, torch.fx._lazy_graph_module._LazyGraphModule):
            if gm._needs_recompile():
                gm._real_recompile()
        else:
            gm.recompile()
        self.gm_dict = gm.__getstate__() if hasattr(gm, "__getstate__") else gm.__dict__.copy()
        del self.gm_dict["_graph"]
        if rebind is not None and isinstance(self.gm_dict.get("_code"), str):
            self.gm_dict["_code"] = canonical_fx_code(self.gm_dict["_code"], rebind)
        self.graph = _LeanGraph(gm._graph, options)  # type: ignore[assignment]


def _plain(t: FakeTensor) -> bool:
    """Whether a fake tensor is fully described by its storage, geometry, dtype and
    device (the lean path); False sends it down GraphPickler's path."""
    if t.requires_grad or t.layout is not torch.strided or t.is_quantized:
        return False
    if t.constant is not None or getattr(t, "real_tensor", None) is not None:
        return False
    if t.is_conj() or t.is_neg() or t._is_zerotensor() or t.is_inference():
        return False
    if getattr(t, "item_memo", None) is not None or getattr(t, "nested_int_memo", None) \
            is not None:
        return False
    return all(type(x) is int for x in (*t.shape, *t.stride(), t.storage_offset()))


def _unpickle_tensor(unpickle_state: Any, base: FakeTensor | None, storage_id: int,
                     nbytes: int, size: tuple[int, ...], stride: tuple[int, ...],
                     offset: int, dtype: torch.dtype, device: torch.device) -> FakeTensor:
    """A plain fake tensor back: a view of ``base`` (as MetaConverter.view_from_base makes
    one), or a tensor on the storage this id names, made once per id."""
    from torch.utils._mode_utils import no_dispatch

    if base is not None:
        with torch.no_grad():
            return base.as_strided(size, stride, offset)
    memo = unpickle_state.meta_converter.storage_memo
    storage = memo.get(storage_id)
    with no_dispatch():
        if storage is None:
            meta = torch.empty_strided(size, stride, dtype=dtype, device="meta")
            if meta.untyped_storage().nbytes() < nbytes:
                storage = torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()
        if storage is not None:
            meta = torch.empty(0, dtype=dtype, device="meta").set_(storage, offset, size, stride)
        fake = FakeTensor(unpickle_state.fake_mode, meta, device)
    if storage_id not in memo:
        memo[storage_id] = fake.untyped_storage()
    return fake


# Types whose default pickling is right: skip GraphPickler's chain of isinstance checks.
_DEFAULT_TYPES = frozenset({int, float, str, bytes, bool, type(None), tuple, list, dict,
                            slice, set, frozenset, immutable_list, immutable_dict,
                            torch.dtype, torch.device, torch.Size, torch.memory_format,
                            torch.layout, _Ref})


class LeanPickler(GraphPickler):
    """GraphPickler with lean node and plain-fake-tensor encodings (module docstring)."""

    def reducer_override(self, obj: object) -> Any:
        t = type(obj)
        if t in _DEFAULT_TYPES:
            return NotImplemented
        if t is FakeTensor:
            args = self._lean_tensor(obj)  # type: ignore[arg-type]
            if args is not None:
                return _unpickle_tensor, (self._unpickle_state, *args)
        elif isinstance(obj, torch.fx.GraphModule):  # each one has its own subclass
            lean = _LeanGraphModule(obj, self.options,  # type: ignore[arg-type]
                                    getattr(self, "_rebind", None))
            return _LeanGraphModule.unpickle, (lean, self._unpickle_state)
        return super().reducer_override(obj)

    def _lean_tensor(self, t: FakeTensor) -> tuple[Any, ...] | None:
        """``_unpickle_tensor``'s arguments after the state, or None for GraphPickler's
        path."""
        if not _plain(t):
            return None
        geometry = (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)
        if t._is_view():
            base = t._base
            if type(base) is not FakeTensor or base.dtype != t.dtype:
                return None
            return (base, 0, 0, *geometry)
        storage = t.untyped_storage()
        return (None, self._meta_tensor_describer.get_storage_id(storage), storage.nbytes(),
                *geometry)
