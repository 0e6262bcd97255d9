"""G independent compile requests, all available at once, on a warm pool of N workers:
does the pool compile them in parallel? (issue 3: all compiled within
1.25 x sum of compile times / min(N, G)).

    this process: G different blocks ─► mode "capture" ─► G request files
    per N, a fresh process: warm pool of N ─► for each rep:
        alone:    each request by itself, waited for  → its compile time t_i
        together: all G submitted at once             → time until the last arrives
        bound = 1.25 x sum(t_i) / min(N, G)

``async_first.py --parallel`` measures the same through torch.compile, where Dynamo
hands the graphs over one by one as it traces them: there the window also holds the
tracing, which the bound does not model. Here every request exists before the clock
starts, so the window is the pool's alone.

Every submission gets its own empty Inductor and Triton cache directory (the request's
preamble names them; a worker clears its in-memory caches when they change), so no
compile reuses kernels of an earlier one, alone or together. Times are wall clock in the
parent, from submission to the response's bytes; every response is checked to hold a
compiled graph. A first round of all G together, after the pool's warm-up, is reported
but not counted: it is each worker's first real compile.

    python bench/pool_parallel.py --device cpu --size tiny --graphs 4 --workers 1,2 --reps 3
    PYTHONPATH=src python3 bench/pool_parallel.py --device cuda --size bench --graphs 4 \\
        --workers 2,4 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
MARK = "@@POOL@@ "


def capture(args: argparse.Namespace, directory: Path) -> list[Path]:
    import torch
    from _async_models import build_parallel

    import fxoffload

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    blocks, x = build_parallel(args.graphs, args.size, args.device, dtype)
    backend = fxoffload.backend(mode="capture", capture_dir=str(directory))
    with torch.no_grad():
        for block in blocks:
            torch.compile(block, backend=backend)(x)
    requests = sorted(directory.glob("*.request.fxo"))
    if len(requests) != args.graphs:
        raise RuntimeError(f"captured {len(requests)} requests for {args.graphs} graphs; "
                           f"fallbacks: {dict(fxoffload.stats().fallbacks)}")
    return requests


def with_fresh_caches(data: bytes, root: Path) -> bytes:
    """The same request, naming new empty Inductor and Triton cache directories."""
    from fxoffload.protocol import join_request, split_request

    preamble, body = split_request(data)
    root.mkdir(parents=True)
    return join_request(dataclasses.replace(preamble, cache_dir=str(root / "inductor"),
                                            triton_cache_dir=str(root / "triton")), body)


def one(workers: int, request_paths: list[str], reps: int, scratch: str) -> dict[str, Any]:
    import torch
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import fxoffload
    from fxoffload import protocol
    from fxoffload.executors import get_executor
    from fxoffload.settings import Settings

    requests = [Path(p).read_bytes() for p in request_paths]
    settings = Settings.resolve(mode="subprocess", workers=workers)
    t0 = time.perf_counter()
    fxoffload.warmup(settings, wait=True)
    warm_s = time.perf_counter() - t0
    pool = get_executor(settings)
    fresh = iter(range(10**6))

    def submit_all(batch: list[bytes]) -> tuple[float, list[float]]:
        batch = [with_fresh_caches(r, Path(scratch) / str(next(fresh))) for r in batch]
        start = time.perf_counter()
        futures = [pool.submit(r) for r in batch]
        done: list[float] = []
        for f in futures:
            raw = f.result()
            done.append(time.perf_counter() - start)
            response = protocol.decode_response(raw, FakeTensorMode(shape_env=ShapeEnv()))
            if response.error is not None:
                raise RuntimeError(f"compile failed in a worker: {response.error[:2]}")
        return max(done), done

    out: dict[str, Any] = {"workers": workers, "graphs": len(requests), "warmup_s": warm_s,
                           "alone": [], "together": [], "together_each": []}
    # Not counted: after its warm-up, a worker's first real compile is slower (on the
    # H200 1.1-1.2 s against 0.45 s for the same block later), and "alone" would mostly
    # meet a worker that had compiled already, "together" all of them.
    out["first_round"] = submit_all(requests)[1]
    for _ in range(reps):
        out["alone"].append([submit_all([r])[0] for r in requests])
        total, each = submit_all(requests)
        out["together"].append(total)
        out["together_each"].append(each)
    out["pids"] = pool.worker_pids()
    out["replacements"] = fxoffload.stats().worker_replacements
    fxoffload.shutdown()
    out["torch"] = torch.__version__
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", default="tiny", choices=("tiny", "bench"))
    p.add_argument("--graphs", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="pool sizes, comma-separated")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the raw samples here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--requests", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(MARK + json.dumps(one(args.one, args.requests, args.reps, args.scratch)),
              flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="fxoffload-pool-bench-") as tmp:
        root = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "capture-inductor")
        os.environ["TRITON_CACHE_DIR"] = str(root / "capture-triton")
        requests = capture(args, root / "requests")
        results = []
        for n in (int(w) for w in args.workers.split(",")):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--reps", str(args.reps),
                 "--scratch", str(root / f"n{n}"), "--requests", *map(str, requests)],
                capture_output=True, text=True, check=False)
            line = [s for s in proc.stdout.splitlines() if s.startswith(MARK)]
            if proc.returncode != 0 or not line:
                sys.exit(f"N={n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[0][len(MARK):]))
    report(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(f"# {args.graphs} independent graphs submitted at once to a warm pool "
          f"({args.device}, size {args.size}, torch {results[0]['torch']}, "
          f"{os.cpu_count()} CPUs, {args.reps} reps, medians)\n")
    print("| workers N | warm-up (s) | sum of compile times alone (s) | all G together (s) "
          "| bound 1.25 x sum / min(N, G) (s) | together / bound | within bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        sums = [sum(a) for a in r["alone"]]
        bounds = [1.25 * s / min(r["workers"], r["graphs"]) for s in sums]
        within = sum(t <= b for t, b in zip(r["together"], bounds, strict=True))
        s, t = statistics.median(sums), statistics.median(r["together"])
        b = statistics.median(bounds)
        print(f"| {r['workers']} | {r['warmup_s']:.1f} | {s:.2f} | {t:.2f} | {b:.2f} | "
              f"{t / b:.2f} | {within}/{len(bounds)} |")
    for r in results:
        print(f"  N={r['workers']} first round, together (not counted), arrivals "
              + ", ".join(f"{e:.2f}" for e in sorted(r["first_round"])) + " s")
        for k, (alone, each) in enumerate(zip(r["alone"], r["together_each"], strict=True)):
            print(f"  N={r['workers']} rep {k}: alone " + ", ".join(f"{a:.2f}" for a in alone)
                  + " s; together, arrivals " + ", ".join(f"{e:.2f}" for e in sorted(each))
                  + " s")


if __name__ == "__main__":
    main()
