"""A worker killed while its compiler writes a kernel library: the library may be left cut
off at its final path in the shared Inductor cache (the compiler's output pipe lost its
reader, and a tool that then writes a diagnostic dies of SIGPIPE). The pool removes such a
file before the in-process fallback compiles the graph, which would otherwise load it
("file too short"); a CI soak run (tests/test_soak.py) found one.

The compiler here is g++ behind a wrapper that, in a worker only, writes the first half
of the library, says so through a marker file, and then keeps printing a warning, as a
compiler does, until its pipe breaks."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import fxoffload
from fxoffload.executors import get_executor
from fxoffload.executors.process import _cut_off, remove_cut_builds

WRAPPER = """#!/bin/bash
# g++, except in a worker building a kernel library: then cut the library off.
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
if [ -z "$FXOFFLOAD_PARENT_PID" ] || [[ "$out" != *.main.so ]]; then exec g++ "$@"; fi
g++ "$@" || exit
size=$(stat -c %s "$out")
head -c $((size / 2)) "$out" > "$out.half" && mv "$out.half" "$out"
touch "{marker}"
for i in $(seq 600); do echo "warning: still linking"; sleep 0.1; done
exec g++ "$@"
"""


@pytest.fixture
def elf() -> bytes:
    """A real shared library's bytes (one of Python's own extension modules)."""
    import _ctypes

    return Path(_ctypes.__file__).read_bytes()


def test_only_recent_cut_off_files_nobody_holds_are_removed(tmp_path: Path,
                                                           elf: bytes) -> None:
    since = time.time()
    whole, cut, old, held, empty, other = (tmp_path / n for n in (
        "a.main.so", "b.main.so", "c.main.so", "d.main.so", "e.o", "f.txt"))
    whole.write_bytes(elf)
    cut.write_bytes(elf[: len(elf) // 2])
    old.write_bytes(elf[: len(elf) // 2])
    os.utime(old, (since - 60, since - 60))
    held.write_bytes(elf[: len(elf) // 2])
    empty.write_bytes(b"")
    other.write_bytes(b"")
    # a live process writing it: another worker's linker at work
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time; f=open(sys.argv[1],'ab');"
                               " print(flush=True); time.sleep(60)", str(held)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        removed = remove_cut_builds(since, str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(removed) == sorted([str(cut), str(empty)])
    assert {p.name for p in tmp_path.iterdir()} == {"a.main.so", "c.main.so", "d.main.so",
                                                    "f.txt"}
    assert not _cut_off(str(whole)) and _cut_off(str(held))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_worker_killed_mid_link_leaves_no_cut_off_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "half-written"
    wrapper = tmp_path / "g++-wrapper"
    wrapper.write_text(WRAPPER.replace("{marker}", str(marker)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FXOFFLOAD_WORKER_WARMUP", "0")
    settings = fxoffload.Settings.resolve(mode="subprocess", workers=1, compile_threads=1,
                                          startup_timeout=300)
    pool: Any = get_executor(settings)
    pool.warmup(wait=True)
    victim = pool.worker_pids()[0]

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x * 1.2345).cos() - 0.5  # a kernel of its own: nothing cached has it

    x = torch.randn(4, 8)
    killed: list[int] = []

    def kill_when_half_written() -> None:
        end = time.monotonic() + 240
        while not marker.exists() and time.monotonic() < end:
            time.sleep(0.05)
        if marker.exists():
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    killer = threading.Thread(target=kill_when_half_written, daemon=True)
    killer.start()
    # The compile runs here, the kill from another thread.
    with torch._inductor.config.patch({"cpp.cxx": (None, str(wrapper))}):
        out = torch.compile(f, backend=fxoffload.backend(settings), fullgraph=True)(x)
    killer.join(1)
    assert killed == [victim], f"the worker never built a library ({fxoffload.stats()})"
    torch.testing.assert_close(out, f(x))
    snap = fxoffload.stats()
    assert dict(snap.fallbacks) == {"worker_crashed": 1}
    libraries = list(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.main.so"))
    assert libraries and not [p for p in libraries if _cut_off(str(p))]
