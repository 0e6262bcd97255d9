"""One client process of the farm tests: a training step of the Block model (forward
and backward graphs) compiled through the farm; outputs, gradients and fxoffload's
stats saved to ``sys.argv[1]``. The farm's address and key come from FXOFFLOAD_FARM and
FXOFFLOAD_FARM_KEY_FILE; ``sys.argv[2]`` is the mode (default ``farm``). With
FARM_CLIENT_FORWARD_ONLY=1, the training graph's forward only: no backward runs."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import Block

import fxoffload


def step(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(x)
    out.pow(2).mean().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def main() -> None:
    out_path, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "farm")
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 8, 32)
    start = time.perf_counter()
    compiled = torch.compile(model, backend=fxoffload.backend(mode=mode))
    if os.environ.get("FARM_CLIENT_FORWARD_ONLY") == "1":
        result = [compiled(x).detach()]
    else:
        result = step(compiled, x)
    if mode.startswith("async"):
        fxoffload.wait(timeout=300)
        result = step(compiled, x)
    seconds = time.perf_counter() - start
    from fxoffload.executors.farm import INSTALLED

    torch.save({"result": result, "stats": fxoffload.stats().as_dict(), "seconds": seconds,
                "installed": sorted(INSTALLED)}, out_path)


if __name__ == "__main__":
    main()
