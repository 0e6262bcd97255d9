"""The deferred trace (async modes): AOTAutograd and Inductor's front half run on
fxoffload's thread while the caller runs Dynamo's graph eagerly. The user's thread
must not see that trace: no FX-tracing flag, no rewound RNG; graphs the trace could add
guards to are traced on the caller's thread; a trace that fails costs no step."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from extensions import (
    HOLD_TRACE,
    TRACE_HELD,
    TRACE_RELEASE,
    CountsJointPass,
    RaisesInJointPass,
)
from models import MLP

import fxoffload
from fxoffload.errors import FxOffloadError, TraceFailed
from fxoffload.private_config import config_can_be_private

DEFERS = config_can_be_private()
deferring = pytest.mark.skipif(not DEFERS, reason="this torch's config cannot be made "
                               "private to a thread: every graph is traced on the caller's")


def _held_model(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.fxoffload_test.held(x.sin()) * 2


@pytest.fixture
def held_trace() -> Iterator[None]:
    TRACE_HELD.clear()
    TRACE_RELEASE.clear()
    HOLD_TRACE.set()
    try:
        yield
    finally:
        HOLD_TRACE.clear()
        TRACE_RELEASE.set()


@deferring
def test_the_caller_does_not_see_the_trace(held_trace: None) -> None:
    """While our thread is inside AOTAutograd's make_fx: another compiled function runs
    compiled (no 'FX symbolically traces a dynamo-optimized function' error, no
    recompile: the FX patcher's swap of Module.__call__ is not made), the FX flag reads
    unset here, and the random numbers drawn here are not rewound when the
    trace restores the generator's state."""
    lin = torch.nn.Linear(5, 5)
    other = torch.compile(lambda t: lin(t).cos() + 1, backend="eager")
    y = torch.randn(5)
    with torch.no_grad():
        expected_other = lin(y).cos() + 1
        torch.testing.assert_close(other(y), expected_other)  # compiled before the trace
    module_call, sqrt = torch.nn.Module.__call__, math.sqrt

    f = torch.compile(_held_model, backend=fxoffload.backend(mode="async+serde"))
    x = torch.randn(4)
    torch.testing.assert_close(f(x), _held_model(x))  # eager; the trace starts
    assert TRACE_HELD.wait(60), "the trace never reached the held op"
    assert fxoffload.stats().background_traces == 1
    torch.manual_seed(1234)
    drawn_during = torch.rand(3)
    # No FX patch is visible here: Dynamo's guard on Module.__call__ (it inlined lin's
    # call) holds, so the compiled function runs without a recompile.
    assert torch.nn.Module.__call__ is module_call and math.sqrt is sqrt
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(other(y), expected_other)
    assert not torch.fx._symbolic_trace.is_fx_tracing()
    assert not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    TRACE_RELEASE.set()
    assert fxoffload.wait(300)
    drawn_after = torch.rand(3)
    torch.manual_seed(1234)
    expected = torch.rand(6)
    torch.testing.assert_close(torch.cat([drawn_during, drawn_after]), expected)
    torch.testing.assert_close(f(x), _held_model(x))
    snap = fxoffload.stats()
    assert snap.swaps == 1 and snap.compiled_runs == 1 and snap.fallback_count == 0, snap


@deferring
def test_a_trace_in_progress_is_not_seen_from_another_thread_either(held_trace: None) -> None:
    f = torch.compile(_held_model, backend=fxoffload.backend(mode="async+serde"))
    x = torch.randn(4)
    f(x)
    assert TRACE_HELD.wait(60)
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(torch.fx._symbolic_trace.is_fx_tracing()))
    t.start()
    t.join()
    TRACE_RELEASE.set()
    assert fxoffload.wait(300)
    assert seen == [False]


@deferring
@pytest.mark.parametrize("case", ["aliased inputs", "dynamic shapes"])
def test_graphs_a_trace_could_guard_are_traced_on_the_caller(case: str) -> None:
    def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    f = torch.compile(add, backend=fxoffload.backend(mode="async+serde"))
    x = torch.randn(6)
    if case == "aliased inputs":  # two views of one storage (not one tensor twice,
        out = f(x[1:], x[:-1])  # which Dynamo passes once)
    else:
        y = torch.randn(6)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(y, 0)
        out = f(x, y)
    assert fxoffload.wait(300)
    snap = fxoffload.stats()
    assert snap.background_traces == 0 and snap.background_compiles == 1, snap
    assert snap.eager_runs == 1, snap
    assert out.shape == (5,) if case == "aliased inputs" else out.shape == (6,)


@deferring
def test_defer_trace_off_traces_on_the_caller() -> None:
    f = torch.compile(MLP(), backend=fxoffload.backend(mode="async+serde",
                                                       defer_trace=False))
    f(torch.randn(2, 16))
    assert fxoffload.wait(300)
    assert fxoffload.stats().background_traces == 0


@deferring
@pytest.mark.parametrize("policy", ["fallback", "eager", "raise"])
def test_a_failed_trace_costs_no_step(policy: str, caplog: Any) -> None:
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 16)
    with torch._inductor.config.patch(joint_custom_pre_pass=RaisesInJointPass()):
        f = torch.compile(model, backend=fxoffload.backend(mode="async+serde",
                                                           on_failure=policy))
        with torch.no_grad():
            torch.testing.assert_close(f(x), model(x))
        assert fxoffload.wait(300)
    with torch.no_grad():
        if policy == "raise":
            with pytest.raises(TraceFailed, match="boom: this joint pass refuses to run"):
                f(x)
            torch.testing.assert_close(f(x), model(x))  # raised once; then eager
            return
        for _ in range(2):
            torch.testing.assert_close(f(x), model(x))
    snap = fxoffload.stats()
    assert snap.fallbacks == {"trace_failed": 1} and snap.eager_runs == 3, snap
    warnings = [r for r in caplog.records if "trace_failed" in r.getMessage()]
    assert len(warnings) == 1 and "boom" in warnings[0].getMessage()

    assert issubclass(TraceFailed, FxOffloadError)


@deferring
def test_config_is_private_to_the_front_thread(held_trace: None) -> None:
    """The trace runs under the config the caller had when Dynamo called the backend,
    and the two threads never see each other's patches: the front thread's own patch
    of a key the user patches too (AOTAutograd's backward switch) neither shows on the
    user's thread nor restores, when it ends, a value the user's patch has undone
    meanwhile. (On torch 2.11, where config is process-global, the key stayed patched.)"""
    from torch._functorch import config as functorch_config
    from torch._inductor import config

    counted = CountsJointPass()
    f = torch.compile(_held_model, backend=fxoffload.backend(mode="async+serde"))
    x = torch.randn(4)
    before = (config.get_config_copy(), functorch_config.get_config_copy())
    with config.patch(joint_custom_pre_pass=counted), \
            functorch_config.patch(force_non_lazy_backward_lowering=True):
        torch.testing.assert_close(f(x), _held_model(x))  # eager; the trace starts
        assert TRACE_HELD.wait(60), "the trace never reached the held op"
    # The user's patches are gone here, while the front thread's are open on its side.
    assert fxoffload.stats().background_traces == 1
    assert not functorch_config.force_non_lazy_backward_lowering
    assert (config.get_config_copy(), functorch_config.get_config_copy()) == before
    TRACE_RELEASE.set()
    assert fxoffload.wait(300)
    assert counted.runs >= 1  # the trace ran under the caller's config at the call
    assert (config.get_config_copy(), functorch_config.get_config_copy()) == before
    torch.testing.assert_close(f(x), _held_model(x))
    snap = fxoffload.stats()
    assert snap.swaps == 1 and snap.fallback_count == 0, snap


@deferring
def test_a_trace_waits_for_the_serde_threads_compile(held_trace: None, tmp_path: Any) -> None:
    """torch.fx.traceback's node metadata is process-global, so a deferred trace and
    async+serde's compile on our other thread must not overlap (a trace failed with
    'Expected current_level > 0' when they did); the caller runs eagerly meanwhile."""
    from extensions import WaitsForFile

    gate = tmp_path / "release"
    backend = fxoffload.backend(mode="async+serde")
    x = torch.randn(4)
    with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile(
            str(gate), serde_thread=True)):
        first = torch.compile(lambda t: t.cos() * 3, backend=backend)
        torch.testing.assert_close(first(x), x.cos() * 3)  # eager; its compile waits
        deadline = time.monotonic() + 60
        while fxoffload.stats().background_compiles < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the serde thread has taken the request: it compiles now
        second = torch.compile(_held_model, backend=backend)
        torch.testing.assert_close(second(x), _held_model(x))  # eager, not blocked
        assert not TRACE_HELD.wait(1.0), "the trace ran beside the serde thread's compile"
        gate.touch()
        assert TRACE_HELD.wait(60), "the trace never ran after the compile"
        TRACE_RELEASE.set()
        assert fxoffload.wait(120)
    torch.testing.assert_close(first(x), x.cos() * 3)
    torch.testing.assert_close(second(x), _held_model(x))
    assert dict(fxoffload.stats().fallbacks) == {}
