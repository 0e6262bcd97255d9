"""How long a warm fxoffload worker pool takes to start, and where the time goes.

Each case runs in a fresh process with fresh, empty Inductor and Triton cache directories
(as in ``first_call.py``): it times ``fxoffload.warmup(mode="subprocess", workers=N,
wait=True)`` and collects each worker's start-up phases from its READY message (torch
import, CPU warm-up compile, CUDA init, CUDA warm-up compile).

    python bench/worker_startup.py --cases "1;4;4:FXOFFLOAD_WARM_CPU=0" --out startup.json

A case is ``WORKERS[:VAR=VALUE,...]``; the variables are set in that case's process (and
so in its workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, logging, re, sys, time
t0 = time.perf_counter()
import fxoffload
workers = int(sys.argv[1])
phases = []
class H(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        m = re.search(r"pid (\d+) ready in ([0-9.]+) s (\{.*\})", msg)
        if m:
            phases.append({"pid": int(m[1]), "startup_s": float(m[2]), **eval(m[3])})
log = logging.getLogger("fxoffload.pool")
log.setLevel(logging.DEBUG)
log.addHandler(H())
t = time.perf_counter()
fxoffload.warmup(mode="subprocess", workers=workers, wait=True, startup_timeout=240)
warm = time.perf_counter() - t
ready = len(phases)
fxoffload.shutdown()
print(json.dumps({"workers": workers, "warmup_s": warm, "ready": ready, "phases": phases}))
"""


def run_case(case: str, timeout: float) -> dict:
    workers, _, extra = case.partition(":")
    env = dict(os.environ)
    root = tempfile.mkdtemp(prefix="fxoffload-startup-")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    env["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    for item in filter(None, extra.split(",")):
        k, _, v = item.partition("=")
        env[k] = v
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, workers], env=env,
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            return {"case": case, "error": f"exit {proc.returncode}",
                    "stderr": proc.stderr[-3000:], "wall_s": wall}
        out = json.loads(lines[-1])
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        return {"case": case, "error": f"timed out after {timeout:g} s",
                "stderr": (err or "")[-3000:]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.update(case=case, wall_s=wall)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1;2;4", help="';'-separated WORKERS[:VAR=V,...]")
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = []
    for case in args.cases.split(";"):
        r = run_case(case, args.timeout)
        results.append(r)
        if r.get("error"):
            print(f"{case}: ERROR {r['error']}\n{r.get('stderr', '')}", file=sys.stderr)
            continue
        keys = ("import_s", "warm_cpu_s", "cuda_init_s", "warm_cuda_s", "wait_pool_s")
        per = "; ".join(
            " ".join(f"{k[:-2]} {ph[k]:.1f}" for k in keys if k in ph)
            + f" pool_ready {int(ph.get('pool_ready', 0))}" for ph in r["phases"])
        print(f"{case}: warmup {r['warmup_s']:.1f} s (process {r['wall_s']:.1f} s), "
              f"{r['ready']} ready; workers: {per}", flush=True)
        if args.out:  # after every case: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
