"""Where a client process builds Inductor's CPU vector-ISA probes (diagnostic, any torch).

    python bench/isa_probe_trace.py [MODE [WIDTH]]

One training step of a small MLP (hidden width WIDTH, default 64) through fxoffload's
MODE (default `subprocess`; `farm` uses FXOFFLOAD_FARM) in a fresh cache dir. Prints each
probe the client's own process makes (and the stack of one that built a library), the
stats that say whether it adopted the worker's ISAs, and the libraries in its cache dir
that did not come from the farm."""

import glob
import os
import shutil
import sys
import tempfile
import traceback

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="isa-probe-")

import torch
from torch._inductor import cpu_vec_isa

import fxoffload

original = cpu_vec_isa.VecISA.check_build


def libraries() -> set[str]:
    root = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return {p.rsplit("/", 1)[-1] for p in glob.glob(root + "/**/*.so", recursive=True)}


def traced(self, code):  # type: ignore[no-untyped-def]
    before = libraries()
    ok = original(self, code)
    built = sorted(libraries() - before)
    print(f"--- client probe {self}: {ok}, built {built or 'nothing'}")
    if built:
        print("".join(traceback.format_stack()[-7:-1]))
    return ok


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "subprocess"
    width = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    cpu_vec_isa.VecISA.check_build = traced
    model = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 8))
    compiled = torch.compile(model, backend=fxoffload.backend(mode=mode))
    if "farm" not in mode:
        fxoffload.warmup()
    compiled(torch.randn(4, 32)).sum().backward()
    shown = ("fallbacks", "farm", "farm_files_installed", "vec_isa_adopted")
    print("stats", {k: v for k, v in fxoffload.stats().__dict__.items() if k in shown})
    if "farm" in mode:
        from fxoffload.executors.farm import INSTALLED

        print("libraries not from the farm",
              sorted(libraries() - {name.rsplit("/", 1)[-1] for name in INSTALLED}))
    else:
        print("libraries", sorted(libraries()))
    fxoffload.shutdown()
    shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
