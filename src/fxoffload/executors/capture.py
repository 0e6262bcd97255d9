"""``capture``: like ``serde``, and every request and response is written to a directory
as ``<pid>-<seq>-<kind>-<dynamo id>-<id>.request.fxo`` / ``.response.fxo`` for
``fxoffload replay`` and ``fxoffload inspect`` (see ``capture_stem``). A file that
cannot be written fails that compile's future with ``CaptureWriteFailed``, so the
parent's ``on_failure`` policy applies (by default: compile in-process, counted)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from concurrent.futures import Future
from pathlib import Path

from ..errors import CaptureWriteFailed
from ..protocol import Preamble, graph_kind, split_request
from .base import Executor
from .inprocess import InProcessExecutor


def capture_stem(preamble: Preamble, seq: int) -> str:
    """``<pid>-<seq>-<kind>-<dynamo id>-<request id>``: kind is forward, backward or
    inference; the Dynamo id is the frame's compile id with ``_`` for ``/`` (``0_0``;
    ``ca1_0_0`` under compiled autograd; ``na`` for a graph compiled outside Dynamo)."""
    compile_id = preamble.summary.get("compile_id")
    tag = re.sub(r"[^0-9A-Za-z]", "_", compile_id.replace("!", "ca")) if compile_id else "na"
    return f"{os.getpid()}-{seq:04d}-{graph_kind(preamble.summary)}-{tag}-{preamble.request_id}"


class CaptureExecutor(Executor):
    name = "capture"

    def __init__(self, directory: Path, *, background: bool = False) -> None:
        self.directory = Path(directory)
        self._inner = InProcessExecutor(background=background)
        self._seq = itertools.count()
        self.written: list[Path] = []

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise CaptureWriteFailed(path, e) from e
        self.written.append(path)

    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        preamble, _ = split_request(request)
        stem = capture_stem(preamble, next(self._seq))
        outer: Future[bytes] = Future()
        try:
            self._write(self.directory / f"{stem}.request.fxo", request)
        except CaptureWriteFailed as e:
            outer.set_exception(e)
            return outer
        response_path = self.directory / f"{stem}.response.fxo"

        def finish(inner: Future[bytes]) -> None:
            # The caller's future completes only after the response is on disk (or
            # failed to get there), as a worker's completes after its bytes arrive.
            if hasattr(inner, "started"):
                outer.started = inner.started  # type: ignore[attr-defined]
            if not outer.set_running_or_notify_cancel():
                return
            error = inner.exception()
            if error is not None:
                outer.set_exception(error)
                return
            try:
                self._write(response_path, inner.result())
            except CaptureWriteFailed as e:
                outer.set_exception(e)
                return
            outer.set_result(inner.result())

        self._inner.submit(request).add_done_callback(finish)
        return outer

    def shutdown(self, *, wait: bool = True) -> None:
        self._inner.shutdown(wait=wait)
