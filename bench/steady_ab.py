"""Steady-state step time of fxoffload's compiled code against stock Inductor's, in one
process: the model compiled both ways (two copies), timed in alternating blocks.

    python bench/steady_ab.py [--mode async+subprocess] [--model gpt2] [--size tiny]
                              [--blocks 6] [--steps 500] [--reps 3] [--out FILE.json]

Separate processes (bench/async_first.py's "steady step") differ by more than the effect
on a shared machine: one process's step time moved 0.35-0.58 ms between runs of the same
code. Here both compiled models share the process, its threads and the machine's load
at the time, so their ratio shows what fxoffload adds per call. Each rep is a fresh
process with a fresh cache dir: fxoffload compiles first (waiting for its background
compile), then stock, then blocks of ``--steps`` calls alternate (ours, stock). Reports
each rep's median over blocks of the per-block median step, and the ratio's median."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> dict:
    import copy

    import torch

    sys.path.insert(0, str(HERE))
    from _child import build_model

    import fxoffload

    device = "cpu"
    model, make = build_model(args.model, args.size, device, torch.float32, False, None, None)
    inputs = make()
    twin = copy.deepcopy(model)
    ours = torch.compile(model, backend=fxoffload.backend(mode=args.mode))
    with torch.no_grad():
        ours(**inputs)
    if not fxoffload.wait(timeout=600):
        raise SystemExit("fxoffload.wait() timed out")
    stock = torch.compile(twin, backend="inductor")
    with torch.no_grad():
        stock(**inputs)
        torch.testing.assert_close(ours(**inputs).logits, stock(**inputs).logits)

    def block(fn: object) -> float:
        times = []
        with torch.no_grad():
            for _ in range(args.steps):
                t = time.perf_counter()
                fn(**inputs)  # type: ignore[operator]
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    block(ours), block(stock)  # settle
    blocks: dict[str, list[float]] = {"ours": [], "stock": []}
    for _ in range(args.blocks):
        blocks["ours"].append(block(ours))
        blocks["stock"].append(block(stock))
    snap = fxoffload.stats()
    fxoffload.shutdown()
    return {"blocks_s": blocks, "ours_s": statistics.median(blocks["ours"]),
            "stock_s": statistics.median(blocks["stock"]),
            "graphs_offloaded": snap.graphs_offloaded,
            "compiled_runs": snap.compiled_runs, "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="async+subprocess")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    reps = []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="steady-ab-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            proc = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]],
                                  env=env, capture_output=True, text=True, timeout=1200)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        r = json.loads(line[len("RESULT "):])
        r["ratio"] = r["ours_s"] / r["stock_s"]
        reps.append(r)
        print(f"rep {rep + 1}/{args.reps}: ours {r['ours_s'] * 1e3:.3f} ms, stock "
              f"{r['stock_s'] * 1e3:.3f} ms, ratio {r['ratio']:.3f} (graphs offloaded "
              f"{r['graphs_offloaded']}, compiled runs {r['compiled_runs']})", flush=True)
    ratios = [r["ratio"] for r in reps]
    print(f"{args.mode} / stock steady step, {args.model} {args.size}: median ratio "
          f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}; "
          f"{args.reps} processes x {args.blocks} blocks x {args.steps} calls)")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "reps": reps, "median_ratio": statistics.median(ratios)},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
