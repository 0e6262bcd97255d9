"""A private view of torch's config for threads of ours that compile in this process (a
deferred trace's front thread), so their ``config.patch`` calls never touch the user's.

    snapshot = config_snapshot()        on the caller's thread, when the work moves
    with private_config(snapshot): ...  on our thread, around the compile

On torch 2.13 config patches are context variables: a copy of the caller's context is
private already, and both calls are no-ops. On 2.11-2.12 they are process-global; there
the entries' ``user_override`` becomes a property over a per-context overlay (below), put
in place through ``patches`` (group "config") and undone by ``uninstall_overlay``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

from . import patches


def config_is_context_local() -> bool:
    """Whether torch's config patches are context variables (2.13), so a thread of ours
    can compile under its own view of them just by running in a copy of the caller's
    context."""
    import contextvars

    from torch._inductor import config

    entry = next(iter(config._config.values()))
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


# Where torch's config is process-global (2.11: ``_ConfigEntry.user_override`` is a plain
# attribute, written by every ``config.patch``), a front thread's compile would patch and
# restore values under the user's feet: a ``config.patch`` on the user's thread that ends
# while the front thread's own patch of the same key is open is undone by the front
# thread's restore (measured on torch 2.11: a pass patched around a first call stayed in
# the config for every later compile). So there the entries' ``user_override`` becomes a
# property that reads and writes a private overlay on threads that run under one (our
# front threads), and the plain attribute everywhere else: the user's thread and torch's
# own threads see exactly what they saw before.
_overlay: Any = None  # ContextVar[dict[int, Any] | None], made on first use
_overlay_lock = threading.Lock()
_overlay_classes: dict[type, type] = {}
_MISSING = object()
_unset: Any = None  # torch's _UNSET_SENTINEL


def config_can_be_private() -> bool:
    """Whether a thread of ours can compile under a private view of torch's config:
    context-local config (2.13), or process-global config of the shape we can overlay."""
    if config_is_context_local():
        return True
    from torch.utils import _config_module as cm

    default = getattr(getattr(cm, "_ConfigEntry", None), "__dict__", {}).get("user_override")
    return (default is getattr(cm, "_UNSET_SENTINEL", _MISSING)
            and callable(getattr(getattr(cm, "ConfigModule", None), "get_hash", None)))


def config_snapshot() -> dict[int, Any] | None:
    """On the caller's thread, when a compile moves to a thread of ours: the config that
    thread is to see (None where a copy of the caller's context carries it)."""
    if config_is_context_local():
        return None
    from torch.utils import _config_module as cm

    unset = cm._UNSET_SENTINEL
    snapshot: dict[int, Any] = {}
    with _overlay_lock:
        _install_overlay(cm)
        for module in list(sys.modules.values()):
            if not isinstance(module, cm.ConfigModule):
                continue
            for entry in module._config.values():
                if type(entry) not in _overlay_classes.values():
                    base = type(entry)
                    if base not in _overlay_classes:
                        _overlay_classes[base] = type(f"Private{base.__name__}", (base,), {
                            "user_override": property(_read_override, _write_override),
                            "__module__": __name__})
                    patches.replace_class("config", entry, _overlay_classes[base])
                snapshot[id(entry)] = entry.__dict__.get("user_override", unset)
    return snapshot


@contextlib.contextmanager
def private_config(snapshot: dict[int, Any] | None) -> Iterator[None]:
    """On a thread of ours: config reads and writes (``config.patch`` included) go to a
    private copy of ``snapshot`` (no-op where config is context-local)."""
    if snapshot is None:
        yield
        return
    token = _overlay.set(dict(snapshot))
    try:
        yield
    finally:
        _overlay.reset(token)


def _read_override(entry: Any) -> Any:
    overlay = _overlay.get()
    if overlay is not None:
        value = overlay.get(id(entry), _MISSING)
        if value is not _MISSING:
            return value
    return entry.__dict__.get("user_override", _unset)


def _write_override(entry: Any, value: Any) -> None:
    overlay = _overlay.get()
    if overlay is not None:
        overlay[id(entry)] = value
    else:
        entry.__dict__["user_override"] = value


def _install_overlay(cm: Any) -> None:
    """The overlay's context variable (once), and ``get_hash`` that does not cache a hash
    of a private view in the module, where the user's thread would read it."""
    global _overlay, _unset
    if _overlay is None:
        import contextvars

        _unset = cm._UNSET_SENTINEL
        _overlay = contextvars.ContextVar("fxoffload_private_config", default=None)
    if patches.is_installed("config"):
        return
    import hashlib

    cached = cm.ConfigModule.get_hash

    def get_hash(self: Any) -> bytes:
        if _overlay.get() is None:
            return cached(self)
        values = self._get_dict(ignored_keys=list(self._compile_ignored_keys))
        return hashlib.md5(repr(sorted(values.items())).encode("utf-8"),
                           usedforsecurity=False).digest()

    patches.replace("config", cm.ConfigModule, "get_hash", get_hash)


def uninstall_overlay() -> None:
    """Config entries and ``get_hash`` back to torch's (``shutdown()``, when no thread of
    ours runs: see ``isolation.uninstall``)."""
    with _overlay_lock:
        patches.uninstall("config")
