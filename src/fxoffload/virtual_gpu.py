"""Compiling a CUDA graph in a process that has no GPU (a farm worker on a CPU node).

    client (GPU)                                  worker (no GPU, CUDA_VISIBLE_DEVICES="")
    describe() ─ the properties of each CUDA ──►  installed(gpus): torch.cuda and Triton's
      device the graph uses, in the preamble        driver answer from those properties;
      (``Preamble.gpus``; the content key           Inductor lowers and generates code as on
      covers them: another GPU model, another       the client; Triton compiles each kernel
      compile)                                      for the client's architecture into the
                                                    cache (ptxas needs no GPU); no kernel is
                                                    loaded or launched here
    load: the kernels arrive in the response's
    Triton bundle; launchers are made here, on
    the real GPU, as after any background compile

What Inductor asks a GPU during a compile is read-only: is there one, how many, which is
current, its properties (SM count, compute capability, shared memory, registers, warp
size), bf16/tf32 support, and Triton's driver target. Everything that would touch a real
device is kept out of the compile: ``CachingAutotuner.precompile`` only compiles (what
Inductor's own compile subprocesses do, ``warm_cache_only``), Inductor's process pool is
not used (its subprocesses cannot see these stand-ins), and RNG state save/restore is a
no-op. Anything else that needs the device (max-autotune's benchmarks, constant folding
with real CUDA tensors under freezing) fails the compile with the driver's error, and the
client's ``on_failure`` policy applies.

The stand-ins read the current description from this module, so a Triton driver built
while it was installed keeps working for the next request, and fails clearly (not with a
stale GPU) outside ``installed``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

from . import patches

GROUP = "virtual_gpu"
# Per-device fields that do not change what Inductor generates and differ between two
# GPUs of one model (ranks on one machine share a compile).
_NOISE = frozenset({"uuid", "pci_bus_id", "pci_device_id", "pci_domain_id"})
_lock = threading.RLock()
_current: dict[int, dict[str, Any]] | None = None
_current_index = 0


# --- the client's side ----------------------------------------------------------------

def describe(devices: list[str]) -> dict[str, dict[str, Any]] | None:
    """``{"<index>": {property: value}}`` for each CUDA device in ``devices`` (strings as
    in a request's summary, ``"cuda:0"``); None when the graph uses no CUDA device."""
    indices = sorted({torch.device(d).index or 0 for d in devices
                      if torch.device(d).type == "cuda"})
    if not indices or not torch.cuda.is_available():
        return None
    return {str(i): _properties(i) for i in indices}


@functools.cache
def _properties(index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    out: dict[str, Any] = {}
    for name in dir(props):
        if name.startswith("_") or name in _NOISE:
            continue
        value = getattr(props, name, None)
        if isinstance(value, (bool, int, float, str)):
            out[name] = value
    out.update(_triton_properties(index))
    return out


def _triton_properties(index: int) -> dict[str, Any]:
    """What Triton's driver reports (``max_shared_mem``, ``max_num_regs``, …), which
    Inductor reads in some heuristics; empty without Triton."""
    try:
        from triton.runtime import driver

        raw = driver.active.utils.get_device_properties(index)
        return {f"triton_{k}": v for k, v in dict(raw).items() if isinstance(v, int)}
    except Exception:  # noqa: BLE001 - only a few heuristics read these
        return {}


def mismatch(gpus: dict[str, dict[str, Any]]) -> str | None:
    """Why this process, which has GPUs, must not compile for ``gpus`` (another model:
    Inductor and Triton would generate code for this one's), or None."""
    for key, wanted in gpus.items():
        index = int(key)
        if index >= torch.cuda.device_count():
            return (f"the client compiles for cuda:{index}; this worker has "
                    f"{torch.cuda.device_count()} GPU(s)")
        here = torch.cuda.get_device_properties(index)
        if (here.name, here.major, here.minor) != (wanted.get("name"), wanted.get("major"),
                                                   wanted.get("minor")):
            return (f"this worker's cuda:{index} is a {here.name} (sm_{here.major}"
                    f"{here.minor}); the client's is a {wanted.get('name')} "
                    f"(sm_{wanted.get('major')}{wanted.get('minor')})")
    return None


# --- the worker's side ----------------------------------------------------------------

class DeviceProperties:
    """What ``torch.cuda.get_device_properties`` returns, from the client's values."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in values.items() if not k.startswith("triton_")})

    def __repr__(self) -> str:
        return (f"_VirtualCudaDeviceProperties(name={self.__dict__.get('name')!r}, "
                f"major={self.__dict__.get('major')}, minor={self.__dict__.get('minor')})")


def _described() -> dict[int, dict[str, Any]]:
    if _current is None:
        raise RuntimeError("fxoffload: this process has no GPU, and no client's GPU is "
                           "described (a CUDA call outside virtual_gpu.installed)")
    return _current


def _index(device: Any = None) -> int:
    if device is None:
        return _current_index
    if isinstance(device, int):
        return device
    parsed = torch.device(device)
    return _current_index if parsed.index is None else parsed.index


def _values(device: Any = None) -> dict[str, Any]:
    gpus = _described()
    index = _index(device)
    if index not in gpus and 0 <= index < max(gpus):
        # Inductor asks cuda:0 in a few places whatever the graph's device (the GPU's
        # shared memory, comm_analysis): a lower index the client did not describe is
        # another GPU of the client's machine, taken to be of the current one's model
        index = _current_index
    if index not in gpus:
        raise RuntimeError(f"fxoffload: the client described {sorted(gpus)} as its CUDA "
                           f"devices; cuda:{index} was asked for")
    return gpus[index]


def get_device_properties(device: Any = None) -> DeviceProperties:
    return DeviceProperties(_values(device))


def get_device_capability(device: Any = None) -> tuple[int, int]:
    values = _values(device)
    return int(values["major"]), int(values["minor"])


def get_device_name(device: Any = None) -> str:
    return str(_values(device)["name"])


def is_available() -> bool:
    return _current is not None


def device_count() -> int:
    return max(_described()) + 1


def current_device() -> int:
    _described()
    return _current_index


def set_device(device: Any) -> None:
    global _current_index
    index = _index(device)
    if index >= 0:
        _values(index)
        _current_index = index


def exchange_device(device: int) -> int:
    previous = _current_index
    if device >= 0:
        set_device(device)
    return previous


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return int(_values()["major"]) >= 8


def is_tf32_supported() -> bool:
    return int(_values()["major"]) >= 8


def synchronize(device: Any = None) -> None:
    """Nothing runs on a virtual device."""


def get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)  # restored by set_rng_state: a no-op


def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    """Inductor saves and restores the RNG state around a compile; there is none here."""


def gpu_shared_memory() -> int:
    values = _values()  # the current device's
    return int(values.get("triton_max_shared_mem")
               or values.get("shared_memory_per_block_optin", 0))


class _TritonUtils:
    """Triton's ``driver.active.utils`` for a virtual device: its properties from the
    client's values; nothing that loads a binary."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def get_device_properties(self, device: int) -> dict[str, Any]:
        values = _values(device)
        return {k[len("triton_"):]: v for k, v in values.items() if k.startswith("triton_")}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def installed(gpus: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Compile for ``gpus`` (``describe``'s value) in this GPU-less process."""
    global _current, _current_index
    with _lock:
        _current = {int(k): v for k, v in gpus.items()}
        _current_index = min(_current)
        try:
            _install()
            yield
        finally:
            patches.uninstall(GROUP)
            _current = None
            _current_index = 0
            _clear_device_caches()


def _install() -> None:
    cuda = torch.cuda
    for name, value in (
            ("is_available", is_available), ("device_count", device_count),
            ("current_device", current_device), ("set_device", set_device),
            ("get_device_properties", get_device_properties),
            ("get_device_capability", get_device_capability),
            ("get_device_name", get_device_name), ("is_bf16_supported", is_bf16_supported),
            ("is_tf32_supported", is_tf32_supported), ("synchronize", synchronize),
            ("get_rng_state", get_rng_state), ("set_rng_state", set_rng_state),
            ("_exchange_device", exchange_device), ("_maybe_exchange_device", exchange_device)):
        if hasattr(cuda, name):
            patches.replace(GROUP, cuda, name, value)
    _install_dynamo()
    _install_inductor()
    _install_triton()
    _clear_device_caches()


def _install_dynamo() -> None:
    from torch._dynamo import device_interface as di
    from torch._subclasses import fake_tensor

    interface = di.CudaInterface
    for name, value in (
            ("is_available", is_available), ("device_count", device_count),
            ("current_device", current_device), ("set_device", set_device),
            ("get_device_properties", get_device_properties),
            ("synchronize", synchronize), ("exchange_device", exchange_device),
            ("maybe_exchange_device", exchange_device),
            ("is_bf16_supported", is_bf16_supported)):
        if name in vars(interface):
            patches.replace(GROUP, interface, name, staticmethod(value))
    # A fake CUDA tensor must not create a real one (fake_tensor's device-context init),
    # and the fake mode must behave as on a machine without a device (no constant
    # propagation that would run real CUDA ops).
    for name in ("init_gpu_context", "init_cuda_context"):
        if hasattr(fake_tensor, name):
            patches.replace(GROUP, fake_tensor, name, lambda *args, **kwargs: None)
    patches.replace(GROUP, fake_tensor.FakeTensorMode, "avoid_device_init",
                    property(lambda self: True))


def _install_inductor() -> None:
    from torch._inductor import async_compile, utils
    from torch._inductor.runtime import triton_heuristics

    # Compile only: launchers are made on the client, with its GPU (as after a compile in
    # Inductor's own subprocesses, which pass warm_cache_only=True).
    def precompile(self: Any, *args: Any, **kwargs: Any) -> None:
        self._precompile_worker()

    patches.replace(GROUP, triton_heuristics.CachingAutotuner, "precompile", precompile)
    # Inductor's compile subprocesses have none of these stand-ins.
    patches.replace(GROUP, async_compile.AsyncCompile, "use_process_pool",
                    classmethod(lambda cls: False))
    if hasattr(utils, "get_gpu_shared_memory"):
        for module_name in ("torch._inductor.utils", "torch._inductor.kernel.mm_grouped",
                            "torch._inductor.autoheuristic.autoheuristic"):
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, "get_gpu_shared_memory"):
                patches.replace(GROUP, module, "get_gpu_shared_memory", gpu_shared_memory)


def _install_triton() -> None:
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime import driver
    except ImportError:
        return  # Inductor reports that it needs Triton
    patches.replace(GROUP, nvidia.CudaDriver, "is_active", staticmethod(lambda: True))
    try:
        from torch._inductor.runtime import triton_helpers
    except ImportError:
        triton_helpers = None
    if triton_helpers is not None and hasattr(triton_helpers, "_is_backend_active"):
        original = triton_helpers._is_backend_active
        patches.replace(GROUP, triton_helpers, "_is_backend_active",
                        lambda name, backend: name == "nvidia" or original(name, backend))
    active = getattr(driver, "active", None)
    try:
        real = active.utils if active is not None else None
    except Exception:  # noqa: BLE001 - no active driver yet: made on first use
        real = None
    if real is not None and not isinstance(real, _TritonUtils):
        target = getattr(active, "_obj", active)
        patches.replace(GROUP, target, "utils", _TritonUtils(real))


def _clear_device_caches() -> None:
    """Inductor and torch memoize what they learn of the devices (``has_triton``,
    ``is_big_gpu``, ``get_system``, ``DeviceProperties.create``, the device interface's
    worker caches, …): what was true before (no GPU) must not leak into the virtual
    compile, nor the virtual GPU out of it."""
    from torch._dynamo import device_interface as di

    for cache_name in ("caching_worker_device_properties", "caching_worker_current_devices"):
        cache = getattr(di, cache_name, None)
        if isinstance(cache, dict):
            cache.pop("cuda", None)
    for module_name in ("torch.utils._triton", "torch._inductor.utils",
                        "torch._inductor.codecache", "torch._inductor.runtime.hints",
                        "torch._dynamo.device_interface"):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for value in list(vars(module).values()):
            for candidate in (value, *_class_members(value)):
                if isinstance(candidate, functools._lru_cache_wrapper):
                    candidate.cache_clear()


def _class_members(value: Any) -> list[Any]:
    if not isinstance(value, type) or not value.__module__.startswith("torch"):
        return []
    return [getattr(member, "__func__", member) for member in vars(value).values()]
