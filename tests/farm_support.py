"""A real farm for the tests: ``fxoffload farm up`` in a temporary state dir, torn down
with ``farm down`` (which must leave no process behind).

Ray binds every interface, so a farm is started only where the only network interface
is loopback: the network namespace scripts/test.sh makes (``unshare --net``), or on a
machine that reaches nothing outside it (``FXOFFLOAD_ISOLATED_HOST=1``). CI runs in the
namespace; elsewhere the farm tests skip, saying so (under CI=true they fail instead)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fxoffload.farm.deploy import loopback_only

FXOFFLOAD = [sys.executable, "-m", "fxoffload"]
_connected_to: str | None = None


def require_farm_environment() -> None:
    why = None
    if importlib.util.find_spec("ray") is None:
        why = "ray is not installed (pip install 'fxoffload[farm]'; scripts/setup.sh does)"
    elif not loopback_only() and os.environ.get("FXOFFLOAD_ISOLATED_HOST") != "1":
        # FXOFFLOAD_ISOLATED_HOST=1: a machine that reaches nothing outside itself (the
        # GPU machine, where unshare is refused): its interfaces lead nowhere.
        why = ("a Ray head binds every network interface: farm tests run only in a "
               "loopback-only network namespace (scripts/test.sh runs pytest in one)")
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def cli(*args: str, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FXOFFLOAD, *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


@dataclasses.dataclass
class Farm:
    address: str
    state_dir: Path
    farm_id: str

    @property
    def key_file(self) -> Path:
        return self.state_dir / "key"

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {"mode": "farm", "farm": self.address, "farm_key": self.key_file, **extra}

    def env(self) -> dict[str, str]:
        return {**os.environ, "FXOFFLOAD_FARM": self.address,
                "FXOFFLOAD_FARM_KEY_FILE": str(self.key_file)}

    def registry(self) -> Any:
        global _connected_to
        import ray

        from fxoffload import farm
        from fxoffload.farm.actors import NAMESPACE, REGISTRY_NAME

        if ray.is_initialized() and _connected_to != self.address:
            ray.shutdown()  # this process is the driver of one cluster at a time
        ray = farm.connect(self.address, self.state_dir)
        _connected_to = self.address
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)

    def stats(self) -> dict[str, Any]:
        import ray

        return ray.get(self.registry().stats.remote(), timeout=60)

    def reset(self, *, store: bool = True, graphs: bool | None = None) -> None:
        """Counters to zero, and the store emptied (each test starts from a cold farm);
        ``graphs`` (default: as ``store``) empties the clients' AOTAutograd entries."""
        import ray

        registry = self.registry()
        ray.get(registry.reset_stats.remote(), timeout=60)
        graphs = store if graphs is None else graphs
        if store or graphs:
            ray.get(registry.clear_store.remote(responses=store, graphs=graphs), timeout=60)


def start(state_dir: Path, workers: int = 2, env: dict[str, str] | None = None) -> Farm:
    """``env``: the farm's (its Ray head's, and so its workers') environment."""
    done = cli("farm", "up", "--workers", str(workers), "--state-dir", str(state_dir),
               "--store", str(state_dir / "store"), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    address = re.search(r"FXOFFLOAD_FARM=(\S+)", done.stdout)
    assert address, done.stdout
    import json

    state = json.loads((state_dir / "farm.json").read_text())
    return Farm(address.group(1), state_dir, state["farm_id"])


def stop(farm: Farm) -> None:
    import ray

    from fxoffload.farm.deploy import farm_processes

    if ray.is_initialized():
        ray.shutdown()
    done = cli("farm", "down", "--state-dir", str(farm.state_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    left = farm_processes(farm.farm_id)
    assert left == [], f"farm down left processes {left}"
