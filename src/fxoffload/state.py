"""State capture and restore: everything about the parent that Inductor's compile reads,
other than its arguments, and how the child puts it back.

Captured in the parent (``capture_state``), restored in the child (``restored``):

- Inductor config: ``save_config_portable()`` plus the keys it drops (custom passes,
  choices factories, trace options) carried by value when they differ from defaults;
- the ``V`` virtualized handlers Inductor reads during compile (others are poisoned);
- lowerings forced to fall back (``lowering.force_fallback``);
- FakeTensorMode flags;
- global torch flags that change generated code (deterministic algorithms, float32
  matmul precision, TF32) and the test suite's DeterministicGuard;
- the levels of the ``torch._inductor`` loggers;
- whether torch's structured trace (``TORCH_TRACE``, for tlparse) is on, and the compile
  id its records are filed under: the child captures what ``trace_structured`` emits
  during the compile and the parent writes it into its own trace log (``replay``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ._compat import is_default_config
from .errors import NotOffloadable

# Keys that save_config_portable drops but that change what the child generates.
_POLICY_ONLY_KEYS = {"fx_graph_cache", "fx_graph_remote_cache", "autotune_local_cache",
                     "autotune_remote_cache", "compile_threads", "worker_start_method",
                     "force_disable_caches"}
_VIRTUALIZED = ("aot_compilation", "choices", "local_buffer_context", "ops", "kernel",
                "current_node")


@dataclasses.dataclass
class FwMetadataView:
    """The fields of AOTAutograd's ViewAndMutationMeta that Inductor's codegen reads from
    ``TracingContext.fw_metadata`` (GraphPickler drops fw_metadata entirely; without
    ``bw_donated_idxs`` a backward compiles without buffer donation, i.e. other code)."""

    bw_donated_idxs: Any = None
    static_input_indices: Any = None
    num_mutated_inp_runtime_indices: Any = None

    @classmethod
    def capture(cls) -> FwMetadataView | None:
        context = torch._guards.TracingContext.try_get()
        meta = getattr(context, "fw_metadata", None)
        if meta is None:
            return None
        return cls(**{f.name: getattr(meta, f.name, None) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class CapturedState:
    config: dict[str, Any]
    config_by_value: dict[str, bytes]
    virtualized: dict[str, Any]
    fallback_lowerings: list[str]
    fake_mode_flags: dict[str, Any]
    torch_flags: dict[str, Any]
    deterministic_guard: Any
    logger_levels: dict[str, tuple[int, bool]]
    inductor_effective_level: int
    fw_metadata: FwMetadataView | None = None
    triton_backend_hash: str | None = None
    # None: the parent writes no structured trace. Else the ids its records carry
    # (frame_id, frame_compile_id, attempt, ...; empty outside a Dynamo compile).
    structured_trace: dict[str, int] | None = None


def capture_state(fake_mode: Any, *, gpu: bool = False) -> CapturedState:
    from torch._inductor import config

    portable = config.save_config_portable()
    factory_keys = set(getattr(config, "_cache_config_factory_keys", ()))
    by_value: dict[str, bytes] = {}
    for key in config.get_config_copy():
        if key in _POLICY_ONLY_KEYS:
            continue
        if key in portable and key not in factory_keys:
            continue
        if is_default_config(config, key):
            continue
        value = getattr(config, key)
        try:
            by_value[key] = pickle.dumps(value)
        except Exception as e:  # noqa: BLE001 - any pickling failure
            raise NotOffloadable(
                "unpicklable_config",
                f"torch._inductor.config.{key}={value!r} cannot be pickled ({e}); the child "
                "would compile without it. Make it a module-level object to offload.",
            ) from None
        portable.pop(key, None)

    return CapturedState(
        config=portable,
        config_by_value=by_value,
        virtualized=_capture_virtualized(),
        fallback_lowerings=_capture_fallbacks(),
        fake_mode_flags={"allow_non_fake_inputs": fake_mode.allow_non_fake_inputs},
        torch_flags=_capture_torch_flags(),
        deterministic_guard=_capture_deterministic_guard(),
        logger_levels=_capture_logger_levels(),
        inductor_effective_level=logging.getLogger("torch._inductor").getEffectiveLevel(),
        fw_metadata=FwMetadataView.capture(),
        triton_backend_hash=_triton_backend_hash() if gpu else None,
        structured_trace=_capture_structured_trace(),
    )


def _trace_log() -> logging.Logger:
    return logging.getLogger("torch.__trace")  # torch._logging._internal.trace_log


def _capture_structured_trace() -> dict[str, int] | None:
    """The trace ids of the current compile when this process writes a structured trace.
    A handler without a directory (torch installs one when TORCH_TRACE is unset) writes
    nothing: it removes itself at the first record."""
    from torch._logging._internal import LazyTraceHandler

    if not any(not (isinstance(h, LazyTraceHandler) and h.root_dir is None)
               for h in _trace_log().handlers):
        return None
    trace_id = torch._guards.CompileContext.current_trace_id()
    if trace_id is None:
        return {}
    ids = {"attempt": trace_id.attempt}
    for name in ("compiled_autograd_id", "frame_id", "frame_compile_id"):
        value = getattr(trace_id.compile_id, name, None)
        if value is not None:
            ids[name] = value
    return ids


def _triton_backend_hash() -> str | None:
    # Inductor writes this hash into every Triton kernel's inductor_meta. It depends on
    # which ptxas the process found when it first asked, and Inductor sets
    # TRITON_PTXAS_PATH in the parent after that: a worker started later would hash
    # another ptxas. The parent's value is the one its caches and code use.
    try:
        return torch.utils._triton.triton_hash_with_backend()
    except Exception:  # noqa: BLE001 - no Triton, no hash to carry
        return None


def _capture_virtualized() -> dict[str, Any]:
    from torch._inductor.virtualized import V

    out = {}
    for name in _VIRTUALIZED:
        try:
            out[name] = getattr(V, name)
        except Exception:  # noqa: BLE001 - an unset handler simply is not carried
            continue
    return out


def _is_fallback_handler(fn: object) -> bool:
    return bool(getattr(fn, "_is_fallback_handler", False))


def _capture_fallbacks() -> list[str]:
    from torch._inductor import lowering

    return [str(k) for k, v in lowering.lowerings.items() if _is_fallback_handler(v)]


def _capture_torch_flags() -> dict[str, Any]:
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        # Inductor's C++ code is written for this many OpenMP threads (when
        # config.cpp.threads is unset); a worker may have another count (Ray gives an
        # actor of one CPU one thread).
        "num_threads": _user_threads(),
    }


def _user_threads() -> int:
    from .cpu_threads import user_threads

    return user_threads()


def _capture_deterministic_guard() -> Any:
    # Only when the test suite's module is already imported: importing it has side effects.
    module = sys.modules.get("torch.testing._internal.common_utils")
    guard = getattr(module, "DeterministicGuard", None)
    current = getattr(guard, "_current_state", None)
    return current() if current is not None else None


def _inductor_loggers() -> Iterator[logging.Logger]:
    # dict.copy() runs in C under the GIL: a logger created meanwhile on another thread
    # cannot break it (logging's module lock is private API, gone in Python 3.13).
    for name, logger in logging.Logger.manager.loggerDict.copy().items():
        if isinstance(logger, logging.Logger) and (
            name == "torch._inductor" or name.startswith("torch._inductor.")
        ):
            yield logger


def _capture_logger_levels() -> dict[str, tuple[int, bool]]:
    return {lg.name: (lg.level, lg.propagate) for lg in _inductor_loggers()}


# --- the child's side -------------------------------------------------------------


class _CaptureHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.NOTSET)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        # Format now: args may hold graphs or lazy objects that do not pickle.
        try:
            message = record.getMessage()
        except Exception as e:  # noqa: BLE001
            message = f"{record.msg!r} (unformattable: {e})"
        clone = logging.makeLogRecord(record.__dict__)
        clone.msg, clone.args = message, None
        if record.exc_info:
            clone.exc_text = logging.Formatter().formatException(record.exc_info)
        clone.exc_info = None
        clone.stack_info = record.stack_info
        self.records.append(clone)


class _TraceCaptureHandler(_CaptureHandler):
    """Captures ``trace_structured``'s records (their metadata and payload go along as
    record attributes), filed under the parent's compile id: the child has no Dynamo
    compile context, so torch recorded a stack instead."""

    def __init__(self, records: list[logging.LogRecord], ids: dict[str, int]) -> None:
        super().__init__(records)
        self.ids = ids

    def emit(self, record: logging.LogRecord) -> None:
        metadata = getattr(record, "metadata", None)
        if self.ids and isinstance(metadata, dict) and "frame_id" not in metadata \
                and "compiled_autograd_id" not in metadata:
            metadata.pop("stack", None)
            metadata.update(self.ids)
        super().emit(record)


@contextlib.contextmanager
def captured_logs(state: CapturedState) -> Iterator[list[logging.LogRecord]]:
    """Route every ``torch._inductor`` record into a list, at the parent's levels, and
    nowhere else; restore the loggers exactly afterwards. When the parent writes a
    structured trace, what ``trace_structured`` emits goes into the list too (and into
    no trace log of this process)."""
    records: list[logging.LogRecord] = []
    handler = _CaptureHandler(records)
    root = logging.getLogger("torch._inductor")
    for name in state.logger_levels:
        logging.getLogger(name)
    saved = {lg.name: (lg.level, lg.propagate, list(lg.handlers)) for lg in _inductor_loggers()}
    trace_log, trace_handlers = _trace_log(), list(_trace_log().handlers)
    trace_ids = getattr(state, "structured_trace", None)  # absent from older captures
    try:
        if trace_ids is not None:
            trace_log.handlers[:] = [_TraceCaptureHandler(records, trace_ids)]
        for lg in _inductor_loggers():
            level, propagate = state.logger_levels.get(lg.name, (logging.NOTSET, True))
            lg.setLevel(level)
            lg.propagate = propagate
            for h in list(lg.handlers):
                lg.removeHandler(h)
            if not propagate:
                lg.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(state.inductor_effective_level)
        root.propagate = False
        if handler not in root.handlers:
            root.addHandler(handler)
        yield records
    finally:
        if trace_ids is not None:
            trace_log.handlers[:] = trace_handlers
        for lg in _inductor_loggers():
            if lg.name in saved:
                level, propagate, handlers = saved[lg.name]
                lg.setLevel(level)
                lg.propagate = propagate
                lg.handlers[:] = handlers
            else:  # created during the compile
                if handler in lg.handlers:
                    lg.removeHandler(handler)


@contextlib.contextmanager
def restored(state: CapturedState, fake_mode: Any) -> Iterator[None]:
    """Put the parent's state in place for one compile in this process."""
    from torch._inductor import config

    with contextlib.ExitStack() as stack:
        patch = dict(state.config)
        patch.update({k: pickle.loads(v) for k, v in state.config_by_value.items()})
        current = config.get_config_copy()
        # Patch only what differs: config.patch marks every key it touches as
        # user-set, which would change _is_default() in this (possibly parent) process.
        patch = {k: v for k, v in patch.items() if k not in current or current[k] != v}
        stack.enter_context(config.patch(patch))
        stack.enter_context(_virtualized(state.virtualized))
        stack.enter_context(_fallbacks(state.fallback_lowerings))
        stack.enter_context(_torch_flags(state.torch_flags))
        if state.triton_backend_hash is not None:
            stack.enter_context(_patched(torch.utils._triton, "triton_hash_with_backend",
                                         lambda: state.triton_backend_hash))
        if state.deterministic_guard is not None:
            stack.enter_context(state.deterministic_guard)
        saved_allow = fake_mode.allow_non_fake_inputs
        fake_mode.allow_non_fake_inputs = state.fake_mode_flags["allow_non_fake_inputs"]
        stack.callback(setattr, fake_mode, "allow_non_fake_inputs", saved_allow)
        yield


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextlib.contextmanager
def _virtualized(values: dict[str, Any]) -> Iterator[None]:
    from torch._inductor import virtualized
    from torch._inductor.virtualized import V

    poison = getattr(virtualized, "_PoisonedVirtual", None)
    with contextlib.ExitStack() as stack:
        for set_name in dir(V):
            if not set_name.startswith("set_"):
                continue
            name = set_name[4:].removesuffix("_handler")
            if name in values:
                stack.enter_context(getattr(V, set_name)(values[name]))
            elif poison is not None:
                # Anything the parent did not carry must fail loudly if read, not
                # silently read the child's default.
                stack.enter_context(getattr(V, set_name)(poison))
        yield


@contextlib.contextmanager
def _fallbacks(names: list[str]) -> Iterator[None]:
    from torch._inductor import lowering

    wanted = set(names)
    with contextlib.ExitStack() as stack:
        for op, fn in list(lowering.lowerings.items()):
            if str(op) in wanted and not _is_fallback_handler(fn):
                stack.enter_context(lowering.force_fallback(op))
        yield


@contextlib.contextmanager
def _torch_flags(flags: dict[str, Any]) -> Iterator[None]:
    before = {**_capture_torch_flags(), "num_threads": torch.get_num_threads()}

    def apply(f: dict[str, Any]) -> None:
        torch.use_deterministic_algorithms(f["deterministic"],
                                           warn_only=f["deterministic_warn_only"])
        torch.set_float32_matmul_precision(f["float32_matmul_precision"])
        torch.backends.cuda.matmul.allow_tf32 = f["cuda_matmul_allow_tf32"]
        torch.backends.cudnn.allow_tf32 = f["cudnn_allow_tf32"]
        torch.backends.cudnn.deterministic = f["cudnn_deterministic"]
        if torch.get_num_threads() != f["num_threads"]:
            torch.set_num_threads(f["num_threads"])

    apply(flags)
    try:
        yield
    finally:
        apply(before)
