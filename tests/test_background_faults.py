"""Async mode under failure: real worker processes crash, hang and misbehave while the
user's graph runs eagerly. Every call returns the right result; ``on_failure`` decides
what happens next (``fallback`` compiles in-process, ``eager`` stays eager, ``raise``
raises a typed error naming the cause); the worker is replaced; the failure is counted
and logged once; other compiles finish; nothing is left running, even at exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from conftest import settings_for
from extensions import Misbehave, SlowInWorker
from models import MLP
from test_faults import _alive, _kill_when_compiling, _wait_for

import fxoffload
from fxoffload.executors import get_executor

CASES = [
    # (how the worker fails, the reason counted, words the log names)
    ("segfault", "worker_crashed", "signal 11 (SIGSEGV)"),
    ("exit", "worker_crashed", "exit code 3"),
    ("oom", None, ""),  # MemoryError in Python, or a crash in C++
    ("raise", "remote_compile_error", "boom"),
    ("corrupt", "corrupted_response", "not an fxoffload envelope"),
    ("unpicklable", "response_unpickle_failed", "fxoffload_worker_only"),
    ("sigkill", "worker_crashed", "signal 9 (SIGKILL)"),
    ("hang", "worker_timeout", "within 3 s"),
]


def _pool(**extra: Any) -> Any:
    """The async pool (its own: background workers run at a lower priority), warm."""
    pool = get_executor(fxoffload.Settings.resolve(**settings_for("async+subprocess",
                                                                  **extra)))
    pool.warmup(wait=True)
    return pool


def _model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLP(), torch.randn(3, 16)


def _fail(how: str, tmp_path: Any) -> Any:
    """The config patch that makes the worker fail in this way."""
    if how == "sigkill":
        sentinel = tmp_path / "compiling"
        _kill_when_compiling(sentinel)
        # The kill comes 0.2 s after the sentinel; the sleep only has to outlast that. The
        # backward's compile, handed over with the forward, sleeps it out in a worker.
        return torch._inductor.config.patch(
            post_grad_custom_post_pass=SlowInWorker(str(sentinel), seconds=8.0))
    if how == "hang":
        (victim,) = _pool().worker_pids()
        os.kill(victim, signal.SIGSTOP)  # a real hang: the process never answers
        return torch._inductor.config.patch({})
    return torch._inductor.config.patch(post_grad_custom_post_pass=Misbehave(how))


def _one_warning(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fxoffload" and r.levelname == "WARNING"]


@pytest.mark.parametrize(("how", "reason", "words"), CASES, ids=[c[0] for c in CASES])
def test_crash_table_fallback(how: str, reason: str | None, words: str, tmp_path: Any,
                              caplog: Any) -> None:
    before = _pool().worker_pids()
    model, x = _model()
    with caplog.at_level("WARNING", logger="fxoffload"), _fail(how, tmp_path):
        compiled = torch.compile(model, backend=fxoffload.backend(
            **settings_for("async+subprocess", timeout=3 if how == "hang" else 900)))
        torch.testing.assert_close(compiled(x), model(x))  # eager, while it fails
        assert fxoffload.wait(300)
        torch.testing.assert_close(compiled(x), model(x))  # compiled in-process now
    snap = fxoffload.stats()
    assert snap.swaps >= 1 and snap.compiled_runs >= 1, snap
    if reason is not None:
        assert snap.fallbacks[reason] >= 1, snap.fallbacks
        warnings = _one_warning(caplog)
        assert len(warnings) == len(snap.fallbacks) and words in warnings[0], warnings
    else:
        assert set(snap.fallbacks) <= {"worker_crashed", "remote_compile_error"}
    if how in ("segfault", "exit", "sigkill", "hang", "corrupt") or \
            snap.fallbacks.get("worker_crashed"):
        assert _wait_for(lambda: not any(_alive(p) for p in before), 10)
        after = _pool().worker_pids()  # replaced and ready
        assert after and set(after).isdisjoint(before)


def test_eager_policy_stays_eager(tmp_path: Any) -> None:
    _pool()
    model, x = _model()
    with _fail("segfault", tmp_path):
        compiled = torch.compile(model, backend=fxoffload.backend(
            **settings_for("async+subprocess", on_failure="eager")))
        torch.testing.assert_close(compiled(x), model(x))
        assert fxoffload.wait(300)
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))
    snap = fxoffload.stats()
    assert snap.swaps == 0 and snap.compiled_runs == 0 and snap.eager_runs >= 4
    assert snap.fallbacks["worker_crashed"] >= 1


def test_raise_policy_names_the_cause(tmp_path: Any) -> None:
    _pool()
    model, x = _model()
    with _fail("segfault", tmp_path):
        compiled = torch.compile(model, backend=fxoffload.backend(
            **settings_for("async+subprocess", on_failure="raise")))
        torch.testing.assert_close(compiled(x), model(x))  # eager: nothing failed yet
        assert fxoffload.wait(300)
        with pytest.raises(fxoffload.WorkerCrashed, match=r"signal 11 \(SIGSEGV\)"):
            compiled(x)
        torch.testing.assert_close(compiled(x), model(x))  # raised once; then eager


def test_other_compiles_finish_when_one_worker_dies(tmp_path: Any) -> None:
    pool = _pool(workers=2)
    assert len(pool.worker_pids()) == 2
    settings = settings_for("async+subprocess", workers=2)
    doomed, x = _model()
    healthy = MLP()
    with torch._inductor.config.patch(post_grad_custom_post_pass=Misbehave("segfault")):
        bad = torch.compile(doomed, backend=fxoffload.backend(**settings))
        torch.testing.assert_close(bad(x), doomed(x))
    good = torch.compile(healthy, backend=fxoffload.backend(**settings))
    torch.testing.assert_close(good(x), healthy(x))
    assert fxoffload.wait(300)
    torch.testing.assert_close(good(x), healthy(x))
    torch.testing.assert_close(bad(x), doomed(x))
    snap = fxoffload.stats()
    # the healthy graph's compiles arrived (from a worker; or compiled here, where every
    # worker was dead and starting again when it was ready); only the doomed ones fell back
    assert snap.graphs_offloaded + snap.compiled_in_process.get("no_warm_worker", 0) >= 1
    assert snap.swaps >= 2
    assert set(snap.fallbacks) == {"worker_crashed"}
    assert _wait_for(lambda: len(pool.worker_pids()) == 2, 120)


EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch, fxoffload
    sys.path.insert(0, sys.argv[2])
    from extensions import WaitsForFile
    from models import MLP
    mode = sys.argv[1]
    model, x = MLP(), torch.randn(3, 16)
    torch._inductor.config.fx_graph_cache = False
    with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile("/nonexistent")):
        f = torch.compile(model, backend=fxoffload.backend(mode=mode, workers=1))
        torch.testing.assert_close(f(x), model(x))
    from fxoffload.executors import get_executor
    ex = get_executor(fxoffload.Settings.resolve(mode=mode, workers=1))
    pids = ex.worker_pids() if hasattr(ex, "worker_pids") else []
    s = fxoffload.stats()
    assert s.background_pending >= 1, s
    print("pids", *pids, flush=True)
""")


@pytest.mark.parametrize("mode", ["async+subprocess", "async+serde"])
def test_exit_with_compiles_in_flight(mode: str) -> None:
    """No hang, no traceback, no process left: in-flight compiles are abandoned."""
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mode, os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "terminate called" not in out.stderr, \
        out.stderr[-3000:]
    pids = [int(p) for p in out.stdout.split("pids", 1)[1].split()]
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 5)
