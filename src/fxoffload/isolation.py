"""Process-global state that torch's tracing touches, kept from leaking between a trace
on fxoffload's front thread (``deferred``) and the user's thread, which goes on running
the model meanwhile. Torch assumes one compile at a time on the thread that runs the
model; three of its globals break that assumption:

- **The FX tracing flag.** ``Tracer.trace`` (under ``make_fx``, so under AOTAutograd)
  sets ``torch.fx._symbolic_trace._is_fx_tracing_flag`` for the whole process. Seen from
  the user's thread, a call of a ``torch.compile``'d function then raises "Detected that
  you are using FX to symbolically trace a dynamo-optimized function", and model code
  that asks ``is_fx_tracing()`` takes its tracing branch. So the two readers report the
  flag only on the thread that set it while a front thread traces.
- **The RNG state.** AOTAutograd and ``compile_fx`` save the global generators' states
  before tracing and restore them after (tracing must not consume random numbers). On a
  front thread that restore would rewind what the user's steps drew meanwhile: dropout
  masks and sampled batches would repeat. Fake tensors draw nothing, so on a front thread
  the save and restore are skipped.
- **The FX patcher.** ``Tracer.trace`` swaps ``torch.nn.Module.__call__`` and
  ``__getattr__``, ``torch.fx.wrap``'d functions and ``math``'s functions for wrappers,
  process-wide, for the length of the trace. Dynamo guards on ``Module.__call__.__code__``
  wherever it inlined a submodule call, so every compiled model call the user made
  meanwhile failed its guards and waited for the trace to recompile (measured on the
  H200, GPT-2: in every run, a 4-5 s call, then a second graph). ``make_fx``'s tracer
  (``PythonKeyTracer``: ``call_module`` calls ``forward``, ``getattr`` returns the
  value, and no proxy ever reaches a wrapped function) needs none of them, so on a front
  thread its trace makes no patches.

One more global cannot be kept apart per thread: **the FX node metadata**
(``torch.fx.traceback``'s ``current_meta`` and ``should_preserve_node_meta``), which
``preserve_node_meta()`` saves on entry and puts back on exit, and which autograd's
``set/reset_grad_fn_seq_nr`` update while AOTAutograd traces a backward. Two traces that
overlap without nesting put back each other's state (a deferred trace failed with
"Expected current_level > 0, got 0" when ``async+serde``'s compile thread finished a
compile under it). So fxoffload's own threads that trace or compile in this process take
turns (``turn``). A deferred trace is kept apart from the user's thread (Dynamo)
by Dynamo's compile lock, which it holds while it traces; ``async+serde``'s compile
thread is not (that mode is for tests and debugging).

Installed on the first deferred trace, never at import. Per-thread state that our
threads must take over from the caller's instead (the current CUDA device) is read with
``caller_cuda_device`` and set with ``on_cuda_device``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

_local = threading.local()  # .front: this thread runs a deferred trace
_lock = threading.Lock()
_fronts = 0  # front threads tracing now
_installed = False


# Held by fxoffload's threads that trace or compile in this process (module docstring).
turn = threading.RLock()


@contextlib.contextmanager
def front_thread() -> Iterator[None]:
    """Mark the calling thread as a front thread for the duration (installs the shims)."""
    global _fronts
    install()
    _local.front = True
    with _lock:
        _fronts += 1
    try:
        yield
    finally:
        with _lock:
            _fronts -= 1
        _local.front = False


def caller_cuda_device(on_cpu: bool) -> int | None:
    """The calling thread's current CUDA device (per thread in torch), for work done for
    it on our threads; None for a CPU graph or before CUDA is initialised."""
    import torch

    if on_cpu or not torch.cuda.is_initialized():
        return None
    return torch.cuda.current_device()


def on_cuda_device(index: int | None) -> contextlib.AbstractContextManager[Any]:
    import torch

    return torch.cuda.device(index) if index is not None else contextlib.nullcontext()


def on_front_thread() -> bool:
    return getattr(_local, "front", False)


def _fx_flag_visible() -> bool:
    """Whether this thread may see the FX tracing flag: always, unless a front thread is
    tracing and this is not it (a front thread holds Dynamo's compile lock, so no other
    thread traces with Dynamo or AOTAutograd meanwhile)."""
    return _fronts == 0 or on_front_thread()


# Replacement bodies for torch.fx._symbolic_trace's readers. They run with that
# module's globals (their code is swapped into the original function objects, which
# Dynamo captured by reference), hence the injected ``_fxoffload_fx_flag_visible``.
def _is_fx_tracing() -> bool:
    is_fx_tracing_warning()  # type: ignore[name-defined]  # noqa: F821
    return _is_fx_tracing_flag and _fxoffload_fx_flag_visible()  # type: ignore[name-defined]  # noqa: F821


def _is_fx_symbolic_tracing() -> bool:
    return (_is_fx_tracing_flag and _fxoffload_fx_flag_visible()  # type: ignore[name-defined]  # noqa: F821
            and not torch.compiler.is_compiling())  # type: ignore[name-defined]  # noqa: F821


def install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        _install_fx_flag_readers()
        _install_rng_guards()
        _install_quiet_patcher()


def _install_fx_flag_readers() -> None:
    from torch.fx import _symbolic_trace as module

    module.__dict__["_fxoffload_fx_flag_visible"] = _fx_flag_visible
    for name, replacement in (("is_fx_tracing", _is_fx_tracing),
                              ("is_fx_symbolic_tracing", _is_fx_symbolic_tracing)):
        original = getattr(module, name, None)
        if original is None or original.__code__.co_freevars:
            continue
        original.__code__ = replacement.__code__.replace(
            co_name=original.__code__.co_name,
            co_filename=original.__code__.co_filename,
            co_qualname=original.__code__.co_qualname,
        )


def _install_rng_guards() -> None:
    from torch._dynamo import utils as dynamo_utils
    from torch._functorch import aot_autograd

    for module in (dynamo_utils, aot_autograd):
        original = getattr(module, "preserve_rng_state", None)
        if original is not None and not getattr(original, "_fxoffload", False):
            module.preserve_rng_state = _skipped_on_front_threads(original)


def _skipped_on_front_threads(original: Callable[[], Any]) -> Callable[[], Any]:
    @functools.wraps(original)
    def preserve_rng_state() -> Any:
        return contextlib.nullcontext() if on_front_thread() else original()

    preserve_rng_state._fxoffload = True  # type: ignore[attr-defined]
    return preserve_rng_state


def _install_quiet_patcher() -> None:
    from torch.fx import _symbolic_trace as module
    from torch.fx.experimental.proxy_tensor import PythonKeyTracer

    for name in ("patch", "patch_method"):
        original = getattr(module._Patcher, name, None)
        if original is not None and not getattr(original, "_fxoffload", False):
            setattr(module._Patcher, name, _unless_quiet(original))
    trace = module.Tracer.trace
    if getattr(trace, "_fxoffload", False):
        return

    @functools.wraps(trace)
    def quiet_trace(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not (on_front_thread() and isinstance(self, PythonKeyTracer)):
            return trace(self, *args, **kwargs)
        outer = getattr(_local, "quiet", False)
        _local.quiet = True
        try:
            return trace(self, *args, **kwargs)
        finally:
            _local.quiet = outer

    quiet_trace._fxoffload = True  # type: ignore[attr-defined]
    module.Tracer.trace = quiet_trace  # type: ignore[method-assign]


def _unless_quiet(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def patch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "quiet", False):
            return None
        return original(self, *args, **kwargs)

    patch._fxoffload = True  # type: ignore[attr-defined]
    return patch
