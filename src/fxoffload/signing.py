"""The farm key and signed envelopes: who may hand this process code to run.

Trust rule: a compile result is code (unpickling it runs whatever it names), so nothing
is unpickled from a peer that has not proven it holds the farm's key. Every request to a
farm and every response from it travels inside a signed envelope; ``verify`` checks all
of it before any data byte is returned, so an unpickler only ever sees authenticated
bytes. This module owns the key file (``create_key``, ``load_key``, ``key_id``) and the
envelope (``sign``, ``verify``); it is pure bytes and stdlib, and never imports torch.

    offset  size  field
    0       4     magic  b"FXSG"
    4       1     envelope version (1)
    5       1     length of the purpose (n, 1-255)
    6       n     purpose, e.g. b"request" or b"response"
    6+n     32    HMAC-SHA256(key, version + n + purpose + data)
    38+n    ...   data

The purpose is under the tag: a signed request can never be replayed as a response.
The key file holds the key hex-encoded, mode 0600 in a 0700 directory; like ssh, a key
file that other users can read or write is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .errors import ConfigError, Unauthenticated

KEY_ENV = "FXOFFLOAD_FARM_KEY_FILE"
MAGIC = b"FXSG"
VERSION = 1
KEY_BYTES = 32
MIN_KEY_BYTES = 16
TAG_BYTES = 32
_MAX_KEY_FILE = 4096  # a hex key is a few dozen characters


def default_key_path() -> Path:
    """``$FXOFFLOAD_FARM_KEY_FILE`` if set, else ``~/.fxoffload/farm/key``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".fxoffload" / "farm" / "key"


def _exists(path: Path) -> ConfigError:
    return ConfigError(f"a farm key already exists at {path}: not overwriting it (remove "
                       "it first, or pass overwrite=True)")


def create_key(path: Path, *, overwrite: bool = False) -> bytes:
    """Write a new random key to ``path`` (hex, mode 0600 from creation, atomically) and
    return it. An existing key file is kept (ConfigError) unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise _exists(path)
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            os.write(fd, key.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if not overwrite:
            try:
                os.link(tmp, path)  # atomic: never replaces a key written meanwhile
                return key
            except FileExistsError:
                raise _exists(path) from None
            except OSError:
                pass  # no hard links on this file system: replace, as checked above
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def load_key(path: Path | None = None) -> bytes:
    """The farm key at ``path`` (default ``default_key_path()``); ConfigError naming the
    path if it is missing, unreadable, malformed or open to other users."""
    path = Path(path) if path is not None else default_key_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"no farm key at {path}: run `fxoffload farm up`, or copy the key "
                          f"file of the farm and set {KEY_ENV}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the farm key {path}: {e.strerror or e}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if os.name == "posix" and mode & 0o077:
            how = "readable" if mode & 0o044 else "writable"
            raise ConfigError(f"farm key {path} is {how} by other users (mode {mode:04o}): "
                              f"chmod 600 {path}")
        raw = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the farm key {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"farm key {path} is malformed: expected hex digits, as "
                          "`fxoffload farm up` writes") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"farm key {path} is malformed: {len(key)} bytes, at least "
                          f"{MIN_KEY_BYTES} needed")
    return key


def key_id(key: bytes) -> str:
    """A short public fingerprint of ``key`` for status lines and errors."""
    return hashlib.sha256(b"fxoffload-key-id" + key).hexdigest()[:8]


def _tag(key: bytes, version: int, purpose: bytes | memoryview,
         data: bytes | memoryview) -> bytes:
    mac = hmac.new(key, bytes((version, len(purpose))), hashlib.sha256)
    mac.update(purpose)
    mac.update(data)
    return mac.digest()


def sign(key: bytes, data: bytes, *, purpose: bytes) -> bytes:
    """``data`` in a signed envelope (layout in the module docstring)."""
    if not 1 <= len(purpose) <= 255:
        raise ValueError(f"purpose must be 1-255 bytes, got {len(purpose)}")
    header = MAGIC + bytes((VERSION, len(purpose))) + purpose
    return b"".join((header, _tag(key, VERSION, purpose, data), data))


def verify(key: bytes, signed: bytes | bytearray | memoryview, *, purpose: bytes) -> bytes:
    """The data of ``signed`` once magic, version, length, tag and purpose all check out;
    ``Unauthenticated`` otherwise. Nothing is returned from bytes that fail any check."""
    view = memoryview(signed).cast("B")
    if bytes(view[:4]) != MAGIC:
        raise Unauthenticated(f"unsigned message ({len(view)} bytes): the farm accepts only "
                              "envelopes signed with its key")
    if len(view) < 6:
        raise Unauthenticated(f"truncated signed envelope: {len(view)} bytes")
    version, plen = view[4], view[5]
    if version != VERSION:
        raise Unauthenticated(f"signed envelope version {version}; this side speaks "
                              f"{VERSION}")
    start = 6 + plen + TAG_BYTES
    if len(view) < start:
        raise Unauthenticated(f"truncated signed envelope: {len(view)} bytes, its header "
                              f"and signature alone are {start}")
    got = view[6:6 + plen]
    expected = _tag(key, version, got, view[start:])
    if not hmac.compare_digest(expected, bytes(view[6 + plen:start])):
        raise Unauthenticated(f"signature does not match this farm's key (key id "
                              f"{key_id(key)}): the sender does not hold the farm's key")
    if not hmac.compare_digest(bytes(got), purpose):
        raise Unauthenticated(f"message signed as {bytes(got)!r}, expected {purpose!r}: a "
                              "signed message cannot stand in for another kind")
    return bytes(view[start:])
