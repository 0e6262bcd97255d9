"""The farm key and signed envelopes: nothing is unpickled unless it proves the farm's key."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from fxoffload import ConfigError, Unauthenticated
from fxoffload.signing import (
    KEY_ENV,
    MAGIC,
    create_key,
    default_key_path,
    key_id,
    load_key,
    sign,
    verify,
)

KEY = bytes(range(32))
DATA = b"compiled module source " * 20


def verified_loads(key: bytes, signed: bytes, purpose: bytes) -> object:
    return pickle.loads(verify(key, signed, purpose=purpose))


class _Canary:
    """Unpickling this creates the directory ``path``: a stand-in for code in a result."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.path),)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip() -> None:
    signed = sign(KEY, DATA, purpose=b"request")
    assert signed.startswith(MAGIC)
    assert verify(KEY, signed, purpose=b"request") == DATA
    assert verify(KEY, memoryview(signed), purpose=b"request") == DATA
    assert verify(KEY, sign(KEY, b"", purpose=b"response"), purpose=b"response") == b""


def test_tampered_data_byte() -> None:
    signed = bytearray(sign(KEY, DATA, purpose=b"request"))
    signed[-5] ^= 0x01
    with pytest.raises(Unauthenticated, match=rf"does not match .*key id {key_id(KEY)}"):
        verify(KEY, bytes(signed), purpose=b"request")


def test_tampered_tag() -> None:
    signed = bytearray(sign(KEY, DATA, purpose=b"request"))
    signed[6 + len(b"request")] ^= 0x80
    with pytest.raises(Unauthenticated, match="signature does not match this farm's key"):
        verify(KEY, bytes(signed), purpose=b"request")


def test_wrong_key() -> None:
    other = bytes(32)
    signed = sign(other, DATA, purpose=b"request")
    with pytest.raises(Unauthenticated, match="the sender does not hold the farm's key"):
        verify(KEY, signed, purpose=b"request")


def test_wrong_purpose() -> None:
    signed = sign(KEY, DATA, purpose=b"request")
    with pytest.raises(Unauthenticated, match="signed as b'request', expected b'response'"):
        verify(KEY, signed, purpose=b"response")


def test_purpose_is_under_the_tag() -> None:
    signed = bytearray(sign(KEY, DATA, purpose=b"aaaa"))
    signed[6:10] = b"bbbb"  # relabelled in place: the tag no longer matches
    with pytest.raises(Unauthenticated, match="signature does not match"):
        verify(KEY, bytes(signed), purpose=b"bbbb")


def test_unsigned() -> None:
    raw = pickle.dumps({"a": 1})
    with pytest.raises(Unauthenticated, match=rf"unsigned message \({len(raw)} bytes\)"):
        verify(KEY, raw, purpose=b"request")
    with pytest.raises(Unauthenticated, match="unsigned message"):
        verify(KEY, b"", purpose=b"request")


def test_unknown_version() -> None:
    signed = bytearray(sign(KEY, DATA, purpose=b"request"))
    signed[4] = 9
    with pytest.raises(Unauthenticated, match="version 9"):
        verify(KEY, bytes(signed), purpose=b"request")


@pytest.mark.parametrize("cut", [4, 5, 6, 6 + 7, 6 + 7 + 31])
def test_truncated(cut: int) -> None:
    signed = sign(KEY, DATA, purpose=b"request")
    with pytest.raises(Unauthenticated, match="truncated"):
        verify(KEY, signed[:cut], purpose=b"request")


def test_truncated_data_fails_the_tag() -> None:
    signed = sign(KEY, DATA, purpose=b"request")
    with pytest.raises(Unauthenticated, match="signature does not match"):
        verify(KEY, signed[:-1], purpose=b"request")


def test_nothing_unpickled_without_the_key(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    payload = pickle.dumps(_Canary(canary))
    attempts = [
        payload,  # unsigned
        sign(bytes(32), payload, purpose=b"response"),  # another key
        sign(KEY, payload, purpose=b"request"),  # a request replayed as a response
        sign(KEY, payload, purpose=b"response")[:-1],  # truncated
    ]
    for signed in attempts:
        with pytest.raises(Unauthenticated):
            verified_loads(KEY, signed, b"response")
        assert not canary.exists()
    # The payload is live: once properly signed, unpickling it does run.
    verified_loads(KEY, sign(KEY, payload, purpose=b"response"), b"response")
    assert canary.is_dir()


def test_key_id_is_short_and_public() -> None:
    kid = key_id(KEY)
    assert len(kid) == 8 and int(kid, 16) >= 0
    assert kid not in KEY.hex() and kid != key_id(bytes(32))


def test_default_key_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert default_key_path() == Path.home() / ".fxoffload" / "farm" / "key"
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "k"))
    assert default_key_path() == tmp_path / "k"


def test_create_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "farm" / "key"
    key = create_key(path)
    assert len(key) == 32
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert path.read_text().strip() == key.hex()
    assert load_key(path) == key
    monkeypatch.setenv(KEY_ENV, str(path))
    assert load_key() == key
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no temp file left


def test_create_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key = create_key(path)
    with pytest.raises(ConfigError, match="already exists"):
        create_key(path)
    assert load_key(path) == key
    new = create_key(path, overwrite=True)
    assert new != key and load_key(path) == new
    assert _mode(path) == 0o600


def test_load_key_refuses_open_mode(tmp_path: Path) -> None:
    path = tmp_path / "key"
    create_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by other users \(mode 0644\): chmod 600"):
        load_key(path)


def test_load_key_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "key"
    with pytest.raises(ConfigError, match=rf"no farm key at {path}: run `fxoffload farm up`"):
        load_key(path)


@pytest.mark.parametrize("text", ["not hex at all", "abcd" * 7, ""])
def test_load_key_malformed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=rf"farm key {path} is malformed"):
        load_key(path)
