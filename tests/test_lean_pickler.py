"""The lean pickler: a graph's fake values come back as GraphPickler's would — same
geometry, same views, same storage sharing — and the lean path is the one taken."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch.fx._graph_pickler import GraphPickler
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxoffload import NotOffloadable, pickling


def _views_and_aliases(x: torch.Tensor, w: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = x.view(4, 6) + v.sum()
    b = a.t()
    c = x[1:3]
    d = torch.relu(b @ w)
    e = d.transpose(0, 1).contiguous()
    with torch.no_grad():
        f = w.view(20)  # no grad of its own, whatever w requires
    return a, b, c, d, e, f, x.unsqueeze(0), w.reshape(-1)


def _trace(grad: bool) -> tuple[torch.fx.GraphModule, list[Any]]:
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        x = torch.randn(24)
        w = torch.randn(4, 5, requires_grad=grad)
        v = torch.randn(8, 3)[2:].t()  # an input that is a view (Dynamo passes such)
    return make_fx(_views_and_aliases)(x, w, v), [x, w, v]


def _values(gm: torch.fx.GraphModule) -> list[Any]:
    return [n.meta.get("val") for n in gm.graph.nodes]


def _describe(values: list[Any]) -> list[Any]:
    """Geometry and view-ness of each value, and which values share a storage."""
    storages: dict[int, int] = {}
    out = []
    for v in values:
        if not isinstance(v, torch.Tensor):
            out.append(v if not isinstance(v, (list, tuple)) else len(v))
            continue
        key = v.untyped_storage()._cdata
        group = storages.setdefault(key, len(storages))
        out.append((tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.device,
                    v._is_view(), v.requires_grad, group))
    return out


def _round_trip(obj: Any, *, lean: bool) -> tuple[bytes, Any]:
    data = pickling.dumps(obj, pickling.OpRecorder(), lean=lean)
    return data, GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))


def test_values_come_back_as_graphpicklers_do() -> None:
    gm, inputs = _trace(grad=False)
    original = _describe(_values(gm) + inputs)
    _, (lean_gm, lean_inputs) = _round_trip((gm, inputs), lean=True)
    assert _describe(_values(lean_gm) + lean_inputs) == original
    # GraphPickler itself cannot pickle a view input (its base's description keeps the
    # FakeTensorMode); on the graph alone it agrees.
    with pytest.raises(NotOffloadable, match="WeakValueDictionary"):
        pickling.dumps(inputs[2], pickling.OpRecorder(), lean=False)
    stock_data, stock_gm = _round_trip(gm, lean=False)
    assert _describe(_values(stock_gm)) == _describe(_values(gm))
    assert [n.format_node() for n in lean_gm.graph.nodes] == \
        [n.format_node() for n in gm.graph.nodes]
    # Values that alias share a storage; a view is a view (Inductor's lowering asks).
    rows = [r for r in original if isinstance(r, tuple)]
    assert len({r[7] for r in rows}) < len(rows)
    assert any(r[5] for r in rows)
    lean_gm_data, _ = _round_trip(gm, lean=True)
    assert b"_unpickle_tensor" in lean_gm_data and b"_unpickle_tensor" not in stock_data
    assert b"_LeanGraph" in lean_gm_data  # the graph's nodes took the lean path too
    assert len(lean_gm_data) < len(stock_data)


def test_a_described_base_and_its_lean_views_share_storage() -> None:
    # The input w requires grad, so it takes GraphPickler's path; the graph's values
    # that alias it do not, so they are lean, and must land on the storage that
    # GraphPickler's path made for w.
    gm, inputs = _trace(grad=True)
    original = _describe(inputs + _values(gm))
    _, (lean_inputs, lean_gm) = _round_trip((inputs, gm), lean=True)
    assert _describe(lean_inputs + _values(lean_gm)) == original
    w = original[1]
    assert w[6] and any(not r[6] and r[7] == w[7] for r in original[3:] if r)


def test_symbolic_values_take_graphpicklers_path() -> None:
    gm = make_fx(lambda t: (t * 2).sum(1), tracing_mode="symbolic")(torch.randn(6, 4))
    assert all(isinstance(v.shape[0], torch.SymInt)
               for v in _values(gm) if isinstance(v, torch.Tensor))
    data, back = _round_trip(gm, lean=True)
    assert b"_unpickle_tensor" not in data
    tensors = [v for v in _values(back) if isinstance(v, torch.Tensor)]
    assert tensors and all(isinstance(v.shape[0], torch.SymInt) for v in tensors)


def test_a_lazy_modules_code_is_regenerated_only_when_stale(monkeypatch: Any) -> None:
    from torch.fx._lazy_graph_module import _LazyGraphModule

    traced, _ = _trace(grad=False)
    gm = _LazyGraphModule(traced, traced.graph)
    gm._real_recompile()
    recompiles: list[int] = []
    real = _LazyGraphModule._real_recompile

    def counted(self: Any) -> Any:
        recompiles.append(1)
        return real(self)

    monkeypatch.setattr(_LazyGraphModule, "_real_recompile", counted)
    _, back = _round_trip(gm, lean=True)
    assert recompiles == []  # current code: carried as it is
    assert back.code == gm.code

    # A graph changed after its last compile: the code that travels is the new graph's.
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.ops.aten.sigmoid.default
    gm.recompile()  # lazy: only marks the code stale
    assert gm._needs_recompile()
    _, back = _round_trip(gm, lean=True)
    assert recompiles == [1]
    assert "aten.sigmoid" in back.code and "aten.relu" not in back.code
