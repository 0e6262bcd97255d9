"""Shared set-up: a private Inductor cache dir, caches off by default, one warm pool."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

# A cache dir of our own, removed when the session ends (one the caller set is kept).
# Each pytest-xdist process gets one of its own too: the processes inherit the
# controller's, and tests that look at the builds in the cache (test_soak's cut-off
# check, test_cut_builds, test_vec_isa) would otherwise see the other process's builds,
# some half written at that moment (the soak failed so in CI, twice).
_OWN_CACHE_DIR = None
_inherited = os.environ.get("FXOFFLOAD_TESTS_CACHE_DIR")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ or (
        _inherited and os.environ["TORCHINDUCTOR_CACHE_DIR"] == _inherited
        and os.environ.get("PYTEST_XDIST_WORKER")):
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="fxoffload-tests-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["FXOFFLOAD_TESTS_CACHE_DIR"] = \
        _OWN_CACHE_DIR

import pytest  # noqa: E402 - torch reads the cache dir above when imported
import torch  # noqa: E402

import fxoffload  # noqa: E402

MODES = ("serde", "capture", "subprocess")
POOL = {"workers": 1}  # one settings key, so every subprocess test shares one warm pool


def settings_for(mode: str, tmp_path: object = None, **extra: object) -> dict[str, object]:
    """Keywords for ``mode``. A subprocess pool is warmed up first: with no warm worker
    free, a compile runs in-process, synchronous or in the background
    (tests/test_cold_start.py)."""
    kw: dict[str, object] = {"mode": mode, **extra}
    if mode.rpartition("+")[2] == "subprocess":
        if mode == "subprocess":
            kw.update(POOL)
        from fxoffload.executors import get_executor

        get_executor(fxoffload.Settings.resolve(**kw)).warmup(wait=True)
    if mode == "capture":
        kw["capture_dir"] = tmp_path
    if mode.endswith("farm"):
        assert CURRENT_FARM is not None, "a farm test must request the `farm` fixture"
        for key, value in CURRENT_FARM.settings(mode=mode).items():
            kw.setdefault(key, value)  # what the test passed wins
    return kw


CURRENT_FARM = None  # set by tests that run a mode over the session's farm


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    torch._dynamo.reset()
    fxoffload.reset_stats()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_pools():
    yield
    fxoffload.shutdown()


# tryfirst: pytest-xdist reads the groups in its own hook of this name (into the node ids);
# run after it, as a conftest hook otherwise does, the groups were never applied.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n N --dist loadgroup`` (scripts/test.sh): a file's tests run in
    one process, as its module fixtures and warm pool expect; every test of the farm runs
    in one process too, so one Ray cluster is started, not one per process (the contract
    suite's farm cases among them: they ask for the farm fixture at run time). Under
    pytest-xdist the farm's group goes first: it is the longest (6.3 of 28 min of tests on
    2 cores, 2026-12-07), and a process that took it last would end minutes after the
    other."""
    in_farm: set[str] = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        mode = callspec.params.get("mode") if callspec is not None else None
        farm = ("farm" in getattr(item, "fixturenames", ())
                or item.path.name.startswith("test_farm")
                or (isinstance(mode, str) and mode.endswith("farm")))
        item.add_marker(pytest.mark.xdist_group("farm" if farm else item.path.name))
        if farm:
            in_farm.add(item.nodeid)
    if config.getoption("loadgroup", default=False):
        items.sort(key=lambda item: item.nodeid not in in_farm)  # stable: farm first


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail at once where pytest-xdist would ignore the groups above (it names a test's
    group in its node id): the run would still pass, with one farm per process. The
    reason goes to stderr too: the controller reports a worker's collection error only as
    its own failed assertion."""
    if session.config.getoption("loadgroup", default=False):
        ungrouped = [item.nodeid for item in session.items if "@" not in item.nodeid]
        if ungrouped:
            why = (f"pytest-xdist did not apply the test groups (e.g. {ungrouped[0]}): "
                   "this pytest and pytest-xdist do not work together (pyproject's pins)")
            print(f"conftest: {why}", file=sys.stderr, flush=True)
            raise pytest.UsageError(why)


def pytest_unconfigure(config: pytest.Config) -> None:
    # here, not in a session fixture: --collect-only runs no fixture and left the dir
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


_COUNTERS = re.compile(r"# AOT ID: \['\d+_")


def normalize_code(code: str) -> str:
    """Generated code up to per-process counters (AOT graph ids)."""
    return _COUNTERS.sub("# AOT ID: ['N_", code)


# A client's description of an H100 (virtual_gpu.describe's fields that Inductor reads):
# a process with no GPU compiles for it (test_virtual_gpu, test_device_index).
H100 = {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0,
        "multi_processor_count": 132, "total_memory": 85_028_765_696,
        "regs_per_multiprocessor": 65536, "max_threads_per_multi_processor": 2048,
        "warp_size": 32, "triton_max_shared_mem": 232448}


def assert_same_code(ours: list[str], stock: list[str]) -> None:
    """Equal up to per-process counters; on failure, show the first differing lines."""
    import difflib

    assert len(ours) == len(stock), f"{len(ours)} graphs of code, stock has {len(stock)}"
    for i, (o, s) in enumerate(zip(ours, stock, strict=True)):
        o, s = normalize_code(o), normalize_code(s)
        if o != s:
            diff = difflib.unified_diff(s.splitlines(), o.splitlines(), "stock", "fxoffload",
                                        lineterm="", n=1)
            raise AssertionError(f"graph {i}: code differs from stock:\n"
                                 + "\n".join(list(diff)[:80]))


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory):
    """One real farm (Ray head + 2 warm workers) for the session, started on first use."""
    import farm_support

    farm_support.require_farm_environment()
    started = farm_support.start(tmp_path_factory.mktemp("farm"))
    yield started
    farm_support.stop(started)
