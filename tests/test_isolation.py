"""What a compile on one of fxoffload's threads must never do to the user's thread: rewind
or move its random generators, or show it the FX tracing flag (``isolation``)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch
from torch import nn

import fxoffload
from fxoffload import isolation


def _rng_digest() -> str:
    return hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("defer_trace", [False, True], ids=["caller-trace", "deferred"])
def test_dropout_loop_never_sees_its_generator_rewound(defer_trace: bool) -> None:
    """A training loop with dropout under async+serde: the compile thread's
    preserve_rng_state must not put the global generator back to an earlier step's state."""
    torch.manual_seed(0)
    model = _Net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model, backend=fxoffload.backend(
        mode="async+serde", defer_trace=defer_trace))
    x = torch.randn(16, 32)
    seen: list[str] = []
    deadline = time.monotonic() + 300
    steps_after_swap = 0
    while steps_after_swap < 3 and time.monotonic() < deadline:
        opt.zero_grad()
        compiled(x).sum().backward()
        opt.step()
        seen.append(_rng_digest())
        if fxoffload.stats().swaps >= 2:  # forward and backward compiled and swapped in
            steps_after_swap += 1
    assert fxoffload.wait(300)
    snap = fxoffload.stats()
    assert snap.swaps >= 2 and snap.eager_runs >= 1, snap
    repeats = len(seen) - len(set(seen))
    assert repeats == 0, f"the generator went back to an earlier state {repeats} times " \
                         f"in {len(seen)} steps"


def test_fx_tracing_flag_stays_on_the_tracing_thread() -> None:
    """While another thread is inside an FX trace, the user's thread neither sees
    is_fx_tracing() nor fails to call a torch.compile'd function."""
    fxoffload.backend(mode="async+serde")  # a background backend installs the shims
    inside, release = threading.Event(), threading.Event()
    seen_inside: list[bool] = []

    def traced(x: torch.Tensor) -> torch.Tensor:
        seen_inside.append(torch.fx._symbolic_trace.is_fx_tracing())
        inside.set()
        release.wait(30)
        return x + 1

    thread = threading.Thread(target=torch.fx.symbolic_trace, args=(traced,))
    thread.start()
    try:
        assert inside.wait(30)
        assert torch.fx._symbolic_trace._is_fx_tracing_flag  # the process-global flag is set
        assert not torch.fx._symbolic_trace.is_fx_tracing()
        f = torch.compile(lambda x: x * 2, backend="eager")
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    finally:
        release.set()
        thread.join(30)
    assert seen_inside == [True]


def test_user_loop_beside_the_serde_compile_thread() -> None:
    """A loop that calls a compiled function and asks is_fx_tracing() while async+serde's
    thread compiles (its trace-based pattern replacements set the FX flag)."""
    compiled = torch.compile(_Net().eval(), backend=fxoffload.backend(
        mode="async+serde", defer_trace=False))
    other = torch.compile(lambda x: torch.relu(x) * 2, backend="eager")
    x = torch.randn(16, 32)
    flags = calls = 0
    with torch.no_grad():
        compiled(x)
        while fxoffload.stats().background_pending:
            flags += torch.fx._symbolic_trace.is_fx_tracing()
            other(x)
            calls += 1
    assert fxoffload.wait(300)
    assert calls > 0 and flags == 0


def test_a_compile_on_our_thread_draws_nothing_from_the_user_generators() -> None:
    """The autotuners' random example inputs and preserve_rng_state, on our thread:
    the user's generator is neither moved nor rewound."""
    from torch._dynamo import utils as dynamo_utils
    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    isolation.install()
    torch.manual_seed(123)
    expected = torch.rand(4)  # what the user's next draw is without anything beside it
    torch.manual_seed(123)
    done = threading.Event()

    def compile_like() -> None:
        with isolation.our_thread(), dynamo_utils.preserve_rng_state():
            example = AlgorithmSelectorCache.generate_example_value(
                (8, 8), (8, 1), "cpu", torch.float32, 0)
            assert example.shape == (8, 8) and example.abs().sum() > 0
            done.set()

    thread = threading.Thread(target=compile_like)
    thread.start()
    thread.join(60)
    assert done.is_set()
    assert torch.equal(torch.rand(4), expected)
    # Off our threads it is stock's: its own preserve_rng_state puts the generator back.
    torch.manual_seed(123)
    AlgorithmSelectorCache.generate_example_value((8, 8), (8, 1), "cpu", torch.float32, 0)
    assert torch.equal(torch.rand(4), expected)
