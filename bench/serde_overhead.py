"""What the serde path itself adds to a compile, measured inside one process.

First-call timings across fresh processes vary by ±10% on a small shared machine, more
than the serde path costs; fxoffload's own stats time each phase of the path exactly.
Prints, per model, the compile time (which includes unpickling the request on the child
side) and the time spent pickling the request, pickling the response ("transfer" in serde
mode: the child's return path) and loading the response in the parent, as a share of it.

    python bench/serde_overhead.py [--models gpt2,bert,llama] [--device cuda --size bench]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fxoffload

sys.path.insert(0, str(Path(__file__).parent))
from _child import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,bert,llama")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch._inductor.config.fx_graph_cache = False
    print("| model | graphs | compile (s) | pickle request (s) | pickle response (s) | "
          "load response (s) | added |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model, make_inputs = build_model(name, args.size, args.device, dtype, False)
        model.eval()
        torch._dynamo.reset()
        fxoffload.reset_stats()
        with torch.no_grad():
            torch.compile(model, backend=fxoffload.backend(mode="serde"))(**make_inputs())
        s = fxoffload.stats()
        added = s.serialize_s + s.transfer_s + s.deserialize_s
        print(f"| {name} | {s.graphs_offloaded} | {s.compile_s:.2f} | {s.serialize_s:.3f} | "
              f"{s.transfer_s:.3f} | {s.deserialize_s:.3f} | {added / s.compile_s:.1%} |")


if __name__ == "__main__":
    main()
