"""One rank of tests/test_farm_ranks.py (under torchrun, gloo): a step with a collective,
compiled through the farm in the mode ``sys.argv[1]``; writes what it saw to
``sys.argv[2]/rank<N>.json``."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import fxoffload


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)

    def step(x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_reduce(lin(x).relu(), "sum", dist.group.WORLD)
        return (y * 2).sum(dim=-1)

    compiled = torch.compile(step, backend=fxoffload.backend(mode=mode))
    same = True
    for i in range(4):
        x = torch.full((4, 16), float(rank + i))
        with torch.no_grad():
            out = compiled(x)
            ref = step(x)  # every rank issues the same collectives in the same order
        same &= bool(torch.allclose(out, ref))
    stats = fxoffload.stats()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"same": same, "farm": dict(stats.farm), "eager_runs": stats.eager_runs,
                   "fallbacks": dict(stats.fallbacks),
                   "offloaded": stats.graphs_offloaded}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
