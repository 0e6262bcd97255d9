"""``capture``: like ``serde``, and every request and response is written to a directory
as ``<pid>-<seq>-<id>.request.fxo`` / ``.response.fxo`` for ``fxoffload replay`` and
``fxoffload inspect``."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Future
from pathlib import Path

from ..protocol import split_request
from .base import Executor
from .inprocess import InProcessExecutor


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
        stem = f"{os.getpid()}-{next(self._seq):04d}-{preamble.request_id}"
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
