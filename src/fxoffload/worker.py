"""Worker process main: ``python -m fxoffload.worker REQUEST_FD RESPONSE_FD``.

Started by ``executors.pool``. It imports torch, warms Inductor up with one tiny compile,
sends READY, then serves requests one at a time until SHUTDOWN or the end of its input
pipe. Its stdout is pointed at its stderr, so nothing a compiler prints can reach the
channel, and it exits on its own within a second of its parent's death.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    # Poll rather than PR_SET_PDEATHSIG: that fires when the *thread* that spawned us
    # exits, and the pool spawns from short-lived threads.
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.25)


def _warm_up() -> None:
    """One tiny compile per device type, so imports, the C++/Triton toolchains and
    Inductor's own compile pools are warm before the first real job."""
    import torch
    from torch._inductor import config

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() + x * 2).sum(dim=0)

    import logging

    # The warm-up is ours, not the user's: nothing of it may reach their logs (TORCH_LOGS
    # is inherited). Real compiles log through the parent (see state.captured_logs).
    logging.disable(logging.CRITICAL)
    try:
        with config.patch(fx_graph_cache=False):
            torch.compile(f, backend="inductor", fullgraph=True)(torch.randn(8, 8))
            if torch.cuda.is_available() and os.environ.get("FXOFFLOAD_WARM_CUDA", "1") == "1":
                # CUDA context, Triton, ptxas probing and Inductor's Triton compile pool
                # would otherwise land on the first real GPU compile.
                torch._dynamo.reset()
                torch.compile(f, backend="inductor", fullgraph=True)(
                    torch.randn(8, 8, device="cuda"))
        torch._dynamo.reset()
    finally:
        logging.disable(logging.NOTSET)


def main(argv: list[str]) -> int:
    request_fd, response_fd = int(argv[1]), int(argv[2])
    parent = int(os.environ.get("FXOFFLOAD_PARENT_PID", os.getppid()))
    if os.getppid() != parent:
        return 70
    os.dup2(2, 1)  # compilers print; the channel is a separate pipe
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="fxoffload-parent-watch").start()
    nice = int(os.environ.get("FXOFFLOAD_WORKER_NICE", "0"))
    if nice:
        os.nice(nice)

    start = time.perf_counter()
    from . import wire
    from .child import compile_request

    if os.environ.get("FXOFFLOAD_WORKER_WARMUP", "1") == "1":
        _warm_up()
    ready = pickle.dumps({"pid": os.getpid(), "startup_s": time.perf_counter() - start})
    wire.write_all(response_fd, wire.encode(wire.Kind.READY, ready), wire.Deadline(None))

    while True:
        try:
            frame = wire.read_frame(request_fd, wire.Deadline(None))
        except wire.StreamClosed:
            return 0
        kind = wire.Kind(frame[6])
        if kind == wire.Kind.SHUTDOWN:
            return 0
        response = compile_request(frame)
        wire.write_all(response_fd, response, wire.Deadline(None))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
