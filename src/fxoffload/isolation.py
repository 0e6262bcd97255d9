"""Process-global state that torch's tracing touches, kept from leaking between
fxoffload's own threads that trace or compile in this process (a deferred trace's front
thread, ``async+serde``'s compile thread: "our threads", ``our_thread``) and the user's
thread, which goes on running the model meanwhile. Torch assumes one compile at a time on
the thread that runs the model; three of its globals break that assumption:

- **The FX tracing flag.** ``Tracer.trace`` (under ``make_fx``, so under AOTAutograd and
  Inductor's pattern replacements) sets ``torch.fx._symbolic_trace._is_fx_tracing_flag``
  for the whole process. Seen from the user's thread, a call of a ``torch.compile``'d
  function then raises "Detected that you are using FX to symbolically trace a
  dynamo-optimized function", and model code that asks ``is_fx_tracing()`` takes its
  tracing branch. So the two readers report the flag only on a thread that is inside
  ``Tracer.trace`` itself.
- **The RNG state.** AOTAutograd, ``compile_fx`` and the autotuners save the global
  generators' states before tracing or benchmarking and restore them after. On our
  threads that restore would rewind what the user's steps drew meanwhile: dropout masks
  and sampled batches would repeat. So on our threads the save and restore are skipped;
  fake tensors draw nothing, and the autotuners' random inputs (``rand_strided``) come
  from a generator of the thread's own: a compile here never moves the user's generators.
- **The FX patcher.** ``Tracer.trace`` swaps ``torch.nn.Module.__call__`` and
  ``__getattr__``, ``torch.fx.wrap``'d functions and ``math``'s functions for wrappers,
  process-wide, for the length of the trace. Dynamo guards on ``Module.__call__.__code__``
  wherever it inlined a submodule call, so every compiled model call the user made
  meanwhile failed its guards and waited for the trace to recompile (measured on the
  H200, GPT-2: in every run, a 4-5 s call, then a second graph). ``make_fx``'s tracer
  (``PythonKeyTracer``: ``call_module`` calls ``forward``, ``getattr`` returns the
  value, and no proxy ever reaches a wrapped function) needs none of them, so on our
  threads its trace makes no patches.

One more global cannot be kept apart per thread: **the FX node metadata**
(``torch.fx.traceback``'s ``current_meta`` and ``should_preserve_node_meta``), which
``preserve_node_meta()`` saves on entry and puts back on exit, and which autograd's
``set/reset_grad_fn_seq_nr`` update while AOTAutograd traces a backward. Two traces that
overlap without nesting put back each other's state (a deferred trace failed with
"Expected current_level > 0, got 0" when ``async+serde``'s compile thread finished a
compile under it). So our threads take turns (``turn``). A deferred trace also holds
Dynamo's compile lock, as Dynamo's own compiles do, so the user's thread never traces
beside it; ``async+serde``'s compile thread does not (the user's next frames would wait
for its whole compile), so there a trace on the user's thread may overlap its compile's
pattern traces: that mode is for tests and debugging.

Installed when a background backend is made (on the caller's thread), never at import;
undone by ``uninstall`` at ``shutdown()`` (``patches`` group "isolation").
Per-thread state that our threads must take over from the caller's instead (the current
CUDA device) is read with ``caller_cuda_device`` and set with ``on_cuda_device``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import patches

_local = threading.local()  # .ours: a thread of fxoffload's; .tracing: Tracer.trace depth
_lock = threading.Lock()
_threads = 0  # threads of ours inside our_thread() now


# Held by fxoffload's threads that trace or compile in this process (module docstring).
turn = threading.RLock()


@contextlib.contextmanager
def our_thread() -> Iterator[None]:
    """Mark the calling thread as one of fxoffload's own (a deferred trace's front thread,
    ``async+serde``'s compile thread) for the duration; installs the shims."""
    global _threads
    with _lock:
        _install_locked()
        _threads += 1
    outer = getattr(_local, "ours", False)
    _local.ours = True
    try:
        yield
    finally:
        _local.ours = outer
        with _lock:
            _threads -= 1


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


def on_our_thread() -> bool:
    return getattr(_local, "ours", False)


def _fx_flag_visible() -> bool:
    """Whether this thread may see the FX tracing flag: only while this very thread is
    inside ``Tracer.trace``. The flag itself is one process global, set and put back by
    every trace on every thread, so traces on two threads leave it wrong for both."""
    return getattr(_local, "tracing", 0) > 0


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
    """Install the shims (idempotent). Done on the caller's thread when a background
    backend is made, before anything traces: a trace already running when the flag's
    readers change would read False until it ends."""
    with _lock:
        _install_locked()


def _install_locked() -> None:
    if patches.is_installed("isolation"):
        return
    _install_fx_flag_readers()
    _install_rng_guards()
    _install_quiet_patcher()


def uninstall() -> bool:
    """Put torch's functions back (``shutdown()``), unless a thread of ours still runs;
    False then. Modules imported after ``install`` bound our wrappers from the patched
    modules: those bindings are unwrapped too."""
    import sys

    with _lock:
        if _threads:
            return False
        for name in _RNG_GUARDED + _RAND_STRIDED:
            module = sys.modules.get(name)
            for attr in ("preserve_rng_state", "rand_strided"):
                value = getattr(module, attr, None)
                if getattr(value, "_fxoffload", False):
                    setattr(module, attr, value.__wrapped__)
        patches.uninstall("isolation")
        return True


def _install_fx_flag_readers() -> None:
    from torch.fx import _symbolic_trace as module

    patches.replace("isolation", module, "_fxoffload_fx_flag_visible", _fx_flag_visible)
    for name, replacement in (("is_fx_tracing", _is_fx_tracing),
                              ("is_fx_symbolic_tracing", _is_fx_symbolic_tracing)):
        original = getattr(module, name, None)
        if original is None or original.__code__.co_freevars:
            continue
        patches.replace_code("isolation", original, replacement.__code__.replace(
            co_name=original.__code__.co_name,
            co_filename=original.__code__.co_filename,
            co_qualname=original.__code__.co_qualname,
        ))


# Modules that call ``preserve_rng_state`` around a trace or compile (some bound the name
# at import, so each binding is replaced).
_RNG_GUARDED = ("torch._dynamo.utils", "torch._functorch.aot_autograd",
                "torch._inductor.select_algorithm", "torch._inductor.codegen.triton")
# Modules that bound ``rand_strided`` (the autotuners' random example inputs) at import;
# code generated later imports it from torch._dynamo.testing, replaced first.
_RAND_STRIDED = ("torch._dynamo.testing", "torch._inductor.select_algorithm",
                 "torch._inductor.autotune_process")


def _install_rng_guards() -> None:
    # Only modules imported already are patched: one imported later binds the replaced
    # name from torch._dynamo.utils / torch._dynamo.testing, which are patched first.
    import importlib
    import sys

    importlib.import_module("torch._dynamo.testing")
    importlib.import_module("torch._functorch.aot_autograd")
    for name in _RNG_GUARDED:
        module = sys.modules.get(name)
        if module is None:
            continue
        original = getattr(module, "preserve_rng_state", None)
        if original is not None and not getattr(original, "_fxoffload", False):
            patches.replace("isolation", module, "preserve_rng_state",
                            _skipped_on_our_threads(original))
    original = sys.modules["torch._dynamo.testing"].rand_strided
    if getattr(original, "_fxoffload", False):
        return
    private = _private_rand_strided(original)
    for name in _RAND_STRIDED:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "rand_strided", None) is original:
            patches.replace("isolation", module, "rand_strided", private)


def _skipped_on_our_threads(original: Callable[[], Any]) -> Callable[[], Any]:
    """On our threads, save and restore nothing: the restore would rewind what the user's
    thread drew meanwhile. A trace on fake tensors draws nothing; the autotuners' random
    inputs come from ``_private_rand_strided``."""
    @functools.wraps(original)
    def preserve_rng_state() -> Any:
        return contextlib.nullcontext() if on_our_thread() else original()

    preserve_rng_state._fxoffload = True  # type: ignore[attr-defined]
    return preserve_rng_state


def _private_rand_strided(original: Callable[..., Any]) -> Callable[..., Any]:
    """``rand_strided`` that, on our threads, draws from a generator of its own, so that
    a compile here never moves the user's generators (which ``preserve_rng_state`` kept
    still for a compile on the user's own thread)."""
    @functools.wraps(original)
    def rand_strided(size: Any, stride: Any, dtype: Any = None, device: Any = "cpu",
                     extra_size: int = 0) -> Any:
        import torch

        dtype = torch.float32 if dtype is None else dtype
        if not on_our_thread():
            return original(size, stride, dtype=dtype, device=device, extra_size=extra_size)
        needed = extra_size
        if all(s > 0 for s in size):
            needed += sum((n - 1) * st for n, st in zip(size, stride, strict=True)) + 1
        gen = _generator(torch.device(device))
        if not dtype.is_floating_point:
            buffer = torch.zeros(needed, dtype=dtype, device=device)
        elif dtype == getattr(torch, "float4_e2m1fn_x2", None):
            buffer = torch.randint(0, 256, (needed,), dtype=torch.uint8, device=device,
                                   generator=gen).view(dtype)
        elif dtype.itemsize == 1:  # no normal kernel for fp8: draw fp16, then cast
            buffer = torch.randn(needed, dtype=torch.float16, device=device,
                                 generator=gen).to(dtype)
        else:
            buffer = torch.randn(needed, dtype=dtype, device=device, generator=gen)
        return torch.as_strided(buffer, size, stride)

    rand_strided._fxoffload = True  # type: ignore[attr-defined]
    return rand_strided


def _generator(device: Any) -> Any:
    """This thread's own generator for ``device``."""
    import torch

    gens = _local.__dict__.setdefault("generators", {})
    key = (device.type, device.index)
    if key not in gens:
        gens[key] = torch.Generator(device=device)
        gens[key].manual_seed(0)
    return gens[key]


def _install_quiet_patcher() -> None:
    from torch.fx import _symbolic_trace as module
    from torch.fx.experimental.proxy_tensor import PythonKeyTracer

    for name in ("patch", "patch_method"):
        original = getattr(module._Patcher, name, None)
        if original is not None and not getattr(original, "_fxoffload", False):
            patches.replace("isolation", module._Patcher, name, _unless_quiet(original))
    trace = module.Tracer.trace
    if getattr(trace, "_fxoffload", False):
        return

    @functools.wraps(trace)
    def tracked_trace(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer_quiet = getattr(_local, "quiet", False)
        if on_our_thread() and isinstance(self, PythonKeyTracer):
            _local.quiet = True
        _local.tracing = getattr(_local, "tracing", 0) + 1
        try:
            return trace(self, *args, **kwargs)
        finally:
            _local.tracing -= 1
            _local.quiet = outer_quiet

    tracked_trace._fxoffload = True  # type: ignore[attr-defined]
    patches.replace("isolation", module.Tracer, "trace", tracked_trace)


def _unless_quiet(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def patch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "quiet", False):
            return None
        return original(self, *args, **kwargs)

    patch._fxoffload = True  # type: ignore[attr-defined]
    return patch
