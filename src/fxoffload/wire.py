"""The wire format: a versioned envelope around every message that crosses the boundary.

    offset  size  field
    0       4     magic  b"FXOF"
    4       2     protocol version (big-endian)
    6       1     kind (REQUEST, RESPONSE, READY, SHUTDOWN)
    7       1     length of the torch version string (n)
    8       8     payload length (m)
    16      16    blake2b-128 digest of torch version + payload
    32      n     torch version, ASCII
    32+n    m     payload

The header is checked before any payload byte is trusted: a short read, a bad magic, a
digest that does not match or a length beyond ``MAX_PAYLOAD`` raise ``ProtocolError``;
another protocol or torch version raises ``VersionMismatch`` naming both. Only then is
the payload handed to an unpickler.
"""

from __future__ import annotations

import enum
import hashlib
import os
import select
import struct
import time
from dataclasses import dataclass

from .errors import ProtocolError, VersionMismatch

MAGIC = b"FXOF"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sHBBQ16s")
MAX_PAYLOAD = 1 << 36  # 64 GiB: any larger length is corruption, not a graph


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    READY = 3  # worker -> parent: imported, takes requests
    SHUTDOWN = 4
    WARM = 5  # worker -> parent, once after READY: warmed up (or skipped it for a request)


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    torch_version: str
    payload: bytes


def _digest(version: bytes, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(version)
    h.update(payload)
    return h.digest()


def encode(kind: Kind, payload: bytes, torch_version: str | None = None) -> bytes:
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    version = torch_version.encode("ascii")
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), len(version), len(payload),
                         _digest(version, payload))
    return b"".join((header, version, payload))


def _parse_header(header: bytes) -> tuple[int, int, int, int, bytes]:
    if len(header) < HEADER.size:
        raise ProtocolError(
            f"truncated envelope: {len(header)} bytes, the header alone is {HEADER.size}"
        )
    magic, proto, kind, vlen, plen, digest = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise ProtocolError(f"not an fxoffload envelope (magic {magic!r}, expected {MAGIC!r})")
    if proto != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"envelope uses fxoffload protocol {proto}; this side speaks {PROTOCOL_VERSION}"
        )
    if plen > MAX_PAYLOAD:
        raise ProtocolError(f"corrupted envelope: payload length {plen} is implausible")
    try:
        Kind(kind)
    except ValueError:
        raise ProtocolError(f"corrupted envelope: unknown message kind {kind}") from None
    return proto, kind, vlen, plen, digest


def decode(data: bytes | memoryview, *, expect: Kind | None = None,
           check_torch: bool = True) -> Envelope:
    """Validate ``data`` completely and return its envelope."""
    data = memoryview(data)
    _, kind, vlen, plen, digest = _parse_header(bytes(data[: HEADER.size]))
    total = HEADER.size + vlen + plen
    if len(data) < total:
        raise ProtocolError(f"truncated envelope: {len(data)} of {total} bytes")
    if len(data) > total:
        raise ProtocolError(f"corrupted envelope: {len(data) - total} trailing bytes")
    version = bytes(data[HEADER.size : HEADER.size + vlen])
    payload = data[HEADER.size + vlen : total]
    if _digest(version, payload) != digest:
        raise ProtocolError("corrupted envelope: checksum mismatch")
    return _finish(Kind(kind), version, bytes(payload), expect, check_torch)


def _finish(kind: Kind, version: bytes, payload: bytes, expect: Kind | None,
            check_torch: bool) -> Envelope:
    text = version.decode("ascii", "replace")
    if check_torch:
        import torch

        if text != torch.__version__:
            raise VersionMismatch(
                f"message was written by torch {text}; this process runs torch "
                f"{torch.__version__}: both sides of fxoffload must run the same torch"
            )
    if expect is not None and kind != expect:
        raise ProtocolError(f"expected a {expect.name} message, got {kind.name}")
    return Envelope(kind, text, payload)


# --- streams (pipes between the parent and a worker) -------------------------------

class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def extend(self, seconds: float) -> None:
        """Move the deadline later (time the peer was stopped does not count)."""
        if self.at is not None:
            self.at += seconds


class StreamTimeout(Exception):
    """The peer sent nothing in time (translated to WorkerTimeout by the pool)."""


class StreamClosed(Exception):
    """The peer closed its end (translated to WorkerCrashed by the pool)."""


def read_exact(fd: int, n: int, deadline: Deadline) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        left = deadline.left()
        if left is not None:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                if deadline.left():  # extended meanwhile
                    continue
                raise StreamTimeout()
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise StreamClosed(f"peer closed the stream after {n - remaining} of {n} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes, deadline: Deadline) -> None:
    view = memoryview(data)
    while view:
        left = deadline.left()
        if left is not None:
            _, ready, _ = select.select([], [fd], [], left)
            if not ready:
                if deadline.left():  # extended meanwhile
                    continue
                raise StreamTimeout()
        try:
            written = os.write(fd, view[: 1 << 20])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise StreamClosed(str(e)) from None
        view = view[written:]


def read_message(fd: int, deadline: Deadline, *, expect: Kind | None = None) -> Envelope:
    return decode(read_frame(fd, deadline), expect=expect)


def read_frame(fd: int, deadline: Deadline) -> bytes:
    """Read one whole envelope's bytes (header lengths checked; ``decode`` checks the rest)."""
    header = read_exact(fd, HEADER.size, deadline)
    _, _, vlen, plen, _ = _parse_header(header)
    return header + read_exact(fd, vlen + plen, deadline)
