"""Configuration: one keyword-only, frozen ``Settings`` object, built from keyword
arguments first and ``FXOFFLOAD_*`` environment variables second. Nothing is read at
import; ``Settings.resolve`` runs on first use. Every value is checked when the object is
made (``ConfigError`` names the keyword or variable and what is allowed), so a backend
with bad settings fails where it is made, not at its first compile."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

BASE_MODES = ("inprocess", "serde", "capture", "subprocess", "farm")
SCHEDULES = ("sync", "async", "progressive")
# Async and progressive run the graph eagerly while one of the executing modes compiles
# it in the background (see background.py); "inprocess" has nothing to run in the
# background.
MODE_PREFIXES = ("async+", "progressive+")
ON_FAILURE = ("fallback", "eager", "raise")
# Progressive: stock config first, then max-autotune; each stage is swapped in when done.
DEFAULT_STAGES: tuple[dict[str, Any], ...] = ({}, {"max_autotune": True})
# Workers yield the CPU to the user's process: its eager steps (async modes), and its own
# compile of a graph that came before any worker was warm (sync modes).
WORKER_NICE = 10
# What one worker needs (torch, Inductor, a compile's peak), to cap the worker count.
WORKER_MEMORY_BYTES = 2 << 30

log = logging.getLogger("fxoffload")
_capped: set[tuple[int, int]] = set()


def _default_workers() -> int:
    # One compile per core is what a 2-core machine sustains; Inductor's own
    # compile threads inside each worker are sized from this too.
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    mode: str = "subprocess"
    workers: int = dataclasses.field(default_factory=_default_workers)
    timeout: float = 900.0
    startup_timeout: float = 300.0
    capture_dir: Path | None = None
    on_failure: str = "fallback"
    worker_imports: tuple[str, ...] = ()
    compile_threads: int | None = None
    nice: int | None = None
    stages: tuple[dict[str, Any], ...] | None = dataclasses.field(default=None, hash=False)
    progress: bool | None = None
    defer_trace: bool = True
    farm: str | None = None  # the farm's Ray address (mode "farm"); see fxoffload.farm
    farm_key: Path | None = None  # the farm key file (default: fxoffload.signing's)
    farm_graphs: bool = True  # share whole graphs through the farm (fxoffload.farm.graphs)
    # How long a client waits for graphs another client is compiling (0: trace its own and
    # join that client's compiles instead; the store is still read); see farm.graphs.
    farm_graph_wait: float = 120.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name not in _REQUIRED:
                continue
            _, parse = _ENV[f.name]
            object.__setattr__(self, f.name, parse(value, f.name))
        object.__setattr__(self, "workers", _capped_workers(self.workers))

    @property
    def base_mode(self) -> str:
        mode = self.mode
        for prefix in MODE_PREFIXES:
            mode = mode.removeprefix(prefix)
        return mode

    @property
    def executor(self) -> str:
        """Where a graph compiles: ``serde``, ``capture``, ``subprocess`` or ``farm``
        (``inprocess``: not offloaded)."""
        return self.base_mode

    @property
    def schedule(self) -> str:
        """When the compiled code is used: ``sync`` (the call waits for it), ``async``
        (eager until it lands) or ``progressive`` (eager, then each stage)."""
        return self.mode.split("+", 1)[0] if self.background else "sync"

    @property
    def background(self) -> bool:
        """Async or progressive: the graph runs eagerly until its compile arrives."""
        return self.mode != self.base_mode

    @property
    def progressive(self) -> bool:
        return self.mode.startswith("progressive+")

    @property
    def worker_nice(self) -> int:
        return self.nice if self.nice is not None else WORKER_NICE

    @property
    def config_stages(self) -> tuple[dict[str, Any], ...]:
        """The Inductor config overrides compiled for each graph, in swap order."""
        if not self.progressive:
            return ({},)
        return self.stages if self.stages is not None else DEFAULT_STAGES

    @property
    def show_progress(self) -> bool:
        if self.progress is not None:
            return self.progress
        return self.background and sys.stderr.isatty()

    @property
    def pool_key(self) -> tuple[Any, ...]:
        """Compiles whose settings share this key share one executor."""
        if self.base_mode == "farm":
            return ("farm", self.farm, str(self.farm_key))
        return (self.base_mode, self.background, self.workers, self.compile_threads,
                self.worker_nice, self.worker_imports, self.startup_timeout)

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> Settings:
        """Keyword arguments win over the environment; unknown keywords are errors."""
        env = os.environ if env is None else env
        kwargs = _schedule_and_executor(kwargs)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - fields
        if unknown:
            raise ConfigError(
                f"unknown fxoffload setting(s) {sorted(unknown)}; known: {sorted(fields)}"
            )
        values: dict[str, Any] = {}
        for name, (var, parse) in _ENV.items():
            if name in kwargs and kwargs[name] is not None:
                values[name] = parse(kwargs[name], name)
            elif var in env and env[var] != "":
                values[name] = parse(env[var], var)
        settings = cls(**values)
        if settings.mode == "capture" and settings.capture_dir is None:
            settings = dataclasses.replace(settings, capture_dir=Path("fxoffload-capture"))
        return settings


def _schedule_and_executor(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``schedule=``/``executor=`` keywords, the two halves of a mode string."""
    schedule = kwargs.pop("schedule", None)
    executor = kwargs.pop("executor", None)
    if schedule is None and executor is None:
        return kwargs
    if kwargs.get("mode") is not None:
        raise ConfigError("give either mode=... or schedule=/executor=, not both")
    schedule = _choice(SCHEDULES)(schedule or "sync", "schedule")
    executor = str(executor or "subprocess").strip().lower()
    prefix = "" if schedule == "sync" else f"{schedule}+"
    return {**kwargs, "mode": _mode(prefix + executor, "executor")}


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_workers() -> int:
    """How many workers this machine sustains: one compile per core, and the memory."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    memory = _memory_bytes()
    return max(1, min(cores, memory // WORKER_MEMORY_BYTES if memory else cores))


def _capped_workers(workers: int) -> int:
    most = machine_workers()
    if workers <= most:
        return workers
    if (workers, most) not in _capped:  # one warning per value
        _capped.add((workers, most))
        log.warning("fxoffload: workers=%d is more than this machine sustains (one compile "
                    "per CPU core, %.0f GiB of memory a worker): using %d", workers,
                    WORKER_MEMORY_BYTES / (1 << 30), most)
    return most


def _mode(value: Any, where: str) -> str:
    text = str(value).strip().lower()
    base = text
    for prefix in MODE_PREFIXES:
        base = base.removeprefix(prefix)
    if base not in BASE_MODES:
        raise ConfigError(
            f"{where}={value!r} is not a mode; allowed: {', '.join(BASE_MODES)} "
            f"(optionally prefixed by {' or '.join(MODE_PREFIXES)})"
        )
    if base != text and base == "inprocess":
        raise ConfigError(
            f"{where}={value!r}: a background mode needs an executing mode to run the "
            f"compile in; allowed after the prefix: serde, capture, subprocess, farm"
        )
    return text


def _positive_int(value: Any, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be a positive integer")
    return number


def _int(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} must be an integer") from None


def _seconds(value: Any, where: str) -> float:
    return _number_of_seconds(value, where, zero_ok=False)


def _seconds_or_zero(value: Any, where: str) -> float:
    return _number_of_seconds(value, where, zero_ok=True)


def _number_of_seconds(value: Any, where: str, *, zero_ok: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if zero_ok and not number >= 0:
        raise ConfigError(f"{where}={value!r} must be a number of seconds, 0 or more")
    if not zero_ok and not number > 0:
        raise ConfigError(f"{where}={value!r} must be a positive number of seconds")
    return number


def _choice(allowed: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ConfigError(f"{where}={value!r}; allowed: {', '.join(allowed)}")
        return text

    return parse


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}={value!r}; allowed: 1, 0, true, false")


def _stages(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """A list of Inductor config overrides (JSON text in the environment)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not JSON: {e}") from None
    if isinstance(value, Mapping) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}={value!r} must be a non-empty list of dicts of "
                          "Inductor config overrides, e.g. [{}, {\"max_autotune\": true}]")
    from torch._inductor import config

    known = set(config._config)
    stages = []
    for stage in value:
        if not isinstance(stage, Mapping):
            raise ConfigError(f"{where}: stage {stage!r} is not a dict")
        unknown = sorted(set(stage) - known)
        if unknown:
            raise ConfigError(f"{where}: {unknown} are not torch._inductor.config keys")
        stages.append(dict(stage))
    return tuple(stages)


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{where}={value!r} must be a path")
    return Path(value).expanduser()


def _address(value: Any, where: str) -> str:
    text = str(value).strip()
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}={value!r} is not a farm address HOST:PORT (what "
                          "`fxoffload farm up` prints)")
    return text


def _modules(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, str | list | tuple):
        raise ConfigError(f"{where}={value!r} must be module names (a list, or text "
                          "separated by commas)")
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(v).strip() for v in items if str(v).strip())
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"{where}: {name!r} is not a module name")
    return names


_ENV: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "mode": ("FXOFFLOAD_MODE", _mode),
    "workers": ("FXOFFLOAD_WORKERS", _positive_int),
    "timeout": ("FXOFFLOAD_TIMEOUT", _seconds),
    "startup_timeout": ("FXOFFLOAD_STARTUP_TIMEOUT", _seconds),
    "capture_dir": ("FXOFFLOAD_CAPTURE_DIR", _path),
    "on_failure": ("FXOFFLOAD_ON_FAILURE", _choice(ON_FAILURE)),
    "worker_imports": ("FXOFFLOAD_WORKER_IMPORTS", _modules),
    "compile_threads": ("FXOFFLOAD_COMPILE_THREADS", _positive_int),
    "nice": ("FXOFFLOAD_NICE", _int),
    "stages": ("FXOFFLOAD_STAGES", _stages),
    "progress": ("FXOFFLOAD_PROGRESS", _bool),
    "defer_trace": ("FXOFFLOAD_DEFER_TRACE", _bool),
    "farm": ("FXOFFLOAD_FARM", _address),
    "farm_key": ("FXOFFLOAD_FARM_KEY_FILE", _path),
    "farm_graphs": ("FXOFFLOAD_FARM_GRAPHS", _bool),
    "farm_graph_wait": ("FXOFFLOAD_FARM_GRAPH_WAIT", _seconds_or_zero),
}

# Fields that may not be None (the others' None means "decide later").
_REQUIRED = {"mode", "workers", "timeout", "startup_timeout", "on_failure",
             "worker_imports", "defer_trace", "farm_graphs", "farm_graph_wait"}
