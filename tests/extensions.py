"""Things a user registers from their own module: a custom op and an Inductor custom
pass. The worker imports this module (custom op) or unpickles by reference (pass)."""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


@torch.library.custom_op("fxoffload_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


@scaled_add.register_fake
def _(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.empty_like(x)


class ReluToSigmoidWarn(CustomGraphPass):
    """Rewrites relu to sigmoid (so the generated code shows whether it ran), and warns
    and logs from wherever it runs, naming the pid."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.target is torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default
        warnings.warn(f"custom pass ran in pid {os.getpid()}", stacklevel=1)
        logging.getLogger("torch._inductor.fxoffload_test").warning(
            "custom pass log from pid %d", os.getpid())

    def uuid(self) -> bytes:
        return b"fxoffload-test-relu-to-sigmoid-v1"


class FailsInWorker(CustomGraphPass):
    """Raises only inside an fxoffload worker, so the in-process fallback succeeds."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        if "FXOFFLOAD_PARENT_PID" in os.environ:
            raise RuntimeError("boom: this pass refuses to run in a worker")

    def uuid(self) -> bytes:
        return b"fxoffload-test-fails-in-worker-v1"


class SlowInWorker(CustomGraphPass):
    """In a worker: writes its pid to ``sentinel`` and sleeps, so a test can kill the
    worker while it is really compiling. In-process (the fallback) it does nothing."""

    def __init__(self, sentinel: str, seconds: float = 60.0) -> None:
        self.sentinel = sentinel
        self.seconds = seconds

    def __call__(self, graph: torch.fx.Graph) -> None:
        if "FXOFFLOAD_PARENT_PID" in os.environ:
            with open(self.sentinel, "w") as f:
                f.write(str(os.getpid()))
            import time

            time.sleep(self.seconds)

    def uuid(self) -> bytes:
        return f"fxoffload-test-slow-{self.sentinel}".encode()
