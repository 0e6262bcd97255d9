"""The contract every executor honours: outputs equal stock torch.compile's, the generated
code is stock's, and nothing falls back. One parametrized suite over every executor (the
farm's runs against the session's real farm, from a cold store each time)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import conftest
import pytest
import torch
from conftest import MODES, assert_same_code, settings_for
from models import MLP, Block, ConvNet, GraphBreak, aliased_outputs, mutate_input
from torch._inductor.utils import run_and_get_code

import fxoffload

MODES = (*MODES, "farm")


@pytest.fixture(autouse=True)
def _farm_when_asked(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("mode") == "farm":
        farm = request.getfixturevalue("farm")
        farm.reset()
        conftest.CURRENT_FARM = farm


def _stock_and_ours(make: Callable[[], Any], run: Callable[[Any], Any], mode: str,
                    tmp_path: Any, **compile_kw: Any) -> tuple[Any, list[str], Any, list[str]]:
    torch.manual_seed(0)
    stock_fn = make()
    ours_fn = copy.deepcopy(stock_fn)
    torch._dynamo.reset()
    stock_out, stock_code = run_and_get_code(
        lambda: run(torch.compile(stock_fn, backend="inductor", **compile_kw)))
    torch._dynamo.reset()
    fxoffload.reset_stats()
    backend = fxoffload.backend(**settings_for(mode, tmp_path))
    ours_out, ours_code = run_and_get_code(
        lambda: run(torch.compile(ours_fn, backend=backend, **compile_kw)))
    return stock_out, stock_code, ours_out, ours_code


def _check(stock_out: Any, stock_code: list[str], ours_out: Any, ours_code: list[str],
           graphs: int) -> None:
    s_flat, _ = torch.utils._pytree.tree_flatten(stock_out)
    o_flat, _ = torch.utils._pytree.tree_flatten(ours_out)
    assert len(s_flat) == len(o_flat)
    for s, o in zip(s_flat, o_flat, strict=True):
        if isinstance(s, torch.Tensor):
            torch.testing.assert_close(o, s)
            assert o.stride() == s.stride()
        else:
            assert o == s
    assert_same_code(ours_code, stock_code)
    snap = fxoffload.stats()
    assert dict(snap.fallbacks) == {}
    # every graph stock compiled, we offloaded: no more, no fewer
    assert snap.graphs_offloaded == len(stock_code) >= graphs


@pytest.mark.parametrize("mode", MODES)
def test_mlp(mode: str, tmp_path: Any) -> None:
    x = torch.randn(4, 16)
    _check(*_stock_and_ours(MLP, lambda f: f(x), mode, tmp_path), graphs=1)


@pytest.mark.parametrize("mode", MODES)
def test_conv_net(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 3, 8, 8)
    _check(*_stock_and_ours(lambda: ConvNet().eval(), lambda f: f(x), mode, tmp_path),
           graphs=1)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_block(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 8, 32)
    _check(*_stock_and_ours(Block, lambda f: f(x), mode, tmp_path), graphs=1)


@pytest.mark.parametrize("mode", MODES)
def test_dynamic_shapes(mode: str, tmp_path: Any) -> None:
    inputs = [torch.randn(n, 16) for n in (4, 7, 9)]

    def run(f: Any) -> list[torch.Tensor]:
        outs = []
        for x in inputs:
            x = x.clone()
            torch._dynamo.mark_dynamic(x, 0)
            outs.append(f(x))
        return outs

    stock_out, stock_code, ours_out, ours_code = _stock_and_ours(MLP, run, mode, tmp_path)
    _check(stock_out, stock_code, ours_out, ours_code, graphs=1)
    assert any("s" in line and "size" in line for line in ours_code[-1].splitlines()), \
        "the last graph compiled should be symbolic in its batch size"
    assert "s0" in ours_code[-1] or "ks0" in ours_code[-1] or "s77" in ours_code[-1]


@pytest.mark.parametrize("mode", MODES)
def test_training_forward_and_backward(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 8, 32)

    def run(f: Any) -> list[torch.Tensor]:
        f.zero_grad()
        out = f(x)
        out.pow(2).mean().backward()
        return [out.detach()] + [p.grad for p in f.parameters()]

    # forward + the lazily compiled backward
    _check(*_stock_and_ours(Block, run, mode, tmp_path), graphs=2)


@pytest.mark.parametrize("mode", MODES)
def test_input_mutation(mode: str, tmp_path: Any) -> None:
    base = torch.randn(3, 3)
    y = torch.randn(3, 3)

    def run(f: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = base.clone()
        out = f(x, y)
        return out, x  # the mutation must be visible in x

    _check(*_stock_and_ours(lambda: mutate_input, run, mode, tmp_path), graphs=1)


@pytest.mark.parametrize("mode", MODES)
def test_aliased_and_multiple_outputs(mode: str, tmp_path: Any) -> None:
    x = torch.randn(4, 4)

    def run(f: Any) -> Any:
        outs = f(x)
        outs[0].add_(1)  # aliasing preserved: views see the write
        return outs

    _check(*_stock_and_ours(lambda: aliased_outputs, run, mode, tmp_path), graphs=1)


@pytest.mark.parametrize("mode", MODES)
def test_graph_break(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 8)
    _check(*_stock_and_ours(GraphBreak, lambda f: f(x), mode, tmp_path), graphs=2)
