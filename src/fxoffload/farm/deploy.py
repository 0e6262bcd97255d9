"""``fxoffload farm up / status / down``: start, inspect and stop a farm.

``up`` starts a local Ray head (token authentication on, the token file 0600) unless
given the address of a cluster to join, then deploys the detached, named registry and
its warm compile workers in the ``fxoffload`` namespace, and waits until every worker
is warm. What it started is written to ``STATE_DIR/farm.json``; ``down`` removes exactly
that: the actors, and, when ``up`` started the head, every process of that head (each
carries ``FXOFFLOAD_FARM_ID`` in its environment) and its temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .. import signing
from ..errors import ConfigError, FarmUnavailable
from . import STATE_FILE, TOKEN_FILE, connect, import_ray, preserved_process_state, read_state
from . import state_dir as default_state_dir
from .actors import NAMESPACE, REGISTRY_NAME, Registry

DEFAULT_STORE_BYTES = 4 << 30
FARM_ID_ENV = "FXOFFLOAD_FARM_ID"


def loopback_only() -> bool:
    """Whether this process's network namespace has no interface but ``lo``: where a
    test or benchmark may start a Ray head, which binds every interface."""
    names = [line.split(":", 1)[0].strip()
             for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    return names == ["lo"]


def up(*, state_dir: Path, workers: int, address: str | None = None,
       store_dir: Path | None = None, store_bytes: int = DEFAULT_STORE_BYTES,
       host: str = "127.0.0.1", startup_timeout: float = 300.0) -> dict[str, Any]:
    """Start (or join) and deploy; the state written to ``farm.json``."""
    ray = import_ray()
    old = read_state(state_dir)
    if old is not None:
        raise ConfigError(f"a farm is already up at {old.get('address')} (state in "
                          f"{state_dir}): run `fxoffload farm down` first")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = state_dir / "key"
    if not key_path.exists():
        signing.create_key(key_path)
    key = signing.load_key(key_path)
    token = state_dir / TOKEN_FILE
    if not token.exists():
        _write_secret(token, secrets.token_hex(32))
    state: dict[str, Any] = {"farm_id": uuid.uuid4().hex, "started_head": address is None,
                             "state_dir": str(state_dir),
                             "workers": workers, "key_id": signing.key_id(key),
                             "store_dir": str(store_dir) if store_dir else None}
    try:
        if address is None:
            address, temp_dir = _start_head(state_dir, state["farm_id"], host, workers)
            state["temp_dir"] = temp_dir
        # The workers' cache dirs (removed by `down`).
        state["work_dir"] = tempfile.mkdtemp(prefix="fxoffload-farm-work-", dir="/tmp")
        state["address"] = address
        connect(address, state_dir)
        registry = ray.remote(Registry).options(
            name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            max_restarts=0).remote(str(key_path), workers,
                                   str(store_dir) if store_dir else None, store_bytes,
                                   {"num_cpus": 1}, state["work_dir"])
        infos = ray.get(registry.ready.remote(), timeout=startup_timeout)
        state["worker_startup_s"] = [round(i["startup_s"], 2) for i in infos]
    except BaseException:
        _teardown(state, ray)
        raise
    finally:
        with preserved_process_state():
            ray.shutdown()
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    return state


def status(*, state_dir: Path, address: str | None = None) -> dict[str, Any]:
    state = read_state(state_dir) or {}
    address = address or state.get("address")
    if not address:
        raise ConfigError(f"no farm recorded in {state_dir} and no --address given")
    ray = connect(address, state_dir)
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        stats: dict[str, Any] = ray.get(registry.stats.remote(), timeout=30)
    except ValueError:
        raise FarmUnavailable(f"the farm at {address} has no registry") from None
    finally:
        with preserved_process_state():
            ray.shutdown()
    return {"address": address, "key_id": state.get("key_id"), **stats}


def down(*, state_dir: Path) -> dict[str, Any]:
    """Stop what ``up`` started; how many actors and processes went."""
    ray = import_ray()
    state = read_state(state_dir)
    if state is None:
        raise ConfigError(f"no farm recorded in {state_dir} (nothing to stop)")
    result = _teardown(state, ray)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    return result


def _teardown(state: dict[str, Any], ray: Any) -> dict[str, Any]:
    actors = 0
    address = state.get("address")
    if address:
        try:
            connect(address, Path(state.get("state_dir") or default_state_dir()))
            registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
            actors = ray.get(registry.shutdown.remote(), timeout=30)
            ray.kill(registry, no_restart=True)
            actors += 1
        except Exception:  # noqa: BLE001 - the head's processes go below anyway
            pass
        finally:
            with preserved_process_state():
                ray.shutdown()
    processes = 0
    if state.get("started_head"):
        processes = kill_farm_processes(state["farm_id"])
        if state.get("temp_dir"):
            shutil.rmtree(state["temp_dir"], ignore_errors=True)
    if state.get("work_dir"):
        shutil.rmtree(state["work_dir"], ignore_errors=True)
    return {"actors": actors, "processes": processes}


def _start_head(state_dir: Path, farm_id: str, host: str, cpus: int) -> tuple[str, str]:
    port = _free_port(host)
    # Ray's sockets live under the temp dir; a Unix socket path must stay short.
    temp_dir = tempfile.mkdtemp(prefix="fxoffload-farm-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(state_dir / TOKEN_FILE), FARM_ID_ENV: farm_id,
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start",
           "--head", f"--node-ip-address={host}", f"--port={port}",
           f"--temp-dir={temp_dir}", "--include-dashboard=false", f"--num-cpus={cpus}",
           "--disable-usage-stats"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    if done.returncode != 0:
        kill_farm_processes(farm_id)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise FarmUnavailable(f"`ray start --head` failed (exit {done.returncode}):\n"
                              f"{done.stderr[-3000:]}")
    return f"{host}:{port}", temp_dir


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def farm_processes(farm_id: str) -> list[int]:
    """Pids of every process whose environment carries this farm's id."""
    marker = f"{FARM_ID_ENV}={farm_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_farm_processes(farm_id: str, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds; how many there were."""
    pids = farm_processes(farm_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and farm_processes(farm_id):
        time.sleep(0.1)
    for pid in farm_processes(farm_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and farm_processes(farm_id):
        time.sleep(0.1)
    return len(pids)
