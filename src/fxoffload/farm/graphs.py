"""Whole graphs through the farm: AOTAutograd's cache entries, shared by the farm's clients.

The farm's store answers a request after the client traced it through AOTAutograd and
Inductor's front half (the joint-graph passes, the partitioner): work that costs a client
as much as the `aot_eager` backend's whole first call again. A client whose graph the
farm has seen skips it: AOTAutograd's cache is consulted before any of that runs, under a
key computed from Dynamo's graph, so the farm keeps, per AOTAutograd cache key, the
files a client's cache needs to hit: the entry, the FX graph cache entries it loads
(forward, backward) and the kernels they run (C++ libraries, Triton's files).

    client that compiled:  AOTAutogradCache.save(key) (after the backward's compile,
                           in the backend call where it leads) ─► the entry's files,
                           and every file written into the cache dirs since the lookup
                           missed ─►
                           pack, sign ─► Registry.put_graphs (refused unless signed)
    client that comes later: AOTAutogradCache._lookup(key), no local entry ─►
                           Registry.get_graphs ─► signature checked ─► files written into
                           this process's cache dirs ─► the lookup hits locally

Single-flight at this level too: the first client that misses leads (the registry gives
it a lease of ``farm_graph_wait`` seconds at most, a setting); clients that miss while it
compiles wait for its graphs instead of tracing the graph themselves, and compile it
themselves only when the leader gives up (its compile failed, AOTAutograd would not save
it) or the lease ends (a leader that died costs the others at most the lease; one that
never runs the backward it compiles lazily, ``PENDING_S`` after its forward compiled: only
where this torch cannot compile a leader's backward with its forward, ``_before_lookup``).
A client that does not lead (the farm unreachable, or ``farm_graph_wait=0``) compiles a
backward lazily, as stock does.
With ``farm_graph_wait=0`` nobody leads or waits: each client traces the graph and its
compiles join at the farm (one compile per request's content key), and the graphs the
first of them gives are stored for later clients. Waiting is the default: it spends the
least CPU (a joiner neither traces nor partitions) and was not slower (GPT-2 training
step, K=4 on a 16-core H100 machine: every rank compiled after 40.35 s waiting, 40.79 s
not waiting, where the joiners ended 2.5 s after the leader); not waiting also gave 6
farm compiles for the 4 graphs, so some request differed between ranks there.

Files are only written once their envelope's signature holds (the farm's key), and a name
that leaves its cache dir is refused (``bundle.write_into``): a set of graphs is code,
like a compile result. Only graphs compiled through the farm executor are shared. A graph
with collectives compiles synchronously on every rank (``offload.in_step``), so a rank
that finds it here runs compiled code from its first call, as the others do.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import FarmUnavailable
from . import bundle

log = logging.getLogger("fxoffload.farm")

# Not a file: the publisher's CPU vector ISAs (``_compat.vec_isa_names``), which a client
# that loads the graphs adopts where its CPU reports the same, instead of probing them by
# building a library per ISA with the compiler (about 1 CPU-s per client on the 2-core
# machine: 3 ISAs). Signed with the files.
VEC_ISA = "fxoffload:vec_isa"
_serving: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fxoffload_farm_graphs", default=None)
_lock = threading.Lock()
# AOTAutograd cache key -> (executor, the cache dirs' files when its lookup missed): what
# the compile then writes is published with the entry. The save may come later and on
# another thread (a backward compiled at the first backward call), so it is not looked up
# in ``_serving``.
_missed: dict[str, tuple[Any, dict[str, float]]] = {}
_MISSED_KEPT = 256
PENDING_S = 60.0  # ... once the other's forward compiled and its backward has not


@dataclasses.dataclass
class _Block:
    executor: Any
    lease_s: float
    led: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def serving(executor: Any, *, lease_s: float) -> Iterator[None]:
    """AOTAutograd cache lookups and saves inside the block go through ``executor``
    (a ``FarmExecutor``): a local miss asks the farm (waiting at most ``lease_s`` for a
    client compiling the same graph), a save publishes to it. Graphs this block leads and
    has not given yet are released when it ends: at once when the compile failed or
    AOTAutograd's cache bypassed the graph; else within ``PENDING_S`` (a backward that
    AOTAutograd compiles at the first backward call saves the entry then)."""
    from torch._dynamo.utils import counters

    from .. import _compat

    if not _compat.on_aot_cache(before_lookup=_before_lookup, after_save=_after_save):
        yield
        return
    block = _Block(executor, lease_s)
    token = _serving.set(block)
    bypassed = counters["aot_autograd"]["autograd_cache_bypass"]
    failed = True
    try:
        yield
        failed = False
    finally:
        _serving.reset(token)
        failed = failed or counters["aot_autograd"]["autograd_cache_bypass"] > bypassed
        for key in block.led:
            with _lock:
                unsaved = key in _missed
            if unsaved:
                with contextlib.suppress(Exception):
                    executor.release_graphs(key, 0.0 if failed else PENDING_S)


def cache_dirs() -> dict[str, Path]:
    """This process's cache dirs by bundle root: Inductor's, and Triton's where it is set
    apart (else Triton's files are under Inductor's)."""
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    dirs = {"inductor": Path(cache_dir())}
    triton = os.environ.get("TRITON_CACHE_DIR")
    if triton:
        dirs["triton"] = Path(triton)
    return dirs


def _name(dirs: dict[str, Path], path: str) -> str:
    return f"inductor/{Path(path).relative_to(dirs['inductor'])}"


def _before_lookup(key: str) -> None:
    block = _serving.get()
    if block is None:
        return
    executor = block.executor
    from .. import _compat
    from ..executors.farm import INSTALLED
    from ..tally import STATS

    if Path(_compat.aot_entry_dir(key)).is_dir():
        return  # a local entry: AOTAutograd's own lookup decides
    dirs = cache_dirs()
    try:
        t0 = time.perf_counter()
        how, files = executor.fetch_graphs(key, lease_s=block.lease_s)
        t1 = time.perf_counter()
        if files:
            isa = files.pop(VEC_ISA, None)
            written = bundle.write_into(dirs, files)
            # After the files: adopting still checks the ISAs' extra features (AVX-512
            # BF16, VNNI) by building a library each, which the publisher's files hold.
            if isa is not None and _compat.adopt_vec_isa(
                    tuple(n for n in isa.decode().split("\n") if n)):
                STATS.add(vec_isa_adopted=1)
            INSTALLED.update(written)
            STATS.add(farm_files_installed=len(written))
            STATS.count_farm(f"graphs_{how}")  # graphs_hit, graphs_joined
            _spans(key, how, t0, t1, files)
            return
        _spans(key, how, t0, t1)
        if how == "lead":
            block.led.append(key)
            # Others wait for these graphs: the backward compiles with the forward, so
            # the entry is saved, and given, in this backend call, not at the first
            # backward (H100, K=4, GPT-2 training step: the waiting ranks ended 2-2.6 s
            # after the leader, within 0.6 s since).
            _compat.backward_at_once_for_this_graph()
    except FarmUnavailable as e:  # the request will say so, once (its on_failure policy)
        log.debug("fxoffload: no graphs from the farm: %s", e)
    except Exception as e:  # noqa: BLE001 - the graph compiles as if the farm had none
        log.warning("fxoffload: the farm's graphs for AOTAutograd key %s could not be "
                    "used (%s: %s); compiling it", key, type(e).__name__, e)
    with _lock:
        _missed[key] = (executor, bundle.snapshot(dirs))
        while len(_missed) > _MISSED_KEPT:  # keys AOTAutograd never saved (bypassed)
            del _missed[next(iter(_missed))]


def _after_save(key: str, entry: Any) -> None:
    with _lock:
        missed = _missed.pop(key, None)
    if missed is None:
        return  # not compiled through the farm, or AOTAutograd's own cache had it
    executor, before = missed
    from .. import _compat

    entry_dir = Path(_compat.aot_entry_dir(key))
    if not entry_dir.is_dir():
        return  # AOTAutograd could not save it: nothing another client could load
    dirs = cache_dirs()
    names = set(bundle.names_under(dirs, _name(dirs, str(entry_dir))))
    for fx_key in _compat.fx_graph_keys(entry):
        names.update(bundle.names_under(dirs, _name(dirs, _compat.fx_graph_entry_dir(fx_key))))
    files = bundle.read(dirs, names)
    files.update(bundle.new_files(dirs, before))
    if (isa := _compat.probed_vec_isa()) is not None:
        files[VEC_ISA] = "\n".join(isa).encode()
    t0 = time.perf_counter()
    try:
        executor.publish_graphs(key, files)
        _spans(key, "publish", t0, None, files)
    except FarmUnavailable as e:  # reported by the request already
        log.debug("fxoffload: graphs not given to the farm: %s", e)
    except Exception as e:  # noqa: BLE001 - this process has its graph; others compile
        log.warning("fxoffload: could not give the farm the graphs for AOTAutograd key "
                    "%s (%s: %s)", key, type(e).__name__, e)


def _spans(key: str, how: str, t0: float, t1: float | None,
           files: dict[str, bytes] | None = None) -> None:
    """On the timeline (``FXOFFLOAD_TRACE``): the farm's answer for AOTAutograd key
    ``key`` (``lead``, ``hit``, ``joined``: the wait for another client's compile, or
    ``publish``) with its files' count and bytes, then the files' install, on the
    parent's track."""
    from .. import timeline

    if (tl := timeline.get()) is None:
        return
    args = {} if files is None else {
        "files": len(files), "bytes": sum(len(data) for data in files.values())}
    now = time.perf_counter()
    end = now if t1 is None else t1
    tl.span(f"farm graphs {how}", t0, end, track=0, track_name="parent",
            step=f"graphs {how}", aot_key=key[:16], **args)
    if t1 is not None and now - t1 > 0.0005:
        tl.span("install graphs", t1, now, track=0, track_name="parent",
                step="install graphs", aot_key=key[:16])
    tl.flush()
