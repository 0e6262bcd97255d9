"""A farm worker's first real compile: how much a fresh worker pays over a warm one.

It captures a model's training-step graphs (``mode="capture"``: the forward's and the
backward's compile requests) at two sequence lengths, then, for each variant, starts a
fresh process that makes a farm ``CompileWorker`` (warm, as ``farm up`` makes it) and
times its compile of the base length's requests (forward, then backward):

- ``current``: the worker as the farm makes it;
- ``training``: and then ``worker._warm_training`` (a small training step compiled);
- ``other-shape``: and then the other length's requests compiled first (a warm farm's
  worker, as in ``bench/farm.py``'s farm-warm).

Reported per request: wall seconds, CPU-s of the worker's process, CPU-s of its Inductor
compile pool (its live child processes and what they reaped, from /proc), how many pool
processes worked, and the packages the compile imported.

    python bench/worker_first_compile.py --device cuda --size bench --model llama \\
        --variants current,training,other-shape --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _farm_procs import _proc_cpu, cpu_delta


def _capture(args: argparse.Namespace, directory: Path) -> None:
    import torch
    from _child import build_model

    import fxoffload as fxo

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for name, seq in (("base", None), ("other", args.other_seq)):
        model, make_inputs = build_model(args.model, args.size, args.device, dtype, True,
                                         seq=seq)
        backend = fxo.backend(mode="capture", capture_dir=directory / name)
        out = torch.compile(model, backend=backend, dynamic=False)(**make_inputs())
        out.loss.backward()
        torch._dynamo.reset()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                found.append(kid)
                todo.append(kid)
    return found


def _pool_cpu(pids: list[int]) -> dict[int, tuple[int, float]]:
    """pid -> (start time, CPU-s with reaped children), as bench/farm.py reads the farm's."""
    return {pid: cpu for pid in pids if (cpu := _proc_cpu(pid)) is not None}


def _requests(directory: Path) -> list[bytes]:
    files = sorted(directory.glob("*.request.fxo"), key=lambda p: p.name.split("-")[1])
    return [p.read_bytes() for p in files]


def _one_variant(variant: str, captured: Path, profile: str | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fxo-wfc-"))
    try:
        return _time_variant(variant, captured, profile, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _time_variant(variant: str, captured: Path, profile: str | None,
                  work: Path) -> dict[str, Any]:
    from fxoffload import signing
    from fxoffload.farm.actors import REQUEST, CompileWorker

    key_path = work / "key"
    signing.create_key(key_path)
    key = signing.load_key(key_path)
    t = time.perf_counter()
    worker = CompileWorker(str(key_path), str(work / "w"))
    result: dict[str, Any] = {"variant": variant, "startup_s": time.perf_counter() - t,
                              "phases": dict(worker.phases)}
    if variant == "training":
        import torch

        from fxoffload import worker as worker_main

        worker_main._warm_training(result["phases"],
                                   "cuda" if torch.cuda.is_available() else "cpu")
    elif variant == "other-shape":
        t = time.perf_counter()
        for data in _requests(captured / "other"):
            worker.compile(signing.sign(key, data, purpose=REQUEST))
        result["phases"]["other_shape_s"] = time.perf_counter() - t
    rows = []
    profiler: Any = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    for data in _requests(captured / "base"):
        pool_before = _pool_cpu(_descendants(os.getpid()))
        me = resource.getrusage(resource.RUSAGE_SELF)
        modules = set(sys.modules)
        t = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        ok, _, _ = worker.compile(signing.sign(key, data, purpose=REQUEST))
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        pool_after = _pool_cpu(_descendants(os.getpid()))
        deltas = [cpu_delta({pid: pool_before[pid]} if pid in pool_before else {},
                            {pid: cpu})[0] for pid, cpu in pool_after.items()]
        rows.append({"ok": ok, "wall_s": round(wall, 2),
                     "self_cpu_s": round(after.ru_utime + after.ru_stime
                                         - me.ru_utime - me.ru_stime, 2),
                     "pool_cpu_s": round(sum(deltas), 2),
                     "pool_procs_busy": sum(d > 0.2 for d in deltas),
                     "pool_procs": len(deltas),
                     # packages the compile imported (a first use this warm-up missed)
                     "imported": sorted({m.split(".")[0] for m in set(sys.modules) - modules
                                         if not m.split(".")[0].startswith("c")
                                         or "_" in m})})
    result["compiles"] = rows
    if profiler is not None:
        import pstats

        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(profile)
        with open(profile + ".txt", "w") as f:
            pstats.Stats(profile, stream=f).sort_stats("cumulative").print_stats(80)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--model", default="llama")
    parser.add_argument("--other-seq", type=int, default=520)
    parser.add_argument("--variants", default="current,training,other-shape")
    parser.add_argument("--profile", default="", help="variants to profile (cProfile)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--captured", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--capture-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture_into:
        _capture(args, args.capture_into)
        return 0
    if args.variant:  # a fresh process for one variant
        profile = str(args.out / f"{args.variant}.prof") if args.variant in args.profile else None
        print("RESULT " + json.dumps(_one_variant(args.variant, args.captured, profile)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    captured = args.out / "captured"
    cache = tempfile.mkdtemp(prefix="fxo-wfc-cap-")
    t = time.perf_counter()
    try:
        _capture_in_child(args, captured, {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"captured in {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for variant in args.variants.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--captured", str(captured),
             "--out", str(args.out), "--profile", args.profile],
            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{variant}: failed ({proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(lines[-1][7:])
        results.append(result)
        print(json.dumps(result), flush=True)
    (args.out / "worker_first_compile.json").write_text(json.dumps(results, indent=1))
    return 0


def _capture_in_child(args: argparse.Namespace, captured: Path, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, __file__, "--capture-into", str(captured), "--out",
                    str(args.out), "--device", args.device, "--size", args.size,
                    "--model", args.model, "--other-seq", str(args.other_seq)],
                   check=True, env=env)


if __name__ == "__main__":
    sys.exit(main())
