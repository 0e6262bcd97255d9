"""A worker that dies, hangs or fails never costs the user their call: real worker
processes are killed, stopped and made to fail; the call returns the right result, the
event is counted, the worker is replaced, and no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch
from conftest import POOL, settings_for
from extensions import FailsInWorker, Misbehave, SlowInWorker
from models import MLP

import fxoffload
from fxoffload.executors import get_executor


def _pool(**extra: Any) -> Any:
    pool = get_executor(fxoffload.Settings.resolve(**settings_for("subprocess", **extra)))
    pool.warmup(wait=True)
    return pool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(predicate: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _compile_and_check(**extra: Any) -> None:
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 16)
    out = torch.compile(model, backend=fxoffload.backend(**settings_for("subprocess", **extra)))(x)
    torch.testing.assert_close(out, model(x))


def _kill_when_compiling(sentinel: Any, sig: int = signal.SIGKILL) -> threading.Thread:
    def kill() -> None:
        _wait_for(sentinel.exists, 120)
        time.sleep(0.2)
        os.kill(int(sentinel.read_text()), sig)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_sigkill_mid_compile_falls_back_and_replaces(tmp_path: Any) -> None:
    pool = _pool()
    (victim,) = pool.worker_pids()
    sentinel = tmp_path / "compiling"
    with torch._inductor.config.patch(post_grad_custom_post_pass=SlowInWorker(str(sentinel))):
        _kill_when_compiling(sentinel)
        _compile_and_check()
    assert int(sentinel.read_text()) == victim
    snap = fxoffload.stats()
    assert dict(snap.fallbacks) == {"worker_crashed": 1}
    assert snap.worker_failures["worker_crashed"] == 1
    assert not _alive(victim)
    assert _wait_for(lambda: pool.worker_pids() and pool.worker_pids() != [victim], 120)
    assert fxoffload.stats().worker_replacements == 1
    torch._dynamo.reset()
    fxoffload.reset_stats()
    _compile_and_check()  # the replacement compiles
    assert fxoffload.stats().graphs_offloaded == 1


def test_hung_worker_is_killed_at_the_timeout() -> None:
    pool = _pool()
    (victim,) = pool.worker_pids()
    os.kill(victim, signal.SIGSTOP)  # a real hang: the process never answers
    start = time.monotonic()
    _compile_and_check(timeout=3)
    assert time.monotonic() - start < 60
    assert dict(fxoffload.stats().fallbacks) == {"worker_timeout": 1}
    assert _wait_for(lambda: not _alive(victim), 5)


def test_worker_dead_while_idle_is_replaced_before_the_next_job() -> None:
    """The compile that finds no warm worker runs here at once (not waiting for a new
    one); the pool replaces the dead worker meanwhile, and the next compile uses it."""
    pool = _pool()
    (victim,) = pool.worker_pids()
    os.kill(victim, signal.SIGKILL)
    assert _wait_for(lambda: not _alive(victim), 60), "SIGKILL did not end the worker"
    # A killed process shows as a zombie once its main thread is gone, but waitpid (the
    # pool's view) reports it only when all its threads have been torn down: until then
    # the pool still counts it warm, and a compile sent to it fails as worker_crashed.
    assert _wait_for(lambda: victim not in pool.worker_pids(), 60)
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 16)
    out = torch.compile(model, backend=fxoffload.backend(mode="subprocess", **POOL))(x)
    torch.testing.assert_close(out, model(x))
    snap = fxoffload.stats()
    assert snap.graphs_offloaded == 0 and dict(snap.fallbacks) == {}
    assert dict(snap.compiled_in_process) == {"no_warm_worker": 1}
    assert _wait_for(lambda: pool.worker_pids() not in ([], [victim]), 300)
    assert fxoffload.stats().worker_failures["worker_crashed"] == 1
    _compile_and_check()
    assert fxoffload.stats().graphs_offloaded == 1


def test_raise_policy_names_the_signal(tmp_path: Any) -> None:
    pool = _pool()
    (victim,) = pool.worker_pids()
    sentinel = tmp_path / "compiling"
    with torch._inductor.config.patch(post_grad_custom_post_pass=SlowInWorker(str(sentinel))), \
            pytest.raises(fxoffload.WorkerCrashed) as info:  # itself, not wrapped by torch
        _kill_when_compiling(sentinel)
        _compile_and_check(on_failure="raise")
    assert "signal 9 (SIGKILL)" in str(info.value) and str(victim) in str(info.value)
    assert info.value.pid == victim


def test_compile_error_in_worker_falls_back() -> None:
    _pool()
    with torch._inductor.config.patch(post_grad_custom_post_pass=FailsInWorker()):
        _compile_and_check()
    assert dict(fxoffload.stats().fallbacks) == {"remote_compile_error": 1}


PARENT = textwrap.dedent("""
    import os, sys, time, fxoffload
    fxoffload.warmup(mode="subprocess", workers=2)
    from fxoffload.executors import get_executor
    pool = get_executor(fxoffload.Settings.resolve(mode="subprocess", workers=2))
    print(" ".join(map(str, pool.worker_pids())), flush=True)
    if sys.argv[1] == "shutdown":
        fxoffload.shutdown()
        print("done", flush=True)
    else:
        time.sleep(600)
""")


@pytest.mark.slow
def test_no_orphans_when_the_parent_is_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, "sleep"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.kill()
    proc.wait()
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 5), "orphaned workers"


def test_shutdown_leaves_no_process() -> None:
    out = subprocess.run([sys.executable, "-c", PARENT, "shutdown"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split()[:-1]]
    assert out.stdout.split()[-1] == "done" and len(pids) == 2
    assert not any(_alive(p) for p in pids)
    assert "Traceback" not in out.stderr


CRASH_TABLE = [
    # (how the worker fails, fallback reason counted, words the error names)
    ("segfault", "worker_crashed", "signal 11 (SIGSEGV)"),
    ("exit", "worker_crashed", "exit code 3"),
    ("oom", None, ""),  # MemoryError in Python, or a crash in C++: either is contained
    ("raise", "remote_compile_error", "boom"),
    ("corrupt", "corrupted_response", "not an fxoffload envelope"),
    ("unpicklable", "response_unpickle_failed", "fxoffload_worker_only"),
]


@pytest.mark.parametrize(("how", "reason", "words"), CRASH_TABLE,
                         ids=[row[0] for row in CRASH_TABLE])
def test_crash_table(how: str, reason: str | None, words: str, caplog: Any) -> None:
    _pool()
    with torch._inductor.config.patch(post_grad_custom_post_pass=Misbehave(how)), \
            caplog.at_level("WARNING", logger="fxoffload"):
        _compile_and_check()  # the user's call returns the right result
    fallbacks = dict(fxoffload.stats().fallbacks)
    assert sum(fallbacks.values()) == 1, fallbacks
    if reason is not None:
        assert fallbacks == {reason: 1}
        assert words in caplog.text
    else:
        assert set(fallbacks) <= {"worker_crashed", "remote_compile_error"}
    _pool()  # a replacement (if one was needed) becomes ready


def test_eager_policy_runs_the_graph_eagerly() -> None:
    _pool()
    with torch._inductor.config.patch(post_grad_custom_post_pass=FailsInWorker()):
        _compile_and_check(on_failure="eager")
    snap = fxoffload.stats()
    assert dict(snap.fallbacks) == {"remote_compile_error": snap.fallback_count}
    assert snap.eager_runs == 1 and snap.graphs_offloaded == 0
