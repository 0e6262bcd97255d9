"""What runs inside the child processes bench/farm.py starts: one rank (``child_main``)
and the farm's admin driver (``admin_main``), with the markers they print.

    python bench/farm.py --child '<json spec>'                    # one rank: run_ranks
    python bench/farm.py --admin clear|reset|stats --state-dir DIR  # Farm.admin

farm.py parses those (hidden) options and calls in here, so a child starts exactly like
the parent script (bench/ is on sys.path as the script's directory, whether it runs as
``python bench/farm.py`` or re-executed under ``unshare``).

A rank builds the model, calls ``torch.compile`` (with ``fxoffload.backend`` in the
fxoffload configs), prints ``READY_MARKER`` and waits for the common start, a
``time.monotonic`` timestamp the parent writes to its stdin; then runs one training step
(forward + backward), timed from that start (async+farm: then ``fxoffload.wait()`` and one
more step). Its CPU seconds are ``getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN)``
at READY and at exit, after ``fxoffload.shutdown()`` and Inductor's compile workers are
shut down (so its children are reaped). Whatever happens, its last line is
``RESULT_MARKER`` + one JSON object, with any error recorded there.

The admin driver connects to the farm as a Ray driver (as tests/farm_support.py does),
empties the store and/or zeroes the counters, and prints ``ADMIN_MARKER`` + the
registry's stats.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _farm_configs import FXO_MODE, REFERENCE, STOCK_CONFIGS

HERE = Path(__file__).resolve().parent
RESULT_MARKER = "FARM_BENCH_RESULT "
READY_MARKER = "FARM_BENCH_READY"
ADMIN_MARKER = "FARM_BENCH_ADMIN "


def _cpu_s(children_only: bool = False) -> float:
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    if children_only:  # Inductor's compile workers, g++, the ISA probes' loaders
        return kids.ru_utime + kids.ru_stime
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _child_step(model: Any, inputs: dict[str, Any]) -> Any:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out["loss"].backward()
    return out


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_run(spec: dict[str, Any], result: dict[str, Any]) -> None:
    config, device = spec["config"], spec["device"]
    import torch

    sys.path.insert(0, str(HERE))
    from _child import build_model  # the first-call benchmark's model factory

    result["torch_version"] = torch.__version__
    result["python"] = sys.version.split()[0]
    dtype = getattr(torch, spec["dtype"])
    model, make_inputs = build_model(spec["model"], spec["size"], device, dtype, True,
                                     seq=spec.get("seq"))
    result["input_shape"] = list(make_inputs()["input_ids"].shape)
    inputs = make_inputs()
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)

    fxo: Any = None
    if config in STOCK_CONFIGS:
        backend: Any = "inductor"
    elif config == REFERENCE:
        backend = "aot_eager"
    else:
        import fxoffload as fxo

        kwargs: dict[str, Any] = {"mode": FXO_MODE[config]}
        if config == "subprocess":
            kwargs["workers"] = 1
        backend = fxo.backend(**kwargs)  # farm modes join the farm's cluster here
    compiled = torch.compile(model, backend=backend)
    _sync(torch, device)

    # ---- ready: wait for the common start ----------------------------------------------
    result["cpu_ready_s"] = _cpu_s()
    print(READY_MARKER, flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        raise RuntimeError("the parent closed stdin before the start")
    t0 = float(line)
    result["release_lag_s"] = time.monotonic() - t0

    profile_dir = os.environ.get("FARM_BENCH_PROFILE")  # cProfile of the step (this thread)
    profiler: Any = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    _child_step(compiled, inputs)
    _sync(torch, device)
    result["first_output_s"] = time.monotonic() - t0
    if profiler is not None:
        profiler.disable()
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(profile_dir) / f"{config}-rank{spec['rank']}.prof"))
    if config == "async+farm":
        result["wait_ok"] = fxo.wait(timeout=spec["timeout"])
        _child_step(compiled, inputs)
        _sync(torch, device)
    result["compiled_s"] = time.monotonic() - t0
    # -------------------------------------------------------------------------------------

    from torch._dynamo.utils import counters

    result["fxgraph"] = {k: int(counters["inductor"][f"fxgraph_cache_{k}"])
                         for k in ("miss", "hit", "bypass")}
    result["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    with contextlib.suppress(Exception):  # where the rank's compile time went, per phase
        from torch._dynamo.utils import compile_times

        names, seconds = compile_times(repr="csv", aggregate=True)
        result["compile_times"] = dict(zip(names, seconds, strict=False))
    fx = sys.modules.get("torch._inductor.compile_fx")
    stats = getattr(getattr(fx, "FxCompile", None), "_compile_stats", None) or {}
    result["inductor_compiles_here"] = sum(
        int(getattr(v, "codegen_and_compile", 0)) for v in stats.values())
    if fxo is not None:
        snap = fxo.stats()
        result["graphs_offloaded"] = snap.graphs_offloaded
        result["fallbacks"] = dict(snap.fallbacks)
        result["compiled_in_process"] = dict(snap.compiled_in_process)
        result["fx_cache_hits"] = snap.fx_cache_hits
        result["farm"] = dict(snap.farm)
        result["background_compiles"] = snap.background_compiles
        result["farm_files_installed"] = getattr(snap, "farm_files_installed", None)
        result["fxoffload_s"] = {f: round(float(getattr(snap, f, 0.0) or 0.0), 3) for f in (
            "serialize_s", "transfer_s", "compile_s", "deserialize_s", "queue_wait_s",
            "trace_s")}


def _shutdown_child(result: dict[str, Any]) -> None:
    if "fxoffload" in sys.modules:
        try:
            sys.modules["fxoffload"].shutdown()
        except BaseException as e:  # noqa: BLE001 - recorded, the result still goes out
            result["shutdown_error"] = f"{type(e).__name__}: {e}"[:500]
    ac = sys.modules.get("torch._inductor.async_compile")
    if ac is not None:  # reap Inductor's compile workers: their CPU joins RUSAGE_CHILDREN
        with contextlib.suppress(Exception):
            ac.shutdown_compile_workers()


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result: dict[str, Any] = {"config": spec["config"], "model": spec["model"],
                              "rank": spec["rank"], "error": None}
    try:
        child_run(spec, result)
    except BaseException as e:  # noqa: BLE001 - record any failure
        import traceback

        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        _shutdown_child(result)
    result["cpu_exit_s"] = _cpu_s()
    result["cpu_children_s"] = _cpu_s(children_only=True)
    if result.get("cpu_ready_s") is not None:
        result["cpu_window_s"] = result["cpu_exit_s"] - result["cpu_ready_s"]
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# the farm admin driver


def admin_main(action: str, state_dir: Path) -> int:
    """Connect to the farm as a driver (as tests/farm_support.py does); ``clear``: empty
    the store and zero the counters; ``reset``: zero the counters; then print stats."""
    import ray

    from fxoffload import farm
    from fxoffload.farm.actors import NAMESPACE, REGISTRY_NAME

    state = farm.read_state(state_dir) or {}
    farm.connect(state["address"], state_dir)
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        if action == "clear":
            ray.get(registry.clear_store.remote(), timeout=60)
        if action in ("clear", "reset"):
            ray.get(registry.reset_stats.remote(), timeout=60)
        stats = ray.get(registry.stats.remote(), timeout=60)
    finally:
        with farm.preserved_process_state():
            ray.shutdown()
    print(ADMIN_MARKER + json.dumps(stats), flush=True)
    return 0
