"""Running a graph eagerly in place of its compiled code: ``EagerOutput``, what the
``on_failure="eager"`` policy returns, and ``run``, the call that ``EagerOutput`` and the
background modes' output (``background.BackgroundOutput``, until its compile arrives)
share. Imports nothing of fxoffload's but the stats, so the failure policy
(``offload.handle_failure``) and the background modes both use it without importing
each other."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor.output_code import OutputCode

from .tally import STATS


def run(gm: torch.fx.GraphModule, args: list[Any],
        threads: contextlib.AbstractContextManager[Any] | None = None,
        pace: Callable[[float], None] | None = None) -> Any:
    """Call ``gm`` on ``args`` eagerly, in Inductor's boxed convention (the callee frees
    its inputs), counted in ``stats().eager_runs``; then ``pace(seconds it took)``."""
    STATS.add(eager_runs=1)
    inputs = list(args)
    args.clear()
    t0 = time.perf_counter()
    with torch.no_grad(), threads or contextlib.nullcontext():
        out = gm(*inputs)
    if pace is not None:
        pace(time.perf_counter() - t0)
    return out


class EagerOutput(OutputCode):
    """A graph that runs eagerly for good (``on_failure="eager"``)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        # An instance attribute: AOTAutograd's wrappers (functools.wraps) copy __dict__.
        self._boxed_call = True
        self._gm = gm

    def __call__(self, args: list[Any]) -> Any:
        return run(self._gm, args)

    def post_compile(self, example_inputs: Sequence[Any], constants: Any,
                     graph_kwargs: Any) -> None:
        pass

    def set_triton_bundle(self, triton_bundle: Any) -> None:
        pass

    def prepare_for_serialization(self) -> None:
        raise NotImplementedError("a graph that runs eagerly is not cached")
