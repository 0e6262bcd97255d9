"""The envelope: round trips, and every kind of bad bytes gives a clear ProtocolError."""

from __future__ import annotations

import os

import pytest
import torch

from fxoffload import ProtocolError, VersionMismatch, wire
from fxoffload.protocol import split_request


def test_round_trip() -> None:
    data = wire.encode(wire.Kind.RESPONSE, b"payload" * 100)
    env = wire.decode(data, expect=wire.Kind.RESPONSE)
    assert env.payload == b"payload" * 100
    assert env.torch_version == torch.__version__


@pytest.mark.parametrize("cut", [0, 3, wire.HEADER.size - 1, wire.HEADER.size + 5, -1])
def test_truncated(cut: int) -> None:
    data = wire.encode(wire.Kind.REQUEST, b"x" * 64)
    with pytest.raises(ProtocolError, match="truncated"):
        wire.decode(data[:cut])


def test_corrupted_payload_byte() -> None:
    data = bytearray(wire.encode(wire.Kind.REQUEST, b"x" * 64))
    data[-10] ^= 0xFF
    with pytest.raises(ProtocolError, match="checksum"):
        wire.decode(bytes(data))


def test_foreign_bytes() -> None:
    with pytest.raises(ProtocolError, match="not an fxoffload envelope"):
        wire.decode(os.urandom(200))
    with pytest.raises(ProtocolError, match="not an fxoffload envelope"):
        wire.decode(b"\x80\x04\x95" + b"\x00" * 100)  # a pickle is not an envelope


def test_trailing_bytes() -> None:
    with pytest.raises(ProtocolError, match="trailing"):
        wire.decode(wire.encode(wire.Kind.REQUEST, b"abc") + b"zz")


def test_other_torch_version_names_both() -> None:
    data = wire.encode(wire.Kind.REQUEST, b"abc", torch_version="2.9.0+cpu")
    with pytest.raises(VersionMismatch) as info:
        wire.decode(data)
    assert "2.9.0+cpu" in str(info.value) and torch.__version__ in str(info.value)


def test_other_protocol_version() -> None:
    data = bytearray(wire.encode(wire.Kind.REQUEST, b"abc"))
    data[4:6] = (99).to_bytes(2, "big")
    with pytest.raises(VersionMismatch, match="protocol 99"):
        wire.decode(bytes(data))


def test_wrong_kind() -> None:
    with pytest.raises(ProtocolError, match="expected a REQUEST"):
        split_request(wire.encode(wire.Kind.RESPONSE, b"abc"))


def test_request_with_garbage_payload() -> None:
    with pytest.raises(ProtocolError, match="preamble is unreadable"):
        split_request(wire.encode(wire.Kind.REQUEST, b"not a pickle"))


def test_implausible_length() -> None:
    data = bytearray(wire.encode(wire.Kind.REQUEST, b"abc"))
    data[8:16] = (1 << 62).to_bytes(8, "big")
    with pytest.raises(ProtocolError, match="implausible"):
        wire.decode(bytes(data))
