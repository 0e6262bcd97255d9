"""``serde``: the whole serialize → compile → serialize path, in the calling thread."""

from __future__ import annotations

from concurrent.futures import Future

from ..child import compile_request
from .base import Executor


class InProcessExecutor(Executor):
    name = "serde"

    def submit(self, request: bytes, *, timeout: float | None = None) -> Future[bytes]:
        future: Future[bytes] = Future()
        try:
            future.set_result(compile_request(request, in_parent=True))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            future.set_exception(e)
        return future
