"""Where a first call's time goes: cProfile over one first call, in this (fresh) process.

    python bench/profile_first_call.py CONFIG [--model gpt2] [--device cuda] [--out DIR]

CONFIG is stock-normal, aot-eager, fxoffload-serde or fxoffload-async (warm: the pool and
``fxoffload.warmup()`` before the timer). Writes DIR/CONFIG.prof (pstats) and prints the
cumulative times of the functions that differ between the configs (Inductor's front half,
the FX cache, the boundary, the eager run). cProfile inflates Python-heavy phases, so
compare configs with each other, not with bench/first_call.py's wall times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

FILTER = ("fxoffload|compile_fx.py:.*(compile_fx|fx_codegen_and_compile|codegen_and_compile|"
          "_compile_fx_inner|joint_graph)|codecache.py:.*(load|_save_graph|torch_key|"
          "get_system|prepare_key|after_deserialization)|lazy_init|aot_module_simplified|"
          "compile_to_module|async_compile|wait_pool|output_code.py|runtime_wrapper|"
          "debugging.py|_find_and_load\\b")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="bench")
    p.add_argument("--out", default="bench/results/profiles")
    args = p.parse_args()
    import torch
    from _child import build_model

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, make_inputs = build_model(args.model, args.size, args.device, dtype, False)
    model.eval()
    inputs = make_inputs()
    if args.config == "stock-normal":
        compiled = torch.compile(model)
    elif args.config == "aot-eager":
        compiled = torch.compile(model, backend="aot_eager")
    else:
        import fxoffload

        mode = {"fxoffload-serde": "serde", "fxoffload-async": "async+subprocess"}[args.config]
        kwargs = {"mode": mode}
        compiled = torch.compile(model, backend=fxoffload.backend(**kwargs))
        fxoffload.warmup(wait=True, device=args.device, **kwargs)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    with torch.no_grad():
        prof.enable()
        compiled(**inputs)
        if args.device == "cuda":
            torch.cuda.synchronize()
        prof.disable()
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(out / f"{args.config}.prof")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(FILTER, 45)
    print(f"## {args.config}: first call {wall:.2f} s (under cProfile)")
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:12000])
    if args.config.startswith("fxoffload"):
        import fxoffload

        print(fxoffload.stats())
        fxoffload.shutdown()


if __name__ == "__main__":
    main()
