"""First-call benchmark: how long the torch.compile'd model's first call takes (Dynamo +
AOTAutograd + Inductor compile + run) with stock Inductor, PyTorch's experimental
SERIALIZE/SUBPROCESS FX compile modes, and fxoffload (including its default backend,
``backend="fxoffload"``, as a new user would call it: ``fxoffload-default``).

Every sample is a fresh Python process (bench/_child.py) with a fresh, empty
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR: caches stay enabled, as on a real cold
start, but nothing is in them. Configurations are interleaved within each repetition
(and their order rotated from one repetition to the next) so drift hits all alike.

    python bench/first_call.py --size tiny --reps 1 --models gpt2          # CPU smoke run
    python bench/first_call.py --size tiny --reps 1 --models gpt2 \\
        --configs stock-normal,fxoffload-default                          # the smallest
    python bench/first_call.py --device cuda --size bench --out bench/results/first_call

See bench/README.md.
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
CHILD = HERE / "_child.py"
RESULT_MARKER = "FIRST_CALL_RESULT "  # keep in step with _child.py

CONFIGS = ("stock-normal", "stock-serialize", "stock-subprocess", "fxoffload-serde",
           "fxoffload-subprocess", "fxoffload-subprocess-cold", "fxoffload-default")
STOCK_ENV = {"stock-normal": None, "stock-serialize": "SERIALIZE",
             "stock-subprocess": "SUBPROCESS"}
MODELS = ("gpt2", "bert", "llama")
BASELINE = "stock-normal"
DEFAULT_BACKEND = "fxoffload-default"  # backend="fxoffload", FXOFFLOAD_* unset, no warmup

# The target (reported, not asserted): the default backend, cold, synchronous,
# first call <= 1.0 x stock-normal's first call.
TARGET_DEFAULT_FIRST_CALL = 1.0


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(MODELS), default=list(MODELS),
                   help="comma-separated subset of gpt2,bert,llama (default: all)")
    p.add_argument("--configs", type=_csv(CONFIGS), default=list(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--train", action="store_true",
                   help="time the first training step (forward+backward) instead of an "
                        "inference forward")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny",
                   help="tiny: the test-suite models; bench: GPT-2 small / BERT-base / "
                        "0.2B Llama at batch 8, seq 512")
    p.add_argument("--batch", type=int, default=None, help="override the size's batch")
    p.add_argument("--seq", type=int, default=None, help="override the size's sequence")
    p.add_argument("--reps", type=int, default=3, help="fresh processes per config")
    p.add_argument("--workers", type=int, default=None,
                   help="fxoffload pool size (default: fxoffload's own default)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before one child is killed and recorded as an error")
    p.add_argument("--python", default=sys.executable, help="interpreter for the children")
    p.add_argument("--out", type=Path, default=None,
                   help="write PATH.json (all raw samples) and PATH.md (the tables)")
    p.add_argument("--no-prime", action="store_true",
                   help="skip the untimed throw-away compile that warms the OS page cache "
                        "(torch, compiler toolchain) before the first sample")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


# ---------------------------------------------------------------------------------------
# running children


def child_env(config: str, cache_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_FX_COMPILE_MODE", None)
    if config == DEFAULT_BACKEND:  # as a new user: no fxoffload settings at all
        for var in [v for v in env if v.startswith("FXOFFLOAD_")]:
            del env[var]
    mode = STOCK_ENV.get(config)
    if mode is not None:
        env["TORCHINDUCTOR_FX_COMPILE_MODE"] = mode
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache_root / "triton")
    # The child runs in its cache directory: a relative PYTHONPATH entry (PYTHONPATH=src)
    # would not resolve there, so make them absolute.
    path = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    # Run from source if fxoffload is not installed in this interpreter.
    src = HERE.parent / "src"
    if importlib.util.find_spec("fxoffload") is None and (src / "fxoffload").is_dir():
        path.insert(0, str(src))
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # The child runs in its own session, so its group holds the compile workers it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_child(args: argparse.Namespace, config: str, model: str, rep: int) -> dict[str, Any]:
    spec = {"config": config, "model": model, "rep": rep, "device": args.device,
            "dtype": args.dtype, "train": args.train, "size": args.size,
            "batch": args.batch, "seq": args.seq, "workers": args.workers}
    cache_root = Path(tempfile.mkdtemp(prefix="fxoffload-bench-"))
    env = child_env(config, cache_root)
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
        # Anything the child left behind in its group (it should have shut its pools).
        _kill_group(proc)
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
        sample = {"config": config, "model": model, "rep": rep, "first_call_s": None,
                  "eager_call_s": None, "warmup_s": None, "fallbacks": {},
                  "graphs_offloaded": None, "error": why}
    elif timed_out:
        sample["error"] = sample.get("error") or f"timed out after {args.timeout:g} s"
    sample["child_rc"] = rc
    sample["child_wall_s"] = wall
    # Cross-check of the child's own log counting: stock SERIALIZE/SUBPROCESS warn with
    # this line when a graph cannot be pickled and is compiled in-process instead.
    sample["stderr_unable_to_pickle_lines"] = stderr.count(
        "Unable to pickle input graph or example inputs")
    sample["stderr_tail"] = stderr[-2000:]
    return sample


PRIME_CODE = """
import sys, torch, transformers
device = sys.argv[1]
f = torch.compile(lambda x: (x.sin() + 1).softmax(-1) @ x.T)
f(torch.randn(8, 8, device=device))
"""


def prime(args: argparse.Namespace) -> None:
    """One untimed, throw-away compile in its own process and cache dir, so the first
    sample does not also pay for reading torch, transformers and the compiler toolchain
    (C++ headers, Triton) from disk."""
    cache_root = Path(tempfile.mkdtemp(prefix="fxoffload-bench-prime-"))
    try:
        subprocess.run([args.python, "-c", PRIME_CODE, args.device],
                       env=child_env("stock-normal", cache_root), cwd=cache_root,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=900,
                       check=False)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"priming failed (ignored): {e}", file=sys.stderr)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# summarising


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summarise(samples: list[dict[str, Any]], configs: list[str],
              models: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        mine = [s for s in samples if s["model"] == model]
        medians: dict[str, float] = {}
        rows = []
        for config in configs:
            these = [s for s in mine if s["config"] == config]
            ok = [s for s in these if not s.get("error") and s.get("first_call_s") is not None]
            times = [s["first_call_s"] for s in ok]
            warm = [s["warmup_s"] for s in ok if s.get("warmup_s") is not None]
            fallbacks: dict[str, int] = {}
            for s in ok:
                for reason, n in (s.get("fallbacks") or {}).items():
                    fallbacks[reason] = fallbacks.get(reason, 0) + int(n)
            offloaded = sorted({s.get("graphs_offloaded") for s in ok} - {None})
            in_process: dict[str, int] = {}
            for s in ok:
                for reason, n in (s.get("compiled_in_process") or {}).items():
                    in_process[reason] = in_process.get(reason, 0) + int(n)
            row: dict[str, Any] = {
                "config": config, "n": len(these), "ok": len(ok),
                "median_s": statistics.median(times) if times else None,
                "min_s": min(times) if times else None,
                "max_s": max(times) if times else None,
                "warmup_median_s": statistics.median(warm) if warm else None,
                "graphs_offloaded": offloaded,
                "fallbacks": fallbacks,
                "compiled_in_process": in_process,  # summed over reps, by reason
                "fx_cache_hits": sum(int(s.get("fx_cache_hits") or 0) for s in ok),
                "aot_cache_hits": sum(int(s.get("aot_cache_hits") or 0) for s in ok),
                "eager_median_s": statistics.median(
                    [s["eager_call_s"] for s in ok if s.get("eager_call_s") is not None]
                    or [float("nan")]),
                "errors": [f"rep {s.get('rep')}: {s.get('error')}" for s in these
                           if s.get("error")],
            }
            if config == "stock-subprocess":
                row["left_process"] = [s.get("stock_left_process_graphs") for s in ok]
            if row["median_s"] is not None:
                medians[config] = row["median_s"]
            rows.append(row)
        base = medians.get(BASELINE)
        for row in rows:
            row["ratio_vs_stock_normal"] = (
                row["median_s"] / base if base and row["median_s"] is not None else None)
        out[model] = rows
    return out


def markdown(summary: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    what = "train step (fwd+bwd)" if meta["args"]["train"] else "inference forward"
    lines = [
        "# First-call time",
        "",
        f"- {meta['when']}; torch {meta.get('torch_version', '?')}, Python "
        f"{meta.get('child_python', '?')}, {meta.get('device_name', '?')} "
        f"({meta['host_cpus']} CPUs)",
        f"- device {meta['args']['device']}, dtype {meta['args']['dtype']}, size "
        f"{meta['args']['size']}, {what}"
        f", {meta['args']['reps']} rep(s), fxoffload workers "
        f"{meta.get('fxoffload_workers') or 'default'}",
        "- every sample: a fresh process with empty TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR;"
        " ratio = median / median of stock-normal (same model, same run)",
        "",
    ]
    for model, rows in summary.items():
        eager = [r["eager_median_s"] for r in rows if r["eager_median_s"] == r["eager_median_s"]]
        lines += [
            f"## {model}",
            "",
            "| config | median first call (s) | ratio vs stock-normal | min (s) | max (s) "
            "| warm-up (s) | graphs offloaded | compiled in-process | fallbacks | ok |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        for r in rows:
            ratio = _fmt(r["ratio_vs_stock_normal"]) + ("x" if r["ratio_vs_stock_normal"] else "")
            fb = ", ".join(f"{k} x{v}" for k, v in sorted(r["fallbacks"].items())) or "none"
            off = "/".join(str(x) for x in r["graphs_offloaded"]) or "-"
            in_proc = ", ".join(f"{k} x{v}" for k, v in sorted(
                (r.get("compiled_in_process") or {}).items())) or "-"
            lines.append(
                f"| {r['config']} | {_fmt(r['median_s'])} | {ratio} | {_fmt(r['min_s'])} "
                f"| {_fmt(r['max_s'])} | {_fmt(r['warmup_median_s'])} | {off} | {in_proc} "
                f"| {fb} | {r['ok']}/{r['n']} |")
        lines.append("")
        if eager:
            lines.append(f"Eager call for reference (median over samples): "
                         f"{statistics.median(eager):.4f} s.")
        for r in rows:
            if r.get("left_process"):
                lines.append(f"stock-subprocess graphs compiled out of process (per rep): "
                             f"{', '.join(str(x) for x in r['left_process'])}.")
        errors = [(r["config"], e) for r in rows for e in r["errors"]]
        if errors:
            lines.append("")
            lines.append("Errors:")
            lines += [f"- {c} {e.splitlines()[0][:300]}" for c, e in errors]
        lines.append("")
    tg = targets(summary)
    if tg:
        lines += ["## Target (reported, not asserted)", "",
                  "| model | target | measured (median) | limit | met | reps |",
                  "|---|---|---|---:|---|---:|"]
        lines += [f"| {t['model']} | {t['target']} | {t['measured']} | {t['limit']:.2f}x "
                  f"| {'yes' if t['met'] else 'no'} | {t['reps']} |" for t in tg]
        lines.append("")
    return "\n".join(lines)


def targets(summary: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's target per model: fxoffload-default's median first call over
    stock-normal's (same run), at most TARGET_DEFAULT_FIRST_CALL."""
    out = []
    for model, rows in summary.items():
        by = {r["config"]: r for r in rows}
        r, base = by.get(DEFAULT_BACKEND), by.get(BASELINE)
        if r is None or base is None or r["ratio_vs_stock_normal"] is None:
            continue
        v = r["ratio_vs_stock_normal"]
        out.append({"model": model, "config": DEFAULT_BACKEND, "reps": r["ok"],
                    "target": f"default backend first call <= {TARGET_DEFAULT_FIRST_CALL}x "
                              "stock-normal", "value": v, "limit": TARGET_DEFAULT_FIRST_CALL,
                    "measured": f"{v:.2f}x ({r['median_s']:.2f} s / {base['median_s']:.2f} s)",
                    "met": v <= TARGET_DEFAULT_FIRST_CALL})
    return out


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    samples: list[dict[str, Any]] = []
    if not args.no_prime:
        prime(args)
    total = len(args.models) * args.reps * len(args.configs)
    done = 0
    for model in args.models:
        for rep in range(args.reps):
            k = rep % len(args.configs)
            order = args.configs[k:] + args.configs[:k]
            for config in order:
                done += 1
                sample = run_child(args, config, model, rep)
                samples.append(sample)
                if sample.get("error"):
                    note = f"ERROR {sample['error'].splitlines()[0][:200]}"
                else:
                    note = (f"first call {sample['first_call_s']:.2f} s"
                            + (f" (warm-up {sample['warmup_s']:.2f} s)"
                               if sample.get("warmup_s") is not None else "")
                            + f", offloaded {sample.get('graphs_offloaded')}"
                            + (f", in-process {sample['compiled_in_process']}"
                               if sample.get("compiled_in_process") else "")
                            + f", fallbacks {sample.get('fallbacks') or {}}")
                print(f"[{done}/{total}] {model} rep {rep + 1}/{args.reps} {config}: {note}",
                      file=sys.stderr, flush=True)

    first_ok = next((s for s in samples if s.get("torch_version")), {})
    meta = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": platform.node(),
        "host_cpus": os.cpu_count(),
        "parent_python": sys.version.split()[0],
        "child_python": first_ok.get("python"),
        "torch_version": first_ok.get("torch_version"),
        "device_name": first_ok.get("device_name"),
        "fxoffload_workers": args.workers or next(
            (s["workers"] for s in samples if s.get("workers")), None),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("TORCHINDUCTOR_", "TORCH_", "FXOFFLOAD_", "TRITON_",
                                 "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"))},
    }
    summary = summarise(samples, args.configs, args.models)
    text = markdown(summary, meta)
    print(text)
    if args.out is not None:
        json_path = args.out.with_suffix(".json")
        md_path = args.out.with_suffix(".md")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "summary": summary,
                                         "targets": targets(summary), "samples": samples},
                                        indent=1, default=str) + "\n")
        md_path.write_text(text + "\n")
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if all(not s.get("error") for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
