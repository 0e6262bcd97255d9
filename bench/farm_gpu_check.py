"""A farm client on the GPU with a cache dir of its own: outputs against stock's (computed
in this process first, in another empty cache dir), and what the client's own cache dir
gained besides the kernels the farm sent (each such Triton file is a kernel the client
compiled itself). Prints one JSON line. Needs FXOFFLOAD_FARM and FXOFFLOAD_FARM_KEY_FILE.

    python bench/farm_gpu_check.py --model gpt2 --size bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--size", default="bench")
    p.add_argument("--mode", default="farm")
    args = p.parse_args()
    stock_dir, ours_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = stock_dir
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _child import build_model

    import fxoffload
    from fxoffload.farm import bundle

    model, make_inputs = build_model(args.model, args.size, "cuda", torch.bfloat16, False)
    inputs = make_inputs()
    with torch.no_grad():
        stock = torch.compile(model, backend="inductor")(**inputs)
    torch._dynamo.reset()
    # Our compile in a fresh cache dir (Inductor reads the variable on each lookup).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = ours_dir
    from fxoffload._compat import clear_inductor_caches

    clear_inductor_caches()  # Inductor memoizes paths under the old dir
    before = bundle.snapshot({"inductor": Path(ours_dir)})
    start = time.perf_counter()
    with torch.no_grad():
        ours = torch.compile(model, backend=fxoffload.backend(mode=args.mode))(**inputs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = bundle.snapshot({"inductor": Path(ours_dir)})
    new = [n for n in after if n not in before]
    stats = fxoffload.stats()
    triton_new = [n for n in new if "/triton/" in n]
    s_flat = torch.utils._pytree.tree_leaves(stock)
    o_flat = torch.utils._pytree.tree_leaves(ours)
    same = all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
               for a, b in zip(s_flat, o_flat, strict=True) if isinstance(a, torch.Tensor))
    print(json.dumps({"model": args.model, "same_as_stock": same, "first_call_s": seconds,
                      "farm": dict(stats.farm), "fallbacks": dict(stats.fallbacks),
                      "files_installed": stats.farm_files_installed,
                      "new_files_in_client_cache": len(new),
                      "triton_files_in_client_cache": len(triton_new)}))


if __name__ == "__main__":
    main()
