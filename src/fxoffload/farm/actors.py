"""The farm's two kinds of Ray actor: compile workers and the one registry.

    client ──compile(key, signed request)──► Registry ─┬─ store hit ──────────► signed response
                                                       ├─ same key in flight ─► wait for it (join)
                                                       └─ else ─► CompileWorker.compile ─► store

``CompileWorker`` holds a warm torch (imported, one compile done at start) and compiles one
request at a time with the same ``child`` code a local worker process runs, in a cache dir
of its own; the files the compile wrote there go back with the response (``bundle``). ``Registry``
(an asyncio actor) keeps single-flight: one compile per content key however many clients
ask; the compile runs in a task of its own, so a client that dies while waiting costs the
others nothing and the result is stored. A worker that dies mid-compile is replaced and
the request re-dispatched once; one that runs past the deadline is killed and replaced.

Both read the farm key from a file on their own node (``key_path``); the key never
travels through Ray. Every request is checked before a worker unpickles it, and every
response before the registry stores or serves it. The classes are plain here; ``deploy``
wraps them with ``ray.remote``, so this module imports without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import signing
from ..errors import Unauthenticated

NAMESPACE = "fxoffload"
REGISTRY_NAME = "fxoffload-registry"
REQUEST = b"request"
RESPONSE = b"response"
GRAPHS = b"graphs"  # a client's AOTAutograd cache entry and its files (farm.graphs)
GRAPHS_DIR = "graphs"  # under the store's directory


class CompileWorker:
    """One warm compile process (``num_cpus=1``)."""

    def __init__(self, key_path: str, work_dir: str, warm: bool = True) -> None:
        self._key = signing.load_key(Path(key_path))
        # A cache dir of its own: what a compile writes there travels with the response
        # (farm.bundle), so clients with other cache dirs load without recompiling.
        os.makedirs(work_dir, exist_ok=True)  # on another node, made there
        base = Path(tempfile.mkdtemp(prefix="worker-", dir=work_dir))
        self._cache = base / "inductor"
        self._dirs = {"inductor": self._cache}  # what farm.bundle snapshots and sends
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self._cache)
        os.environ.pop("TRITON_CACHE_DIR", None)  # Triton's under Inductor's: one layout
        os.environ["FXOFFLOAD_FARM_WORKER"] = "1"  # what tests' worker-only passes look for
        start = time.perf_counter()
        from .. import _compat, child, worker  # imports torch and Inductor

        _compat.use_torch_ptxas()  # before the warm-up reads Triton's key
        self._child = child
        self.phases: dict[str, float] = {"import_s": time.perf_counter() - start}
        from . import bundle

        before = bundle.snapshot(self._dirs)
        if warm:
            # A farm is up when its workers are warm: Inductor's compile pool answering
            # too (on a 16-core H100 machine, 4 workers' pools were still starting
            # after `farm up` returned, 4 CPU-s per s, while the first compiles ran).
            worker._warm_up(self.phases, compile=True, request_waiting=lambda: False,
                            wait_pool=True)
            if "warm_cuda_s" in self.phases:
                # And a small training step: on an H100, a fresh worker then compiled
                # Llama's forward and backward in 8.4 s against 10.8 s (its Inductor
                # pool's processes each pay a first use), as fast as a worker that had
                # compiled them before at another length (bench/worker_first_compile.py).
                # CUDA only: on 2 CPU cores it took 12 s of start-up and saved 0.5 s.
                worker._warm_training(self.phases, "cuda")
        # The C++ the warm-up built: mostly Inductor's CPU vector-ISA probe libraries,
        # which a CPU client with a cache dir of its own would otherwise build before it
        # loads anything (1-9 s). Sent with every CPU graph's response (about 180 KB).
        self._toolchain = self._new_cpp(before)
        self.startup_s = time.perf_counter() - start
        self.compiles = 0
        self._cpp_paths: list[str] | None = None  # the C++ sources the compile running uses
        self._name_cpp_sources()

    def _new_cpp(self, before: dict[str, float]) -> dict[str, bytes]:
        from . import bundle

        return {name: data for name, data in bundle.new_files(self._dirs, before).items()
                if name.endswith((".cpp", ".so"))}

    def _probe_cpu_isa(self) -> None:
        """Before the first CPU compile: the vector-ISA probes join the toolchain. A
        worker with a GPU warms up on CUDA only, so the probes were built by its first
        CPU compile and sent with that response alone; every client of a later one built
        its own (6 libraries each on an H200 machine). Not at start: there, 4 workers
        that probed at start took 60-66 s to come up (23 s without)."""
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        from . import bundle

        if valid_vec_isa_list.cache_info().currsize:
            return  # probed: by a CPU warm-up (in the toolchain already) or here
        before = bundle.snapshot(self._dirs)
        valid_vec_isa_list()
        self._toolchain.update(self._new_cpp(before))

    def _name_cpp_sources(self) -> None:
        """Inductor writes every C++ source it builds or loads through ``codecache.write``
        (also when the library is cached, in memory or on disk): noted here, so that a
        kernel built for an earlier graph is sent with a later one that uses it."""
        from torch._inductor import codecache

        from .. import patches

        original = codecache.write

        def write(content: Any, extension: str, *args: Any, **kwargs: Any) -> Any:
            key, path = original(content, extension, *args, **kwargs)
            if self._cpp_paths is not None and extension.endswith("cpp"):
                self._cpp_paths.append(path)
            return key, path

        patches.replace("farm_worker", codecache, "write", write)

    def _cpp_names(self, paths: list[str]) -> set[str]:
        """The names of each C++ source's build files: beside it, named by its key."""
        from . import bundle

        names: set[str] = set()
        for path in paths:
            source = Path(path)
            key = source.name.split(".", 1)[0]
            for sibling in source.parent.glob(f"{key}.*"):
                if sibling.is_file() and not sibling.name.endswith(bundle.SKIP_SUFFIXES):
                    with contextlib.suppress(ValueError):
                        names.add(f"inductor/{sibling.relative_to(self._cache)}")
        return names

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "startup_s": self.startup_s, "compiles": self.compiles,
                "phases": self.phases}

    def compile(self, signed_request: bytes) -> tuple[bool, bytes, float]:
        """``(ok, signed response, seconds)``: ``ok`` is False for an error response
        (returned to the client, never stored)."""
        from .. import _compat, protocol
        from . import bundle

        data = signing.verify(self._key, signed_request, purpose=REQUEST)
        start = time.perf_counter()
        cpu = protocol.split_request(data)[0].host_cpu is not None
        if cpu:
            self._probe_cpu_isa()
        before = bundle.snapshot(self._dirs)
        # A kernel this process loaded before (warm-up, an earlier graph) would come from
        # memory and go unnamed (below): every compile loads its kernels from the cache.
        _compat.forget_loaded_triton_kernels()
        self._cpp_paths = []
        try:
            raw, response = self._child.compile_request_status(
                data, cache_dirs=(str(self._cache), ""))
        finally:
            cpp_paths, self._cpp_paths = self._cpp_paths, None
        ok = response.error is None
        files = bundle.new_files(self._dirs, before) if ok else {}
        if ok:  # a kernel built for an earlier graph is not rewritten: sent by name
            named = self._cpp_names(cpp_paths)
            for kernel_hash, device in response.triton_kernels:
                named.update(bundle.names_under(
                    self._dirs, f"inductor/triton/{device}/{kernel_hash}"))
            files.update(bundle.read(self._dirs, named - files.keys()))
        if ok and cpu:
            files = {**self._toolchain, **files}
        self.compiles += 1
        blob = bundle.pack(raw, files)
        return ok, signing.sign(self._key, blob, purpose=RESPONSE), time.perf_counter() - start


@dataclass
class _Slot:
    handle: Any
    name: str
    pid: int = 0
    busy: int = 0
    compiles: int = 0


@dataclass
class _Stats:
    requests: int = 0
    hits: int = 0
    joins: int = 0
    compiles: int = 0
    failed: int = 0
    redispatched: int = 0
    workers_replaced: int = 0
    compile_s: float = 0.0
    refused: int = 0
    graphs_hits: int = 0
    graphs_misses: int = 0
    graphs_puts: int = 0
    graphs_joins: int = 0
    by_key: dict[str, int] = field(default_factory=dict)


class Registry:
    """Single-flight, the store, and the workers (an asyncio actor, ``num_cpus=0``)."""

    def __init__(self, key_path: str, workers: int, store_dir: str | None,
                 store_bytes: int, worker_options: dict[str, Any], work_dir: str) -> None:
        from .store import ArtifactStore

        self._key_path = key_path
        self._key = signing.load_key(Path(key_path))
        self._store = ArtifactStore(max_bytes=store_bytes,
                                    directory=Path(store_dir) if store_dir else None)
        # AOTAutograd cache entries with their files, from clients (farm.graphs)
        self._graphs = ArtifactStore(
            max_bytes=store_bytes,
            directory=Path(store_dir) / GRAPHS_DIR if store_dir else None)
        self._worker_options = worker_options
        self._work_dir = work_dir
        self._inflight: dict[str, asyncio.Future[tuple[str, Any]]] = {}
        # graphs a client is compiling (farm.graphs): others wait for its put_graphs
        self._leases: dict[str, asyncio.Future[bytes | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats = _Stats()
        self._generation = 0
        self._slots = [self._new_slot() for _ in range(workers)]

    def _new_slot(self) -> _Slot:
        import ray

        self._generation += 1
        name = f"fxoffload-worker-{self._generation}"
        handle = ray.remote(CompileWorker).options(
            name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=0,
            max_concurrency=1, **self._worker_options).remote(self._key_path, self._work_dir)
        return _Slot(handle, name)

    async def ready(self) -> list[dict[str, Any]]:
        """Wait until every worker is warm; their ``info()``."""
        infos = await asyncio.gather(*(s.handle.info.remote() for s in self._slots))
        for slot, info in zip(self._slots, infos, strict=True):
            slot.pid = info["pid"]
        return list(infos)

    async def compile(self, key: str, signed_request: bytes,
                      timeout: float | None) -> tuple[str, Any]:
        """``("hit" | "joined" | "compiled", signed response)``, or ``("error", (reason,
        message))`` when the farm could not compile it."""
        self._stats.requests += 1
        try:
            signing.verify(self._key, signed_request, purpose=REQUEST)
        except Unauthenticated as e:
            self._stats.refused += 1
            return "refused", ("unauthenticated", str(e))
        stored = self._store.get(key)
        if stored is not None:
            self._stats.hits += 1
            return "hit", stored
        future = self._inflight.get(key)
        if future is not None:
            self._stats.joins += 1
            how, result = await asyncio.shield(future)
            return ("joined" if how == "compiled" else how), result
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        task = asyncio.create_task(self._run(key, signed_request, timeout, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    async def get_graphs(self, key: str, lease_s: float = 0.0) -> tuple[str, bytes | None]:
        """The signed graphs a client gave for ``key`` (``farm.graphs``): ``("hit",
        graphs)``; ``("joined", graphs)`` after waiting (at most ``lease_s``) for the client
        that is compiling them; ``("lead", None)``: none, and the asker is now that client
        for ``lease_s`` (others wait for it); ``("miss", None)``: compile it yourself."""
        data = self._graphs.get(key)
        if data is not None:
            self._stats.graphs_hits += 1
            return "hit", data
        lease = self._leases.get(key)
        if lease is not None:
            self._stats.graphs_joins += 1
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(asyncio.shield(lease), lease_s)
            if data is not None:
                return "joined", data
            self._stats.graphs_misses += 1
            return "miss", None  # the leader gave up or is late: no second lease
        self._stats.graphs_misses += 1
        if lease_s <= 0:
            return "miss", None
        lease = asyncio.get_running_loop().create_future()
        self._leases[key] = lease
        asyncio.get_running_loop().call_later(lease_s, self._end_lease, key, lease, None)
        return "lead", None

    def _end_lease(self, key: str, lease: asyncio.Future[bytes | None],
                   data: bytes | None) -> None:
        if self._leases.get(key) is lease:
            del self._leases[key]
        if not lease.done():
            lease.set_result(data)

    async def put_graphs(self, key: str, signed: bytes) -> bool:
        """Keep a client's graphs for others, if the farm's key signed them."""
        try:
            signing.verify(self._key, signed, purpose=GRAPHS)
        except Unauthenticated:
            self._stats.refused += 1
            return False
        self._graphs.put(key, signed)
        self._stats.graphs_puts += 1
        lease = self._leases.get(key)
        if lease is not None:
            self._end_lease(key, lease, signed)
        return True

    async def release_graphs(self, key: str, after_s: float) -> None:
        """The leader of ``key`` gives its graphs within ``after_s`` (0: never), or the
        clients waiting for them compile."""
        lease = self._leases.get(key)
        if lease is None:
            return
        if after_s <= 0:
            self._end_lease(key, lease, None)
        else:
            asyncio.get_running_loop().call_later(after_s, self._end_lease, key, lease, None)

    async def _run(self, key: str, signed_request: bytes, timeout: float | None,
                   future: asyncio.Future[tuple[str, Any]]) -> None:
        try:
            result = await self._dispatch(key, signed_request, timeout)
        except Exception as e:  # noqa: BLE001 - every failure becomes the answer
            result = ("error", ("farm_internal_error", f"{type(e).__name__}: {e}"))
        self._inflight.pop(key, None)
        if result[0] == "error":
            self._stats.failed += 1
        future.set_result(result)

    async def _dispatch(self, key: str, signed_request: bytes,
                        timeout: float | None) -> tuple[str, Any]:
        import ray

        for attempt in (1, 2):
            slot = min(self._slots, key=lambda s: s.busy)
            slot.busy += 1
            ref = slot.handle.compile.remote(signed_request)
            try:
                ok, signed_response, seconds = await asyncio.wait_for(
                    asyncio.wrap_future(ref.future()), timeout)
            except TimeoutError:
                self._replace(slot, kill=True)
                return "error", ("worker_timeout", f"farm worker {slot.name} (pid "
                                 f"{slot.pid}) did not finish within {timeout:g} s; it was "
                                 "killed and replaced")
            except ray.exceptions.RayActorError as e:
                self._replace(slot, kill=False)
                if attempt == 1:
                    self._stats.redispatched += 1
                    continue
                return "error", ("worker_crashed", f"farm worker {slot.name} (pid "
                                 f"{slot.pid}) died during the compile, twice: {e}")
            except ray.exceptions.RayTaskError as e:
                return "error", ("remote_compile_error", str(e)[-4000:])
            finally:
                slot.busy -= 1
            signing.verify(self._key, signed_response, purpose=RESPONSE)
            slot.compiles += 1
            self._stats.compiles += 1
            self._stats.compile_s += seconds
            self._stats.by_key[key] = self._stats.by_key.get(key, 0) + 1
            if ok:
                self._store.put(key, signed_response)
            return "compiled", signed_response
        raise AssertionError("unreachable")

    def _replace(self, slot: _Slot, *, kill: bool) -> None:
        import ray

        if kill:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - it may be gone already
                pass
        index = self._slots.index(slot)
        self._slots[index] = self._new_slot()
        self._stats.workers_replaced += 1
        asyncio.get_running_loop().create_task(self._learn_pid(self._slots[index]))

    async def _learn_pid(self, slot: _Slot) -> None:
        try:
            slot.pid = (await slot.handle.info.remote())["pid"]
        except Exception:  # noqa: BLE001 - a slot whose worker died says pid 0
            pass

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "workers": [{"name": x.name, "pid": x.pid, "busy": x.busy,
                         "compiles": x.compiles} for x in self._slots],
            "in_flight": len(self._inflight),
            "queued": sum(max(0, x.busy - 1) for x in self._slots),
            "store_entries": len(self._store), "store_bytes": self._store.bytes,
            "store_evictions": self._store.evictions,
            "requests": s.requests, "hits": s.hits, "joins": s.joins,
            "compiles": s.compiles, "failed": s.failed, "refused": s.refused,
            "redispatched": s.redispatched, "workers_replaced": s.workers_replaced,
            "compile_s": round(s.compile_s, 3),
            "graphs_entries": len(self._graphs), "graphs_bytes": self._graphs.bytes,
            "graphs_hits": s.graphs_hits, "graphs_misses": s.graphs_misses,
            "graphs_puts": s.graphs_puts, "graphs_joins": s.graphs_joins,
            "compiles_per_key_max": max(s.by_key.values(), default=0),
        }

    def reset_stats(self) -> None:
        """Counters back to zero (tests); the store stays."""
        self._stats = _Stats()

    def clear_store(self, *, responses: bool = True, graphs: bool = True) -> None:
        if responses:
            self._store.clear()
        if graphs:
            self._graphs.clear()

    def shutdown(self) -> int:
        """Kill every worker (``farm down``); how many."""
        import ray

        for slot in self._slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - gone already
                pass
        count = len(self._slots)
        self._slots = []
        return count
