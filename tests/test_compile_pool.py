"""Inductor's compile pool in this process: a farm client's loads run with one compile
thread (no pool started: a pool made by a load is not ready for it, and only costs CPU),
and a real compile inside (a fallback) gets the threads Inductor would have had. On the
GPU machine, tests/test_gpu.py checks which backends start the pool when made."""

from __future__ import annotations

import pytest
from torch._inductor import config
from torch._inductor.async_compile import get_compile_threads

from fxoffload import compile_pool


@pytest.fixture
def threads() -> int:
    with config.patch(compile_threads=6):
        yield get_compile_threads()


def test_loading_holds_threads_back_and_a_compile_inside_gets_them(threads: int) -> None:
    assert threads == 6
    with compile_pool.loading_only():
        assert get_compile_threads() == 1
        with compile_pool.compiling():
            assert get_compile_threads() == 6
            with compile_pool.compiling():  # nested: still the real ones
                assert get_compile_threads() == 6
        assert get_compile_threads() == 1
    assert get_compile_threads() == 6


def test_compiling_outside_a_load_changes_nothing(threads: int) -> None:
    with compile_pool.compiling():
        assert get_compile_threads() == 6


def test_nested_loading_keeps_the_outer_blocks_threads(threads: int) -> None:
    """A farm client's inner compile runs inside its backend call, both loading only: a
    fallback compile in there still gets Inductor's threads, not the outer block's 1."""
    with compile_pool.loading_only(), compile_pool.loading_only():
        assert get_compile_threads() == 1
        with compile_pool.compiling():
            assert get_compile_threads() == 6
    assert get_compile_threads() == 6


def test_only_a_farm_client_loads_without_the_pool(threads: int) -> None:
    import fxoffload

    with compile_pool.loading_only_for(fxoffload.Settings.resolve(mode="serde")):
        assert get_compile_threads() == 6
    farm = fxoffload.Settings.resolve(mode="farm", farm="127.0.0.1:1")
    with compile_pool.loading_only_for(farm):
        assert get_compile_threads() == 1
