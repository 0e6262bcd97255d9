"""Which graph is this, as the user knows it: Dynamo's compile id (``0/0``: frame 0, first
compile; ``1/0`` the frame after a graph break; ``0/1`` a recompile), the frame's name and
its file and first line (Dynamo's resume function after a graph break is the frame's name
"resumed", at the graph break's line), and ``backward`` for AOTAutograd's backward graph.
The progress display, the timeline and log lines name graphs with it (``identify``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import threading
from typing import Any


@dataclasses.dataclass(frozen=True)
class Graph:
    """A graph as the user knows it: Dynamo's compile id and the frame it came from."""

    compile_id: str | None  # "0/0"; None outside a Dynamo compile
    name: str  # the frame's function name
    where: str  # the frame's file name and first line, "model.py:12"
    nodes: int
    part: str = ""  # "backward" for AOTAutograd's backward graph
    serial: int = 0  # numbers graphs that have no compile id

    @property
    def label(self) -> str:
        base = self.compile_id if self.compile_id is not None else f"#{self.serial}"
        return f"{base} {self.part}" if self.part else base

    def args(self, **more: Any) -> dict[str, Any]:
        """The timeline's args for an event about this graph."""
        out: dict[str, Any] = {
            "compile_id": self.compile_id if self.compile_id is not None
            else f"#{self.serial}",
            "frame": self.name, "where": self.where, "nodes": self.nodes}
        if self.part:
            out["part"] = self.part
        out.update({k: v for k, v in more.items() if v is not None})
        return out


_serials = itertools.count(1)
_frames: dict[str, tuple[str, str]] = {}  # compile id -> (name, where), newest last
_frames_lock = threading.Lock()
_FRAMES_KEPT = 512
_RESUME = re.compile(r"^torch_dynamo_resume_in_(.+)_at_(\d+)$")
_STACK_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _frame_name(name: str) -> str:
    """Dynamo's resume function after a graph break: the frame's name, resumed (its
    first line is the graph break's)."""
    resumed = _RESUME.match(name)
    return f"{resumed[1]} resumed" if resumed else name


def _frame_of_tracer() -> tuple[str, str] | None:
    """The frame Dynamo is converting on this thread (it calls the backend while it
    translates): its name and where its code starts."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
        code = root.f_code
    except Exception:  # noqa: BLE001 - no Dynamo translation on this thread
        return None
    return (_frame_name(code.co_name),
            f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}")


def _frame_of_nodes(gm: Any) -> tuple[str, str] | None:
    """The outermost user frame in the graph's node stack traces."""
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace")
        if trace and (found := _STACK_FRAME.search(trace)):
            return (_frame_name(found[3]),
                    f"{os.path.basename(found[1])}:{found[2]}")
    return None


def identify(gm: Any, graph_kwargs: dict[str, Any] | None = None) -> Graph:
    """Name the graph being compiled on this thread: under Dynamo's compile context (the
    caller's thread, or a deferred trace's thread, which enters the caller's context)."""
    compile_id = None
    try:
        import torch

        current = torch._guards.CompileContext.current_compile_id()
        compile_id = str(current) if current is not None else None
    except Exception:  # noqa: BLE001 - not under Dynamo
        pass
    frame = _frame_of_tracer()
    if compile_id is not None:
        # Remembered by compile id for the threads and later moments that have no
        # translator: a deferred trace's thread, a backward compiled at its first call.
        with _frames_lock:
            if frame is not None:
                _frames.pop(compile_id, None)
                _frames[compile_id] = frame
                while len(_frames) > _FRAMES_KEPT:
                    _frames.pop(next(iter(_frames)))
            else:
                frame = _frames.get(compile_id)
    frame = frame or _frame_of_nodes(gm) or (type(gm).__name__, "?")
    if graph_kwargs is not None:
        backward = bool(graph_kwargs.get("is_backward"))
    else:  # AOTAutograd's backward graphs take the tangents
        backward = any(n.op == "placeholder" and n.name.startswith("tangents")
                       for n in gm.graph.nodes)
    return Graph(compile_id, frame[0], frame[1], len(gm.graph.nodes),
                 "backward" if backward else "",
                 0 if compile_id is not None else next(_serials))
