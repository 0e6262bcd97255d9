"""A first call on the GPU: stock Inductor against fxoffload's default (no ``warmup()``: the
graph compiles in-process, the pool paused meanwhile) and the same with the pool never
started. One fresh process per run; the caller loops over variants with empty caches:

    for v in stock default nopool default stock nopool; do TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) \\
      TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python3 bench/gpu_cold_probe.py $v; done

Prints the seconds in the backend call and the whole first call (see
bench/measured/h200_torch211_cold_probe_2026-12-03.log).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _child import build_model


def main(variant: str) -> None:
    model, make = build_model("gpt2", "bench", "cuda", torch.bfloat16, False)
    inputs = make()
    seconds: dict[str, float] = {}
    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        if variant == "stock":
            from torch._dynamo.backends.registry import lookup_backend

            inner = lookup_backend("inductor")
        else:
            import fxoffload

            if variant == "nopool":
                from fxoffload.executors.pool import WorkerPool

                WorkerPool.warmup = lambda self, wait=False, full=True: None  # type: ignore
            inner = fxoffload.backend(mode="subprocess")

        def backend(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(gm, example_inputs, **kwargs)
            finally:
                seconds["backend"] = time.perf_counter() - start

        compiled = torch.compile(model, backend=backend)
        start = time.perf_counter()
        compiled(**inputs)
        torch.cuda.synchronize()
        seconds["first call"] = time.perf_counter() - start
    print(variant, {k: round(v, 2) for k, v in seconds.items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # no pool shutdown: the probe times the first call only
