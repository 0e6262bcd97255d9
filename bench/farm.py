"""Compile-farm benchmark: K processes ("ranks") started at once on the same model, each
running one training step (forward + backward) of the torch.compile'd model, with stock
Inductor, fxoffload's own process pool, and the compile farm (``fxoffload farm up``).

Every rank is a fresh Python process (``bench/farm.py --child``, bench/_farm_child.py)
with its own, empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR (``stock-shared``: one
empty directory for all K). When all K are ready the parent takes one timestamp
(``time.monotonic``, CLOCK_MONOTONIC, system-wide) and releases them all. Times are
measured from that common start:

- first output: the end of the rank's first training step;
- until compiled: when the rank has run compiled code (sync: the end of its first step;
  async: after ``fxoffload.wait()`` and one more step); "until all compiled" is the max
  over the K ranks;
- compiles: stock, the Inductor compiles in the ranks (``codegen_and_compile``, i.e. FX
  graph cache misses and bypasses); subprocess, the graphs each rank's pool compiled plus
  any compiled in the rank; farm, the delta of the farm's own ``compiles`` counter (any
  compile that fell back into a rank is counted in "in ranks" too);
- CPU seconds: each rank's own and its reaped children's at exit, summed over ranks
  ("rank CPU"); the same from READY to exit ("window", leaving out the imports and model
  build, equal in every config); and, for farm configs, the CPU the farm's processes
  (every process whose environment carries its ``FXOFFLOAD_FARM_ID``) used from just
  before the ranks were started until they had all exited (bench/_farm_procs.py).

Configurations (``--configs``), run in this order in each repetition:

- ``aot_eager``: ONE rank, backend ``aot_eager`` (no Inductor), the first-output floor;
- ``stock-separate``: stock Inductor, separate cache dirs: **the baseline for ratios**;
- ``stock-shared``: stock Inductor, one shared cache dir (empty at the start);
- ``subprocess``: ``fxoffload.backend(mode="subprocess", workers=1)``, one pool per rank,
  cold (no ``warmup()``);
- ``farm-cold``: a farm started right before the ranks (``farm up`` timed apart), store
  empty;
- ``farm-warm``: the same farm, warm (its workers compiled farm-cold's graphs), counters
  zeroed through the registry's ``reset_stats`` (no restart), asked for graphs it has not
  seen: the same model at a longer sequence (``SEQ_EXTRA``; static shapes, so other
  graphs and kernels, the same amount of compiling). Every graph misses the store. (The
  same graphs again, after ``clear_store``, would be no honest miss: a worker finds their
  kernels in its own cache dir, neither compiles nor sends them, and every client
  compiles them itself.);
- ``farm-store``: the same farm again right after, counters zeroed, store kept, the base
  shape: every graph should be a store hit (farm-cold's);
- ``async+farm``: the same farm, store emptied (``clear_store``), ``mode="async+farm"``,
  at another sequence length again.

One farm per (model, repetition), stopped (``fxoffload farm down``) in a ``finally``.
A Ray head binds every network interface, so this script runs only in a loopback-only
network namespace: when /proc/net/dev lists any other interface it re-executes itself
under ``unshare --net`` (and refuses if that is not possible).

This module owns the entry point and the orchestration: options, starting and releasing
the ranks, the farm's lifetime, partial saves. What a rank (or the farm admin driver)
runs: bench/_farm_child.py; the configs' names: bench/_farm_configs.py; process and CPU
accounting: bench/_farm_procs.py; summaries, targets and the markdown report:
bench/_farm_report.py.

    python bench/farm.py --models gpt2 --reps 1 --configs stock-separate,stock-shared \\
        --k 2                                                              # smoke run
    python bench/farm.py --models gpt2,llama --k 4 --reps 2 \\
        --out bench/results/farm_cpu

See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# bench/ is this script's directory
from _farm_child import READY_MARKER, RESULT_MARKER, admin_main, child_main
from _farm_configs import (
    CONFIGS,
    FARM_CONFIGS,
    MODELS,
    REFERENCE,
    SEQ_EXTRA,
    STOCK_CONFIGS,
)
from _farm_procs import Farm, _kill_group, _reader, base_env, cpu_delta, cpu_delta_by_kind
from _farm_report import _digest, _median, _note, markdown, summarise, targets
from first_call import _csv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETNS_ENV = "FXOFFLOAD_BENCH_NETNS"


# ---------------------------------------------------------------------------------------
# running ranks


def run_ranks(args: argparse.Namespace, root: Path, config: str, model: str, rep: int,
              k: int, extra_env: dict[str, str] | None = None,
              farm: Farm | None = None) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}-{config}-{rep}-", dir=root))
    procs: list[subprocess.Popen[str]] = []
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
    stdout: list[list[str]] = [[] for _ in range(k)]
    seq = None
    if config in SEQ_EXTRA:
        sys.path.insert(0, str(HERE))
        from _child import SIZES

        seq = SIZES[args.size]["seq"] + SEQ_EXTRA[config]
    record: dict[str, Any] = {"config": config, "model": model, "rep": rep, "k": k,
                              "seq": seq, "errors": [],
                              "loadavg_before": os.getloadavg()}  # the machine is shared
    farm_before = farm.cpu() if farm else {}
    try:
        for rank in range(k):
            rank_dir = run_dir / f"rank{rank}"
            rank_dir.mkdir()
            cache = run_dir / "shared" if config == "stock-shared" else rank_dir
            env = {**base_env(cache), **(extra_env or {})}
            if config not in (*STOCK_CONFIGS, REFERENCE):  # an fxoffload rank
                env.update(args.rank_env_vars)
                if args.trace_dir is not None:
                    env["FXOFFLOAD_TRACE"] = str(
                        args.trace_dir / f"{model}-{config}-rep{rep}-rank{rank}.trace.json")
            spec = {"config": config, "model": model, "rank": rank, "size": args.size,
                    "device": args.device, "dtype": args.dtype, "timeout": args.timeout,
                    "seq": seq}
            with open(rank_dir / "stderr.log", "w") as err:
                proc = subprocess.Popen(
                    [args.python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                    env=env, cwd=rank_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=err, text=True, start_new_session=True)
            procs.append(proc)
            threading.Thread(target=_reader, args=(proc, lines, rank), daemon=True).start()
        # ---- wait until all are READY, then release them at one timestamp --------------
        ready: set[int] = set()
        ended: set[int] = set()
        deadline = time.monotonic() + args.timeout
        while len(ready) < k and not ended:
            try:
                rank, line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                ended.add(rank)
            else:
                stdout[rank].append(line)
                if line == READY_MARKER:
                    ready.add(rank)
        if len(ready) < k:
            record["errors"].append(f"only {len(ready)} of {k} ranks got ready "
                                    f"(ended early: {sorted(ended)})")
        t0 = time.monotonic()
        for proc in procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write(f"{t0!r}\n" if len(ready) == k else "\n")
                proc.stdin.close()
        # ---- wait for every rank to finish -------------------------------------------------
        open_ranks = set(range(k)) - ended
        deadline = time.monotonic() + args.timeout
        while open_ranks:
            try:
                rank, line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                record["errors"].append(f"ranks {sorted(open_ranks)} timed out after "
                                        f"{args.timeout:g} s")
                break
            if line is None:
                open_ranks.discard(rank)
            else:
                stdout[rank].append(line)
        record["wall_s"] = time.monotonic() - t0
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
    finally:
        for proc in procs:
            _kill_group(proc)  # anything the rank left in its group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
    if farm:
        farm_after = farm.cpu()
        record["farm_cpu_s"], record["farm_processes_gone"] = cpu_delta(farm_before,
                                                                        farm_after)
        record["farm_cpu_by_kind"] = cpu_delta_by_kind(farm_before, farm_after)
    ranks: list[dict[str, Any]] = []
    for rank in range(k):
        res = next((json.loads(x[len(RESULT_MARKER):]) for x in reversed(stdout[rank])
                    if x.startswith(RESULT_MARKER)), None)
        if res is None:
            res = {"rank": rank, "error": f"no result (exit {procs[rank].returncode})"}
        if res.get("error"):
            err = run_dir / f"rank{rank}" / "stderr.log"
            with contextlib.suppress(OSError):
                res["stderr_tail"] = err.read_text()[-3000:]
            record["errors"].append(f"rank {rank}: {res['error'].splitlines()[0][:300]}")
        ranks.append(res)
    shutil.rmtree(run_dir, ignore_errors=True)
    record["ranks"] = ranks
    _digest(record)
    return record


FARM_COUNTERS = ("requests", "hits", "joins", "compiles", "failed", "refused",
                 "redispatched", "workers_replaced", "compile_s", "store_entries")


def _farm_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {k: round(after.get(k, 0) - before.get(k, 0), 3) for k in FARM_COUNTERS}


def run_farm_block(args: argparse.Namespace, root: Path, model: str, rep: int,
                   configs: list[str], log: Any, done: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    """One farm for this (model, repetition): up, the farm configs in order, down."""
    records: list[dict[str, Any]] = []
    farm = Farm(args, Path(tempfile.mkdtemp(prefix=f"farm-{model}-{rep}-", dir=root)))
    down: dict[str, Any] = {}
    try:
        farm.up()
        up_state = farm.state() or {}
        log(f"farm up in {farm.up_s:.2f} s ({args.farm_workers} workers, start-up "
            f"{up_state.get('worker_startup_s')} s)")
        idle_before = farm.cpu()
        time.sleep(args.idle_probe)
        idle_cpu, _ = cpu_delta(idle_before, farm.cpu())
        idle_rate = idle_cpu / args.idle_probe if args.idle_probe else None
        filled = False  # the store holds the base shape's graphs (farm-cold's)
        for config in configs:
            if config == "farm-cold":
                before = farm.status()  # fresh farm: all zero
            elif config in ("farm-warm", "farm-store"):
                if config == "farm-store" and not filled:
                    # no farm-cold: one untimed rank fills the store
                    run_ranks(args, root, "farm-cold", model, rep, 1, farm.env_for_ranks())
                # counters zeroed; the store keeps farm-cold's graphs (farm-warm's, at
                # another shape, are not among them: a store miss)
                before = farm.admin("reset")
            else:
                before = farm.admin("clear")  # async+farm: store emptied
            rec = run_ranks(args, root, config, model, rep, args.k, farm.env_for_ranks(),
                            farm=farm)
            after = farm.status()
            rec["farm_status_before"] = before
            rec["farm_status_after"] = after
            rec["farm_delta"] = delta = _farm_delta(before, after)
            rec["compiles"] = int(delta["compiles"]) + rec["compiles_in_ranks"]
            rec["farm_compiles"] = int(delta["compiles"])
            rec["farm_compiles_per_key_max"] = after.get("compiles_per_key_max")
            rec["farm_idle_cpu_per_s"] = idle_rate
            rec["farm_workers"] = args.farm_workers
            if config == "farm-cold":
                rec["farm_up_s"] = farm.up_s
                rec["farm_worker_startup_s"] = up_state.get("worker_startup_s")
            filled = filled or (config == "farm-cold" and not rec.get("errors"))
            records.append(rec)
            log(_note(rec))
            save_partial(args, done + records, None, None)
    except Exception as e:  # noqa: BLE001 - recorded; the other configs still run
        records.append({"config": "farm", "model": model, "rep": rep, "k": args.k,
                        "errors": [f"farm block: {type(e).__name__}: {e}"[:3000]],
                        "ranks": []})
        log(f"{model} rep {rep + 1}: farm block failed: {e}")
    finally:
        down = farm.down()
        log(f"farm down: {down.get('down_output', '')!s}"
            + (f"; LEFT {down['left_after_down']}" if down.get("left_after_down") else ""))
        shutil.rmtree(farm.state_dir.parent, ignore_errors=True)
    for rec in records:
        rec["farm_down"] = down
    return records


_PARTIAL_META: dict[str, Any] = {}


def save_partial(args: argparse.Namespace, records: list[dict[str, Any]],
                 argv: list[str] | None, git: dict[str, Any] | None) -> None:
    """Every run so far to PATH.partial.json (removed once PATH.json is written)."""
    if args.out is None:
        return
    if argv is not None:
        _PARTIAL_META.update(command="python bench/farm.py " + shlex.join(argv), git=git,
                             args={k: getattr(args, k) for k in ("k", "size", "device",
                                                                 "dtype")})
    _PARTIAL_META["when"] = datetime.datetime.now().isoformat(timespec="seconds")
    path = args.out.parent / (args.out.name + ".partial.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": _PARTIAL_META, "runs": records}, default=str)
                    + "\n")


def git_state() -> dict[str, Any]:
    """The commit measured, and which files under src/ differed from it (others edit
    this checkout while benchmarks run)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True, check=False
                                     ).stdout.strip()
        out["src_changes"] = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
            text=True, check=False).stdout.splitlines()
    return out


PRIME_CODE = """
import torch, transformers
f = torch.compile(lambda x: (x.sin() + 1).softmax(-1) @ x.T)
f(torch.randn(8, 8))
"""


def prime(args: argparse.Namespace, root: Path) -> None:
    """One untimed throw-away compile, so the first sample does not also pay for reading
    torch, transformers and the compiler toolchain from disk."""
    cache = root / "prime"
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([args.python, "-c", PRIME_CODE], env=base_env(cache), cwd=root,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=900,
                       check=False)
    shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(MODELS), default=list(MODELS),
                   help="comma-separated subset of gpt2,llama (default: both)")
    p.add_argument("--configs", type=_csv(CONFIGS), default=list(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: all; "
                        "always run in that order)")
    p.add_argument("--k", type=int, default=4, help="ranks started at once (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny",
                   help="tiny: the test-suite models; bench: GPT-2 small / 0.2B Llama "
                        "(bench/_child.py SIZES)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of every config")
    p.add_argument("--farm-workers", type=int, default=2,
                   help="`farm up --workers` (default 2)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds for the ranks to get ready, and again to finish")
    p.add_argument("--idle-probe", type=float, default=5.0,
                   help="seconds after `farm up` to measure the idle farm's CPU")
    p.add_argument("--python", default=sys.executable, help="interpreter for the ranks")
    p.add_argument("--out", type=Path, default=None,
                   help="write PATH.json (every rank of every run) and PATH.md")
    p.add_argument("--rank-env", action="append", default=[], metavar="VAR=VALUE",
                   help="set for every fxoffload rank (e.g. FXOFFLOAD_FARM_GRAPH_WAIT=0); "
                        "repeatable, recorded with the run")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="each fxoffload rank's FXOFFLOAD_TRACE timeline here, as "
                        "MODEL-CONFIG-repR-rankN.trace.json")
    p.add_argument("--no-prime", action="store_true",
                   help="skip the untimed compile that warms the OS page cache")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH.json",
                   help="run nothing: summarise the runs saved in PATH.json again (with "
                        "this version's tables and targets) into --out, or print them")
    p.add_argument("--include", type=Path, action="append", default=[],
                   help="runs of an earlier invocation (its PATH.json or PATH.partial.json, "
                        "same --k/--size/--device/--dtype) to summarise with this one's; "
                        "both commands are reported")
    # internal
    p.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--admin", choices=("clear", "reset", "stats"), help=argparse.SUPPRESS)
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.reps < 1 or args.k < 1 or args.farm_workers < 1:
        p.error("--reps, --k and --farm-workers must be at least 1")
    args.configs = [c for c in CONFIGS if c in args.configs]
    args.rank_env_vars = {}
    for pair in args.rank_env:  # checked before any rank runs
        var, sep, value = pair.partition("=")
        if not sep or not var:
            p.error(f"--rank-env {pair!r} is not VAR=VALUE")
        args.rank_env_vars[var] = value
    if args.trace_dir is not None:
        args.trace_dir = args.trace_dir.resolve()
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    return args


def rerender(args: argparse.Namespace) -> int:
    data = json.loads(args.from_json.read_text())
    meta, records = data["meta"], data["runs"]
    models = [m for m in MODELS if any(r["model"] == m for r in records)]
    configs = [c for c in CONFIGS if any(r["config"] == c for r in records)]
    summary = summarise(records, configs, models)
    tg = targets(summary, int(meta["args"]["k"]))
    text = markdown(summary, tg, meta)
    if args.out is None:
        print(text)
        return 0
    json_path = args.out.parent / (args.out.name + ".json")
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "targets": tg,
                                     "runs": records}, indent=1, default=str) + "\n")
    (args.out.parent / (args.out.name + ".md")).write_text(text + "\n")
    return 0


def ensure_loopback_only(argv: list[str]) -> None:
    """Re-execute this script in a network namespace of its own whose only interface is
    loopback (a Ray head binds every interface); refuse when that cannot be done."""
    from fxoffload.farm.deploy import loopback_only  # here: stock ranks never import it

    if loopback_only():
        return
    if os.environ.get("FXOFFLOAD_ISOLATED_HOST") == "1":
        # Only for a machine that reaches nothing outside itself (the GPU machine, which
        # has no unshare): its interfaces lead nowhere.
        print("bench/farm.py: FXOFFLOAD_ISOLATED_HOST=1: running on the host's "
              "network (this machine reaches nothing outside itself)", file=sys.stderr)
        return
    if os.environ.get(NETNS_ENV):
        sys.exit("bench/farm.py: still not in a loopback-only network namespace after "
                 "`unshare --net`; refusing to start a Ray head")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        sys.exit("bench/farm.py: this machine has network interfaces other than lo, and "
                 "`unshare`/`ip` are missing: a Ray head (which binds every interface) "
                 "may only run in a loopback-only network namespace; refusing")
    inner = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable,
             str(Path(__file__).resolve()), *argv]
    for prefix in (["unshare", "--net", "--"], ["unshare", "--net", "--map-root-user", "--"]):
        probe = subprocess.run([*prefix, "sh", "-c", "ip link set lo up"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            os.environ[NETNS_ENV] = " ".join(prefix[:-1])
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvp(prefix[0], [*prefix, *inner])
    sys.exit("bench/farm.py: `unshare --net` failed (needs root or unprivileged user "
             "namespaces): a Ray head binds every network interface, so it may only run "
             f"in a loopback-only network namespace; refusing ({probe.stderr!r})")


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.child is not None:
        return child_main(args.child)
    if args.admin is not None:
        return admin_main(args.admin, args.state_dir)
    if args.from_json is not None:
        return rerender(args)
    ensure_loopback_only(raw_argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # so that the finally blocks run

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    records: list[dict[str, Any]] = []
    included: list[dict[str, Any]] = []
    for path in args.include:
        data = json.loads(path.read_text())
        old = (data.get("meta") or {}).get("args") or data.get("args") or {}
        for key in ("k", "size", "device", "dtype"):
            if key in old and old[key] != getattr(args, key):
                sys.exit(f"bench/farm.py: --include {path}: --{key} {old[key]} there, "
                         f"{getattr(args, key)} here")
        records += data["runs"]
        included.append({"path": str(path), "runs": len(data["runs"]),
                         **{k: v for k, v in (data.get("meta") or data).items()
                            if k in ("command", "when", "git", "total_s")}})
    root = Path(tempfile.mkdtemp(prefix="fxoffload-farmbench-", dir="/tmp"))
    started = time.monotonic()
    git = git_state()
    try:
        if not args.no_prime:
            prime(args, root)
        farm_configs = [c for c in args.configs if c in FARM_CONFIGS]
        for model in args.models:
            for rep in range(args.reps):
                for config in [c for c in args.configs if c not in FARM_CONFIGS]:
                    k = 1 if config == REFERENCE else args.k
                    rec = run_ranks(args, root, config, model, rep, k)
                    records.append(rec)
                    log(_note(rec))
                    save_partial(args, records, raw_argv, git)
                if farm_configs:
                    records += run_farm_block(args, root, model, rep, farm_configs, log,
                                              records)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total_s = time.monotonic() - started

    first_ok = next((r for rec in records for r in rec.get("ranks", [])
                     if r.get("torch_version")), {})
    idle = _median([rec.get("farm_idle_cpu_per_s") for rec in records])
    ray_version = None
    with contextlib.suppress(Exception):
        import importlib.metadata

        ray_version = importlib.metadata.version("ray")
    if ray_version is None:  # unpacked without its dist-info (bench/device_ray_setup.sh)
        with contextlib.suppress(Exception):
            import ray

            ray_version = ray.__version__
    netns = os.environ.get(NETNS_ENV)
    meta = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/farm.py " + shlex.join(raw_argv),
        "netns": (f"ran in a loopback-only network namespace (re-executed under "
                  f"`{netns}`)" if netns else "ran where loopback was the only interface"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("child", "admin", "state_dir")},
        "host": platform.node(), "host_cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "parent_python": sys.version.split()[0], "child_python": first_ok.get("python"),
        "torch_version": first_ok.get("torch_version"), "ray_version": ray_version,
        "rank_env": args.rank_env,
        "farm_idle_cpu_per_s": idle, "total_s": round(total_s, 1), "git": git,
        "included": included,
    }
    configs = [c for c in CONFIGS if c in args.configs
               or any(r["config"] == c for r in records)]
    models = [m for m in MODELS if m in args.models or any(r["model"] == m for r in records)]
    summary = summarise(records, configs, models)
    tg = targets(summary, args.k)
    text = markdown(summary, tg, meta)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        json_path = args.out.parent / (args.out.name + ".json")
        md_path = args.out.parent / (args.out.name + ".md")
        json_path.write_text(json.dumps({"meta": meta, "summary": summary, "targets": tg,
                                         "runs": records}, indent=1, default=str) + "\n")
        md_path.write_text(text + "\n")
        with contextlib.suppress(FileNotFoundError):
            (args.out.parent / (args.out.name + ".partial.json")).unlink()
        log(f"wrote {json_path} and {md_path} ({total_s:.0f} s in all)")
    print(text)
    return 0 if all(not r.get("errors") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
