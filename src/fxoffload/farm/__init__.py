"""The compile farm: one compile per graph across processes, ranks and machines, on Ray.

    process A ─┐ request (content key, HMAC-signed) ┌─► store hit ─────────────┐
    process B ─┼──────────► Registry actor ─────────┼─► join the compile in flight ─┤
    process C ─┘    (single-flight, the store)      └─► CompileWorker actor ─► store ┘
                                  ▲                                               │
                                  └────────── signed response (checked, then unpickled)

- ``actors``: the Ray actors (warm compile workers, the registry).
- ``store``: the bounded, persistent artifact store (plain bytes).
- ``deploy``: ``fxoffload farm up / status / down``.
- ``fxoffload.executors.farm``: the client side, an ``Executor`` like the others.

Ray is an optional extra (``pip install 'fxoffload[farm]'``) and is imported only here,
when a farm is used. The farm's state (its key, Ray's token, what ``up`` started) lives
in one directory, ``~/.fxoffload/farm`` (``--state-dir``; the key file's directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError, FarmUnavailable

log = logging.getLogger("fxoffload.farm")
INSTALL_HINT = "pip install 'fxoffload[farm]' (or: pip install ray)"
TOKEN_FILE = "ray_token"
STATE_FILE = "farm.json"


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"mode 'farm' needs Ray, which is not installed in "
                          f"{sys.executable}: {INSTALL_HINT}") from None
    return ray


def state_dir(key_file: Path | None = None) -> Path:
    """The farm's state directory: the key file's."""
    from .. import signing

    return (key_file or signing.default_key_path()).parent


def read_state(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{directory / STATE_FILE} is unreadable: {e}") from None


def resolve_address(address: str | None, key_file: Path | None) -> str:
    """The address given, else the one ``farm up`` wrote beside the key."""
    if address:
        return address
    state = read_state(state_dir(key_file))
    if state and state.get("address"):
        return str(state["address"])
    raise ConfigError("mode 'farm' needs the farm's address: farm='HOST:PORT' or "
                      "FXOFFLOAD_FARM (what `fxoffload farm up` prints)")


def use_token(directory: Path) -> None:
    """Ray's token authentication, with the farm's token file (read by Ray's C++ core,
    so it goes through the environment, as Ray documents)."""
    token = directory / TOKEN_FILE
    if not token.is_file():
        raise ConfigError(f"no Ray token at {token}: run `fxoffload farm up`, or copy the "
                          "farm's state directory (key and ray_token, mode 0600)")
    if (os.environ.get("RAY_AUTH_MODE") == "token"
            and os.environ.get("RAY_AUTH_TOKEN_PATH") == str(token)):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    # Ray's core read its config when imported: make it read the environment again.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def check_reachable(address: str, seconds: float = 3.0) -> None:
    """Fail fast (``FarmUnavailable``) when nothing listens at ``address``; Ray itself
    retries for much longer."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=seconds):
            pass
    except OSError as e:
        raise FarmUnavailable(f"the farm at {address} is not reachable: "
                              f"{e.strerror or e}") from None


_init_lock = threading.Lock()


def connect(address: str, directory: Path) -> ModuleType:
    """Join the farm's Ray cluster as a driver (never start one). What ``ray.init``
    changes in the process (signal handlers, logging) is put back."""
    ray = import_ray()
    with _init_lock:
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if _same_address(current, address):
                return ray
            raise FarmUnavailable(f"this process is already a Ray driver of the cluster at "
                                  f"{current}; it cannot also join the farm at {address}")
        check_reachable(address)
        use_token(directory)
        host = address.rpartition(":")[0]
        extra: dict[str, Any] = {}
        if host in ("127.0.0.1", "localhost"):
            extra["_node_ip_address"] = "127.0.0.1"
        with preserved_process_state():
            try:
                ray.init(address=address, namespace="fxoffload", log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=False,
                         include_dashboard=False, **extra)
            except Exception as e:
                raise FarmUnavailable(f"could not join the farm at {address}: "
                                      f"{type(e).__name__}: {e}") from e
            _ready_to_send(ray)
    return ray


def _ready_to_send(ray: ModuleType) -> None:
    """Ray builds its serialization context at a driver's first remote call (importing
    pydantic and its serializers: 0.2-0.4 s measured on the 2-core CPU): done here, when
    the client joins, not in the middle of its first compile. Best effort (private)."""
    try:
        ray._private.worker.global_worker.get_serialization_context()
    except Exception as e:  # noqa: BLE001 - the first remote call builds it instead
        log.debug("fxoffload: Ray's serialization context not built ahead: %s", e)


def _same_address(a: str, b: str) -> bool:
    """Whether two ``HOST:PORT`` name one GCS. Ray rewrites a loopback bootstrap address
    to the node's own IP (``resolve_ip_for_localhost``) where the machine has another
    interface, so two hosts of this machine count as one."""
    host_a, _, port_a = a.rpartition(":")
    host_b, _, port_b = b.rpartition(":")
    if port_a != port_b:
        return False
    return host_a == host_b or (_is_this_machine(host_a) and _is_this_machine(host_b))


def _is_this_machine(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    try:
        # Binding succeeds only to an address one of this machine's interfaces holds.
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host.strip("[]"), 0))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Put back the signal handlers (``ray.init`` replaces SIGTERM's), the root logger
    and the ``sys``/``threading`` hooks as they were."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in signal.valid_signals()
                if s not in (signal.SIGKILL, signal.SIGSTOP)} if main else {}
    root = logging.getLogger()
    root_state = (list(root.handlers), root.level, logging.root.manager.disable)
    hooks = (sys.excepthook, threading.excepthook)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                if signal.getsignal(sig) is not handler and handler is not None:
                    signal.signal(sig, handler)
        root.handlers[:] = root_state[0]
        root.setLevel(root_state[1])
        logging.disable(root_state[2])
        sys.excepthook, threading.excepthook = hooks
