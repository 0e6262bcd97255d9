"""Compile-farm benchmark: K processes ("ranks") started at once on the same model, each
running one training step (forward + backward) of the torch.compile'd model, with stock
Inductor, fxoffload's own process pool, and the compile farm (``fxoffload farm up``).

Every rank is a fresh Python process (``bench/farm.py --child``) with its own, empty
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR (``stock-shared``: one empty directory for
all K). Each rank imports torch, builds the model and calls ``torch.compile`` (and
``fxoffload.backend``), then says READY and waits; when all K are ready the parent takes
one timestamp (``time.monotonic``, CLOCK_MONOTONIC, system-wide) and releases them all.
Times are measured from that common start:

- first output: the end of the rank's first training step;
- until compiled: when the rank has run compiled code (sync: the end of its first step;
  async: after ``fxoffload.wait()`` and one more step); "until all compiled" is the max
  over the K ranks;
- compiles: stock, the Inductor compiles in the ranks (``codegen_and_compile``, i.e. FX
  graph cache misses and bypasses); subprocess, the graphs each rank's pool compiled plus
  any compiled in the rank; farm, the delta of the farm's own ``compiles`` counter (any
  compile that fell back into a rank is counted in "in ranks" too);
- CPU seconds: each rank's ``getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN)`` at exit
  (after ``fxoffload.shutdown()`` and Inductor's compile workers are shut down, so its
  children are reaped), summed over ranks ("rank CPU"); the same from READY to exit
  ("window", leaving out the imports and model build, equal in every config); and, for
  farm configs, the CPU the farm's processes (every process whose environment carries
  its ``FXOFFLOAD_FARM_ID``) used from just before the ranks were started until they
  had all exited, from /proc/<pid>/stat (utime+stime+cutime+cstime).

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
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from first_call import _csv  # bench/ is this script's directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT_MARKER = "FARM_BENCH_RESULT "
READY_MARKER = "FARM_BENCH_READY"
ADMIN_MARKER = "FARM_BENCH_ADMIN "
NETNS_ENV = "FXOFFLOAD_BENCH_NETNS"

CONFIGS = ("aot_eager", "stock-separate", "stock-shared", "subprocess", "farm-cold",
           "farm-warm", "farm-store", "async+farm")
FARM_CONFIGS = ("farm-cold", "farm-warm", "farm-store", "async+farm")
STOCK_CONFIGS = ("stock-separate", "stock-shared")
MODELS = ("gpt2", "llama")
BASELINE = "stock-separate"
REFERENCE = "aot_eager"
FXO_MODE = {"subprocess": "subprocess", "farm-cold": "farm", "farm-warm": "farm",
            "farm-store": "farm", "async+farm": "async+farm"}
# Graphs the farm has not seen: farm-warm and async+farm run the same model at a longer
# sequence (static shapes: other graphs, other kernels, the same amount of compiling).
# Asked again for a graph it compiled before, a farm worker finds the kernels in its own
# cache dir, so it neither compiles them nor sends them, and every client compiles them
# itself (fxoffload.farm.actors.CompileWorker.compile): that would be no "store miss".
SEQ_EXTRA = {"farm-warm": 8, "async+farm": 16}

# Targets (reported beside the numbers, not asserted).
TARGET_UNTIL_COMPILED = 1.1  # until every rank runs compiled code <= 1.1 x stock first call
TARGET_CPU_SLACK = 1.1  # total compile CPU <= (stock's / K) x 1.1
TARGET_STORE_FIRST = 1.2  # store warm: first call <= 1.2 x aot_eager's first call
TARGET_WARM_MISS_FIRST = 1.0  # warm farm, store miss: first call <= 1.0 x stock's


# ---------------------------------------------------------------------------------------
# the rank (child) side


def _cpu_s() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
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

    _child_step(compiled, inputs)
    _sync(torch, device)
    result["first_output_s"] = time.monotonic() - t0
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
    if result.get("cpu_ready_s") is not None:
        result["cpu_window_s"] = result["cpu_exit_s"] - result["cpu_ready_s"]
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# the farm: up, down, registry, CPU


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


class Farm:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.state_dir = root / "farm-state"
        self.store_dir = root / "farm-store"
        self.cache_dir = root / "farm-cache"  # the workers' own (warm-up) Inductor cache
        self.address: str | None = None
        self.farm_id: str | None = None
        self.up_s: float | None = None
        self.up_output = ""

    def env(self) -> dict[str, str]:
        return base_env(self.cache_dir)

    def _cli(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.args.python, "-m", "fxoffload", "farm", *argv,
                               "--state-dir", str(self.state_dir)], env=self.env(),
                              cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def up(self) -> None:
        t = time.perf_counter()
        done = self._cli("up", "--workers", str(self.args.farm_workers), "--store",
                         str(self.store_dir))
        self.up_s = time.perf_counter() - t
        self.up_output = done.stdout.strip()
        state = self.state()
        if state:
            self.farm_id = state.get("farm_id")  # for `down`'s check even on failure
        if done.returncode != 0:
            raise RuntimeError(f"`fxoffload farm up` failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-3000:]}")
        m = re.search(r"FXOFFLOAD_FARM=(\S+)", done.stdout)
        if not m or not state:
            raise RuntimeError(f"`fxoffload farm up` printed no address: {done.stdout}")
        self.address = m.group(1)

    def state(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.state_dir / "farm.json").read_text())
        return None

    def status(self) -> dict[str, Any]:
        done = self._cli("status", "--json", timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`fxoffload farm status` failed: {done.stdout}{done.stderr}")
        return json.loads(done.stdout)

    def admin(self, action: str) -> dict[str, Any]:
        done = subprocess.run([self.args.python, str(Path(__file__).resolve()), "--admin",
                               action, "--state-dir", str(self.state_dir)], env=self.env(),
                              cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120, check=False)
        for line in done.stdout.splitlines():
            if line.startswith(ADMIN_MARKER):
                return json.loads(line[len(ADMIN_MARKER):])
        raise RuntimeError(f"farm admin {action} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr)[-3000:]}")

    def down(self) -> dict[str, Any]:
        """``farm down``; then whatever still carries the farm's id is reported (and
        killed, so that the benchmark leaves nothing behind)."""
        out: dict[str, Any] = {}
        if self.state() is not None:
            done = self._cli("down", timeout=300)
            out["down_rc"] = done.returncode
            out["down_output"] = (done.stdout + done.stderr).strip()[-2000:]
        if self.farm_id:
            from fxoffload.farm.deploy import farm_processes, kill_farm_processes

            left = farm_processes(self.farm_id)
            out["left_after_down"] = left
            if left:
                kill_farm_processes(self.farm_id)
        return out

    def env_for_ranks(self) -> dict[str, str]:
        assert self.address
        return {"FXOFFLOAD_FARM": self.address,
                "FXOFFLOAD_FARM_KEY_FILE": str(self.state_dir / "key")}

    def cpu(self) -> dict[int, tuple[int, float]]:
        """pid -> (start time, CPU seconds incl. reaped children) of the farm's processes."""
        if not self.farm_id:
            return {}
        from fxoffload.farm.deploy import farm_processes

        return {pid: v for pid in farm_processes(self.farm_id)
                for v in [_proc_cpu(pid)] if v is not None}


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> tuple[int, float] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()  # fields from 3 (state) on
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return int(rest[19]), (utime + stime + cutime + cstime) / _TICK


def cpu_delta(before: dict[int, tuple[int, float]],
              after: dict[int, tuple[int, float]]) -> tuple[float, int]:
    """CPU seconds used between the two looks; and how many processes went away
    meanwhile (theirs is lost unless a farm process reaped them)."""
    total = 0.0
    for pid, (start, cpu) in after.items():
        old = before.get(pid)
        total += cpu - old[1] if old and old[0] == start else cpu
    gone = sum(1 for pid, (start, _) in before.items()
               if pid not in after or after[pid][0] != start)
    return total, gone


# ---------------------------------------------------------------------------------------
# running ranks


def base_env(cache_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FXOFFLOAD_") and k != "TORCHINDUCTOR_FX_COMPILE_MODE"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache_root / "triton")
    path = [str(ROOT / "src")] + [os.path.abspath(p) for p in
                                  env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reader(proc: subprocess.Popen[str], lines: queue.Queue[tuple[int, str | None]],
            rank: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put((rank, line.rstrip("\n")))
    lines.put((rank, None))


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
        record["farm_cpu_s"], record["farm_processes_gone"] = cpu_delta(farm_before,
                                                                        farm.cpu())
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


def _digest(record: dict[str, Any]) -> None:
    ranks = [r for r in record["ranks"] if not r.get("error")]
    record["ok_ranks"] = len(ranks)
    first = [r["first_output_s"] for r in ranks if r.get("first_output_s") is not None]
    done = [r["compiled_s"] for r in ranks if r.get("compiled_s") is not None]
    full = len(ranks) == record["k"]
    record["first_output_median_s"] = statistics.median(first) if first else None
    record["first_output_max_s"] = max(first) if first and full else None
    record["until_all_compiled_s"] = max(done) if done and full else None
    record["rank_cpu_s"] = sum(r.get("cpu_exit_s") or 0.0 for r in record["ranks"])
    record["rank_cpu_window_s"] = sum(r.get("cpu_window_s") or 0.0 for r in record["ranks"])
    farm_cpu = record.get("farm_cpu_s") or 0.0
    record["compile_cpu_s"] = record["rank_cpu_s"] + farm_cpu
    record["compile_cpu_window_s"] = record["rank_cpu_window_s"] + farm_cpu
    record["compiles_in_ranks"] = sum(int(r.get("inductor_compiles_here") or 0)
                                      for r in ranks)
    record["graphs_per_rank"] = max((int(r.get("dynamo_unique_graphs") or 0) for r in ranks),
                                    default=None)
    config = record["config"]
    if config in STOCK_CONFIGS or config == REFERENCE:
        record["compiles"] = record["compiles_in_ranks"]
    elif config == "subprocess":
        record["compiles"] = record["compiles_in_ranks"] + sum(
            int(r.get("graphs_offloaded") or 0) for r in ranks)
    # farm configs: set by the caller from the farm's counters
    outcomes: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    for r in ranks:
        for how, n in (r.get("farm") or {}).items():
            outcomes[how] = outcomes.get(how, 0) + int(n)
        for why, n in (r.get("fallbacks") or {}).items():
            fallbacks[why] = fallbacks.get(why, 0) + int(n)
        for why, n in (r.get("compiled_in_process") or {}).items():
            fallbacks[f"in_process:{why}"] = fallbacks.get(f"in_process:{why}", 0) + int(n)
    record["farm_outcomes"] = outcomes
    record["farm_files_installed"] = sum(int(r.get("farm_files_installed") or 0)
                                         for r in ranks)
    record["fallbacks"] = fallbacks
    record["fxgraph"] = {k: sum(int((r.get("fxgraph") or {}).get(k, 0)) for r in ranks)
                         for k in ("miss", "hit", "bypass")}


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


def _note(rec: dict[str, Any]) -> str:
    if rec.get("errors"):
        return (f"{rec['model']} rep {rec['rep'] + 1} {rec['config']}: ERROR "
                f"{'; '.join(rec['errors'])[:400]}")
    farm = (f", farm {rec['farm_outcomes']} (kernel files installed "
            f"{rec.get('farm_files_installed')})" if rec.get("farm_outcomes") else "")
    return (f"{rec['model']} rep {rec['rep'] + 1} {rec['config']} (K={rec['k']}, load "
            f"{rec['loadavg_before'][0]:.1f}): "
            f"compiles {rec.get('compiles')}, until all compiled "
            f"{_fmt(rec.get('until_all_compiled_s'))} s, first output median/max "
            f"{_fmt(rec.get('first_output_median_s'))}/{_fmt(rec.get('first_output_max_s'))} s"
            f", CPU {_fmt(rec.get('compile_cpu_s'), 1)} s (window "
            f"{_fmt(rec.get('compile_cpu_window_s'), 1)}, farm "
            f"{_fmt(rec.get('farm_cpu_s'), 1)}){farm}"
            + (f", fallbacks {rec['fallbacks']}" if rec.get("fallbacks") else ""))


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
# summarising


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


FIELDS = ("compiles", "farm_compiles", "compiles_in_ranks", "until_all_compiled_s",
          "first_output_median_s", "first_output_max_s", "compile_cpu_s",
          "compile_cpu_window_s", "rank_cpu_s", "farm_cpu_s", "farm_up_s", "graphs_per_rank")


def summarise(records: list[dict[str, Any]], configs: list[str],
              models: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        rows = []
        for config in configs:
            these = [r for r in records if r["model"] == model and r["config"] == config]
            ok = [r for r in these if not r.get("errors")]
            row: dict[str, Any] = {"config": config, "n": len(these), "ok": len(ok),
                                   "k": these[0]["k"] if these else None,
                                   "seq": these[0].get("seq") if these else None}
            for f in FIELDS:
                row[f] = _median([r.get(f) for r in ok])
            row["per_rep"] = {f: [r.get(f) for r in these] for f in
                              ("compiles", "until_all_compiled_s", "first_output_median_s",
                               "compile_cpu_s")}
            outcomes: dict[str, int] = {}
            fallbacks: dict[str, int] = {}
            for r in ok:
                for how, n in (r.get("farm_outcomes") or {}).items():
                    outcomes[how] = outcomes.get(how, 0) + n
                for why, n in (r.get("fallbacks") or {}).items():
                    fallbacks[why] = fallbacks.get(why, 0) + n
            row["farm_outcomes"] = outcomes  # summed over reps
            row["load_before"] = _median([(r.get("loadavg_before") or [None])[0]
                                          for r in these])
            row["farm_files_installed"] = sum(int(r.get("farm_files_installed") or 0)
                                              for r in ok)
            row["fallbacks"] = fallbacks  # summed over reps
            row["per_key_max"] = max((r.get("farm_compiles_per_key_max") or 0 for r in ok),
                                     default=None) if config in FARM_CONFIGS else None
            row["errors"] = [f"rep {r['rep'] + 1}: {e}" for r in these
                             for e in r.get("errors", [])]
            rows.append(row)
        # a farm block that failed as a whole
        for r in records:
            if r["model"] == model and r["config"] == "farm":
                rows.append({"config": "farm", "n": 1, "ok": 0, "k": r["k"],
                             **dict.fromkeys(FIELDS), "per_rep": {}, "farm_outcomes": {},
                             "fallbacks": {}, "per_key_max": None,
                             "errors": [f"rep {r['rep'] + 1}: {e}" for e in r["errors"]]})
        base = next((r for r in rows if r["config"] == BASELINE), None)
        for row in rows:
            for f, bf in (("until_all_compiled_s", "first_output_median_s"),
                          ("compile_cpu_s", "compile_cpu_s"),
                          ("compile_cpu_window_s", "compile_cpu_window_s")):
                b = base.get(bf) if base else None
                row[f"{f}_x_stock"] = (row[f] / b if b and row.get(f) is not None
                                       else None)
        out[model] = rows
    return out


def targets(summary: dict[str, list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(model: str, config: str, target: str, measured: str, met: bool | None,
            reps: int) -> None:
        out.append({"model": model, "config": config, "target": target,
                    "measured": measured, "met": met, "reps": reps})

    for model, rows in summary.items():
        by = {r["config"]: r for r in rows}
        base, ref = by.get(BASELINE), by.get(REFERENCE)
        stock_first = base.get("first_output_median_s") if base else None
        stock_cpu = base.get("compile_cpu_s") if base else None
        stock_cpu_w = base.get("compile_cpu_window_s") if base else None
        for config in FARM_CONFIGS:
            r = by.get(config)
            if r is None or not r["ok"]:
                continue
            # graphs per rank: what each stock rank compiled (forward and backward of
            # every Dynamo graph), else two per Dynamo graph
            graphs = r.get("graphs_per_rank")
            want = (base["compiles"] / base["k"] if base and base.get("compiles")
                    else None if graphs is None else 2 * graphs)
            if config != "farm-store" and r.get("farm_compiles") is not None:
                met = (want is not None and r["farm_compiles"] == want
                       and (r.get("per_key_max") or 0) <= 1)
                add(model, config, f"K={r['k']} ranks -> exactly 1 compile per graph "
                    "(forward and backward of each Dynamo graph) on the farm",
                    f"{r['farm_compiles']:g} farm compiles (median) for {want:g} graphs; "
                    f"max {r.get('per_key_max')} per key", met, r["ok"])
            if config == "farm-store" and r.get("farm_compiles") is not None:
                add(model, config, "store warm -> 0 compiles",
                    f"{r['farm_compiles']:g} farm compiles", r["farm_compiles"] == 0, r["ok"])
            u = r.get("until_all_compiled_s")
            if u is not None and stock_first:
                v = u / stock_first
                add(model, config, f"until every rank runs compiled code <= "
                    f"{TARGET_UNTIL_COMPILED}x stock-separate's median first call",
                    f"{v:.2f}x ({u:.2f} s / {stock_first:.2f} s)",
                    v <= TARGET_UNTIL_COMPILED, r["ok"])
            c = r.get("compile_cpu_s")
            if c is not None and stock_cpu:
                limit = stock_cpu / k * TARGET_CPU_SLACK
                add(model, config, f"compile CPU-s (ranks at exit + farm) <= stock's / K "
                    f"+ 10% ({limit:.1f} s)", f"{c:.1f} s ({c / stock_cpu:.2f}x stock's "
                    f"{stock_cpu:.1f} s)", c <= limit, r["ok"])
            cw = r.get("compile_cpu_window_s")
            if cw is not None and stock_cpu_w:
                limit = stock_cpu_w / k * TARGET_CPU_SLACK
                add(model, config, f"the same from READY on (no imports/model build) <= "
                    f"stock's / K + 10% ({limit:.1f} s)", f"{cw:.1f} s "
                    f"({cw / stock_cpu_w:.2f}x stock's {stock_cpu_w:.1f} s)", cw <= limit,
                    r["ok"])
            f = r.get("first_output_median_s")
            if config == "farm-store" and f is not None and ref and \
                    ref.get("first_output_median_s"):
                a = ref["first_output_median_s"]
                add(model, config, f"store warm: first call (median over ranks) <= "
                    f"{TARGET_STORE_FIRST}x aot_eager's (one rank)",
                    f"{f / a:.2f}x ({f:.2f} s / {a:.2f} s)", f / a <= TARGET_STORE_FIRST,
                    r["ok"])
            if config == "farm-warm" and f is not None and stock_first:
                add(model, config, f"warm farm, store miss: first call (median over ranks)"
                    f" <= {TARGET_WARM_MISS_FIRST}x stock-separate's",
                    f"{f / stock_first:.2f}x ({f:.2f} s / {stock_first:.2f} s)",
                    f / stock_first <= TARGET_WARM_MISS_FIRST, r["ok"])
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(summary: dict[str, list[dict[str, Any]]], tg: list[dict[str, Any]],
             meta: dict[str, Any]) -> str:
    a = meta["args"]
    lines = [
        "# Compile farm: K ranks at once",
        "",
        "```sh",
        *[f"{i['command']}  # {i.get('when', '?')}, {i['runs']} runs, included"
          for i in meta.get("included") or []],
        meta["command"],
        "```",
        "",
        "- code measured: "
        + "; ".join(f"{g.get('head', '?')}"
                    + (f" with uncommitted {', '.join(x.split()[-1] for x in g['src_changes'])}"
                       if g.get("src_changes") else "")
                    for g in [*(i.get("git") or {} for i in meta.get("included") or []),
                              meta.get("git") or {}]),
        f"- {meta['when']}; torch {meta.get('torch_version', '?')}, Python "
        f"{meta.get('child_python', '?')}, Ray {meta.get('ray_version', '?')}, "
        f"{meta['host_cpus']} CPUs, {meta.get('mem_gib', '?')} GiB",
        f"- device {a['device']}, dtype {a['dtype']}, size {a['size']}, one training step "
        f"(forward + backward); K = {a['k']} ranks (aot_eager: 1), {a['reps']} rep(s), "
        f"farm workers {a['farm_workers']}; medians over reps; times from the common "
        "start (all ranks ready, released at once)",
        "- ratios (x) are against stock-separate in the same run: time against its median "
        "first output, CPU against its CPU",
        f"- {meta.get('netns', '')}",
        "",
    ]
    for model, rows in summary.items():
        lines += [
            f"## {model}",
            "",
            "| config | K | compiles | in ranks | until all compiled (s) | x | first output "
            "median / max (s) | compile CPU-s: ranks + farm | x | from READY | x | farm CPU-s "
            "| farm up (s) | farm answers | fallbacks | load | ok |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
        ]
        for r in rows:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["farm_outcomes"].items()))
            if outcomes:
                outcomes += f"; kernel files installed {r.get('farm_files_installed', 0)}"
            name = r["config"] + (f" (seq {r['seq']})" if r.get("seq") else "")
            fb = ", ".join(f"{k} x{v}" for k, v in sorted(r["fallbacks"].items())) or "none"
            comp = "-" if r.get("compiles") is None else f"{r['compiles']:g}"
            in_ranks = _fmt(r.get("compiles_in_ranks"), 0)
            lines.append(
                f"| {name} | {r['k']} | {comp} | {in_ranks} "
                f"| {_fmt(r['until_all_compiled_s'])} | {_x(r['until_all_compiled_s_x_stock'])} "
                f"| {_fmt(r['first_output_median_s'])} / {_fmt(r['first_output_max_s'])} "
                f"| {_fmt(r['compile_cpu_s'], 1)} | {_x(r['compile_cpu_s_x_stock'])} "
                f"| {_fmt(r['compile_cpu_window_s'], 1)} "
                f"| {_x(r['compile_cpu_window_s_x_stock'])} | {_fmt(r['farm_cpu_s'], 1)} "
                f"| {_fmt(r['farm_up_s'])} | {outcomes or '-'} | {fb} "
                f"| {_fmt(r.get('load_before'), 1)} | {r['ok']}/{r['n']} |")
        lines.append("")
        errors = [(r["config"], e) for r in rows for e in r["errors"]]
        if errors:
            lines += ["Errors:", ""] + [f"- {c} {e.splitlines()[0][:300]}" for c, e in errors]
            lines.append("")
    if tg:
        lines += ["## Targets (reported, not asserted)", "",
                  "| model | config | target | measured (median) | met | reps |",
                  "|---|---|---|---|---|---:|"]
        lines += [f"| {t['model']} | {t['config']} | {t['target']} | {t['measured']} "
                  f"| {'yes' if t['met'] else 'no'} | {t['reps']} |" for t in tg]
        lines.append("")
    lines += [
        "Columns: *compiles*, Inductor compiles of the run (stock: in the ranks; "
        "subprocess: in the ranks' pools and the ranks; farm: the farm's `compiles` delta "
        "plus any in a rank, *in ranks*); *until all compiled*, the last rank's time to "
        "having run compiled code (async: after `fxoffload.wait()` and one more step); "
        "*compile CPU-s*, the ranks' CPU at exit (self + reaped children) plus the farm's "
        "processes' CPU over the run; *from READY*, the same without each rank's imports "
        "and model build; *farm CPU-s* includes the idle farm's own "
        f"({_fmt(meta.get('farm_idle_cpu_per_s'), 3)} CPU-s per s when idle, measured after "
        "`farm up`); *farm answers*, the ranks' `fxoffload.stats().farm`, summed over reps.",
        "",
        "One farm per model and repetition, in this order: farm-cold (started right before "
        "its ranks, `farm up` timed apart); farm-warm, the same farm with its counters zeroed "
        "(registry `reset_stats`, no restart) asked for graphs it has not seen: the same "
        f"model at a longer sequence (+{SEQ_EXTRA['farm-warm']}), so every graph misses the "
        "store and is compiled by a warm worker (the same graphs again would find their "
        "kernels in the worker's cache dir: neither compiled nor sent, so every client "
        "compiles them); farm-store, counters zeroed, store kept, the base shape again: "
        "farm-cold's graphs; async+farm, store emptied (`clear_store`), at "
        f"+{SEQ_EXTRA['async+farm']}. *kernel files installed*: the ranks' "
        "`stats().farm_files_installed`, summed over ranks and reps. *load*: the 1-minute "
        "load average just before the ranks started (median; the machine is shared).",
        "",
    ]
    return "\n".join(lines)


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


def loopback_only() -> bool:
    names = [line.split(":", 1)[0].strip()
             for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    return names == ["lo"]


def ensure_loopback_only(argv: list[str]) -> None:
    """Re-execute this script in a network namespace of its own whose only interface is
    loopback (a Ray head binds every interface); refuse when that cannot be done."""
    if loopback_only():
        return
    if os.environ.get("FXOFFLOAD_BENCH_ISOLATED_HOST") == "1":
        # Only for a machine that reaches nothing outside itself (the GPU machine, which
        # has no unshare): its interfaces lead nowhere.
        print("bench/farm.py: FXOFFLOAD_BENCH_ISOLATED_HOST=1: running on the host's "
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
