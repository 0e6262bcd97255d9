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


THREADS_SEEN: list[int] = []


@torch.library.custom_op("fxoffload_test::record_threads", mutates_args=())
def record_threads(x: torch.Tensor) -> torch.Tensor:
    """The identity, noting the intra-op thread count of whoever runs the graph."""
    THREADS_SEEN.append(torch.get_num_threads())
    return x.clone()


@record_threads.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
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


class SlowOnceInWorker(CustomGraphPass):
    """In a worker (pool or farm), the first time only (``sentinel`` does not exist yet):
    writes its pid to ``sentinel`` and sleeps, so a test can kill or stop that worker
    mid-compile; a re-dispatched attempt then compiles at once."""

    def __init__(self, sentinel: str, seconds: float = 60.0) -> None:
        self.sentinel = sentinel
        self.seconds = seconds

    def __call__(self, graph: torch.fx.Graph) -> None:
        in_worker = ("FXOFFLOAD_PARENT_PID" in os.environ
                     or "FXOFFLOAD_FARM_WORKER" in os.environ)
        if in_worker and not os.path.exists(self.sentinel):
            with open(self.sentinel, "w") as f:
                f.write(str(os.getpid()))
            import time

            time.sleep(self.seconds)

    def uuid(self) -> bytes:
        return f"fxoffload-test-slow-once-{self.sentinel}".encode()


class Noisy(CustomGraphPass):
    """Prints to stdout and writes straight to file descriptors 1 and 2, as compilers do,
    from wherever the compile runs."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        print("noisy pass: print() to stdout " * 50, flush=True)
        os.write(1, b"FXOF garbage on fd 1 that looks like an envelope header\n" * 20)
        os.write(2, b"noisy pass: raw bytes on fd 2\n")

    def uuid(self) -> bytes:
        return b"fxoffload-test-noisy-v1"


class Misbehave(CustomGraphPass):
    """In a worker only: fail in one of the ways the crash table covers."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __call__(self, graph: torch.fx.Graph) -> None:
        if "FXOFFLOAD_PARENT_PID" not in os.environ:
            return
        import ctypes
        import resource
        import sys
        import types

        if self.how == "segfault":
            ctypes.string_at(0)
        elif self.how == "exit":
            os._exit(3)
        elif self.how == "oom":
            resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
            blocks = [bytearray(1 << 28) for _ in range(64)]  # 16 GiB
            del blocks
        elif self.how == "raise":
            raise RuntimeError("boom: this pass refuses to run in a worker")
        elif self.how == "corrupt":
            os.write(int(sys.argv[2]), b"\x00garbage where a response envelope belongs" * 4)
        elif self.how == "unpicklable":
            module = types.ModuleType("fxoffload_worker_only")
            module.WorkerOnlyWarning = type("WorkerOnlyWarning", (UserWarning,), {})
            module.WorkerOnlyWarning.__module__ = "fxoffload_worker_only"
            sys.modules["fxoffload_worker_only"] = module
            warnings.warn(module.WorkerOnlyWarning("only the worker can unpickle this"),
                          stacklevel=1)

    def uuid(self) -> bytes:
        return f"fxoffload-test-misbehave-{self.how}".encode()


class WaitsForFile(CustomGraphPass):
    """In a worker (and, with ``serde_thread=True``, on ``async+serde``'s compile thread):
    blocks the compile until ``path`` exists (at most 120 s), so a test decides when
    background compiles may finish. In the caller's own compiles it does nothing."""

    def __init__(self, path: str, *, serde_thread: bool = False) -> None:
        self.path = path
        self.serde_thread = serde_thread

    def __call__(self, graph: torch.fx.Graph) -> None:
        import threading
        import time

        in_serde_thread = threading.current_thread().name == "fxoffload-serde"
        if "FXOFFLOAD_PARENT_PID" not in os.environ and not (
                self.serde_thread and in_serde_thread):
            return

        deadline = time.monotonic() + 120
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)

    def uuid(self) -> bytes:
        return f"fxoffload-test-waits-for-{self.path}".encode()


HOLD_TRACE = __import__("threading").Event()  # set: a trace reaching ``held`` waits
TRACE_HELD = __import__("threading").Event()  # set by ``held`` while it waits
TRACE_RELEASE = __import__("threading").Event()


@torch.library.custom_op("fxoffload_test::held", mutates_args=())
def held(x: torch.Tensor) -> torch.Tensor:
    """The identity; while ``HOLD_TRACE`` is set, a trace on another thread waits at it,
    inside AOTAutograd's make_fx (FX flag set), until ``TRACE_RELEASE``: a test holds a
    deferred trace mid-trace."""
    return x.clone()


@held.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    import threading

    # Dynamo's own trace runs the fake kernel too, on the caller's thread: not that one;
    # and AOTAutograd's metadata pass runs it before make_fx sets the FX flag.
    from torch.fx import _symbolic_trace

    if (HOLD_TRACE.is_set() and threading.current_thread() is not threading.main_thread()
            and _symbolic_trace._is_fx_tracing_flag):
        TRACE_HELD.set()
        TRACE_RELEASE.wait(120)
    return torch.empty_like(x)


class RaisesInJointPass:
    """A joint-graph pass (runs on whichever thread traces) that raises."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        raise RuntimeError("boom: this joint pass refuses to run")

    def uuid(self) -> bytes:
        return b"fxoffload-test-raises-in-joint-pass"


class CountsJointPass:
    """A joint-graph pass that counts its runs (it runs on whichever thread traces)."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.runs += 1

    def uuid(self) -> bytes:
        return b"fxoffload-test-counts-joint-pass"
