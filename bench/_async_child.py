"""One repetition of one configuration of the async benchmark, in a fresh process
(started by bench/async_first.py).

    python bench/_async_child.py '<json spec>'

The parent has set up this process's environment (fresh cache directories,
TORCHINDUCTOR_FX_COMPILE_MODE for stock-async, FXOFFLOAD_TRACE when a trace is wanted):
they must be in place before torch is imported, which is why every sample is its own
process. Two kinds of sample:

- a model sample: the torch.compile'd model's first call (time to first output), then the
  same call again and again until one runs every graph compiled (time until compiled),
  then steady-state step times;
- a parallel sample: G independent small functions compiled with one backend, each called
  once, then the time until all G have arrived compiled.

Whatever happens, the last stdout line is ``RESULT_MARKER`` + one JSON object; a sample
that crashes records the error there instead of times.

Keep this file free of APIs newer than torch 2.11.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _child import _LogCounter, build_model  # the first-call benchmark's model factory

RESULT_MARKER = "ASYNC_FIRST_RESULT "

FXOFFLOAD = {  # config -> (mode, pre-warm the pool before the timer)
    "fxoffload-async": ("async+subprocess", True),
    "fxoffload-async-cold": ("async+subprocess", False),
    "fxoffload-progressive": ("progressive+subprocess", True),
    "fxoffload-async-serde": ("async+serde", False),  # compiled on a thread of this process
}

# ---------------------------------------------------------------------------------------


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model: Any, inputs: dict[str, Any], train: bool, torch: Any) -> Any:
    if train:
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out["loss"].backward()
        return out
    with torch.no_grad():
        return model(**inputs)


def _logits(out: Any) -> Any:
    return out["logits"]


class _Counters:
    """How many graph runs were eager (not yet compiled) so far, per config."""

    def __init__(self, config: str) -> None:
        self.config = config

    def eager_runs(self) -> int | None:
        if self.config.startswith("fxoffload"):
            import fxoffload

            return fxoffload.stats().eager_runs
        if self.config == "stock-async":
            mod = sys.modules.get("torch._inductor.compile_fx_async")
            cls = getattr(mod, "_AsyncFxCompile", None)
            return None if cls is None else int(cls._stat_eager_runs)
        return None

    def snapshot(self) -> dict[str, Any]:
        if self.config.startswith("fxoffload"):
            import fxoffload

            return _snap_dict(fxoffload.stats())
        if self.config == "stock-async":
            mod = sys.modules.get("torch._inductor.compile_fx_async")
            cls = getattr(mod, "_AsyncFxCompile", None)
            if cls is None:
                return {"module_imported": False}
            return {k.removeprefix("_stat_"): int(getattr(cls, k))
                    for k in ("_stat_bg_started", "_stat_bg_finished", "_stat_eager_runs",
                              "_stat_compiled_runs") if hasattr(cls, k)}
        return {}


def _snap_dict(snap: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: (dict(v) if isinstance(v, Mapping) else v)
            for f in dataclasses.fields(snap) for v in [getattr(snap, f.name)]}


class _CallLog:
    """Consecutive calls of the same kind merged into one span: (kind, start, end, n)."""

    def __init__(self) -> None:
        self.spans: list[list[Any]] = []

    def add(self, kind: str, start: float, end: float) -> None:
        if self.spans and self.spans[-1][0] == kind:
            self.spans[-1][2] = end
            self.spans[-1][3] += 1
        else:
            self.spans.append([kind, start, end, 1])


def _trace_calls(log: _CallLog, marks: dict[str, float]) -> None:
    """Add the benchmark's own rows (the model's calls, its marks) to FXOFFLOAD_TRACE."""
    if not os.environ.get("FXOFFLOAD_TRACE"):
        return
    from fxoffload import timeline

    tl = timeline.get()
    if tl is None:
        return
    for kind, start, end, n in log.spans:
        tl.span(f"{kind} call" + (f" x{n}" if n > 1 else ""), start, end, track=1,
                track_name="model calls", calls=n)
    for name, at in marks.items():
        tl.instant(name, at)
    tl.flush()


def _setup_backend(config: str, spec: dict[str, Any], result: dict[str, Any]) -> Any:
    if config == "eager":
        return "eager"  # Dynamo only: no AOTAutograd, no Inductor
    if config == "aot-eager":
        return "aot_eager"
    if config in ("stock-normal", "stock-async"):
        return "inductor"
    import fxoffload

    mode, warm = FXOFFLOAD[config]
    kwargs: dict[str, Any] = {"mode": mode}
    if spec.get("workers"):
        kwargs["workers"] = spec["workers"]
    t0 = time.perf_counter()
    backend = fxoffload.backend(**kwargs)  # starts the pool, without waiting
    result["workers"] = backend.settings.workers
    if warm:
        fxoffload.warmup(wait=True, **kwargs)
        result["warmup_s"] = time.perf_counter() - t0
    return backend


def _env_facts(torch: Any, spec: dict[str, Any], result: dict[str, Any]) -> None:
    result["torch_version"] = torch.__version__
    result["python"] = sys.version.split()[0]
    if spec["device"].startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name(0)
    else:
        import platform

        result["device_name"] = platform.processor() or platform.machine()
    result["cpu_count"] = os.cpu_count()


def _after(torch: Any, config: str, counter: _LogCounter, result: dict[str, Any]) -> None:
    fx = sys.modules.get("torch._inductor.compile_fx")
    mode_seen = getattr(fx, "fx_compile_mode", None)
    result["inductor_fx_compile_mode"] = getattr(mode_seen, "name", str(mode_seen))
    result["inductor_fx_compile_async"] = bool(getattr(fx, "fx_compile_async", False))
    stats = getattr(getattr(fx, "FxCompile", None), "_compile_stats", None) or {}
    result["stock_compile_stats"] = {
        getattr(k, "__name__", str(k)): int(getattr(v, "codegen_and_compile", 0))
        for k, v in stats.items()}
    result["unable_to_pickle"] = dict(counter.pickle_failures)
    try:
        from torch._dynamo.utils import counters

        result["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
        result["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    except Exception as e:  # noqa: BLE001 - informational only
        result["dynamo_counters_error"] = repr(e)
    if config.startswith("fxoffload"):
        import fxoffload

        snap = fxoffload.stats()
        result["fxoffload_stats"] = _snap_dict(snap)
        result["fallbacks"] = dict(snap.fallbacks)
        result["graphs_offloaded"] = snap.graphs_offloaded
        # Newer fields; getattr so that an older fxoffload still runs the benchmark.
        result["compiled_in_process"] = dict(getattr(snap, "compiled_in_process", {}) or {})
        result["fx_cache_hits"] = getattr(snap, "fx_cache_hits", None)
        result["aot_cache_hits"] = getattr(snap, "aot_cache_hits", None)
    elif config == "stock-async":
        snap = _Counters(config).snapshot()
        result["stock_async_stats"] = snap
        result["graphs_offloaded"] = snap.get("bg_finished")
        in_process = result["stock_compile_stats"].get("_InProcessFxCompile", 0)
        result["fallbacks"] = (
            {"unable_to_pickle": max(0, in_process - snap.get("bg_started", 0))}
            if in_process > snap.get("bg_started", 0) else {})


# ---------------------------------------------------------------------------------------


def run_model(spec: dict[str, Any], result: dict[str, Any]) -> None:
    config = spec["config"]
    device = spec["device"]
    train = spec["train"]
    counter = _LogCounter()
    counter.install()
    result["log_warnings"] = counter.messages

    import torch

    counter.install()
    _env_facts(torch, spec, result)
    dtype = getattr(torch, spec["dtype"])
    if spec["model"] == "breaks":
        from _async_models import build_breaks

        model, make_inputs = build_breaks(spec["size"], device, dtype, train,
                                          spec.get("batch"), spec.get("seq"))
    else:
        model, make_inputs = build_model(spec["model"], spec["size"], device, dtype, train,
                                         spec.get("batch"), spec.get("seq"))
    inputs = make_inputs()
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    result["input_shape"] = list(inputs["input_ids"].shape)

    backend = _setup_backend(config, spec, result)
    compiled = torch.compile(model, backend=backend)
    counters = _Counters(config)
    calls = _CallLog()
    marks: dict[str, float] = {}
    _sync(torch, device)

    # ---- time to first output ----------------------------------------------------
    t0 = time.perf_counter()
    first = _step(compiled, inputs, train, torch)
    _sync(torch, device)
    t1 = time.perf_counter()
    # ------------------------------------------------------------------------------
    result["first_output_s"] = t1 - t0
    calls.add("first", t0, t1)
    marks["first output"] = t1
    first_logits = _logits(first).detach().float().clone() if not train else None
    del first

    # fxoffload: when did every background compile arrive (fxoffload.wait())?
    waiter: threading.Thread | None = None
    if config.startswith("fxoffload"):
        import fxoffload

        def _wait() -> None:
            ok = fxoffload.wait(timeout=spec["compiled_cap_s"])
            at = time.perf_counter()
            result["wait_returned_s"] = at - t0 if ok else None
            marks["fxoffload.wait() returned" if ok else "fxoffload.wait() timed out"] = at

        waiter = threading.Thread(target=_wait, daemon=True)
        waiter.start()

    # ---- time until every graph runs compiled --------------------------------------
    # eager, aot-eager and stock-normal: the first call already ran every graph compiled
    # (or never compiles any: eager, aot-eager). Background configs: call again, back to
    # back with the same inputs, until a call runs no graph eagerly.
    before = counters.eager_runs()
    result["first_call_eager_runs"] = before
    n_calls = 1
    if before is None or before == 0:
        result["all_compiled_s"] = result["first_output_s"]
        result["compiled_outcome"] = ("nothing to compile"
                                      if config in ("eager", "aot-eager") else
                                      "no background compile: the first call ran compiled")
    else:
        poll = float(spec.get("poll_s") or 0.0)
        deadline = t0 + spec["compiled_cap_s"]
        result["all_compiled_s"] = None
        result["compiled_outcome"] = f"still running eagerly after {spec['compiled_cap_s']} s"
        eager_loop: list[float] = []
        while time.perf_counter() < deadline:
            if poll:
                time.sleep(poll)
            c0 = time.perf_counter()
            out = _step(compiled, inputs, train, torch)
            _sync(torch, device)
            c1 = time.perf_counter()
            n_calls += 1
            now = counters.eager_runs()
            eager = now != before
            calls.add("eager" if eager else "compiled", c0, c1)
            before = now
            if eager:
                eager_loop.append(c1 - c0)
            if not eager:
                # The first call that ran every graph compiled: it swapped the last
                # graph in (loading its compiled module on the caller's thread).
                result["first_compiled_call_s"] = c1 - c0
                result["all_compiled_s"] = c1 - t0
                result["compiled_outcome"] = "every graph ran compiled"
                marks["every graph compiled"] = c1
                break
            del out
    result["calls_until_compiled"] = n_calls
    if before is not None and before > 0 and eager_loop:
        # While compiles were pending: how long a call that still ran eagerly took.
        result["eager_phase_call_median_s"] = statistics.median(eager_loop)
        result["eager_phase_call_max_s"] = max(eager_loop)
    if before is not None and eager_loop:
        # The slowest call in the window: a call that swapped a graph in, or stalled.
        result["slowest_call_s"] = max([*eager_loop, result.get("first_compiled_call_s", 0.0)])
    if waiter is not None:
        waiter.join(timeout=max(1.0, spec["compiled_cap_s"] - (time.perf_counter() - t0)))

    # ---- steady state ---------------------------------------------------------------
    for _ in range(2):
        out = _step(compiled, inputs, train, torch)
    _sync(torch, device)
    steps = []
    s0 = time.perf_counter()
    for _ in range(spec["steady_iters"]):
        c0 = time.perf_counter()
        out = _step(compiled, inputs, train, torch)
        _sync(torch, device)
        steps.append(time.perf_counter() - c0)
    result["steady_step_s"] = statistics.median(steps)
    result["steady_step_min_s"] = min(steps)
    if len(steps) >= 2:  # the spread the parent reports beside the medians' ratio
        q = statistics.quantiles(steps, n=20, method="inclusive")  # 5 %, 10 %, ... 95 %
        for pct, value in (("p10", q[1]), ("p25", q[4]), ("p75", q[14]), ("p90", q[17])):
            result[f"steady_step_{pct}_s"] = value
    result["steady_steps_s"] = steps
    calls.add("steady", s0, time.perf_counter())
    last_logits = _logits(out).detach().float() if not train else None
    _after(torch, config, counter, result)
    result["counters_after"] = counters.snapshot()
    _trace_calls(calls, marks)
    result["call_spans"] = [[k, round(s - t0, 4), round(e - t0, 4), n]
                            for k, s, e, n in calls.spans]

    # ---- references -------------------------------------------------------------------
    _step(model, inputs, train, torch)
    _sync(torch, device)
    eager_steps = []
    for _ in range(max(3, spec["steady_iters"] // 4)):
        c0 = time.perf_counter()
        ref = _step(model, inputs, train, torch)
        _sync(torch, device)
        eager_steps.append(time.perf_counter() - c0)
    result["eager_step_s"] = statistics.median(eager_steps)
    if not train:
        ref_logits = _logits(ref).float()
        result["max_abs_diff_first_vs_eager"] = float((first_logits - ref_logits).abs().max())
        result["max_abs_diff_compiled_vs_eager"] = float(
            (last_logits - ref_logits).abs().max())


def run_parallel(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """G independent graphs, each called once, then wait until all have arrived."""
    config = spec["config"]
    device = spec["device"]
    g = spec["parallel_graphs"]
    counter = _LogCounter()
    counter.install()
    result["log_warnings"] = counter.messages
    import torch

    counter.install()
    _env_facts(torch, spec, result)
    dtype = getattr(torch, spec["dtype"])
    from _async_models import build_parallel

    blocks, x = build_parallel(g, spec["size"], device, dtype)
    backend = _setup_backend(config, spec, result)
    fns = [torch.compile(b, backend=backend) for b in blocks]
    _sync(torch, device)

    marks: dict[str, float] = {}
    calls = _CallLog()
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, f in enumerate(fns):
            c0 = time.perf_counter()
            f(x)
            _sync(torch, device)
            calls.add(f"first call {k}", c0, time.perf_counter())
        t_called = time.perf_counter()
        marks[f"{g} graphs called once"] = t_called
        result["all_called_once_s"] = t_called - t0
        if config.startswith("fxoffload"):
            import fxoffload

            ok = fxoffload.wait(timeout=spec["compiled_cap_s"])
            t_arrived = time.perf_counter()
            marks["fxoffload.wait() returned"] = t_arrived
            result["wait_returned_s"] = (t_arrived - t0) if ok else None
            before = fxoffload.stats().compiled_runs
            c0 = time.perf_counter()
            for f in fns:
                f(x)
            _sync(torch, device)
            t_done = time.perf_counter()
            calls.add("compiled call", c0, t_done)
            result["second_calls_compiled"] = fxoffload.stats().compiled_runs - before
        else:
            t_done = t_called
    marks["all compiled"] = t_done
    result["all_compiled_s"] = t_done - t0
    _after(torch, config, counter, result)

    if config.startswith("fxoffload"):
        # Per-graph compile times and submission times, from the trace.
        from fxoffload import timeline

        _trace_calls(calls, marks)
        path = os.environ.get("FXOFFLOAD_TRACE")
        events = json.loads(Path(path).read_text())["traceEvents"] if path else []
        epoch = timeline._EPOCH
        compiles = [e for e in events if e.get("ph") == "X"
                    and e["name"].startswith("compile graph")]
        queues = [e for e in events if e.get("ph") == "X"
                  and e["name"].startswith("queue graph")]
        result["per_graph_compile_s"] = [round(e["dur"] / 1e6, 4) for e in compiles]
        result["compile_workers"] = sorted({e["tid"] for e in compiles})
        if queues and compiles:
            first_submit = min(e["ts"] for e in queues) / 1e6 + epoch
            last_end = max((e["ts"] + e["dur"]) for e in compiles) / 1e6 + epoch
            result["first_submit_s"] = first_submit - t0
            result["compile_window_s"] = last_end - first_submit
            if result.get("wait_returned_s") is not None:
                result["submit_to_arrived_s"] = t_arrived - first_submit
        sum_s = sum(result["per_graph_compile_s"])
        n = result.get("workers") or 1
        result["sum_compile_s"] = sum_s
        result["bound_s"] = 1.25 * sum_s / min(n, g)


def main() -> int:
    spec = json.loads(sys.argv[1])
    result: dict[str, Any] = {
        "config": spec["config"], "model": spec["model"], "rep": spec.get("rep"),
        "workers": spec.get("workers"), "first_output_s": None, "all_compiled_s": None,
        "steady_step_s": None, "warmup_s": None, "fallbacks": {}, "error": None,
    }
    t_start = time.perf_counter()
    try:
        if spec["model"] == "parallel":
            run_parallel(spec, result)
        else:
            run_model(spec, result)
    except BaseException as e:  # noqa: BLE001 - record any failure; the run goes on
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if "fxoffload" in sys.modules:
            try:
                sys.modules["fxoffload"].shutdown()
            except BaseException as e:  # noqa: BLE001
                result["shutdown_error"] = f"{type(e).__name__}: {e}"[:500]
    result["child_total_s"] = time.perf_counter() - t_start
    if "log_warnings" in result:
        result["log_warnings"] = dict(result["log_warnings"])
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
