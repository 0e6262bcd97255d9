"""Executor ``farm``: requests go to a shared compile farm on Ray (see ``fxoffload.farm``).

    submit(request bytes) ─► content key ─► HMAC-sign ─► Registry.compile (Ray)
        ─► signed response ─► signature checked ─► response bytes ─► Future

The process joins the farm's cluster as a Ray driver on first use (never starting one)
and asks the named registry; it holds no workers of its own, so it pays no worker
start-up. A farm that cannot be reached fails the request with ``FarmUnavailable`` (the
caller's ``on_failure`` policy compiles locally, with one WARNING), and for
``RETRY_AFTER_S`` every later request fails the same way at once instead of waiting on
the network again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .. import device_index, signing
from ..device_index import Rebind
from ..errors import FarmCompileFailed, FarmUnavailable, FxOffloadError, Unauthenticated
from ..farm.actors import GRAPHS, REQUEST, RESPONSE
from ..protocol import rebind_of
from ..settings import Settings
from ..tally import STATS
from .base import Executor

RETRY_AFTER_S = 30.0
GRAPHS_TIMEOUT_S = 30.0  # a set of graphs asked for or given (farm.graphs)


class FarmExecutor(Executor):
    name = "farm"
    out_of_process = True

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._registry: Any = None
        self._key: bytes | None = None
        self._down: tuple[float, FxOffloadError] | None = None
        self._closed = False

    def _connect(self) -> Any:
        with self._lock:
            if self._closed:
                from ..errors import PoolClosed

                raise PoolClosed("the farm executor was shut down")
            if self._registry is not None:
                return self._registry
            if self._down is not None and time.monotonic() - self._down[0] < RETRY_AFTER_S:
                raise self._down[1]
            from .. import farm
            from ..farm.actors import NAMESPACE, REGISTRY_NAME

            key_file = key_file_of(self._settings)
            try:
                self._key = signing.load_key(key_file)
                address = farm.resolve_address(self._settings.farm, key_file)
                ray = farm.connect(address, farm.state_dir(key_file))
                try:
                    self._registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
                except ValueError:
                    raise FarmUnavailable(f"the farm at {address} has no registry (was "
                                          "`fxoffload farm down` run?)") from None
            except FarmUnavailable as e:
                self._down = (time.monotonic(), e)
                raise
            return self._registry

    def warmup(self, *, wait: bool = False, full: bool = True) -> None:
        """Join the farm now (its workers are warm already)."""
        try:
            self._connect()
        except FxOffloadError:
            pass  # the first request reports it, under the on_failure policy

    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        future: Future[bytes] = Future()
        future.set_running_or_notify_cancel()
        try:
            registry = self._connect()
            from ..content_key import content_key

            assert self._key is not None
            key = content_key(request)
            rebind = rebind_of(request)
            signed = signing.sign(self._key, request, purpose=REQUEST)
            ref = registry.compile.remote(key, signed, timeout)
        except FxOffloadError as e:
            future.set_exception(e)
            return future
        except Exception as e:  # noqa: BLE001 - Ray's errors become ours
            future.set_exception(FarmUnavailable(f"{type(e).__name__}: {e}"))
            return future
        started = time.perf_counter()
        setattr(future, "started", started)  # noqa: B010 - read by offload's stats
        ref.future().add_done_callback(lambda f: self._finish(f, future, rebind))
        return future

    def _finish(self, ray_future: Future[Any], future: Future[bytes],
                rebind: Rebind | None) -> None:
        try:
            how, result = ray_future.result()
            if how == "refused":
                raise Unauthenticated(f"the farm refused the request: {result[1]}")
            if how == "error":
                reason, message = result
                raise FarmCompileFailed(reason, message)
            assert self._key is not None
            raw = _install_files(signing.verify(self._key, result, purpose=RESPONSE),
                                 rebind)
        except FxOffloadError as e:
            future.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001 - Ray's errors become ours
            with self._lock:
                self._registry = None  # ask for it again next time
            future.set_exception(FarmUnavailable(
                f"the farm's registry failed: {type(e).__name__}: {e}"))
            return
        STATS.count_farm(how)
        future.set_result(raw)

    def fetch_graphs(self, aot_key: str, *,
                     lease_s: float = 0.0) -> tuple[str, dict[str, bytes] | None]:
        """The files of AOTAutograd cache entry ``aot_key`` that a client gave the farm
        (``farm.graphs``), signature checked, as ``(how, files)``: see
        ``Registry.get_graphs`` (``"lead"``: this process is to compile and give them
        within ``lease_s``, others waiting for it)."""
        registry = self._connect()
        from .. import farm

        how, signed = farm.import_ray().get(
            registry.get_graphs.remote(graphs_key(aot_key), lease_s),
            timeout=lease_s + GRAPHS_TIMEOUT_S)
        if signed is None:
            return how, None
        assert self._key is not None
        from ..errors import ProtocolError
        from ..farm import bundle

        name, files = bundle.unpack(signing.verify(self._key, signed, purpose=GRAPHS))
        if name != aot_key.encode():
            raise ProtocolError(f"the farm answered AOTAutograd key {aot_key} with the "
                                f"graphs of {name[:80]!r}", reason="farm_graphs_mismatch")
        return how, files

    def release_graphs(self, aot_key: str, after_s: float) -> None:
        """This process gives the graphs it leads (``fetch_graphs``) within ``after_s``,
        or never (0)."""
        registry = self._connect()
        registry.release_graphs.remote(graphs_key(aot_key), after_s)  # no need to wait

    def publish_graphs(self, aot_key: str, files: dict[str, bytes]) -> None:
        """Give the farm what another client needs for AOTAutograd key ``aot_key`` to hit."""
        registry = self._connect()
        from .. import farm
        from ..farm import bundle

        assert self._key is not None
        signed = signing.sign(self._key, bundle.pack(aot_key.encode(), files),
                              purpose=GRAPHS)
        if not farm.import_ray().get(registry.put_graphs.remote(graphs_key(aot_key), signed),
                                     timeout=GRAPHS_TIMEOUT_S):
            raise Unauthenticated("the farm refused the graphs (signature)")

    def shutdown(self, *, wait: bool = True) -> None:
        """Leave the farm; it keeps running for others (``fxoffload farm down`` stops it)."""
        with self._lock:
            self._closed = True
            self._registry = None


def _install_files(blob: bytes, rebind: Rebind | None = None) -> bytes:
    """The response, after the kernels compiled with it are written into this process's
    cache dirs (``farm.bundle``), so that loading it compiles nothing; with ``rebind``,
    Triton's files go to the dir of this process's device."""
    from ..errors import ProtocolError
    from ..farm import bundle
    from ..farm.graphs import cache_dirs

    try:
        raw, files = bundle.unpack(blob)
        dirs = cache_dirs()
        if "triton" in dirs:  # the worker's Triton files sit at inductor/triton/<device>/...
            files = {_to_triton(name): data for name, data in files.items()}
        elif rebind is not None:  # ... and go to this process's device's dir
            files = {device_index.kernel_file(name, rebind): data
                     for name, data in files.items()}
        written = bundle.write_into(dirs, files)
    except (ValueError, OSError) as e:
        raise ProtocolError(f"the farm's kernel bundle could not be installed: {e}",
                            reason="farm_bundle_failed") from e
    INSTALLED.update(written)
    STATS.add(farm_files_installed=len(written))
    return raw


# Names ("inductor/…", "triton/…") of the kernel files this process took from the farm
# (diagnostics: bench/farm_gpu_check.py tells them from kernels compiled here).
INSTALLED: set[str] = set()


def _to_triton(name: str) -> str:
    parts = name.split("/", 3)
    if len(parts) == 4 and parts[:2] == ["inductor", "triton"]:
        return f"triton/{parts[3]}"
    return name


def graphs_key(aot_key: str) -> str:
    """The store key of AOTAutograd cache entry ``aot_key``'s graphs (lowercase hex)."""
    import hashlib

    return hashlib.sha256(b"aot-graphs\0" + aot_key.encode()).hexdigest()


def key_file_of(settings: Settings) -> Path:
    """The farm key file these settings name (``signing``'s default when unset)."""
    return settings.farm_key or signing.default_key_path()
