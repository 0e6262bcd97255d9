"""Async-compile benchmark: time to first output, time until every graph runs compiled,
and steady-state step time, for fxoffload's ``async+subprocess`` mode against the
``eager`` backend (the floor: Dynamo only, no AOTAutograd), ``aot_eager`` (no Inductor),
stock Inductor (NORMAL) and stock PyTorch's own ``ASYNC+SUBPROCESS`` mode, all in the same
run; plus a "parallel" case (G independent graphs compiled on N workers).

Every sample is a fresh Python process (bench/_async_child.py) with fresh, empty
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR. Configurations are interleaved within each
repetition, their order rotated from one repetition to the next.

    python bench/async_first.py --models gpt2 --reps 1 \\
        --configs eager,stock-normal,fxoffload-async-cold               # CPU smoke run
    python bench/async_first.py --models gpt2,bert,llama,breaks --parallel 4 \\
        --parallel-workers 2 --trace-dir bench/results/traces --out bench/results/async_cpu

See bench/README.md ("Async compile").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_async_child.py"
RESULT_MARKER = "ASYNC_FIRST_RESULT "  # keep in step with _async_child.py

CONFIGS = ("eager", "aot-eager", "stock-normal", "stock-async", "fxoffload-async",
           "fxoffload-async-cold", "fxoffload-progressive", "fxoffload-async-serde")
DEFAULT_CONFIGS = CONFIGS[:6]  # all but fxoffload-progressive
MODELS = ("gpt2", "bert", "llama", "breaks")
FLOOR = "eager"  # the first-output target's floor: Dynamo only, no AOTAutograd
AOT_FLOOR = "aot-eager"  # the earlier floor, still reported
BASELINE = "stock-normal"
PARALLEL_CONFIGS = ("stock-normal", "fxoffload-async")

# Targets of the issue (reported, not asserted), for every fxoffload config; the issue's
# own is fxoffload-async-cold (async+subprocess, cold pool, no warmup()).
TARGET_FIRST_OUTPUT = 1.3  # first output <= 1.3 x the eager backend's first call
TARGET_COMPILED = 1.0  # until every graph runs compiled <= 1.0 x stock-normal's first call
TARGET_STEADY = 1.0  # median step / stock-normal's median step: 1.0 within noise (below)
TARGET_PARALLEL = 1.25  # G graphs on N workers within 1.25 x sum(compile) / min(N, G)


def _csv(allowed: tuple[str, ...], allow_none: bool = False) -> Any:
    def parse(text: str) -> list[str]:
        if allow_none and text.strip() == "none":
            return []
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated)"
                + (" or none" if allow_none else ""))
        return list(dict.fromkeys(items))

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(MODELS, allow_none=True), default=list(MODELS),
                   help="comma-separated subset of gpt2,bert,llama,breaks, or none "
                        "(default: all)")
    p.add_argument("--configs", type=_csv(CONFIGS), default=list(DEFAULT_CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: all but "
                        "fxoffload-progressive)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--train", action="store_true",
                   help="training steps (forward+backward) instead of inference forwards")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny",
                   help="tiny: the test-suite models; bench: GPT-2 small / BERT-base / "
                        "0.2B Llama at batch 8, seq 512 (see bench/README.md)")
    p.add_argument("--batch", type=int, default=None, help="override the size's batch")
    p.add_argument("--seq", type=int, default=None, help="override the size's sequence")
    p.add_argument("--reps", type=int, default=3, help="fresh processes per config")
    p.add_argument("--workers", type=int, default=None,
                   help="fxoffload pool size for the model samples (default: fxoffload's)")
    p.add_argument("--parallel", type=int, default=0, metavar="G",
                   help="also run the parallel case: G independent graphs (default 0: off)")
    p.add_argument("--parallel-workers", type=_ints, default=[2], metavar="N[,N...]",
                   help="fxoffload pool sizes for the parallel case (default 2)")
    p.add_argument("--steady-iters", type=int, default=100,
                   help="timed calls for the steady-state step time (median, p10-p90)")
    p.add_argument("--poll", type=float, default=0.0,
                   help="seconds to sleep between the calls that wait for compiled code "
                        "(default 0: back to back, like a training loop)")
    p.add_argument("--compiled-cap", type=float, default=None,
                   help="seconds after the first call's start to give up waiting for "
                        "compiled code (default: --timeout minus 60 s, at least 30 s)")
    p.add_argument("--disable-caches", action="store_true",
                   help="TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for every config, not only "
                        "stock-async (which needs it)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before one child is killed and recorded as an error")
    p.add_argument("--deadline", type=float, default=None,
                   help="start no new child after this many seconds (from the start, "
                        "priming included); report what ran")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="save the FXOFFLOAD_TRACE of each model's first fxoffload-async "
                        "(and -cold, -progressive) sample and of the parallel case here, "
                        "each with its timeline plot (bench/plot_timeline.py)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the children")
    p.add_argument("--out", type=Path, default=None,
                   help="write PATH.json (all raw samples) and PATH.md (the tables), "
                        "rewritten after every sample")
    p.add_argument("--no-prime", action="store_true",
                   help="skip the untimed throw-away compile that warms the OS page cache")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="run nothing: print the tables of an earlier run's PATH.json "
                        "(and rewrite them with --out)")
    args = p.parse_args(argv)
    if args.report is not None:
        return args
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.steady_iters < 2:
        p.error("--steady-iters must be at least 2")
    if not args.models and not args.parallel:
        p.error("nothing to run: --models none and no --parallel")
    if args.compiled_cap is None:
        args.compiled_cap = max(30.0, args.timeout - 60.0)
    return args


# ---------------------------------------------------------------------------------------
# running children


def child_env(args: argparse.Namespace, config: str, cache_root: Path,
              trace: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("TORCHINDUCTOR_FX_COMPILE_MODE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
                "FXOFFLOAD_TRACE"):
        env.pop(var, None)
    if config == "stock-async":
        env["TORCHINDUCTOR_FX_COMPILE_MODE"] = "ASYNC+SUBPROCESS"
    if config == "stock-async" or args.disable_caches:
        # Stock async fails on a graph it can send ("NotImplementedError:
        # _AsyncOutputCode" from set_triton_bundle) unless the caches are off.
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache_root / "triton")
    if trace is not None:
        env["FXOFFLOAD_TRACE"] = str(trace)
    # The child runs in its cache directory: make PYTHONPATH entries (PYTHONPATH=src)
    # absolute, and run from source if fxoffload is not installed in this interpreter.
    path = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    src = HERE.parent / "src"
    if importlib.util.find_spec("fxoffload") is None and (src / "fxoffload").is_dir():
        path.insert(0, str(src))
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # The child runs in its own session: its group holds the workers it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_child(args: argparse.Namespace, config: str, model: str, rep: int,
              workers: int | None, keep_trace: Path | None) -> dict[str, Any]:
    spec = {"config": config, "model": model, "rep": rep, "device": args.device,
            "dtype": args.dtype, "train": args.train and model != "parallel",
            "size": args.size, "batch": args.batch, "seq": args.seq, "workers": workers,
            "parallel_graphs": args.parallel, "steady_iters": args.steady_iters,
            "poll_s": args.poll, "compiled_cap_s": args.compiled_cap}
    cache_root = Path(tempfile.mkdtemp(prefix="fxoffload-async-bench-"))
    trace = None
    if config.startswith("fxoffload") and (keep_trace is not None or model == "parallel"):
        trace = cache_root / "trace.json"
    env = child_env(args, config, cache_root, trace)
    t0 = time.perf_counter()
    stdout = stderr = ""
    rc: int | None = None
    timed_out = False
    try:
        proc = subprocess.Popen([args.python, str(CHILD), json.dumps(spec)], env=env,
                                cwd=cache_root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            stdout, stderr = proc.communicate()
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        rc = proc.returncode
        _kill_group(proc)
        if keep_trace is not None and trace is not None and trace.exists():
            keep_trace.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trace, keep_trace)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    wall = time.perf_counter() - t0

    sample: dict[str, Any] | None = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            with contextlib.suppress(ValueError):
                sample = json.loads(line[len(RESULT_MARKER):])
            break
    if sample is None:
        why = (f"timed out after {args.timeout:g} s" if timed_out
               else f"child exited with status {rc} without a result")
        sample = {"config": config, "model": model, "rep": rep, "workers": workers,
                  "first_output_s": None, "all_compiled_s": None, "steady_step_s": None,
                  "warmup_s": None, "fallbacks": {}, "error": why}
    elif timed_out:
        sample["error"] = sample.get("error") or f"timed out after {args.timeout:g} s"
    sample["workers_requested"] = workers
    sample["caches"] = ("disabled" if env.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1"
                        else "empty")
    sample["child_rc"] = rc
    sample["child_wall_s"] = wall
    sample["stderr_tail"] = stderr[-2000:]
    if keep_trace is not None and keep_trace.exists():
        sample["trace"] = str(keep_trace)
    return sample


PRIME_CODE = """
import sys, torch, transformers
device = sys.argv[1]
f = torch.compile(lambda x: (x.sin() + 1).softmax(-1) @ x.T)
f(torch.randn(8, 8, device=device))
"""


def prime(args: argparse.Namespace) -> None:
    """One untimed, throw-away compile in its own process, so the first sample does not
    also pay for reading torch, transformers and the compiler toolchain from disk."""
    cache_root = Path(tempfile.mkdtemp(prefix="fxoffload-async-bench-prime-"))
    try:
        subprocess.run([args.python, "-c", PRIME_CODE, args.device],
                       env=child_env(args, "stock-normal", cache_root, None), cwd=cache_root,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=900,
                       check=False)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"priming failed (ignored): {e}", file=sys.stderr)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# summarising


def _med(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


_PCT = {"p10": 1, "p25": 4, "p75": 14, "p90": 17}  # index into 5 % quantiles


def _steady_pct(sample: dict[str, Any], q: str) -> float | None:
    """A sample's steady step-time percentile: as the child recorded it, else (runs
    before it did) from its recorded steps."""
    value = sample.get(f"steady_step_{q}_s")
    steps = sample.get("steady_steps_s") or []
    if value is None and len(steps) >= 2:
        value = statistics.quantiles(steps, n=20, method="inclusive")[_PCT[q]]
    return value


def _stock_async_outcome(s: dict[str, Any]) -> str:
    st = s.get("stock_async_stats") or {}
    graphs = s.get("dynamo_unique_graphs")
    started = st.get("bg_started", 0)
    in_proc = (s.get("stock_compile_stats") or {}).get("_InProcessFxCompile")
    text = (f"{started} of {in_proc} graph compiles also sent to the subprocess"
            if in_proc is not None else f"{started} sent to the subprocess")
    if graphs is not None:
        text += f" ({graphs} Dynamo graphs)"
    if s.get("unable_to_pickle"):
        why = ", ".join(sorted(
            w.removeprefix("BypassFxGraphCache: ").removeprefix(
                "Unable to pickle non-standard op: ") for w in s["unable_to_pickle"]))
        text += f"; unable to pickle: {why[:300]}"
    text += f"; {s.get('compiled_outcome')}"
    if s.get("calls_until_compiled"):
        text += f" after {s['calls_until_compiled']} call(s)"
    return text


def summarise(samples: list[dict[str, Any]], configs: list[str],
              models: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        mine = [s for s in samples if s["model"] == model]
        rows = []
        for config in configs:
            these = [s for s in mine if s["config"] == config]
            if not these:
                continue
            ok = [s for s in these if not s.get("error") and s.get("first_output_s") is not None]
            fallbacks: dict[str, int] = {}
            for s in ok:
                for reason, n in (s.get("fallbacks") or {}).items():
                    fallbacks[reason] = fallbacks.get(reason, 0) + int(n)
            in_process: dict[str, int] = {}
            for s in ok:
                for reason, n in (s.get("compiled_in_process") or {}).items():
                    in_process[reason] = in_process.get(reason, 0) + int(n)
            compiled = [s["all_compiled_s"] for s in ok if s.get("all_compiled_s") is not None]
            row: dict[str, Any] = {
                "config": config, "n": len(these), "ok": len(ok),
                "first_output_s": _med([s["first_output_s"] for s in ok]),
                "first_output_min_max": ([min(s["first_output_s"] for s in ok),
                                          max(s["first_output_s"] for s in ok)] if ok else None),
                "all_compiled_s": _med(compiled),
                "all_compiled_min_max": [min(compiled), max(compiled)] if compiled else None,
                "compiled_reps": len(compiled),
                "wait_returned_s": _med([s.get("wait_returned_s") for s in ok]),
                "steady_step_s": _med([s.get("steady_step_s") for s in ok]),
                "steady_step_min_s": _med([s.get("steady_step_min_s") for s in ok]),
                # Each sample's step-time percentiles (over --steady-iters calls), then
                # the median of each over the reps.
                **{f"steady_step_{q}_s": _med([_steady_pct(s, q) for s in ok])
                   for q in _PCT},
                "steady_iters": _med([len(s["steady_steps_s"]) for s in ok
                                      if s.get("steady_steps_s")]),
                "eager_step_s": _med([s.get("eager_step_s") for s in ok]),
                "eager_phase_call_s": _med([s.get("eager_phase_call_median_s") for s in ok]),
                "first_compiled_call_s": _med([s.get("first_compiled_call_s") for s in ok]),
                "slowest_call_s": _med([s.get("slowest_call_s") for s in ok]),
                "calls_until_compiled": _med([s.get("calls_until_compiled") for s in ok]),
                "warmup_s": _med([s.get("warmup_s") for s in ok]),
                "workers": sorted({s.get("workers") for s in ok} - {None}),
                "graphs": sorted({s.get("dynamo_unique_graphs") for s in ok} - {None}),
                "background": sorted({(s.get("fxoffload_stats") or {}).get(
                    "background_compiles", (s.get("stock_async_stats") or {}).get(
                        "bg_started")) for s in ok} - {None}),
                "fallbacks": fallbacks,
                "compiled_in_process": in_process,
                "outcomes": sorted({_stock_async_outcome(s) for s in ok})
                if config == "stock-async" else [],
                "errors": [f"rep {s.get('rep')}: {s.get('error')}" for s in these
                           if s.get("error")],
            }
            rows.append(row)
        by = {r["config"]: r for r in rows}
        eager = by.get(FLOOR, {}).get("first_output_s")
        aot = by.get(AOT_FLOOR, {}).get("first_output_s")
        base = by.get(BASELINE, {})
        # stock-normal's own spread: its p90 step over its median step.
        noise = _ratio(base.get("steady_step_p90_s"), base.get("steady_step_s"))
        for r in rows:
            r["first_output_vs_eager"] = _ratio(r["first_output_s"], eager)
            r["first_output_vs_aot_eager"] = _ratio(r["first_output_s"], aot)
            # Before the eager config existed the floor was aot-eager: same meaning kept.
            r["first_output_vs_floor"] = r["first_output_vs_aot_eager"]
            r["first_output_vs_stock"] = _ratio(r["first_output_s"], base.get("first_output_s"))
            r["compiled_vs_stock"] = _ratio(r["all_compiled_s"], base.get("first_output_s"))
            r["steady_vs_stock"] = _ratio(r["steady_step_s"], base.get("steady_step_s"))
            r["steady_p10_vs_stock"] = _ratio(r["steady_step_p10_s"],
                                              base.get("steady_step_p10_s"))
            r["steady_p90_vs_stock"] = _ratio(r["steady_step_p90_s"],
                                              base.get("steady_step_p90_s"))
            r["stock_steady_p90_over_median"] = noise
        out[model] = rows
    return out


def summarise_parallel(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mine = [s for s in samples if s["model"] == "parallel"]
    keys = sorted({(s["config"], s.get("workers_requested") or 0) for s in mine},
                  key=lambda k: (k[0] != "stock-normal", k[1]))
    rows = []
    for config, workers in keys:
        these = [s for s in mine if s["config"] == config
                 and (s.get("workers_requested") or 0) == workers]
        ok = [s for s in these if not s.get("error") and s.get("all_compiled_s") is not None]
        per_graph = [s.get("per_graph_compile_s") for s in ok if s.get("per_graph_compile_s")]
        row = {
            "config": config, "workers": workers or None, "n": len(these), "ok": len(ok),
            "all_called_once_s": _med([s.get("all_called_once_s") for s in ok]),
            "all_compiled_s": _med([s.get("all_compiled_s") for s in ok]),
            "submit_to_arrived_s": _med([s.get("submit_to_arrived_s") for s in ok]),
            "sum_compile_s": _med([s.get("sum_compile_s") for s in ok]),
            "bound_s": _med([s.get("bound_s") for s in ok]),
            "per_graph_compile_s": per_graph,
            "compile_workers_used": sorted({len(s.get("compile_workers") or []) for s in ok}),
            "warmup_s": _med([s.get("warmup_s") for s in ok]),
            "fallbacks": {k: sum(int((s.get("fallbacks") or {}).get(k, 0)) for s in ok)
                          for k in {k for s in ok for k in (s.get("fallbacks") or {})}},
            "errors": [f"rep {s.get('rep')}: {s.get('error')}" for s in these
                       if s.get("error")],
        }
        # Per rep: the compile window against that rep's own bound.
        met = [s["submit_to_arrived_s"] <= s["bound_s"] for s in ok
               if s.get("submit_to_arrived_s") is not None and s.get("bound_s")]
        row["within_bound_reps"] = f"{sum(met)}/{len(met)}" if met else None
        rows.append(row)
    return rows


def _target(model: str, config: str, reps: int, target: str, value: float,
            limit: float, measured: str, met: bool) -> dict[str, Any]:
    return {"model": model, "config": config, "reps": reps, "target": target,
            "value": value, "limit": limit, "measured": measured, "met": met}


def targets(summary: dict[str, list[dict[str, Any]]],
            parallel: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, per model and fxoffload config: the measured median (a ratio
    of medians over fresh processes), the limit, met or not."""
    out = []
    for model, rows in summary.items():
        by = {r["config"]: r for r in rows}
        eager = by.get(FLOOR, {})
        aot = by.get(AOT_FLOOR, {})
        base = by.get(BASELINE, {})
        for r in rows:
            config = r["config"]
            if not config.startswith("fxoffload"):
                continue
            n = r["ok"]
            v = r["first_output_vs_eager"]
            if v is not None:
                out.append(_target(
                    model, config, n, f"first output <= {TARGET_FIRST_OUTPUT}x eager", v,
                    TARGET_FIRST_OUTPUT, f"{v:.2f}x ({r['first_output_s']:.2f} s / "
                    f"{eager['first_output_s']:.2f} s)", v <= TARGET_FIRST_OUTPUT))
            elif r["first_output_vs_aot_eager"] is not None:  # an old run without eager
                v = r["first_output_vs_aot_eager"]
                out.append(_target(
                    model, config, n, f"first output <= {TARGET_FIRST_OUTPUT}x aot-eager "
                    "(eager not run)", v, TARGET_FIRST_OUTPUT,
                    f"{v:.2f}x ({r['first_output_s']:.2f} s / {aot['first_output_s']:.2f} s)",
                    v <= TARGET_FIRST_OUTPUT))
            v = r["compiled_vs_stock"]
            if v is not None:
                out.append(_target(
                    model, config, n, f"until compiled <= {TARGET_COMPILED}x stock-normal "
                    "first call", v, TARGET_COMPILED, f"{v:.2f}x ({r['all_compiled_s']:.2f} s"
                    f" / {base['first_output_s']:.2f} s)", v <= TARGET_COMPILED))
            v = r["steady_vs_stock"]
            if v is not None:
                # "Within noise": at most stock-normal's own p90 step over its median step.
                noise = r["stock_steady_p90_over_median"]
                limit = max(TARGET_STEADY, noise or TARGET_STEADY)
                band = (f"<= stock's p90/median, {noise:.2f}x" if noise is not None
                        else "stock's spread not recorded")
                spread = (f"; p10 {r['steady_p10_vs_stock']:.2f}x, p90 "
                          f"{r['steady_p90_vs_stock']:.2f}x"
                          if r["steady_p10_vs_stock"] is not None
                          and r["steady_p90_vs_stock"] is not None else "")
                out.append(_target(
                    model, config, n, f"steady step = stock-normal within noise ({band})",
                    v, limit,
                    f"{v:.2f}x ({_ms(r['steady_step_s'])} / {_ms(base['steady_step_s'])} ms"
                    f"{spread})", v <= limit))
    for r in parallel:
        if r["config"] != "stock-normal" and r["submit_to_arrived_s"] is not None \
                and r["bound_s"]:
            value = r["submit_to_arrived_s"] / r["bound_s"]
            out.append(_target(
                "parallel", f"{r['config']} N={r['workers']}", r["ok"],
                f"all compiled <= {TARGET_PARALLEL} x sum(compile)/min(N,G)", value, 1.0,
                f"{value:.2f}x of the bound ({r['submit_to_arrived_s']:.2f} s / "
                f"{r['bound_s']:.2f} s)", value <= 1.0))
    return out


def markdown(summary: dict[str, list[dict[str, Any]]], parallel: list[dict[str, Any]],
             meta: dict[str, Any]) -> str:
    a = meta["args"]
    what = "training step (fwd+bwd)" if a["train"] else "inference forward"
    lines = [
        "# Async compile: first output, until compiled, steady state",
        "",
        f"- {meta['when']}; torch {meta.get('torch_version', '?')}, Python "
        f"{meta.get('child_python', '?')}, {meta.get('device_name', '?')} "
        f"({meta['host_cpus']} CPUs, load average at start {meta.get('loadavg_start')})",
        f"- device {a['device']}, dtype {a['dtype']}, size {a['size']}, {what}, "
        f"{a['reps']} rep(s); fxoffload workers {meta.get('fxoffload_workers') or 'default'}",
        "- every sample: a fresh process, empty TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR; "
        + ("caches force-disabled for every config" if a["disable_caches"]
           else "caches force-disabled only for stock-async (it needs that)"),
        "- first output: the first call (Dynamo + AOT + whatever compiles before it "
        "returns + the run); eager: backend \"eager\" (Dynamo only), the first-output "
        "floor; until compiled: from the first call's start to the end of "
        "the first call that ran every graph compiled (calls back to back); wait(): when "
        "fxoffload.wait() returned (all compiles arrived); steady: median of "
        f"{a['steady_iters']} calls after that (steady min: the fastest of them; p10/p90: "
        "the ratios of those percentiles to stock-normal's; all medians over reps). "
        "Ratios: medians over medians.",
        "",
    ]
    for model, rows in summary.items():
        lines += [
            f"## {model}",
            "",
            "| config | first output (s) | x eager | x aot-eager | x stock-normal "
            "| until compiled (s) | x stock-normal first call | wait() (s) | steady step (ms) "
            "| x stock steady | p10 / p90 x stock | steady min (ms) | warm-up (s) "
            "| graphs (bg) | fallbacks | compiled in-process | ok |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
            "---:|",
        ]
        for r in rows:
            fb = ", ".join(f"{k} x{v}" for k, v in sorted(r["fallbacks"].items())) or "none"
            graphs = "/".join(map(str, r["graphs"])) or "-"
            bg = "/".join(map(str, r["background"]))
            if bg:
                graphs += f" ({bg})"
            in_proc = ", ".join(f"{k} x{v}" for k, v in sorted(
                (r.get("compiled_in_process") or {}).items())) or "-"
            spread = (f"{_fmt(r.get('steady_p10_vs_stock'))} / "
                      f"{_fmt(r.get('steady_p90_vs_stock'))}"
                      if r.get("steady_p10_vs_stock") is not None else "-")
            compiled = _fmt(r["all_compiled_s"])
            if r["ok"] and r["compiled_reps"] < r["ok"]:
                compiled += f" ({r['compiled_reps']}/{r['ok']} reps)"
            lines.append(
                f"| {r['config']} | {_fmt(r['first_output_s'])} "
                f"| {_fmt(r['first_output_vs_eager'], suffix='x')} "
                f"| {_fmt(r['first_output_vs_aot_eager'], suffix='x')} "
                f"| {_fmt(r['first_output_vs_stock'], suffix='x')} | {compiled} "
                f"| {_fmt(r['compiled_vs_stock'], suffix='x')} | {_fmt(r['wait_returned_s'])} "
                f"| {_ms(r['steady_step_s'])} | {_fmt(r['steady_vs_stock'], suffix='x')} "
                f"| {spread} | {_ms(r['steady_step_min_s'])} | {_fmt(r['warmup_s'])} "
                f"| {graphs} | {fb} | {in_proc} | {r['ok']}/{r['n']} |")
        lines.append("")
        eager = _med([r["eager_step_s"] for r in rows])
        if eager is not None:
            lines.append(f"Plain eager step (no torch.compile), median: {_ms(eager)} ms.")
        for r in rows:
            if r["eager_phase_call_s"] is not None:
                lines.append(f"{r['config']}: a call while compiles were pending took "
                             f"{_ms(r['eager_phase_call_s'])} ms (median); "
                             f"{_fmt(r['calls_until_compiled'], 0)} calls until compiled "
                             f"(median).")
            if r.get("first_compiled_call_s") is not None:
                lines.append(f"{r['config']}: the first call that ran every graph compiled "
                             f"(it swapped the last one in) took "
                             f"{_ms(r['first_compiled_call_s'])} ms; the slowest call from "
                             f"the first call's return until then, "
                             f"{_ms(r['slowest_call_s'])} ms (medians).")
            for o in r["outcomes"]:
                lines.append(f"stock-async outcome: {o}.")
            if r["first_output_min_max"]:
                lo, hi = r["first_output_min_max"]
                cl = r["all_compiled_min_max"]
                lines.append(f"{r['config']} range: first output {lo:.2f}-{hi:.2f} s"
                             + (f", until compiled {cl[0]:.2f}-{cl[1]:.2f} s" if cl else ""))
        errors = [(r["config"], e) for r in rows for e in r["errors"]]
        if errors:
            lines += ["", "Errors:"] + [f"- {c} {e.splitlines()[0][:300]}" for c, e in errors]
        lines.append("")
    if parallel:
        g = a["parallel"]
        lines += [
            f"## parallel: {g} independent graphs, each called once",
            "",
            "| config | workers | all called once (s) | all compiled (s) | first submit -> "
            "all arrived (s) | sum of compile times (s) | bound 1.25 x sum/min(N,G) (s) "
            "| within bound | warm-up (s) | fallbacks | ok |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in parallel:
            fb = ", ".join(f"{k} x{v}" for k, v in sorted(r["fallbacks"].items())) or "none"
            lines.append(
                f"| {r['config']} | {r['workers'] or '-'} | {_fmt(r['all_called_once_s'])} "
                f"| {_fmt(r['all_compiled_s'])} | {_fmt(r['submit_to_arrived_s'])} "
                f"| {_fmt(r['sum_compile_s'])} | {_fmt(r['bound_s'])} "
                f"| {r['within_bound_reps'] or '-'} | {_fmt(r['warmup_s'])} | {fb} "
                f"| {r['ok']}/{r['n']} |")
        lines.append("")
        for r in parallel:
            for i, pg in enumerate(r["per_graph_compile_s"]):
                lines.append(f"{r['config']} N={r['workers']} rep {i}: per-graph compile "
                             f"{', '.join(f'{x:.2f}' for x in pg)} s")
            for e in r["errors"]:
                lines.append(f"- error {r['config']} {e.splitlines()[0][:300]}")
        lines.append("")
    tg = targets(summary, parallel)
    if tg:
        lines += ["## Targets (reported, not asserted)", "",
                  "Measured: the ratio of medians over the reps (fresh processes); the "
                  "issue asks for at least 3 reps.", "",
                  "| model | config | target | measured (median) | limit | met | reps |",
                  "|---|---|---|---|---:|---|---:|"]
        for t in tg:
            measured = t.get("measured") or f"{t['value']:.2f}"
            limit = f"{t['limit']:.2f}x" if t.get("limit") is not None else "-"
            lines.append(f"| {t['model']} | {t['config']} | {t['target']} | {measured} "
                         f"| {limit} | {'yes' if t['met'] else 'no'} | {t.get('reps', '-')} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def _plot(trace: Path) -> Path | None:
    try:
        spec = importlib.util.spec_from_file_location("plot_timeline",
                                                      HERE / "plot_timeline.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.plot(trace, trace.with_suffix(".png"), title=trace.stem)
    except Exception as e:  # noqa: BLE001 - a plot never costs the run
        print(f"plotting {trace} failed (ignored): {e}", file=sys.stderr)
        return None


def _write(args: argparse.Namespace, samples: list[dict[str, Any]],
           quiet: bool = True, meta: dict[str, Any] | None = None) -> int:
    first_ok = next((s for s in samples if s.get("torch_version")), {})
    meta = meta or {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": platform.node(),
        "host_cpus": os.cpu_count(),
        "loadavg_start": args._loadavg,
        "loadavg_end": _loadavg(),
        "parent_python": sys.version.split()[0],
        "child_python": first_ok.get("python"),
        "torch_version": first_ok.get("torch_version"),
        "device_name": first_ok.get("device_name"),
        "fxoffload_workers": args.workers or next(
            (s["workers"] for s in samples if s.get("workers") and s["model"] != "parallel"),
            None),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("TORCHINDUCTOR_", "TORCH_", "FXOFFLOAD_", "TRITON_",
                                 "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"))},
    }
    a = meta["args"]
    models = [m for m in a["models"] if any(s["model"] == m for s in samples)]
    summary = summarise(samples, a["configs"], models)
    parallel = summarise_parallel(samples)
    text = markdown(summary, parallel, meta)
    if not quiet:
        print(text)
    if args.out is not None:
        json_path = args.out.with_suffix(".json")
        md_path = args.out.with_suffix(".md")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(
            {"meta": meta, "summary": summary, "parallel": parallel,
             "targets": targets(summary, parallel), "samples": samples},
            indent=1, default=str) + "\n")
        md_path.write_text(text + "\n")
        if not quiet:
            print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if samples and all(not s.get("error") for s in samples) else 1


def _loadavg() -> str | None:
    with contextlib.suppress(OSError, AttributeError):
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return None


def _note(sample: dict[str, Any]) -> str:
    if sample.get("error"):
        return f"ERROR {sample['error'].splitlines()[0][:200]}"
    if sample["model"] == "parallel":
        return (f"all called {_fmt(sample.get('all_called_once_s'))} s, all compiled "
                f"{_fmt(sample.get('all_compiled_s'))} s, submit->arrived "
                f"{_fmt(sample.get('submit_to_arrived_s'))} s, bound "
                f"{_fmt(sample.get('bound_s'))} s, fallbacks {sample.get('fallbacks') or {}}")
    return (f"first output {_fmt(sample.get('first_output_s'))} s, compiled "
            f"{_fmt(sample.get('all_compiled_s'))} s ({sample.get('compiled_outcome')})"
            + (f", wait() {sample['wait_returned_s']:.2f} s"
               if sample.get("wait_returned_s") is not None else "")
            + f", steady {_ms(sample.get('steady_step_s'))} ms"
            + (f", warm-up {sample['warmup_s']:.2f} s" if sample.get("warmup_s") else "")
            + f", fallbacks {sample.get('fallbacks') or {}}")


def report(args: argparse.Namespace) -> int:
    data = json.loads(args.report.read_text())
    return _write(args, data["samples"], quiet=False, meta=data["meta"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return report(args)
    args._loadavg = _loadavg()
    started = time.perf_counter()  # --deadline counts from here, priming included
    if not args.no_prime:
        prime(args)
    jobs: list[tuple[str, int, str, int | None]] = []  # (model, rep, config, workers)
    for model in args.models:
        for rep in range(args.reps):
            k = rep % len(args.configs)
            for config in args.configs[k:] + args.configs[:k]:
                jobs.append((model, rep, config, args.workers))
    if args.parallel:
        variants = [("stock-normal", None)] + [("fxoffload-async", n)
                                                for n in args.parallel_workers]
        for rep in range(args.reps):
            k = rep % len(variants)
            for config, n in variants[k:] + variants[:k]:
                jobs.append(("parallel", rep, config, n))

    samples: list[dict[str, Any]] = []
    traced: set[tuple[str, str, int | None]] = set()
    for i, (model, rep, config, workers) in enumerate(jobs, 1):
        if args.deadline is not None and time.perf_counter() - started > args.deadline:
            print(f"deadline of {args.deadline:g} s reached: {len(jobs) - i + 1} sample(s) "
                  "not run", file=sys.stderr, flush=True)
            break
        keep = None
        if args.trace_dir is not None and config.startswith("fxoffload") \
                and (model, config, workers) not in traced:
            suffix = f"-n{workers}" if model == "parallel" else ""
            keep = args.trace_dir / f"{model}-{config}{suffix}.trace.json"
        sample = run_child(args, config, model, rep, workers, keep)
        samples.append(sample)
        if keep is not None and sample.get("trace"):
            traced.add((model, config, workers))
            png = _plot(keep)
            if png is not None:
                sample["trace_plot"] = str(png)
        label = f"{config}" + (f" N={workers}" if model == "parallel" else "")
        print(f"[{i}/{len(jobs)}] {model} rep {rep + 1}/{args.reps} {label}: {_note(sample)}"
              f" ({sample['child_wall_s']:.0f} s)", file=sys.stderr, flush=True)
        _write(args, samples)
    return _write(args, samples, quiet=False)


if __name__ == "__main__":
    sys.exit(main())
