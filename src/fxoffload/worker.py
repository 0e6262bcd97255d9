"""Worker process main: ``python -m fxoffload.worker REQUEST_FD RESPONSE_FD``.

Started by ``executors.pool``. It imports torch and sends READY; then, unless a request is
already waiting, it warms Inductor up with one tiny compile (on CUDA when a GPU is present,
on CPU otherwise); it sends WARM, then serves requests one at a time until SHUTDOWN or the
end of its input pipe. Its stdout is pointed at its stderr, so
nothing a compiler prints can reach the channel, and it exits on its own within a second of
its parent's death.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import sys
import threading
import time
from collections.abc import Callable

# How long after READY the worker looks for a request before it warms up.
_REQUEST_GRACE_S = 0.05


def _watch_parent(parent: int) -> None:
    # Poll rather than PR_SET_PDEATHSIG: that fires when the *thread* that spawned us
    # exits, and the pool spawns from short-lived threads.
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.25)


def _die_with_spawning_thread() -> None:
    """SIGKILL when the pool's thread that started us exits (it lives as long as the pool):
    a worker the pool stopped (SIGSTOP, ``WorkerPool.paused``) cannot poll for its
    parent's death, and must not outlive it."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent watch still covers a live one
        pass


def _idle_class(on: bool) -> bool:
    """Put this process in (or back out of) Linux's SCHED_IDLE class; False where that
    cannot be done. Children started meanwhile (Inductor's compile pool) keep it."""
    policy = getattr(os, "SCHED_IDLE" if on else "SCHED_OTHER", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


def _warm_up(phases: dict[str, float], *, compile: bool,
             request_waiting: Callable[[], bool], wait_pool: bool = False) -> None:
    """One tiny compile (on CUDA when a GPU is present, on CPU otherwise), so imports,
    the Triton (or C++) toolchain and Inductor's own compile pools are warm before the
    first real job; without ``compile`` (a pool started because a compile is about to
    come), only what that compile would pay first anyway: Inductor's import, the CUDA
    context and Inductor's compile pool. (The CPU's vector-ISA probes, tried here too,
    only moved: on 2 cores they took as long before the request as inside it.) A
    request that arrives cuts it short at the next phase. Seconds per phase go into
    ``phases`` (sent with WARM, logged by the pool at DEBUG)."""
    import torch
    from torch._inductor import config

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() + x * 2).sum(dim=0)

    import logging

    warm_cuda = (os.environ.get("FXOFFLOAD_WARM_CUDA", "1") == "1"
                 and torch.cuda.is_available())
    # The CPU warm-up compile is skipped when the CUDA one runs (FXOFFLOAD_WARM_CPU=1
    # forces it): on an H100 machine it took 58-64 s of a 75 s start-up (the C++
    # toolchain's first compile), and a GPU model's graphs do not use it; the CUDA
    # warm-up alone warms Dynamo, AOTAutograd, Inductor and Triton (bench/worker_startup.py).
    warm_cpu = os.environ.get("FXOFFLOAD_WARM_CPU", "0" if warm_cuda else "1") == "1"

    # The warm-up is ours, not the user's: nothing of it may reach their logs (TORCH_LOGS
    # is inherited). Real compiles log through the parent (see state.captured_logs).
    logging.disable(logging.CRITICAL)
    try:
        # Every compile imports it; in a fresh worker that is 1-2 s of a cold first request
        # (2 cores), paid here while the parent still traces its graph.
        t = time.perf_counter()
        import torch._inductor.compile_fx

        phases["import_inductor_s"] = time.perf_counter() - t
        with config.patch(fx_graph_cache=False):
            if not compile:
                warm_cpu = False
                with contextlib.suppress(Exception):
                    from torch._inductor.async_compile import AsyncCompile

                    AsyncCompile.warm_pool()  # starts in the background
            if warm_cpu and not request_waiting():
                t = time.perf_counter()
                torch.compile(f, backend="inductor", fullgraph=True)(torch.randn(8, 8))
                torch._dynamo.reset()
                phases["warm_cpu_s"] = time.perf_counter() - t
            if warm_cuda:
                # CUDA context, Triton, ptxas probing and Inductor's Triton compile pool
                # would otherwise land on the first real GPU compile.
                t = time.perf_counter()
                x = torch.randn(8, 8, device="cuda")
                torch.cuda.synchronize()
                phases["cuda_init_s"] = time.perf_counter() - t
                if compile and not request_waiting():
                    t = time.perf_counter()
                    torch.compile(f, backend="inductor", fullgraph=True)(x)
                    torch.cuda.synchronize()
                    torch._dynamo.reset()
                    phases["warm_cuda_s"] = time.perf_counter() - t
        if wait_pool or os.environ.get("FXOFFLOAD_WARM_WAIT_POOL", "0") == "1":
            # Wait until Inductor's compile-process pool answers, so the first real
            # compile does not compile its kernels in this process while it starts.
            t = time.perf_counter()
            with contextlib.suppress(Exception):
                from torch._inductor.async_compile import AsyncCompile

                AsyncCompile.wait_pool_ready()
            phases["wait_pool_s"] = time.perf_counter() - t
        with contextlib.suppress(Exception):
            from torch._inductor.async_compile import AsyncCompile

            ready = AsyncCompile._ready_future
            phases["pool_ready"] = float(ready is not None and ready.done())
    finally:
        logging.disable(logging.NOTSET)


def _warm_training(phases: dict[str, float], device: str) -> None:
    """A small training step compiled on ``device``: a forward and a backward graph with
    what a transformer's graphs hold (embedding, norms, attention, rotary, matmuls, a
    loss), so a farm worker's first real training graph does not pay the first use of
    their lowerings and kernel kinds, nor each Inductor pool process its first kernel (on
    an H100, Llama's two graphs: 8.4 s after it, 10.8 s without; bench/README.md). A
    failure is recorded in ``phases`` (``warm_training_failed``), never raised."""
    import logging

    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(64, 32)
            self.norm = torch.nn.LayerNorm(32)
            self.qkv = torch.nn.Linear(32, 96, bias=False)
            self.up = torch.nn.Linear(32, 64)
            self.down = torch.nn.Linear(64, 32)

        def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids)
            pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
            angle = pos[:, None] * torch.arange(8, device=ids.device, dtype=torch.float32)
            cos, sin = angle.cos().to(h.dtype), angle.sin().to(h.dtype)
            q, k, v = self.qkv(self.norm(h)).view(*ids.shape, 6, 16).split(2, dim=2)

            def rotate(x: torch.Tensor) -> torch.Tensor:
                a, b = x[..., :8], x[..., 8:]
                return torch.cat((a * cos[:, None] - b * sin[:, None],
                                  b * cos[:, None] + a * sin[:, None]), dim=-1)

            q, k, v = (t.transpose(1, 2) for t in (rotate(q), rotate(k), v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            scores = (q @ k.transpose(-1, -2) * 0.25).softmax(dim=-1) @ v
            h = h + (att + scores).transpose(1, 2).reshape(h.shape)
            rms = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
            h = h + self.down(F.gelu(self.up(rms)) * F.silu(self.up(h)))
            logits = (h @ self.emb.weight.t()).float()
            return F.cross_entropy(logits.view(-1, 64), labels.view(-1))

    logging.disable(logging.CRITICAL)
    t = time.perf_counter()
    try:
        from torch._inductor import config

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = Block().to(device=device, dtype=dtype)
        ids = torch.randint(0, 64, (2, 16), device=device)
        with config.patch(fx_graph_cache=False):
            torch.compile(model, backend="inductor", fullgraph=True)(ids, ids).backward()
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a warm-up that fails costs speed, never the worker
        phases["warm_training_failed"] = 1.0
    finally:
        torch._dynamo.reset()
        logging.disable(logging.NOTSET)
    phases[f"warm_training_{device}_s"] = time.perf_counter() - t


def _no_trace_log() -> None:
    """This process writes no structured trace (TORCH_TRACE, or TORCH_COMPILE_DEBUG's
    tlparse dir) of its own: its warm-up is not the user's, and what a request's compile
    emits is captured and written by the parent into its own log (state.captured_logs).
    torch opens that log at its first record, so none is opened."""
    from torch._logging._internal import trace_log

    for handler in list(trace_log.handlers):
        trace_log.removeHandler(handler)


def main(argv: list[str]) -> int:
    from .wire import StreamClosed

    try:
        return _serve(argv)
    except StreamClosed:  # the parent closed our pipes (it exited or killed the pool)
        return 0


def _serve(argv: list[str]) -> int:
    request_fd, response_fd = int(argv[1]), int(argv[2])
    parent = int(os.environ.get("FXOFFLOAD_PARENT_PID", os.getppid()))
    if os.getppid() != parent:
        return 70
    os.dup2(2, 1)  # compilers print; the channel is a separate pipe
    _die_with_spawning_thread()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="fxoffload-parent-watch").start()
    nice = int(os.environ.get("FXOFFLOAD_WORKER_NICE", "0"))
    if nice:
        os.nice(nice)
    # Synchronous modes start workers beside the parent's own first compile: until warm,
    # take only CPU time nobody else wants, so that compile is not slowed.
    idle_start = os.environ.get("FXOFFLOAD_WORKER_IDLE_START") == "1" and _idle_class(True)

    start = time.perf_counter()
    from . import wire
    from ._compat import use_torch_ptxas
    from .child import compile_request  # imports torch

    _no_trace_log()
    use_torch_ptxas()  # before the warm-up reads Triton's key
    phases: dict[str, float] = {"import_s": time.perf_counter() - start}
    ready = pickle.dumps({"pid": os.getpid(), "startup_s": time.perf_counter() - start})
    wire.write_all(response_fd, wire.encode(wire.Kind.READY, ready), wire.Deadline(None))
    # A request the parent had waiting when we came up is sent at once: it would wait for
    # the whole warm-up, whose costs (toolchain, pools) its own compile pays anyway.
    def request_waiting(wait: float = 0.0) -> bool:
        return bool(select.select([request_fd], [], [], wait)[0])

    waiting = request_waiting(_REQUEST_GRACE_S)
    warmup = os.environ.get("FXOFFLOAD_WORKER_WARMUP", "1")
    if warmup in ("1", "init") and not waiting:
        _warm_up(phases, compile=warmup == "1", request_waiting=request_waiting)
        waiting = request_waiting()
    if idle_start:
        _idle_class(False)
    warm = pickle.dumps({"startup_s": time.perf_counter() - start, "phases": phases,
                         "skipped": waiting})
    wire.write_all(response_fd, wire.encode(wire.Kind.WARM, warm), wire.Deadline(None))

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
