"""A farm client on the GPU with a cache dir of its own: outputs against stock's (computed
in this process first, in another empty cache dir), and what the client's own cache dir
gained besides the kernels the farm sent (a Triton file the client wrote itself is part of
a kernel it compiled). Prints one JSON line. Needs FXOFFLOAD_FARM and FXOFFLOAD_FARM_KEY_FILE.

    python bench/farm_gpu_check.py --model gpt2 --size bench

``--model mlp2`` then ``--model mlp3`` on a farm of one worker: the second graph is new,
but its kernels are the first's; the worker sends them again (by the kernel names its
compile loaded), so the second client compiles no kernel either.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--size", default="bench")
    p.add_argument("--mode", default="farm")
    p.add_argument("--stock-out", help=argparse.SUPPRESS)  # the stock child: save outputs
    args = p.parse_args()
    if args.stock_out is None:
        # Stock runs in a process of its own: nothing of it (in-memory kernels, cache
        # dirs) can help the farm client below.
        stock_out = tempfile.mktemp(suffix=".pt")
        subprocess.run([sys.executable, __file__, "--model", args.model, "--size",
                        args.size, "--stock-out", stock_out], check=True,
                       env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()})
    ours_dir = tempfile.mkdtemp()
    if args.stock_out is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = ours_dir
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _child import build_model

    torch.manual_seed(0)
    if args.model.startswith("mlp"):  # mlp<N>: N equal layers, the same kernels for any N
        layers = [torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                      torch.nn.LayerNorm(256)) for _ in range(int(args.model[3:]))]
        model = torch.nn.Sequential(*layers).cuda().to(torch.bfloat16)

        def make_inputs() -> dict[str, torch.Tensor]:
            return {"input": torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)}
    else:
        model, make_inputs = build_model(args.model, args.size, "cuda", torch.bfloat16,
                                         False)
    torch.manual_seed(1)
    inputs = make_inputs()
    if args.stock_out:
        with torch.no_grad():
            out = torch.compile(model, backend="inductor")(**inputs)
        torch.save(torch.utils._pytree.tree_leaves(out), args.stock_out)
        return
    import fxoffload
    from fxoffload.executors.farm import INSTALLED
    from fxoffload.farm import bundle

    before = bundle.snapshot({"inductor": Path(ours_dir)})
    start = time.perf_counter()
    with torch.no_grad():
        ours = torch.compile(model, backend=fxoffload.backend(mode=args.mode))(**inputs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = [n for n in bundle.snapshot({"inductor": Path(ours_dir)}) if n not in before]
    # Installed names are "inductor/..." or "triton/...": Triton's own dir, which Inductor
    # sets to <cache>/triton/<device> when the first kernel loads (a later graph's files
    # are installed there); as names under the cache dir:
    triton_dir = Path(os.environ.get("TRITON_CACHE_DIR", ours_dir))
    installed = {n if n.startswith("inductor/") else
                 "inductor/" + os.path.relpath(triton_dir / n.split("/", 1)[1], ours_dir)
                 for n in INSTALLED}
    compiled_here = [n for n in new if "/triton/" in n and n not in installed]
    stats = fxoffload.stats()
    # A kernel the client compiled though the farm sent one of the same name: how the two
    # builds' Triton metadata differ (options, specialization, target).
    differs: dict[str, Any] = {}
    for name in compiled_here:
        if not name.endswith(".json") or "/__grp__" in name:
            continue
        base = name.rsplit("/", 1)[1]
        sent = [n for n in installed if n.endswith("/" + base)]
        if sent:
            mine = json.loads((Path(ours_dir) / name.split("/", 1)[1]).read_text())
            theirs = json.loads((Path(ours_dir) / sent[0].split("/", 1)[1]).read_text())
            differs[base] = {k: [theirs.get(k), mine.get(k)] for k in sorted(
                set(mine) | set(theirs)) if mine.get(k) != theirs.get(k) and k != "hash"}
    stock = torch.load(stock_out, weights_only=False)
    same = all(torch.equal(a, b.to(a.device)) for a, b in zip(
        torch.utils._pytree.tree_leaves(ours), stock, strict=True)
        if isinstance(a, torch.Tensor))
    print(json.dumps({"model": args.model, "same_as_stock": same, "first_call_s": seconds,
                      "farm": dict(stats.farm), "fallbacks": dict(stats.fallbacks),
                      "files_installed": stats.farm_files_installed,
                      "gpu_less_compiles": stats.gpu_less_compiles,
                      "triton_files_written_by_client": len(compiled_here),
                      "kernels_rebuilt_by_client": differs}))

if __name__ == "__main__":
    main()
