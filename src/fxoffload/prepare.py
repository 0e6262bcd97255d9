"""The parent's share of a first compile that does not depend on the graph, done ahead
(``fxoffload.warmup()``): Inductor's compile path imported, the joint-graph patterns
registered for the device, the FX cache key's fixed parts (torch's source hash, system
info) computed, and on the CPU the vector-ISA probes built, unless a worker's result will
be adopted instead (``offload.load``).

Without ``warmup()``, on a machine without a GPU, a synchronous backend starts those probes
in a thread of ours when it is made, and an async one when its first graph's trace starts
(``probe_cpu_isa_ahead``): they are 8 s of the first call on the 2-core CI machine (three
C++ builds in an empty cache dir) that stock runs at its first CPU kernel, after Dynamo,
AOTAutograd and lowering; here they run beside those.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fxoffload")

_prepared: set[str] = set()
_isa_probe: threading.Thread | None = None
_isa_stop: threading.Event | None = None
_isa_probed: list[str] = []  # the ISAs that thread probed, in order


def prepare_parent(device: str | None = None, *, probe_cpu_isa: bool = True) -> None:
    """Do now, once, the parent's share of a first compile that does not depend on the
    graph: import Inductor's compile path, register the joint-graph patterns for
    ``device``, hash torch's sources and read the system info (the FX cache key's parts);
    on the CPU, probe the vector ISAs that loading compiled code checks first (unless
    ``probe_cpu_isa`` is False: a worker's result will be adopted instead).
    About 1.5-2 s of a cold process that would otherwise fall on the first call, which
    matters most in async modes, where that call should cost little more than eager.

    Called by ``fxoffload.warmup()`` in the caller's thread, never in a thread of ours:
    imports racing Dynamo's own imports of the same circular modules can deadlock.
    Best effort: a step that fails here simply happens at the first compile, as stock."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        from .errors import ConfigError

        raise ConfigError(f"fxoffload.warmup(device={device!r}): not a device ({exc})") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if not probe_cpu_isa and _isa_stop is not None:
        # A backend made before warmup() started the probes; a warm worker's result
        # will be adopted instead: the build under way is the last (its cores go to
        # the workers' start).
        _isa_stop.set()
    if str(dev) in _prepared:
        return
    _prepared.add(str(dev))
    from ._compat import use_torch_ptxas

    use_torch_ptxas()  # before the system info reads Triton's key
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("import compile_fx", lambda: __import__("torch._inductor.compile_fx")),
        ("torch_key", _torch_key),
        ("system info", _system_info),
        ("joint-graph patterns", lambda: _joint_graph_patterns(dev)),
    ]
    if dev.type == "cpu" and probe_cpu_isa:  # loading compiled CPU code probes them first
        steps.append(("CPU vector ISAs", _cpu_isa))
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the first compile does it again, as stock
            log.debug("fxoffload: preparing %s failed (%s: %s); the first compile does it",
                      name, type(exc).__name__, exc)


def _torch_key() -> None:
    from torch._inductor.codecache import torch_key

    torch_key()


def _system_info() -> None:
    from torch._inductor.codecache import CacheBase

    CacheBase.get_system()


def _cpu_isa() -> None:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()


def _joint_graph_patterns(dev: Any) -> None:
    from torch._inductor.fx_passes.joint_graph import lazy_init

    lazy_init(dev)


def probe_cpu_isa_ahead(mode: str) -> threading.Thread | None:
    """Start Inductor's CPU vector-ISA probes now, in a thread, once per process: for a
    synchronous backend of ``mode`` just made, or a deferred graph's trace starting after
    its first output (``deferred``); return the thread, or None where nothing was started.

    Its first CPU graph compiles in this process (no worker is warm yet), and Inductor
    probes the ISAs at that compile's first kernel (one C++ build and load per ISA the CPU
    reports). Probed here, one build after another (one core), they overlap Dynamo's
    trace, AOTAutograd and lowering on the caller's thread; a compile that gets there
    first takes what is built (each build holds its file lock) and does the rest itself.
    The result is Inductor's own: the same probes, cached where it caches them.

    Not started: on a machine with a GPU (its graphs need no probe); after
    ``fxoffload.warmup()`` (it probed, or a warm worker's result will be adopted); in mode
    ``inprocess`` (stock, untouched); where ``cpp.vec_isa_ok`` is set or torch already
    probed. Stopped after the build under way by a later ``warmup()`` of an
    out-of-process mode (a warm worker's result will be adopted) and at exit."""
    global _isa_probe, _isa_stop
    if _isa_probe is not None or _prepared or mode == "inprocess":
        return None
    import torch

    from ._compat import vec_isa_to_probe

    if torch.cuda.is_available():
        return None
    try:
        isas = vec_isa_to_probe()  # imports what the probes use, here (see prepare_parent)
    except Exception as exc:  # noqa: BLE001 - the first compile probes, as stock
        log.debug("fxoffload: no ISA probe ahead (%s: %s)", type(exc).__name__, exc)
        return None
    if not isas:
        return None

    stop = _isa_stop = threading.Event()

    def probe() -> None:
        for isa in isas:
            if stop.is_set():
                return  # exit, or warmup(): the next compile (if any) probes the rest
            try:
                bool(isa)  # Inductor's probe, cached on the ISA
                _isa_probed.append(str(isa))
            except Exception as exc:  # noqa: BLE001 - the compile probes it again
                log.debug("fxoffload: probing %s ahead failed (%s: %s)", isa,
                          type(exc).__name__, exc)

    def at_exit(thread: threading.Thread) -> None:
        # No compiler left running after the process: the build under way ends first.
        stop.set()
        thread.join(60)

    _isa_probe = threading.Thread(target=probe, name="fxoffload-isa-probe", daemon=True)
    _isa_probe.start()
    atexit.register(at_exit, _isa_probe)
    return _isa_probe
