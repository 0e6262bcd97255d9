"""What the serde path itself adds to a first call, phase by phase, in fresh processes.

First-call times across fresh processes vary by ±10% (more on a shared GPU host), far
more than the boundary costs, so a ratio of two first-call medians cannot resolve 3%.
Here each phase of the boundary is timed inside the serde run itself:

    encode request ─► decode request (child side) ─► [Inductor compile] ─► encode
    response ─► decode response ─► load (after_deserialization) ─► replay

and their sum is set against the same model's stock NORMAL first call, measured in its
own fresh process (empty Inductor/Triton caches for both). Each serde sample also encodes
and decodes its request three more times ("again"), which separates first-time costs
from the work; ``--profile`` prints where a second encode/decode spends its time.
``--configs serde,serde-graphpickler`` compares the lean pickler with torch's GraphPickler.

    python bench/serde_overhead.py [--models gpt2,bert,llama] [--device cuda --size bench]
        [--reps 3] [--configs serde,serde-graphpickler] [--json FILE]
    python bench/serde_overhead.py --summarize FILE [FILE ...]   # medians of saved runs
"""

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
from typing import Any

HERE = Path(__file__).parent
MARK = "SERDE_OVERHEAD "
PHASES = ("encode_request", "decode_request", "encode_response", "decode_response",
          "load", "replay")


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_GC = {"s": 0.0, "start": 0.0}


def _gc_clock(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _GC["start"] = time.perf_counter()
    else:
        _GC["s"] += time.perf_counter() - _GC["start"]


def _timed(owner: Any, name: str, key: str, totals: dict[str, float],
           keep: dict[str, Any] | None = None) -> None:
    """Time every call of ``owner.name`` into ``totals[key]``; count the minor page faults
    it takes (``key + "_faults"``: fresh memory is costly in a VM) and the time the
    garbage collector ran inside it (``key + "_gc"``)."""
    fn = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, f0, g0 = time.perf_counter(), _faults(), _GC["s"]
        try:
            out = fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
            totals[key + "_faults"] = totals.get(key + "_faults", 0) + _faults() - f0
            totals[key + "_gc"] = totals.get(key + "_gc", 0.0) + _GC["s"] - g0
        if keep is not None:
            keep.setdefault(key, (args, kwargs, out))
        return out

    setattr(owner, name, wrapper)


def one(model_name: str, config: str, device: str, size: str, profile: bool) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from _child import build_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, make_inputs = build_model(model_name, size, device, dtype, False)
    model.eval()
    inputs = make_inputs()
    if device == "cuda":
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    # A once-per-process cost both configs pay, stock inside Inductor's compile and serde
    # when it captures the parent's state (Inductor caches it): the Triton backend hash,
    # which runs `ptxas --version`. Paid here, before the clock, so that "around" holds
    # only what serde adds.
    t0 = time.perf_counter()
    try:
        torch.utils._triton.triton_hash_with_backend()
    except Exception:  # noqa: BLE001 - no Triton (CPU): nothing to pay
        pass
    totals["triton_backend_hash_before"] = time.perf_counter() - t0
    keep: dict[str, Any] = {}
    if config.startswith("serde"):
        import fxoffload
        from fxoffload import child, offload, pickling, protocol

        if profile:
            _load_detail(keep)
            _profile_first(offload, "load", keep)

        if config == "serde-graphpickler":  # torch's GraphPickler instead of the lean one
            dumps = pickling.dumps
            pickling.dumps = lambda obj, recorder, lean=False: dumps(obj, recorder, lean=False)

        for owner, name, key in ((protocol, "encode_request", "encode_request"),
                                 (protocol, "decode_request_body", "decode_request"),
                                 (protocol, "encode_response", "encode_response"),
                                 (protocol, "decode_response", "decode_response"),
                                 (offload, "load", "load"), (offload, "replay", "replay")):
            _timed(owner, name, key, totals, keep)
        # child.py binds protocol's functions through the module, so the wrappers apply.
        assert child.protocol is protocol
        # The work between the phases, to split what "around" holds (see _split).
        from fxoffload.executors import inprocess

        for owner, name, key in ((offload, "build_request", "build_request"),
                                 (inprocess, "compile_request", "compile_request"),
                                 (child, "_compile", "child_compile"),
                                 (offload, "install", "install")):
            _timed(owner, name, key, totals)
        compiled = torch.compile(model, backend=fxoffload.backend(mode="serde"))
    else:
        compiled = torch.compile(model)
    import gc

    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor.compile_fx import _InProcessFxCompile

    if config.startswith("serde"):
        from fxoffload import integration

        integration.install()  # its hook replaces fx_codegen_and_compile: time the hook
    # All of the cache miss's compile call (serde: fxoffload's whole replacement of it),
    # so "fx_codegen_and_compile - inductor_compile" is everything around Inductor's own
    # compile, boundary phases or not, in both configs.
    _timed(compile_fx_module, "fx_codegen_and_compile", "fx_codegen_and_compile", totals)
    gc.callbacks.append(_gc_clock)
    # Inductor's own compile, in both configs (serde's child calls the same method): does
    # the compile itself run as fast on the far side of the boundary as in stock?
    _timed(_InProcessFxCompile, "codegen_and_compile", "inductor_compile", totals)
    gc0 = _GC["s"]
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(**inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    totals["first_call_gc"] = _GC["s"] - gc0
    result: dict[str, Any] = {"model": model_name, "config": config, "first_call_s": first,
                              "phases": dict(totals)}
    if config.startswith("serde"):
        import fxoffload

        stats = fxoffload.stats()
        result["graphs_offloaded"] = stats.graphs_offloaded
        result["fallbacks"] = dict(stats.fallbacks)
        result["compile_s"] = stats.compile_s
        result["kernels_reused"] = stats.kernels_reused
        if "encode_request" not in keep:  # fell back before a request was built
            raise RuntimeError("nothing crossed the boundary (an FX graph cache hit? run "
                               f"with an empty TORCHINDUCTOR_CACHE_DIR); fallbacks: "
                               f"{dict(stats.fallbacks)}")
        result["again"] = _again(keep)
        if profile:
            result["profile"] = keep.get("profile_load", "") + _profile(keep)
            result["load_detail"] = keep.get("load_detail", {})
    return result


def _profile_first(owner: Any, name: str, keep: dict[str, Any]) -> None:
    """cProfile the first call of ``owner.name`` (cumulative, top 30) into keep."""
    import cProfile
    import io
    import pstats

    fn = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if f"profile_{name}" in keep:
            return fn(*args, **kwargs)
        prof = cProfile.Profile()
        prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
            keep[f"profile_{name}"] = buf.getvalue()

    setattr(owner, name, wrapper)


def _load_detail(keep: dict[str, Any]) -> None:
    """Per-call timings inside the parent's loads (GPU): Triton kernel lookups (and
    whether Inductor's in-memory kernel cache had each), the wait for kernels, and the
    FX-cache bundler's copies. Into keep["load_detail"]."""
    from torch._inductor.async_compile import AsyncCompile, CompiledTritonKernels

    detail = keep.setdefault("load_detail", {})

    def timed(owner: Any, name: str, label: str, hit: bool = False) -> None:
        fn = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not detail.get("in_load"):
                return fn(*args, **kwargs)
            if hit and len(args) >= 3:
                key = "kernel_cache_hits" if CompiledTritonKernels.get(args[2]) is not None \
                    else "kernel_cache_misses"
                detail[key] = detail.get(key, 0) + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                d = detail.setdefault(label, [0, 0.0])
                d[0] += 1
                d[1] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(AsyncCompile, "triton", "triton", hit=True)
    timed(AsyncCompile, "wait", "wait")
    try:
        from torch._inductor.triton_bundler import TritonBundler

        timed(TritonBundler, "put_static_autotuner", "put_static_autotuner")
    except (ImportError, AttributeError):
        pass
    if os.environ.get("SERDE_BENCH_KEEP_KERNELS"):  # experiment: no removal on a hit
        CompiledTritonKernels.remove_future = staticmethod(lambda src: None)
    from fxoffload import offload

    load = offload.load

    def in_load(*args: Any, **kwargs: Any) -> Any:
        detail["in_load"] = True
        try:
            return load(*args, **kwargs)
        finally:
            detail["in_load"] = False

    offload.load = in_load


def _again(keep: dict[str, Any]) -> list[tuple[float, float]]:
    """Encode and decode the first request three more times: (encode, decode) seconds.
    Against the first call's phases this separates first-time costs from the work."""
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxoffload import protocol

    (req,), kw, data = keep["encode_request"]
    out = []
    for _ in range(3):
        t0 = time.perf_counter()
        data = protocol.encode_request(req, **kw)
        t1 = time.perf_counter()
        protocol.decode_request_body(protocol.split_request(data)[1],
                                     FakeTensorMode(shape_env=ShapeEnv()))
        out.append((t1 - t0, time.perf_counter() - t1))
    return out


def _profile(keep: dict[str, Any]) -> str:
    """cProfile a second encode and decode of the first request, by own time."""
    import cProfile
    import io
    import pstats

    from fxoffload import protocol

    (req,), kw, data = keep["encode_request"]
    prof = cProfile.Profile()
    prof.enable()
    protocol.encode_request(req, **kw)
    _, body = protocol.split_request(data)
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    protocol.decode_request_body(body, FakeTensorMode(shape_env=ShapeEnv()))
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue()


def _around(phases: dict[str, float]) -> float:
    return phases.get("fx_codegen_and_compile", 0.0) - phases.get("inductor_compile", 0.0)


def _split(ph: dict[str, float]) -> dict[str, float]:
    """What "around" holds besides the phases, by the function it ran in."""
    g = ph.get
    parts = {
        "capture state + checks": g("build_request", 0.0) - g("encode_request", 0.0),
        "child set-up/tear-down": g("child_compile", 0.0) - g("decode_request", 0.0)
        - g("inductor_compile", 0.0),
        "child rest": g("compile_request", 0.0) - g("child_compile", 0.0)
        - g("encode_response", 0.0),
        "install rest": g("install", 0.0) - g("load", 0.0) - g("replay", 0.0),
    }
    parts["unaccounted"] = (_around(ph) - sum(g(k, 0.0) for k in PHASES)
                            - sum(parts.values()))
    return parts


def _medians(samples: list[dict]) -> None:
    """The medians table, per model and config, in the samples' order."""
    models = list(dict.fromkeys(x["model"] for x in samples))
    configs = list(dict.fromkeys(x["config"] for x in samples if x["config"] != "stock"))
    print("\nMedians over reps (boundary, and all of around, / median stock first call):\n")
    print("| model | config | boundary (s) | stock first call (s) | added | around (s) | "
          "added | serde first call (s) | x stock | Inductor compile, stock (s) | "
          "the same, serde (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def median(name: str, config: str, value: Any) -> float:
        return statistics.median(value(x) for x in samples
                                 if x["model"] == name and x["config"] == config)

    def first_call(x: dict) -> float:
        return x["first_call_s"]

    def inductor(x: dict) -> float:
        return x["phases"].get("inductor_compile", 0.0)

    for name in models:
        stock_med = median(name, "stock", first_call)
        stock_ind = median(name, "stock", inductor)
        for config in configs:
            b = median(name, config, lambda x: x["boundary_s"])
            ind = median(name, config, inductor)
            first = median(name, config, first_call)
            ar = median(name, config, lambda x: _around(x["phases"]))
            print(f"| {name} | {config} | {b:.3f} | {stock_med:.2f} | {b / stock_med:.1%} | "
                  f"{ar:.3f} | {ar / stock_med:.1%} | "
                  f"{first:.2f} | {first / stock_med:.2f}x | {stock_ind:.2f} | {ind:.2f} |")


def run(model_name: str, config: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fxoffload-serde-bench-") as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
                   TRITON_CACHE_DIR=f"{tmp}/triton")
        cmd = [sys.executable, __file__, "--one", model_name, "--config", config,
               "--device", args.device, "--size", args.size]
        if args.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{model_name}/{config} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,bert,llama")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--configs", default="serde",
                   help="serde (the lean pickler), serde-graphpickler (torch's GraphPickler)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--config", default="serde", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write every sample here")
    p.add_argument("--summarize", nargs="+", metavar="JSON",
                   help="run nothing: print the medians table of the samples saved in these "
                        "--json files, taken together")
    args = p.parse_args()
    if args.summarize:
        _medians([x for f in args.summarize for x in json.loads(Path(f).read_text())])
        return
    if args.one:
        print(MARK + json.dumps(one(args.one, args.config, args.device, args.size,
                                    args.profile)), flush=True)
        return

    configs = args.configs.split(",")
    samples = []
    print("| model | config | stock first call (s) | serde first call (s) | compile (s) | "
          + " | ".join(f"{ph} (s)" for ph in PHASES) + " | boundary (s) | x stock first call |")
    print("|---|---|" + "---:|" * (len(PHASES) + 6))
    for name in args.models.split(","):
        for _ in range(args.reps):
            stock = run(name, "stock", args)
            samples.append(stock)
            for config in configs:
                serde = run(name, config, args)
                samples.append(serde)
                ph = serde["phases"]
                serde["boundary_s"] = boundary = sum(ph.get(k, 0.0) for k in PHASES)
                serde["stock_first_call_s"] = stock["first_call_s"]
                print(f"| {name} | {config} | {stock['first_call_s']:.2f} | "
                      f"{serde['first_call_s']:.2f} | {serde['compile_s']:.2f} | "
                      + " | ".join(f"{ph.get(k, 0.0):.3f}" for k in PHASES)
                      + f" | {boundary:.3f} | {boundary / stock['first_call_s']:.1%} |",
                      flush=True)
                print("  encode/decode again: " + ", ".join(
                    f"{e:.3f}/{d:.3f}" for e, d in serde["again"])
                    + "; first call's page faults: " + ", ".join(
                    f"{k} {ph.get(k + '_faults', 0)}" for k in (*PHASES[:2], "load"))
                    + "; in the collector: " + ", ".join(
                    f"{k} {ph.get(k + '_gc', 0.0):.3f} s" for k in (*PHASES[:2], "load"))
                    + f"; Triton kernels reused by the load: {serde.get('kernels_reused', 0)}")
                sp = stock["phases"]
                print("  Inductor's compile (codegen_and_compile): stock "
                      f"{sp.get('inductor_compile', 0.0):.2f} s (collector "
                      f"{sp.get('inductor_compile_gc', 0.0):.2f} s), {config} "
                      f"{ph.get('inductor_compile', 0.0):.2f} s (collector "
                      f"{ph.get('inductor_compile_gc', 0.0):.2f} s); collector in the whole "
                      f"first call: stock {sp.get('first_call_gc', 0.0):.2f} s, {config} "
                      f"{ph.get('first_call_gc', 0.0):.2f} s; around Inductor's compile "
                      "(fx_codegen_and_compile minus it): stock "
                      f"{_around(sp):.3f} s, {config} {_around(ph):.3f} s")
                print("  around, besides the phases: " + ", ".join(
                    f"{k} {v:.3f} s" for k, v in _split(ph).items())
                    + "; paid before the clock in each process (Triton backend hash): stock "
                    f"{sp.get('triton_backend_hash_before', 0.0):.3f} s, {config} "
                    f"{ph.get('triton_backend_hash_before', 0.0):.3f} s")
                if serde.get("fallbacks"):
                    print(f"  fallbacks: {serde['fallbacks']}")
                if "profile" in serde:
                    print(serde["profile"])
    _medians(samples)
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
