"""Why does a model recompile under fxoffload's async mode? At each Dynamo recompile,
re-check the failed cache entry's guards at once (a guard that passes again later was
broken only for a moment: "Unexpected recompilation" in TORCH_LOGS=recompiles) and dump
what fxoffload's threads were doing at that moment.

    python bench/recompile_watch.py [cpu|cuda] [tiny|bench] [gpt2|bert|llama]

How the FX patcher's swap of ``torch.nn.Module.__call__`` during a deferred trace was
found (``bench/measured/h200_torch211_recompile_watch_gpt2.log``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _child import build_model

import fxoffload

events: list[dict[str, Any]] = []


def _watch() -> None:
    from torch._dynamo import convert_frame

    original = convert_frame.CatchErrorsWrapper.__call__

    def __call__(self: Any, frame: Any, cache_entry: Any, frame_state: Any) -> Any:
        if cache_entry is not None:  # a recompile: this frame's guards just failed
            info: dict[str, Any] = {"code": frame.f_code.co_name}
            try:
                r = cache_entry.guard_manager.check_verbose(frame.f_locals)
                info["guards_now"] = (r.result, list(r.verbose_code_parts)[:5])
            except Exception as e:  # noqa: BLE001 - a diagnostic reports what it can
                info["guards_now"] = repr(e)
            names = {t.ident: t.name for t in threading.enumerate()}
            info["stacks"] = {
                names[ident]: "".join(traceback.format_stack(fr)[-14:])
                for ident, fr in sys._current_frames().items()
                if names.get(ident, "").startswith("fxoffload")}
            events.append(info)
        return original(self, frame, cache_entry, frame_state)

    convert_frame.CatchErrorsWrapper.__call__ = __call__  # type: ignore[method-assign]


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    size = sys.argv[2] if len(sys.argv) > 2 else "bench"
    name = sys.argv[3] if len(sys.argv) > 3 else "gpt2"
    _watch()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, make = build_model(name, size, device, dtype, False)
    model.eval()
    inputs = make()
    fxoffload.warmup(mode="async+subprocess", wait=True)
    f = torch.compile(model, backend=fxoffload.backend(mode="async+subprocess"))
    with torch.no_grad():
        t0 = time.time()
        while time.time() - t0 < 60 and fxoffload.stats().compiled_runs <= 3:
            c = time.perf_counter()
            f(**inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            if (d := time.perf_counter() - c) > 0.2:
                print(f"slow call {d:.2f}s at {time.time() - t0:.2f}s", flush=True)
    from torch._dynamo.utils import counters

    print("dynamo", dict(counters["stats"]), "fxoffload", fxoffload.stats().as_dict())
    for e in events:
        print("RECOMPILE", e["code"], "guards now:", e["guards_now"])
        for thread, stack in e["stacks"].items():
            print("STACK", thread)
            print(stack)
    fxoffload.shutdown()


if __name__ == "__main__":
    main()
