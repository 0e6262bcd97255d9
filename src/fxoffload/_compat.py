"""Every difference between the torch versions we support (2.11 through 2.13) lives here."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

SUPPORTED = ((2, 11), (2, 13))


def torch_version() -> str:
    return torch.__version__


def torch_version_tuple() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_supported() -> None:
    lo, hi = SUPPORTED
    if not lo <= torch_version_tuple() <= hi:
        log.warning(
            "fxoffload supports torch %d.%d through %d.%d; this is torch %s",
            *lo,
            *hi,
            torch.__version__,
        )


def clear_inductor_caches() -> None:
    """Forget in-memory Inductor caches (needed when the cache dir changes under a worker)."""
    from torch._inductor import utils

    fn = getattr(utils, "clear_caches", None) or getattr(utils, "clear_inductor_caches", None)
    if fn is not None:
        fn()


def graph_pickler_options(ops_filter: Any) -> Any:
    """GraphPickler's Options with our op filter (the field exists on 2.11+)."""
    from torch.fx._graph_pickler import Options

    return Options(ops_filter=ops_filter)


def is_default_config(config: Any, name: str) -> bool:
    fn = getattr(config, "_is_default", None)
    if fn is not None:
        return bool(fn(name))
    entry = config._config[name]
    return entry.user_override is getattr(entry, "_UNSET_SENTINEL", object())


@contextlib.contextmanager
def no_save_output_code() -> Iterator[None]:
    """Keep an in-process 'child' compile from calling the parent's save_output_code hook:
    the parent replays it from the response, once, in every mode."""
    from torch._inductor.graph import GraphLowering

    saved = GraphLowering.save_output_code
    GraphLowering.save_output_code = None  # type: ignore[assignment]
    try:
        yield
    finally:
        GraphLowering.save_output_code = saved  # type: ignore[assignment]


def write_fx_cache_entry(key: str, graph: Any, guards_expr: str | None, local: bool,
                         remote_cache: Any) -> None:
    """Write a compiled graph that arrived after ``_compile_fx_inner`` returned into the
    FX graph cache under the key it computed: the tail of ``FxGraphCache._save_graph``,
    for a graph already prepared for serialization (as every response's graph is)."""
    import base64
    import pickle

    from torch._inductor.codecache import FxGraphCache

    graph.guards_expr = guards_expr
    content = pickle.dumps(graph)
    if local:
        FxGraphCache._write_to_local_cache(key, content)
    if remote_cache:
        remote_cache.put(key, {
            "data": base64.b64encode(content).decode("ascii"),
            "time_taken_ms": int((getattr(graph, "_time_taken_ns", None) or 0) // 1e6),
        })


def guards_expression(example_inputs: Any) -> str | None:
    """What ``FxGraphCache._save_graph`` stores as the entry's guard, computed now, under
    the tracing context (the compile itself finishes later)."""
    from torch._inductor.codecache import FxGraphCache

    shape_env = FxGraphCache._get_shape_env()
    if shape_env is None:
        return None
    symints = FxGraphCache._filter_backed_symints(example_inputs)
    guards = shape_env.get_pruned_guards(symints)
    return shape_env.produce_guards_expression(placeholders=symints, guards=guards)


def has_symbols(shape_env: Any) -> bool:
    """Whether a ShapeEnv holds any symbol, backed or unbacked (a compile could guard on
    it)."""
    if shape_env is None:
        return False
    backed = getattr(shape_env, "backed_var_to_val", None)  # 2.13 renamed var_to_val
    if backed is None:
        backed = getattr(shape_env, "var_to_val", None)
    return bool(backed or getattr(shape_env, "var_to_range", None))


_aot_watch: list[Any] = []  # callback(hit) once the cache was consulted
_aot_before: list[Any] = []  # fn(key) before a local lookup (farm.graphs fetches here)
_aot_saved: list[Any] = []  # fn(key, entry) after an entry was saved
# The AOTConfig whose key was computed last on this thread, while its lookup runs
# (``backward_at_once_for_this_graph``).
_aot_config = threading.local()


def _aot_seam() -> bool:
    """AOTAutograd's cache lookup and save, wrapped once (``patches`` group "aot_cache")
    to call the lists above; False where this torch's cache has no such seam."""
    from . import patches

    if patches.is_installed("aot_cache"):
        return True
    try:
        from torch._functorch._aot_autograd import autograd_cache as module
    except ImportError:
        return False
    cache = module.AOTAutogradCache
    lookup, save = cache.__dict__.get("_lookup"), cache.__dict__.get("save")
    key_fn = getattr(module, "autograd_cache_key", None)
    if not (isinstance(lookup, staticmethod) and isinstance(save, staticmethod)
            and key_fn is not None):
        return False

    def _lookup(key: str, local: bool, *args: Any, **kwargs: Any) -> Any:
        try:
            if local:
                for fn in _aot_before:
                    fn(key)
        finally:
            _aot_config.value = None
        result = lookup.__func__(key, local, *args, **kwargs)
        for fn in _aot_watch:
            fn(result is not None)
        return result

    def autograd_cache_key(*args: Any, **kwargs: Any) -> Any:
        _aot_config.value = next((a for a in (*args, *kwargs.values())
                                  if hasattr(a, "force_non_lazy_backward_lowering")), None)
        try:
            return key_fn(*args, **kwargs)
        except BaseException:
            for fn in _aot_watch:
                fn(False)
            raise

    def _save(key: str, entry: Any, *args: Any, **kwargs: Any) -> Any:
        result = save.__func__(key, entry, *args, **kwargs)
        for fn in _aot_saved:
            fn(key, entry)
        return result

    patches.replace("aot_cache", cache, "_lookup", staticmethod(_lookup))
    patches.replace("aot_cache", cache, "save", staticmethod(_save))
    patches.replace("aot_cache", module, "autograd_cache_key", autograd_cache_key)
    return True


def watch_aot_cache_lookup(callback: Any) -> bool:
    """Call ``callback(hit)`` on the looking-up thread once AOTAutograd's cache has been
    consulted (a key that cannot be computed counts as a miss). False when the cache is
    off or this torch's cache has no seam for it: then no hit is to be expected early."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config

    if not functorch_config.enable_autograd_cache or config.force_disable_caches:
        return False
    if not _aot_seam():
        return False
    if callback not in _aot_watch:
        _aot_watch.append(callback)
    return True


def on_aot_cache(*, before_lookup: Any, after_save: Any) -> bool:
    """Call ``before_lookup(key)`` before AOTAutograd's cache looks ``key`` up locally and
    ``after_save(key, entry)`` after it saved an entry; False where this torch has no
    seam for it."""
    if not _aot_seam():
        return False
    if before_lookup not in _aot_before:
        _aot_before.append(before_lookup)
    if after_save not in _aot_saved:
        _aot_saved.append(after_save)
    return True


def aot_entry_dir(key: str) -> str:
    from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCache

    return AOTAutogradCache._get_tmp_dir_for_key(key)


def fx_graph_keys(entry: Any) -> list[str]:
    """The FX graph cache keys an AOTAutograd cache entry loads (forward, backward)."""
    keys = []
    for value in vars(entry).values():
        info = getattr(value, "fx_graph_cache_info", None)
        if isinstance(info, tuple) and info and isinstance(info[0], str):
            keys.append(info[0])
    return keys


def fx_graph_entry_dir(key: str) -> str:
    from torch._inductor.codecache import FxGraphCache

    return FxGraphCache._get_tmp_dir_for_key(key)


def backward_compiled_at_once() -> Any:
    """AOTAutograd compiles the backward with the forward, not lazily (where this torch
    has the switch; else a no-op)."""
    from torch._functorch import config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


def backward_at_once_for_this_graph() -> bool:
    """Inside a ``before_lookup`` callback: AOTAutograd compiles this graph's backward
    with its forward (``force_non_lazy_backward_lowering``), not at its first backward,
    so its cache entry is saved in the backend call. False where this torch cannot."""
    config = getattr(_aot_config, "value", None)
    if config is None:
        return False
    # AOTConfig is a frozen dataclass, made before the lookup; the compile that follows
    # a miss reads this field from it (or from a copy made after the lookup).
    object.__setattr__(config, "force_non_lazy_backward_lowering", True)
    return True


def cache_can_hit() -> bool:
    """Whether AOTAutograd's cache could answer a compile now: it is on and has a local
    entry, or a remote cache. False means a deferred graph's first call need not wait for
    the lookup (an empty cache dir, the usual cold start)."""
    import os

    from torch._functorch import config as functorch_config
    from torch._inductor import config

    if not functorch_config.enable_autograd_cache or config.force_disable_caches:
        return False
    try:
        from torch._functorch._aot_autograd import autograd_cache as module

        if module.should_use_remote_autograd_cache():
            return True
        directory = module.AOTAutogradCache._get_tmp_dir()
    except Exception:  # noqa: BLE001 - another torch's layout: assume it could hit
        return True
    try:
        with os.scandir(directory) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def process_group_sizes(gm: Any) -> dict[str, int]:
    """``{group name: size}`` of the process groups the graph's collectives name."""
    from torch._ops import OpOverload

    names: set[str] = set()
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            target = node.target
            if node.op != "call_function" or not isinstance(target, OpOverload):
                continue
            if target.namespace not in ("_c10d_functional", "c10d_functional"):
                continue
            for arg in target._schema.arguments:
                if arg.name == "group_name":
                    value = node.kwargs.get("group_name")
                    if value is None:
                        index = target._schema.arguments.index(arg)
                        value = node.args[index] if index < len(node.args) else None
                    if isinstance(value, str):
                        names.add(value)
    if not names:
        return {}
    from torch.distributed.distributed_c10d import _get_group_size_by_name

    return {name: int(_get_group_size_by_name(name)) for name in sorted(names)}


def ensure_process_groups(sizes: dict[str, int]) -> None:
    """Make each named group resolvable here with its size (a worker has no process
    group; Inductor asks a collective's group for its size): a fake group, rank 0, that
    communicates nothing. Groups that resolve already (the parent's own) are left be."""
    if not sizes:
        return
    import torch._C._distributed_c10d as c10d
    from torch.distributed.distributed_c10d import _get_group_size_by_name

    for name, size in sizes.items():
        try:
            if _get_group_size_by_name(name) == size:
                continue
        except Exception:  # noqa: BLE001 - not registered, or its group is gone
            pass
        c10d._unregister_process_group(name)
        group = c10d.ProcessGroup(c10d.HashStore(), 0, size)
        create = getattr(c10d.FakeProcessGroup, "_create_internal", None)
        backend = create(0, size) if create is not None else c10d.FakeProcessGroup(0, size)
        kind = c10d.ProcessGroup.BackendType.CUSTOM
        group._register_backend(torch.device("cpu"), kind, backend)
        group._set_default_backend(kind)
        c10d._register_process_group(name, group)
        _stand_in_groups[name] = group  # the registry holds groups weakly


_stand_in_groups: dict[str, Any] = {}


def vec_isa_names() -> tuple[str, ...]:
    """This process's usable CPU vector ISAs, as Inductor's probes found them."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return tuple(str(isa) for isa in valid_vec_isa_list())


def import_before_threads() -> None:
    """Import on the caller's thread what a compile on a thread of ours would import first:
    ``torch.utils.cpp_extension`` (C++ builds) imports setuptools, whose distutils hack
    inserts a finder into ``sys.meta_path`` and removes it again. An import that the
    caller's thread runs meanwhile (Dynamo imports lazily while it traces) walks that
    list and can skip the path finder: ``ModuleNotFoundError: No module named
    'torch.distributed.tensor.experimental'``, seen in one of four demo runs with the ISA
    probes ahead."""
    import torch.utils.cpp_extension  # noqa: F401


def vec_isa_to_probe() -> list[Any]:
    """The vector ISAs that ``valid_vec_isa_list()`` would build a probe for, when this
    process has not probed them yet: on x86, those the CPU's flags report (elsewhere
    Inductor takes them from the flags, or probes none). Imports on the caller's thread
    what the probes import lazily, so that a thread of ours can run them."""
    import platform

    # codecache, cpp_builder and _filelock: imported by the probes (check_build)
    from torch._inductor import codecache, config, cpp_builder, cpu_vec_isa  # noqa: F401
    from torch.utils import _filelock  # noqa: F401

    import_before_threads()

    if (cpu_vec_isa.valid_vec_isa_list.cache_info().currsize or config.is_fbcode()
            or config.cpp.vec_isa_ok is not None
            or platform.machine() not in ("x86_64", "AMD64")):
        return []
    flags = cpu_vec_isa.x86_isa_checker()
    return [isa for isa in cpu_vec_isa.supported_vec_isa_list
            if all(flag in flags for flag in str(isa).split())]


def probed_vec_isa() -> tuple[str, ...] | None:
    """``vec_isa_names()`` where this process has probed (or adopted) already; else None,
    without probing."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return vec_isa_names() if valid_vec_isa_list.cache_info().currsize else None


def adopt_vec_isa(names: tuple[str, ...]) -> bool:
    """Take another process's probe result (``vec_isa_names``) as this one's, when this
    process has not probed yet and its CPU reports the same ISAs.

    Loading compiled CPU code asks for the usable ISAs first; Inductor finds them by
    building and loading a probe library per ISA (about 9 s in a fresh cache dir, 1.2 s
    in a warm one, on the 2-core CI machine). ``cpp.vec_isa_ok=True`` makes Inductor take
    the ISAs the CPU's flags report without probing; kept only when that list is exactly
    what the compiling process's probes found (same CPU, a compiler that builds them all),
    else forgotten, and this process probes as stock does. Returns whether it adopted."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    if valid_vec_isa_list.cache_info().currsize:
        return False  # probed (or adopted) already
    with config.patch({"cpp.vec_isa_ok": True}):
        flags_say = tuple(str(isa) for isa in valid_vec_isa_list())
    if flags_say != tuple(names):
        valid_vec_isa_list.cache_clear()
        return False
    return True


def forget_loaded_triton_kernels() -> None:
    """Empty Inductor's in-memory table of loaded Triton kernels (by source), so that the
    next compile loads each kernel from the Triton cache and names it to
    ``TritonBundler.put`` (triton_bundle.capture)."""
    from torch._inductor import async_compile

    table = getattr(async_compile, "CompiledTritonKernels", None)
    if table is not None and hasattr(table, "cache_clear"):
        table.cache_clear()


def use_torch_ptxas() -> None:
    """Point Triton at torch's bundled ptxas now, as Inductor's compile pool processes do
    when they start and its in-process compile does at each call (``TRITON_PTXAS_PATH``;
    no-op where torch has none, or the variable is set).

    Triton's cache key holds the ptxas version, read once per process: when something
    read it before that call (the FX graph cache key's system info does), a kernel
    compiled in this process is keyed by Triton's own ptxas, one compiled in the pool by
    torch's. Seen on an H200 (torch 2.11: CUDA 13.0 against Triton's 12.8): a farm
    client whose pool was not ready rebuilt a kernel the worker had sent under the other
    key. Called before either reads it: in the parent when fxoffload is installed, in a
    worker when it starts."""
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:  # moved: nothing to align
        return
    _set_triton_ptxas_path()
