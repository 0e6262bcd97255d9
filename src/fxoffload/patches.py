"""Every lasting change fxoffload makes to torch, in one place, each one undoable.

    replace(group, owner, name, value)      owner.name = value, the original remembered
    replace_code(group, function, code)     function.__code__ = code (for functions that
                                            others captured by reference, e.g. Dynamo)
    replace_class(group, obj, cls)          obj.__class__ = cls
    uninstall(group), uninstall_all()       put the originals back, newest first
    installed()                             what is in place now, as "group: owner.name"

The groups and who installs them:

    hook          integration.install: Inductor's fx_codegen_and_compile and the FX graph
                  cache's writer (held while a backend() exists or enabled() is active)
    isolation     isolation.install: the FX-tracing flag's readers, preserve_rng_state,
                  rand_strided, the tracer's patcher (for threads of ours)
    kernel_reuse  kernel_reuse: AsyncCompile.triton, only while a graph loads
    config        private_config: private config views for threads of ours (torch < 2.13)
    triton_bundle triton_bundle.capture: TritonBundler.put, while a compile runs
    farm_worker   farm.actors.CompileWorker (a farm worker's process only): codecache.write
    virtual_gpu   virtual_gpu.installed: torch.cuda's queries, Dynamo's CudaInterface,
                  Triton's driver, CachingAutotuner.precompile (compile only), while a
                  worker without a GPU compiles a CUDA graph
    aot_cache     _compat._aot_seam: AOTAutograd's cache lookup, key and save, calling
                  fxoffload's observers (the deferred trace's wait, farm.graphs)

Changes scoped to one ``with`` block (``state.restored``, ``_compat.quiet_output_code``)
restore themselves and are not recorded here. ``fxoffload.shutdown()`` uninstalls every
group; leaving the last ``enabled()`` block uninstalls the hook unless a backend uses it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import CodeType
from typing import Any

_MISSING = object()
_lock = threading.RLock()
_groups: dict[str, dict[tuple[int, str], _Change]] = {}  # insertion order kept


@dataclass
class _Change:
    owner: Any
    name: str  # an attribute, "__code__" or "__class__"
    original: Any  # what owner.__dict__ held (_MISSING: inherited or absent)

    def undo(self) -> None:
        if self.name in ("__code__", "__class__"):
            setattr(self.owner, self.name, self.original)
        elif self.original is _MISSING:
            try:
                delattr(self.owner, self.name)
            except AttributeError:
                pass
        else:
            setattr(self.owner, self.name, self.original)

    def label(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) or getattr(
            self.owner, "__name__", None) or type(self.owner).__name__
        module = getattr(self.owner, "__module__", None)
        if isinstance(module, str) and not owner.startswith(module):
            owner = f"{module}.{owner}"
        return f"{owner}.{self.name}"


def _find(group: str, owner: Any, name: str) -> _Change | None:
    return _groups.get(group, {}).get((id(owner), name))


def _record(group: str, change: _Change) -> None:
    _groups.setdefault(group, {})[(id(change.owner), change.name)] = change


def replace(group: str, owner: Any, name: str, value: Any) -> None:
    """``owner.name = value``, remembered under ``group`` (the first original is kept
    when the same attribute is replaced again)."""
    with _lock:
        if _find(group, owner, name) is None:
            original = vars(owner).get(name, _MISSING) if hasattr(owner, "__dict__") \
                else getattr(owner, name, _MISSING)
            _record(group, _Change(owner, name, original))
        setattr(owner, name, value)


def replace_code(group: str, function: Any, code: CodeType) -> None:
    with _lock:
        if _find(group, function, "__code__") is None:
            _record(group, _Change(function, "__code__", function.__code__))
        function.__code__ = code


def replace_class(group: str, obj: Any, cls: type) -> None:
    with _lock:
        if _find(group, obj, "__class__") is None:
            _record(group, _Change(obj, "__class__", obj.__class__))
        obj.__class__ = cls


def is_installed(group: str) -> bool:
    with _lock:
        return bool(_groups.get(group))


def uninstall(group: str) -> None:
    with _lock:
        for change in reversed(list(_groups.pop(group, {}).values())):
            change.undo()


def uninstall_all() -> None:
    with _lock:
        for group in reversed(list(_groups)):
            uninstall(group)


def installed() -> list[str]:
    with _lock:
        return [f"{group}: {change.label()}"
                for group, changes in _groups.items() for change in changes.values()]
