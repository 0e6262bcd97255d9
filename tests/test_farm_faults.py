"""A farm that fails never costs a client its step: a worker killed mid-compile (the
request is re-dispatched once), a hung worker (timeout: killed and replaced, the client
compiles locally), a farm that is not there (local fallback, one WARNING), and a client
killed while it waits (the compile finishes and is stored for the next)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import conftest
import torch
from conftest import settings_for
from extensions import SlowOnceInWorker
from models import MLP

import fxoffload


def _when_file(path: Path, seconds: float = 120) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _compile(farm: Any, sentinel: Path, **extra: Any) -> torch.Tensor:
    conftest.CURRENT_FARM = farm
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 16)
    with torch._inductor.config.patch(post_grad_custom_post_pass=SlowOnceInWorker(
            str(sentinel), seconds=120)):
        out = torch.compile(model, backend=fxoffload.backend(
            **settings_for("farm", **extra)))(x)
    torch.testing.assert_close(out, model(x))
    return out


def test_worker_killed_mid_compile_is_redispatched(farm: Any, tmp_path: Path) -> None:
    farm.reset()
    sentinel = tmp_path / "pid"
    killed: list[int] = []

    def kill() -> None:
        pid = _when_file(sentinel)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill)
    killer.start()
    _compile(farm, sentinel)
    killer.join()
    stats = farm.stats()
    assert killed and stats["redispatched"] == 1 and stats["workers_replaced"] == 1, stats
    assert dict(fxoffload.stats().fallbacks) == {}
    assert fxoffload.stats().farm == {"compiled": 1}
    assert killed[0] not in [w["pid"] for w in stats["workers"]]


def test_hung_worker_times_out_and_the_client_compiles_locally(farm: Any,
                                                              tmp_path: Path) -> None:
    farm.reset()
    sentinel = tmp_path / "pid"
    start = time.monotonic()
    _compile(farm, sentinel, timeout=4)
    assert time.monotonic() - start < 60
    pid = int(sentinel.read_text())
    stats = farm.stats()
    assert stats["workers_replaced"] == 1, stats
    assert dict(fxoffload.stats().fallbacks) == {"farm_worker_timeout": 1}
    end = time.monotonic() + 30
    while time.monotonic() < end and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the hung worker was not killed"


def test_unreachable_farm_falls_back_with_one_warning(farm: Any, tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, torch, fxoffload
        sys.path.insert(0, sys.argv[1])
        from models import MLP, Block
        torch.manual_seed(0)
        for make, x in ((MLP, torch.randn(3, 16)), (Block, torch.randn(2, 8, 32))):
            model = make()
            out = torch.compile(model, backend=fxoffload.backend(mode="farm"))(x)
            torch.testing.assert_close(out, model(x))
        print("FALLBACKS", dict(fxoffload.stats().fallbacks))
    """)
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    env = {**farm.env(), "FXOFFLOAD_FARM": f"127.0.0.1:{port}"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FALLBACKS {'farm_unavailable': 2}" in done.stdout, done.stdout
    warnings = [line for line in done.stderr.splitlines()
                if "compiling in-process instead (farm_unavailable)" in line]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert time.monotonic() - start < 120


def test_client_killed_while_waiting_still_fills_the_store(farm: Any,
                                                           tmp_path: Path) -> None:
    farm.reset()
    sentinel = tmp_path / "pid"
    script = textwrap.dedent("""
        import sys, torch, fxoffload
        sys.path.insert(0, sys.argv[1])
        from models import MLP
        from extensions import SlowOnceInWorker
        torch.manual_seed(0)
        with torch._inductor.config.patch(
                post_grad_custom_post_pass=SlowOnceInWorker(sys.argv[2], seconds=8)):
            torch.compile(MLP(), backend=fxoffload.backend(mode="farm"))(torch.randn(3, 16))
    """)
    client = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent),
                               str(sentinel)], env=farm.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _when_file(sentinel)
    client.kill()
    client.wait()
    end = time.monotonic() + 120
    while time.monotonic() < end and farm.stats()["store_entries"] < 1:
        time.sleep(0.2)
    stats = farm.stats()
    assert stats["compiles"] == 1 and stats["store_entries"] == 1, stats
