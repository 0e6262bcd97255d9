"""A worker started because a compile is about to come (``warm_compile=False``: a
background backend's pool) does no warm-up compile, but imports Inductor's ``compile_fx``
before WARM: every request needs it, and in a fresh worker it costs 1-2 s on 2 cores,
which a cold async compile otherwise paid after the request was sent."""

from __future__ import annotations

from fxoffload.executors.process import WorkerProcess
from fxoffload.settings import Settings


def test_init_worker_imports_inductor_before_warm() -> None:
    worker = WorkerProcess(Settings.resolve(env={}), warm_compile=False)
    try:
        worker.wait_ready(120)
        info = worker.wait_warm(worker.startup)
    finally:
        worker.kill()
    phases = info["phases"]
    assert not info["skipped"], info
    assert "import_inductor_s" in phases, phases
    assert "warm_cpu_s" not in phases and "warm_cuda_s" not in phases, phases  # no compile
