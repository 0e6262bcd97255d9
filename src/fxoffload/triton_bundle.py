"""The Triton kernels a compile built, so that the FX graph cache entry written after a
background compile carries them, as a stock compile's entry does.

Stock Inductor notes each Triton kernel it loads during ``_compile_fx_inner``
(``TritonBundler.put``, process-global) and, when it writes the cache entry, bundles the
kernels' files from the Triton cache into it: a process on another machine, or with an
empty Triton cache, loads the entry without compiling a kernel. A background compile is
loaded after ``_compile_fx_inner`` returned, so stock bundles nothing for it.

    compile (worker, or our compile thread)          parent, when stage 0 arrives
      with capture() as kernels:  ->  response.triton_kernels  ->  bundle(kernels)
        Inductor's compile                                          graph._triton_bundle
                                                                    -> FX cache entry

``capture`` records ``TritonBundler.put`` on the calling thread (``patches`` group
"triton_bundle"); on a thread of ours it also keeps the kernels out of the process's
bundle: the user's thread may be inside a compile of its own. The kernels' files are read from the
parent's Triton cache, where the compile put them (a ``subprocess`` worker and
``async+serde`` share the parent's cache dirs; a farm response installs them there).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from . import isolation, patches

_local = threading.local()  # .kernels: the capture running on this thread
_lock = threading.Lock()
_users = 0  # captures running: the patch is in place only while one runs


@contextlib.contextmanager
def capture() -> Iterator[list[tuple[str, int]]]:
    """Within the block, the ``(kernel hash, device index)`` of each Triton kernel this
    thread loads goes to the yielded list (on a thread of ours, not to the process's
    bundle too)."""
    global _users
    with _lock:
        _users += 1
        if _users == 1:
            _install()
    outer = getattr(_local, "kernels", None)
    kernels: list[tuple[str, int]] = []
    _local.kernels = kernels
    try:
        yield kernels
    finally:
        _local.kernels = outer
        with _lock:
            _users -= 1
            if _users == 0:
                patches.uninstall("triton_bundle")


def _install() -> None:
    from torch._inductor.triton_bundler import TritonBundler

    original = TritonBundler.__dict__["put"].__func__

    def put(cls: Any, kernel_hash: str, device: int) -> None:
        kernels = getattr(_local, "kernels", None)
        if kernels is not None and (kernel_hash, device) not in kernels:
            kernels.append((kernel_hash, device))
        # A compile on the user's thread (sync serde, inside _compile_fx_inner) feeds
        # stock's bundle as well; one on a thread of ours must not: the user's thread
        # may be in a compile of its own.
        if kernels is None or not isolation.on_our_thread():
            original(cls, kernel_hash, device)

    patches.replace("triton_bundle", TritonBundler, "put", classmethod(put))


def bundle(kernels: list[tuple[str, int]]) -> Any:
    """A ``TritonBundle`` of ``kernels``' files in this process's Triton cache, as
    ``TritonBundler.collect`` makes it; None when bundling is off or nothing was found."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.runtime_utils import triton_cache_dir
    from torch._inductor.triton_bundler import (
        TritonBundle,
        TritonBundler,
        TritonKernelArtifact,
        TritonKernelArtifacts,
    )

    if not kernels or not TritonBundler.is_enabled():
        return None
    result = []
    for kernel_hash, device in kernels:
        path = os.path.join(triton_cache_dir(device), kernel_hash)
        if not os.path.isdir(path):
            continue
        artifacts = []
        for filename in sorted(os.listdir(path)):
            filepath = os.path.join(path, filename)
            if not os.path.isfile(filepath):
                continue
            with open(filepath, "rb") as f:
                payload = f.read()
            if filename.endswith(".json"):
                if TritonBundler._REPLACE_BYTES in payload:
                    return None  # as stock: such a payload cannot be relocated
                # Relocatable: the reader writes its own directory back in.
                payload = payload.replace(path.encode(), TritonBundler._REPLACE_BYTES)
            artifacts.append(TritonKernelArtifact(filename, payload))
            counters["inductor"]["triton_bundler_save_kernel"] += 1  # as stock counts
        if artifacts:
            result.append(TritonKernelArtifacts(kernel_hash, device, artifacts))
    return TritonBundle(result, []) if result else None
