"""What a captured ``.request.fxo`` / ``.response.fxo`` holds, as text for the CLI.

Every function here returns lines; nothing prints and nothing exits. Bytes that are not a
valid capture raise ``BadInput`` (a missing file) or ``ProtocolError`` (anything the
envelope check or the unpickler rejects), which ``fxoffload.cli`` turns into exit code 2.
"""

from __future__ import annotations

import datetime
import difflib
import importlib
import logging
import pickle
import re
import sys
from pathlib import Path
from typing import Any

from . import protocol, wire
from .errors import ProtocolError


class BadInput(Exception):
    """The file cannot be read at all (missing, a directory, no permission)."""


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read: {e.strerror or e}") from None


def read_capture(path: str | Path) -> bytes:
    """``read_bytes``, and a file that does not start with fxoffload's magic is refused
    here as not an fxoffload file (a short one would otherwise read as a truncated
    envelope); a file cut inside the magic still reads as truncated."""
    data = read_bytes(path)
    head = data[: len(wire.MAGIC)]
    if not data or (head != wire.MAGIC and not (len(data) < len(wire.MAGIC)
                                                 and wire.MAGIC.startswith(data))):
        raise BadInput(f"{path}: not an fxoffload file ({len(data)} bytes, starting "
                       f"{head!r}; a capture starts with {wire.MAGIC!r})")
    return data


def fresh_fake_mode() -> Any:
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv())


def short(value: Any, limit: int = 100) -> str:
    if callable(value) and hasattr(value, "__qualname__"):
        return f"<{type(value).__name__} {getattr(value, '__module__', '?')}.{value.__qualname__}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_name(source: Any) -> str:
    name = getattr(source, "name", None)
    try:
        name = name() if callable(name) else name
    except Exception:  # noqa: BLE001 - a source that cannot name itself is shown raw
        name = None
    return str(name) if name is not None else repr(source)


# --- one line per thing ------------------------------------------------------------

def format_record(record: logging.LogRecord) -> str:
    line = f"{record.levelname} {record.name}: {record.getMessage()}"
    if record.exc_text:
        line += "\n" + "\n".join("    " + x for x in record.exc_text.splitlines())
    return line


def format_warning(warning: tuple[Any, str, str, int]) -> str:
    category, message, filename, lineno = warning
    return f"{getattr(category, '__name__', category)}: {message} ({filename}:{lineno})"


def format_input(index: int, value: Any, static: set[int]) -> str:
    import torch

    mark = " (static)" if index in static else ""
    if isinstance(value, torch.Tensor):
        shape = ", ".join(str(s) for s in value.shape)
        stride = ", ".join(str(s) for s in value.stride())
        grad = " requires_grad" if value.requires_grad else ""
        return (f"[{index}] tensor shape=({shape}) dtype={value.dtype} stride=({stride}) "
                f"device={value.device}{grad}{mark}")
    return f"[{index}] {type(value).__name__} {value}{mark}"


def nonzero_metrics(metrics: Any) -> dict[str, Any]:
    items = vars(metrics).items() if hasattr(metrics, "__dict__") else ()
    return {k: v for k, v in items if v}


# --- requests -------------------------------------------------------------------------

def preamble_lines(preamble: protocol.Preamble) -> list[str]:
    created = datetime.datetime.fromtimestamp(preamble.created).isoformat(" ", "seconds")
    summary = ", ".join(f"{k}={v}" for k, v in preamble.summary.items())
    compile_id = preamble.summary.get("compile_id")
    return [
        f"request id:   {preamble.request_id}",
        f"graph:        {protocol.graph_kind(preamble.summary)}, "
        + (f"Dynamo compile id {compile_id}" if compile_id else "no Dynamo compile id"),
        f"torch:        {preamble.torch_version}",
        f"created:      {created}",
        f"summary:      {summary}",
        f"imports:      {', '.join(preamble.imports) or '(none)'}",
        f"custom ops:   {', '.join(preamble.custom_ops) or '(none)'}",
        f"cache dirs:   inductor={preamble.cache_dir} triton={preamble.triton_cache_dir}",
    ]


def load_request(data: bytes) -> tuple[protocol.Preamble, protocol.CompileRequest, Any]:
    """Preamble, request and the fake mode it was unpickled into (its ShapeEnv holds the
    captured symbols). Imports the modules the preamble names, as a worker would."""
    preamble, body = protocol.split_request(data)
    sys.path.extend(p for p in preamble.sys_path if p not in sys.path)
    for name in preamble.imports:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            raise ProtocolError(f"request needs module {name!r}, which fails to import: "
                                f"{type(e).__name__}: {e}") from None
    fake_mode = fresh_fake_mode()
    try:
        request = protocol.decode_request_body(body, fake_mode)
    except Exception as e:  # foreign bytes inside a valid envelope
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"request body could not be unpickled: {type(e).__name__}: {e}"
                            ) from None
    return preamble, request, fake_mode


def shape_env_lines(shape_env: Any) -> list[str]:
    if shape_env is None:
        return ["  (no ShapeEnv)"]
    values = getattr(shape_env, "backed_var_to_val", None)
    if values is None:
        values = shape_env.var_to_val
    symbols = sorted(set(values) | set(shape_env.var_to_range), key=str)
    out = []
    for sym in symbols:
        vr = shape_env.var_to_range.get(sym)
        sources = [_source_name(s) for s in shape_env.var_to_sources.get(sym, [])]
        out.append(f"  {sym}: hint {values.get(sym, '?')}, range "
                   f"{f'[{vr.lower}, {vr.upper}]' if vr is not None else '?'}"
                   + (f", from {', '.join(sources)}" if sources else ""))
    if not symbols:
        out.append("  (no symbols: all shapes static)")
    guards = [str(g.expr) for g in shape_env.guards]
    out.append(f"  guards: {'; '.join(guards) if guards else '(none)'}")
    asserts = [str(a.expr) for ras in shape_env.deferred_runtime_asserts.values() for a in ras]
    if asserts:
        out.append(f"  runtime asserts: {'; '.join(asserts)}")
    if shape_env.replacements:
        out.append("  replacements: " + ", ".join(
            f"{k} -> {v}" for k, v in shape_env.replacements.items()))
    return out


def config_diff(state: Any) -> list[str]:
    """Inductor config keys whose captured value differs from torch's code default, and
    the keys carried by value (custom passes and the like)."""
    from torch._inductor import config

    entries = getattr(config, "_config", {})
    out = []
    for key, value in sorted(state.config.items()):
        entry = entries.get(key)
        try:
            same = entry is not None and bool(value == entry.default)
        except Exception:  # noqa: BLE001 - values without a usable __eq__
            same = False
        if not same:
            default = short(entry.default, 40) if entry is not None else "(unknown here)"
            out.append(f"  {key} = {short(value)}  (default {default})")
    for key, blob in sorted(state.config_by_value.items()):
        try:
            value = pickle.loads(blob)
            shown = short(value)
            note = ", equals the default" if key in entries and value == entries[key].default \
                else ""
        except Exception as e:  # noqa: BLE001
            shown, note = f"<{len(blob)} bytes, unloadable here: {type(e).__name__}>", ""
        out.append(f"  {key} = {shown}  (carried by value{note})")
    return out or ["  (all defaults)"]


def fallback_lines(names: list[str]) -> list[str]:
    from .state import _capture_fallbacks

    extra = sorted(set(names) - set(_capture_fallbacks()))
    line = f"  {len(names)} lowerings fall back to eager"
    if not extra:
        return [line + " (the same set as this process's defaults)"]
    return [line + "; forced beyond the defaults:"] + [f"    {n}" for n in extra]


def request_lines(data: bytes) -> list[str]:
    preamble, request, fake_mode = load_request(data)
    static = set(request.graph_kwargs.get("static_input_idxs") or ())
    state = request.state
    try:
        code = request.gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - print_readable is best effort; gm.code is not
        code = request.gm.code
    out = ["== request ==", *preamble_lines(preamble)]
    if request.compile_region_name:
        out.append(f"region:       {request.compile_region_name}")
    out += ["", "== graph ==", code.rstrip(), "",
            f"== example inputs ({len(request.example_inputs)}) =="]
    out += ["  " + format_input(i, v, static) for i, v in enumerate(request.example_inputs)]
    if request.inputs_to_check:
        out.append(f"  inputs to check: {list(request.inputs_to_check)}")
    out += ["", "== symbolic shapes ==", *shape_env_lines(fake_mode.shape_env)]
    out += ["", "== graph kwargs =="]
    out += [f"  {k} = {short(v)}" for k, v in request.graph_kwargs.items()]
    out += ["", "== inductor config (differs from defaults) ==", *config_diff(state)]
    out += ["", "== fallback lowerings ==", *fallback_lines(state.fallback_lowerings)]
    out += ["", "== torch flags =="]
    out += [f"  {k} = {v}" for k, v in state.torch_flags.items()]
    out.append(f"  fake mode: {state.fake_mode_flags}")
    if state.deterministic_guard is not None:
        out.append(f"  deterministic guard: {short(state.deterministic_guard)}")
    return out


# --- responses ------------------------------------------------------------------------

def load_response(data: bytes) -> protocol.CompileResponse:
    return protocol.decode_response(data, fresh_fake_mode())


_KERNEL = re.compile(r"^(\w+) = async_compile\.\w+\(")


def response_lines(data: bytes) -> list[str]:
    response = load_response(data)
    out = ["== response ==", f"worker pid:   {response.pid}",
           f"compile:      {response.compile_s:.3f} s"]
    if response.error is not None:
        reason, summary, tb = response.error
        out += [f"error:        {reason}: {summary}"]
        if tb:
            out += ["traceback:", *("  " + x for x in tb.rstrip().splitlines())]
    else:
        source = getattr(response.graph, "source_code", None) or ""
        out += [f"graph:        {type(response.graph).__name__}, source code "
                f"{len(source)} chars, {source.count(chr(10))} lines"]
        lines = source.splitlines()
        kernels = [m.group(1) for m in map(_KERNEL.match, lines) if m]
        out.append(f"kernels:      {', '.join(kernels) or '(none)'}")
        start = next((i for i, x in enumerate(lines) if x.lstrip().startswith("def call(")), 0)
        out += ["first lines of call():" if start else "first lines:",
                *("  " + x for x in lines[start : start + 15] if x.strip())]
    metrics = nonzero_metrics(response.metrics)
    out.append("metrics:      " + (", ".join(f"{k}={v}" for k, v in metrics.items())
                                   or "(all zero)"))
    for group, values in response.counters.items():
        out.append(f"counters:     {group}: {values}")
    if response.boxes:
        out.append(f"boxes:        {response.boxes}")
    out.append(f"log records:  {len(response.logs)}")
    out.append(f"warnings:     {len(response.warnings)}")
    out += ["  " + format_warning(w) for w in response.warnings]
    return out


def file_lines(data: bytes) -> list[str]:
    """``fxoffload inspect``: a request or a response, told apart by the envelope."""
    envelope = wire.decode(data, check_torch=False)
    import torch

    if envelope.torch_version != torch.__version__:
        wire.decode(data)  # raises VersionMismatch with both versions named
    if envelope.kind == wire.Kind.REQUEST:
        return request_lines(data)
    if envelope.kind == wire.Kind.RESPONSE:
        return response_lines(data)
    raise ProtocolError(f"a {envelope.kind.name} message is not a captured compile")


# --- replay: comparing generated code ---------------------------------------------------

_PATH = re.compile(r"(?:/[\w.+-]+){2,}")
_HASH = re.compile(r"\b(?=[a-z0-9]*\d)(?=[a-z0-9]*[a-z])[a-z0-9]{24,}\b")


def normalize_source(code: str) -> list[str]:
    """Generated code with what legitimately differs between two processes removed.

    Kept simple on purpose: drop comment lines that name a file path, a hash or the
    process-wide AOT graph counter (``# AOT ID``, ``# kernel path: /tmp/...``,
    ``# Topologically Sorted Source Nodes`` stay), replace any remaining absolute path
    with ``<path>`` and any long lowercase-alphanumeric token (cache keys, content hashes)
    with ``<hash>``, and ignore blank lines. Kernel names and buffer numbers are counted
    per graph, not per process, so they are left alone: a difference there is real."""
    out = []
    for line in code.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#") and (
            "AOT ID" in stripped or _PATH.search(stripped) or _HASH.search(stripped)
        ):
            continue
        out.append(_HASH.sub("<hash>", _PATH.sub("<path>", line.rstrip())))
    return out


def compare_sources(captured: str, replayed: str, context: int = 2) -> list[str]:
    """An empty list when both are equal after ``normalize_source``; else a unified diff."""
    a, b = normalize_source(captured), normalize_source(replayed)
    if a == b:
        return []
    return list(difflib.unified_diff(a, b, "captured", "replayed", lineterm="", n=context))
