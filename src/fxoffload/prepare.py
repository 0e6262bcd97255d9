"""The parent's share of a first compile that does not depend on the graph, done ahead
(``fxoffload.warmup()``): Inductor's compile path imported, the joint-graph patterns
registered for the device, the FX cache key's fixed parts (torch's source hash, system
info) computed, and on the CPU the vector-ISA probes built, unless a worker's result will
be adopted instead (``offload.load``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fxoffload")

_prepared: set[str] = set()


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
