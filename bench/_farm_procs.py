"""Process and CPU accounting for bench/farm.py: the environment every rank (and the farm)
starts with (``base_env``: its own Inductor/Triton cache dirs, src/ on PYTHONPATH, no
inherited FXOFFLOAD_* settings), reading a rank's stdout on a thread, killing what a rank
left in its process group, and the CPU seconds of other processes (the farm's) from
/proc/<pid>/stat: utime+stime+cutime+cstime, compared between two looks by pid and start
time; and ``Farm``: the farm a benchmark starts (``fxoffload farm up/status/down``), its
admin actions (through ``farm.py --admin``), and its processes' CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from _farm_child import ADMIN_MARKER

ROOT = Path(__file__).resolve().parent.parent


def base_env(cache_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FXOFFLOAD_") and k != "TORCHINDUCTOR_FX_COMPILE_MODE"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache_root / "triton")
    path = [str(ROOT / "src")] + [os.path.abspath(p) for p in
                                  env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reader(proc: subprocess.Popen[str], lines: queue.Queue[tuple[int, str | None]],
            rank: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put((rank, line.rstrip("\n")))
    lines.put((rank, None))


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> tuple[int, float] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()  # fields from 3 (state) on
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return int(rest[19]), (utime + stime + cutime + cstime) / _TICK


def cpu_delta(before: dict[int, tuple[int, float]],
              after: dict[int, tuple[int, float]]) -> tuple[float, int]:
    """CPU seconds used between the two looks; and how many processes went away
    meanwhile (theirs is lost unless a farm process reaped them)."""
    total = 0.0
    for pid, (start, cpu) in after.items():
        old = before.get(pid)
        total += cpu - old[1] if old and old[0] == start else cpu
    gone = sum(1 for pid, (start, _) in before.items()
               if pid not in after or after[pid][0] != start)
    return total, gone


def process_kind(pid: int) -> str:
    """A farm process's kind, from its command line: Ray's process titles
    ("ray::CompileWorker.compile", "ray::IDLE"), or the program ("raylet", "gcs_server")."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    first = argv[0].decode(errors="replace").strip()
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]  # ray::CompileWorker, ray::Registry, ray::IDLE
    name = Path(first.split()[0]).name if first else "?"
    if name.startswith("python"):
        rest = [a.decode(errors="replace") for a in argv[1:3]]
        return "python " + " ".join(Path(r).name for r in rest if r)[:60]
    return name


def cpu_delta_by_kind(before: dict[int, tuple[int, float]],
                      after: dict[int, tuple[int, float]]) -> dict[str, float]:
    """``cpu_delta`` split by ``process_kind`` (of the processes still there)."""
    out: dict[str, float] = {}
    for pid, (start, cpu) in after.items():
        old = before.get(pid)
        used = cpu - old[1] if old and old[0] == start else cpu
        kind = process_kind(pid)
        out[kind] = round(out.get(kind, 0.0) + used, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------
# the farm: up, status, down (the CLI), admin, its processes' CPU


class Farm:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.state_dir = root / "farm-state"
        self.store_dir = root / "farm-store"
        self.cache_dir = root / "farm-cache"  # the workers' own (warm-up) Inductor cache
        self.address: str | None = None
        self.farm_id: str | None = None
        self.up_s: float | None = None
        self.up_output = ""

    def env(self) -> dict[str, str]:
        return base_env(self.cache_dir)

    def _cli(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.args.python, "-m", "fxoffload", "farm", *argv,
                               "--state-dir", str(self.state_dir)], env=self.env(),
                              cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def up(self) -> None:
        t = time.perf_counter()
        done = self._cli("up", "--workers", str(self.args.farm_workers), "--store",
                         str(self.store_dir))
        self.up_s = time.perf_counter() - t
        self.up_output = done.stdout.strip()
        state = self.state()
        if state:
            self.farm_id = state.get("farm_id")  # for `down`'s check even on failure
        if done.returncode != 0:
            raise RuntimeError(f"`fxoffload farm up` failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-3000:]}")
        m = re.search(r"FXOFFLOAD_FARM=(\S+)", done.stdout)
        if not m or not state:
            raise RuntimeError(f"`fxoffload farm up` printed no address: {done.stdout}")
        self.address = m.group(1)

    def state(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.state_dir / "farm.json").read_text())
        return None

    def status(self) -> dict[str, Any]:
        done = self._cli("status", "--json", timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`fxoffload farm status` failed: {done.stdout}{done.stderr}")
        return json.loads(done.stdout)

    def admin(self, action: str) -> dict[str, Any]:
        script = Path(__file__).resolve().parent / "farm.py"
        done = subprocess.run([self.args.python, str(script), "--admin", action,
                               "--state-dir", str(self.state_dir)], env=self.env(),
                              cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120, check=False)
        for line in done.stdout.splitlines():
            if line.startswith(ADMIN_MARKER):
                return json.loads(line[len(ADMIN_MARKER):])
        raise RuntimeError(f"farm admin {action} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr)[-3000:]}")

    def down(self) -> dict[str, Any]:
        """``farm down``; then whatever still carries the farm's id is reported (and
        killed, so that the benchmark leaves nothing behind)."""
        out: dict[str, Any] = {}
        if self.state() is not None:
            done = self._cli("down", timeout=300)
            out["down_rc"] = done.returncode
            out["down_output"] = (done.stdout + done.stderr).strip()[-2000:]
        if self.farm_id:
            from fxoffload.farm.deploy import farm_processes, kill_farm_processes

            left = farm_processes(self.farm_id)
            out["left_after_down"] = left
            if left:
                kill_farm_processes(self.farm_id)
        return out

    def env_for_ranks(self) -> dict[str, str]:
        assert self.address
        return {"FXOFFLOAD_FARM": self.address,
                "FXOFFLOAD_FARM_KEY_FILE": str(self.state_dir / "key")}

    def cpu(self) -> dict[int, tuple[int, float]]:
        """pid -> (start time, CPU seconds incl. reaped children) of the farm's processes."""
        if not self.farm_id:
            return {}
        from fxoffload.farm.deploy import farm_processes

        return {pid: v for pid in farm_processes(self.farm_id)
                for v in [_proc_cpu(pid)] if v is not None}
