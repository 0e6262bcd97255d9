"""Counters for what fxoffload did, kept on one ``Stats`` instance per process.

``fxoffload.stats()`` returns an immutable ``Snapshot``; ``fxoffload.reset_stats()``
starts over. Times are wall-clock seconds summed over compiles."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Snapshot:
    graphs_offloaded: int
    fallbacks: MappingProxyType[str, int]
    # Graphs compiled in this process on purpose, not after a failure, by reason:
    # "no_warm_worker" (a synchronous compile came before any worker was warm).
    compiled_in_process: MappingProxyType[str, int]
    # Compiles of fxoffload's backends answered by a cache, so nothing was compiled:
    # Inductor's FX graph cache and AOTAutograd's cache.
    fx_cache_hits: int
    aot_cache_hits: int
    bytes_sent: int
    bytes_received: int
    serialize_s: float
    transfer_s: float
    compile_s: float
    deserialize_s: float
    worker_starts: int
    worker_replacements: int
    worker_failures: MappingProxyType[str, int]
    background_compiles: int  # compiles started behind an eagerly running graph
    background_pending: int  # of those, not finished yet
    eager_runs: int  # calls that ran a graph eagerly while its compile was pending
    compiled_runs: int  # calls of a background-compiled graph after its swap
    swaps: int  # compiled code swapped in (progressive: once per stage)
    queue_wait_s: float  # time compiles waited for a free worker
    background_traces: int  # graphs whose AOTAutograd trace ran on fxoffload's thread
    trace_s: float  # time those traces took (AOTAutograd, Inductor's front half, pickling)
    kernels_reused: int  # Triton kernels an in-process compile handed to the parent's load
    # How the farm answered this process's requests: "compiled" (a worker compiled it for
    # us), "joined" (another client's compile of the same graph was in flight), "hit"
    # (the farm's store had it).
    farm: MappingProxyType[str, int]
    farm_files_installed: int  # compiled kernels the farm sent that this process lacked
    # 1 when this process took a worker's CPU vector ISA probe result instead of probing
    vec_isa_adopted: int
    # CUDA graphs compiled by a worker that has no GPU, for this process's (virtual_gpu)
    gpu_less_compiles: int
    # Graphs the farm compiled for the canonical CUDA device, loaded on this process's
    # (device_index): ranks on other devices of one model share their compiles
    device_rebinds: int

    @property
    def fallback_count(self) -> int:
        return sum(self.fallbacks.values())

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), MappingProxyType)
                         else v) for f in dataclasses.fields(self)}


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.graphs_offloaded = 0
            self.fallbacks: Counter[str] = Counter()
            self.compiled_in_process: Counter[str] = Counter()
            self.fx_cache_hits = 0
            self.aot_cache_hits = 0
            self.bytes_sent = 0
            self.bytes_received = 0
            self.serialize_s = 0.0
            self.transfer_s = 0.0
            self.compile_s = 0.0
            self.deserialize_s = 0.0
            self.worker_starts = 0
            self.worker_replacements = 0
            self.worker_failures: Counter[str] = Counter()
            self.background_compiles = 0
            # A gauge, not a counter: compiles in flight stay in flight across a reset.
            self.background_pending = getattr(self, "background_pending", 0)
            self.eager_runs = 0
            self.compiled_runs = 0
            self.swaps = 0
            self.queue_wait_s = 0.0
            self.background_traces = 0
            self.trace_s = 0.0
            self.kernels_reused = 0
            self.farm: Counter[str] = Counter()
            self.farm_files_installed = 0
            self.vec_isa_adopted = 0
            self.gpu_less_compiles = 0
            self.device_rebinds = 0

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def count_fallback(self, reason: str) -> int:
        """Returns how many times this reason has now been seen (1 means: first time)."""
        with self._lock:
            self.fallbacks[reason] += 1
            return self.fallbacks[reason]

    def count_in_process(self, reason: str) -> None:
        with self._lock:
            self.compiled_in_process[reason] += 1

    def count_farm(self, outcome: str) -> None:
        with self._lock:
            self.farm[outcome] += 1

    def count_worker_failure(self, reason: str) -> None:
        with self._lock:
            self.worker_failures[reason] += 1

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                graphs_offloaded=self.graphs_offloaded,
                fallbacks=MappingProxyType(dict(self.fallbacks)),
                compiled_in_process=MappingProxyType(dict(self.compiled_in_process)),
                fx_cache_hits=self.fx_cache_hits,
                aot_cache_hits=self.aot_cache_hits,
                bytes_sent=self.bytes_sent,
                bytes_received=self.bytes_received,
                serialize_s=self.serialize_s,
                transfer_s=self.transfer_s,
                compile_s=self.compile_s,
                deserialize_s=self.deserialize_s,
                worker_starts=self.worker_starts,
                worker_replacements=self.worker_replacements,
                worker_failures=MappingProxyType(dict(self.worker_failures)),
                background_compiles=self.background_compiles,
                background_pending=self.background_pending,
                eager_runs=self.eager_runs,
                compiled_runs=self.compiled_runs,
                swaps=self.swaps,
                queue_wait_s=self.queue_wait_s,
                background_traces=self.background_traces,
                trace_s=self.trace_s,
                kernels_reused=self.kernels_reused,
                farm=MappingProxyType(dict(self.farm)),
                farm_files_installed=self.farm_files_installed,
                vec_isa_adopted=self.vec_isa_adopted,
                gpu_less_compiles=self.gpu_less_compiles,
                device_rebinds=self.device_rebinds,
            )


STATS = Stats()
