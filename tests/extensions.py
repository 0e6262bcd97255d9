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
