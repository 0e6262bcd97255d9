"""serde's load takes the Triton kernels its in-process compile loaded (kernel_reuse).

The end-to-end check (every kernel of a CUDA graph reused, the FX cache entry still
bundling them) is in test_gpu.py; here, the hand-over itself, on any machine."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.runtime.triton_heuristics import CachingAutotuner

from fxoffload import kernel_reuse


def _compiled(source: str, **scope: Any) -> SimpleNamespace:
    """What a CompiledFxGraph looks like right after its compile: its source and the
    loaded module's ``call`` (whose globals hold the kernels)."""
    call = eval("lambda *args: None", scope)
    return SimpleNamespace(source_code=source, current_callable=call)


@pytest.fixture(autouse=True)
def _empty() -> Any:
    with kernel_reuse._lock:
        kernel_reuse._pending.clear()
    yield
    with kernel_reuse._lock:
        kernel_reuse._pending.clear()


def test_the_load_of_that_source_gets_each_kernel_once_by_name() -> None:
    original = AsyncCompile.triton
    kernel = object.__new__(CachingAutotuner)
    kernel_reuse.remember(_compiled("module source", triton_poi_0=kernel, buf0=3))
    assert kernel_reuse.pending() == 1
    with kernel_reuse.reusing("another source") as used:
        assert AsyncCompile.triton is original and used == {}
    with kernel_reuse.reusing("module source") as used:
        assert AsyncCompile.triton is not original
        assert AsyncCompile().triton("triton_poi_0", "kernel source") is kernel
        assert used == {"triton_poi_0": kernel}
    assert AsyncCompile.triton is original
    assert kernel_reuse.pending() == 0
    with kernel_reuse.reusing("module source") as used:  # handed over once only
        assert used == {} and AsyncCompile.triton is original


def test_only_the_loading_thread_gets_them() -> None:
    kernel = object.__new__(CachingAutotuner)
    kernel_reuse.remember(_compiled("src", triton_poi_0=kernel))
    elsewhere: list[Any] = []
    with kernel_reuse.reusing("src"):
        t = threading.Thread(target=lambda: elsewhere.append(kernel_reuse.take("triton_poi_0")))
        t.start()
        t.join()
        assert kernel_reuse.take("triton_red_1") is None
        assert kernel_reuse.take("triton_poi_0") is kernel
    assert elsewhere == [None]
    assert kernel_reuse.take("triton_poi_0") is None


def test_graphs_without_kernels_are_not_kept_and_old_ones_are_dropped() -> None:
    kernel_reuse.remember(_compiled("cpu module", kernel=print))  # no Triton kernel
    kernel_reuse.remember(SimpleNamespace(source_code="s", current_callable=None))
    assert kernel_reuse.pending() == 0
    for k in range(kernel_reuse._MAX_PENDING + 5):
        kernel_reuse.remember(_compiled(f"src {k}", t=object.__new__(CachingAutotuner)))
    assert kernel_reuse.pending() == kernel_reuse._MAX_PENDING
    with kernel_reuse.reusing("src 0") as used:
        assert used == {}
