"""Async modes: the first call runs the graph eagerly with no Inductor compile in this
process, the compile runs in the background, and the first call after it arrives swaps
the compiled code in. Both phases give stock torch.compile's results; the compiled
phase runs stock's code."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import assert_same_code, normalize_code, settings_for
from extensions import WaitsForFile
from models import MLP, Block, ConvNet, GraphBreak, OddWidth, aliased_outputs, mutate_input
from torch._inductor.utils import run_and_get_code

import fxoffload

ASYNC_MODES = ("async+serde", "async+subprocess")


def _compare(ours: Any, stock: Any) -> None:
    o_flat, _ = torch.utils._pytree.tree_flatten(ours)
    s_flat, _ = torch.utils._pytree.tree_flatten(stock)
    assert len(o_flat) == len(s_flat)
    for o, s in zip(o_flat, s_flat, strict=True):
        if isinstance(s, torch.Tensor):
            torch.testing.assert_close(o, s)
            assert o.stride() == s.stride()
        else:
            assert o == s


@contextlib.contextmanager
def _saved_code() -> Iterator[list[str]]:
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    saved = GraphLowering.save_output_code
    GraphLowering.save_output_code = codes.append  # type: ignore[assignment]
    try:
        yield codes
    finally:
        GraphLowering.save_output_code = saved  # type: ignore[assignment]


def _phases(make: Callable[[], Any], run: Callable[[Any], Any], mode: str, tmp_path: Any,
            graphs: int, calls: int | None = None, **extra: Any) -> None:
    """Stock compile vs. ours: the first call eager (its compiles held back until it
    returns), then, after the compiles arrive, compiled; each equal to stock, and the
    compiled phase's code equal to stock's. ``calls``: graph calls in one run (a
    training step whose forward runs Dynamo's graph eagerly makes one, not two)."""
    torch.manual_seed(0)
    stock_fn = make()
    ours_fn = copy.deepcopy(stock_fn)
    torch._dynamo.reset()
    stock_out, stock_code = run_and_get_code(
        lambda: run(torch.compile(stock_fn, backend="inductor")))
    torch._dynamo.reset()
    fxoffload.reset_stats()
    compiled = torch.compile(ours_fn, backend=fxoffload.backend(
        **settings_for(mode, tmp_path, **extra)))

    gate = tmp_path / "release-compiles"
    with _saved_code() as ours_code:  # not run_and_get_code: it resets Dynamo
        # Compiles wait at the gate until the first call is over: a warm worker would
        # otherwise win the race on a tiny graph, and the eager phase would go untested.
        with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile(
                str(gate), serde_thread=True)):
            first = run(compiled)
        snap = fxoffload.stats()
        assert snap.compiled_runs == 0 and snap.swaps == 0, snap
        # each graph is compiling in a worker, or still being traced on our thread
        calls = graphs if calls is None else calls
        assert snap.eager_runs >= calls, snap
        assert snap.background_compiles + snap.background_traces >= 1, snap
        if extra.get("defer_trace") is False:
            assert snap.background_traces == 0, snap
        _compare(first, stock_out)
        gate.touch()
        assert fxoffload.wait(300)
        second = run(compiled)
    snap = fxoffload.stats()
    # A deferred trace hands a training graph's backward to the pool with its forward,
    # even when no backward runs (stock compiles a backward at its first call).
    if extra.get("defer_trace") is False:
        assert snap.background_compiles == len(stock_code) >= graphs
    else:
        assert snap.background_compiles >= len(stock_code) >= graphs
    assert dict(snap.fallbacks) == {}
    # every graph called again was swapped (a static graph that Dynamo's dynamic
    # recompile supersedes is never called again, so it never swaps)
    assert snap.swaps == len(ours_code) >= 1 and snap.compiled_runs >= snap.swaps
    _compare(second, stock_out)
    if len(ours_code) == len(stock_code):
        assert_same_code(ours_code, stock_code)
    else:  # each swapped graph runs one of stock's graphs
        stock_set = {normalize_code(c) for c in stock_code}
        assert all(normalize_code(c) in stock_set for c in ours_code)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_mlp(mode: str, tmp_path: Any) -> None:
    x = torch.randn(4, 16)
    _phases(MLP, lambda f: f(x), mode, tmp_path, graphs=1)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_conv_net(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 3, 8, 8)

    def run(f: Any) -> torch.Tensor:
        with torch.no_grad():  # inference: stock's code (training pins layouts, below)
            return f(x)

    _phases(lambda: ConvNet().eval(), run, mode, tmp_path, graphs=1)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_training(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 8, 32)

    def run(f: Any) -> list[torch.Tensor]:
        f.zero_grad()
        out = f(x)
        out.pow(2).mean().backward()
        return [out.detach()] + [p.grad for p in f.parameters()]

    _phases(Block, run, mode, tmp_path, graphs=2, calls=1)  # forward and backward


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "traced-on-caller"])
def test_training_steps(deferred: bool, tmp_path: Any) -> None:
    """Several steps, AOTAutograd's trace deferred to our thread or done by the caller:
    eager, then compiled forward and backward, each step equal to stock's."""
    x = torch.randn(2, 8, 32)

    def run(f: Any) -> list[torch.Tensor]:
        outs = []
        for _ in range(3):
            f.zero_grad()
            out = f(x)
            out.pow(2).mean().backward()
            outs += [out.detach()] + [p.grad.clone() for p in f.parameters()]
        return outs

    _phases(Block, run, "async+subprocess", tmp_path, graphs=2,
            calls=3 if deferred else 6, defer_trace=deferred)


def test_mlp_traced_on_caller(tmp_path: Any) -> None:
    x = torch.randn(4, 16)
    _phases(MLP, lambda f: f(x), "async+subprocess", tmp_path, graphs=1, defer_trace=False)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_input_mutation(mode: str, tmp_path: Any) -> None:
    base, y = torch.randn(3, 3), torch.randn(3, 3)

    def run(f: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = base.clone()
        return f(x, y), x  # the mutation must be visible in x, eager or compiled

    _phases(lambda: mutate_input, run, mode, tmp_path, graphs=1)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_aliased_and_multiple_outputs(mode: str, tmp_path: Any) -> None:
    x = torch.randn(4, 4)

    def run(f: Any) -> Any:
        outs = f(x)
        outs[0].add_(1)  # views see the write in both phases
        return outs

    _phases(lambda: aliased_outputs, run, mode, tmp_path, graphs=1)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_graph_break(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 8)
    _phases(GraphBreak, lambda f: f(x), mode, tmp_path, graphs=2)


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_dynamic_shapes(mode: str, tmp_path: Any) -> None:
    inputs = [torch.randn(n, 16) for n in (4, 7, 9)]

    def run(f: Any) -> list[torch.Tensor]:
        outs = []
        for x in inputs:
            x = x.clone()
            torch._dynamo.mark_dynamic(x, 0)
            outs.append(f(x))
        return outs

    _phases(MLP, run, mode, tmp_path, graphs=1)


def test_no_inductor_compile_in_the_parent_before_the_first_output() -> None:
    """The first call never waits for Inductor: nothing is lowered in this process."""
    from torch._inductor import graph as inductor_graph

    lowered: list[int] = []
    original = inductor_graph.GraphLowering.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        lowered.append(os.getpid())
        original(self, *args, **kwargs)

    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    compiled = torch.compile(model, backend=fxoffload.backend(
        **settings_for("async+subprocess")))
    inductor_graph.GraphLowering.__init__ = spy  # type: ignore[method-assign]
    try:
        torch.testing.assert_close(compiled(x), model(x))
        assert lowered == []
        assert fxoffload.wait(300)
        torch.testing.assert_close(compiled(x), model(x))
        assert lowered == []  # compiled in a worker, not here
    finally:
        inductor_graph.GraphLowering.__init__ = original  # type: ignore[method-assign]
    assert fxoffload.stats().swaps == 1


def test_eager_forward_meets_compiled_backward(tmp_path: Any) -> None:
    """A forward that ran eagerly feeds its saved tensors to a backward swapped in
    meanwhile, and later the compiled forward feeds the same backward: strides agree in
    both (the forward is compiled with eager's output strides, padding or not)."""
    torch.manual_seed(0)
    stock = OddWidth()
    ours = copy.deepcopy(stock)
    x = torch.randn(8, 16)
    stock(x).pow(2).mean().backward()
    stock(x).pow(2).mean().backward()
    gate = tmp_path / "release"
    # Padding on (as on GPU): Inductor would give the saved activations padded strides.
    with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile(str(gate)),
                                      disable_padding_cpu=False, padding_stride_threshold=1):
        # AOTAutograd's trace on the caller's thread: its eager stand-in is then the
        # forward graph, whose saved tensors a compiled backward may meet.
        compiled = torch.compile(ours, backend=fxoffload.backend(
            **settings_for("async+subprocess", defer_trace=False)))
        out_a = compiled(x)  # eager forward; its compile waits at the gate
        out_b = compiled(x)  # eager again
        out_a.pow(2).mean().backward()  # eager backward; the backward compile starts
    assert fxoffload.stats().eager_runs == 3 and fxoffload.stats().swaps == 0
    gate.touch()
    assert fxoffload.wait(300)
    out_b.pow(2).mean().backward()  # compiled backward, saved tensors from eager
    snap = fxoffload.stats()
    assert snap.swaps == 1 and snap.compiled_runs == 1 and snap.fallback_count == 0, snap
    for p, q in zip(ours.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    # and the compiled forward's saved tensors suit the same compiled backward
    ours.zero_grad()
    stock.zero_grad()
    compiled(x).pow(2).mean().backward()
    stock(x).pow(2).mean().backward()
    assert fxoffload.stats().swaps == 2 and fxoffload.stats().compiled_runs == 3
    for p, q in zip(ours.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


NEXT_PROCESS = textwrap.dedent("""
    import torch, sys
    sys.path.insert(0, sys.argv[1])
    from models import MLP
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    out = torch.compile(model)(x)
    torch.testing.assert_close(out, model(x))
    print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
""")


def test_background_compile_fills_the_cache_for_the_next_process(tmp_path: Any) -> None:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    script = textwrap.dedent("""
        import sys, torch, fxoffload
        sys.path.insert(0, sys.argv[1])
        from models import MLP
        torch.manual_seed(0)
        model, x = MLP(), torch.randn(4, 16)
        fxoffload.warmup(mode="async+subprocess", workers=1)  # else the first compiles here
        def compile():
            return torch.compile(model, backend=fxoffload.backend(mode="async+subprocess",
                                                                  workers=1))
        with torch.no_grad():
            torch.testing.assert_close(compile()(x), model(x))
        torch.testing.assert_close(compile()(x), model(x))  # a training forward
        assert fxoffload.wait(300)
        s = fxoffload.stats()
        # inference; training forward, and its backward where the trace was deferred
        # (handed over with the forward; elsewhere it compiles at its first call)
        from fxoffload.private_config import config_can_be_private
        expected = 3 if config_can_be_private() else 2
        assert s.background_compiles == expected and s.fallback_count == 0, s
        # A second compile in this process: the inference graph hits AOTAutograd's cache,
        # and is used at once: no background work, no eager run.
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(compile()(x), model(x))
        s2 = fxoffload.stats()
        assert s2.background_compiles == s.background_compiles, s2
        assert s2.eager_runs == s.eager_runs, s2
        # The training graph hits too (AOTAutograd's cache, or the FX graph cache after
        # the trace): no worker compiles it.
        g = compile()
        for _ in range(2):
            torch.testing.assert_close(g(x), model(x))
        assert fxoffload.wait(300)
        torch.testing.assert_close(g(x), model(x))
        s3 = fxoffload.stats()
        assert s3.background_compiles == s.background_compiles, s3
        print("ok")
    """)
    tests_dir = os.path.dirname(__file__)
    first = subprocess.run([sys.executable, "-c", script, tests_dir], env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and first.stdout.strip().endswith("ok"), first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-c", NEXT_PROCESS, tests_dir], env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    hits, misses = map(int, second.stdout.split())
    assert hits >= 1 and misses == 0, second.stdout


def test_compiled_module_is_loaded_before_the_swap() -> None:
    """The receiver loads an arrived compile's module (its C++ or Triton kernels) before
    offering it, so the call that swaps it in does not load anything: measured, that
    call took 1.2 s for a tiny GPT-2 on 2 cores and 0.3 s for GPT-2 on the H200."""
    from torch._inductor.codecache import PyCodeCache

    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    compiled = torch.compile(model, backend=fxoffload.backend(mode="async+subprocess",
                                                             workers=1))
    before = len(PyCodeCache.modules)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # eager
        assert fxoffload.wait(300)
        assert len(PyCodeCache.modules) == before + 1  # loaded on arrival
        snap = fxoffload.stats()
        assert snap.swaps == 0 and snap.compiled_runs == 0, snap
        torch.testing.assert_close(compiled(x), model(x))  # the swap: no second load
    assert len(PyCodeCache.modules) == before + 1
    snap = fxoffload.stats()
    assert snap.swaps == 1 and snap.compiled_runs == 1 and snap.fallback_count == 0, snap
