"""``capture``: like ``serde``, and every request and response is written to a directory
as ``<pid>-<seq>-<kind>-<dynamo id>-<id>.request.fxo`` / ``.response.fxo`` for
``fxoffload replay`` and ``fxoffload inspect`` (see ``capture_stem``)."""

from __future__ import annotations

import itertools
import os
import re
from concurrent.futures import Future
from pathlib import Path

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
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.written.append(path)

    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        preamble, _ = split_request(request)
        stem = capture_stem(preamble, next(self._seq))
        self._write(self.directory / f"{stem}.request.fxo", request)
        response_path = self.directory / f"{stem}.response.fxo"

        def write_response(future: Future[bytes]) -> None:
            if future.exception() is None:
                self._write(response_path, future.result())

        future = self._inner.submit(request)
        future.add_done_callback(write_response)  # before the caller's callbacks run
        return future

    def shutdown(self, *, wait: bool = True) -> None:
        self._inner.shutdown(wait=wait)
