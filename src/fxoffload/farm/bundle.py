"""Portable results: the files a farm worker's compile wrote into its own cache dirs
(compiled C++ libraries on CPU, Triton's cubins and their metadata on GPU), carried with
the response and written into the client's cache dirs before it loads the graph, so a
client with other cache dirs, or on another machine, loads with no kernel recompiled.

    worker:  snapshot(dirs) ─► compile ─► new_files(dirs, snapshot) ─► pack(response, files)
    client:  unpack(blob) ─► write_into(client dirs, files) ─► load the response

Cache files are named by the hash of what they hold, so a file the client has already is
the same file and is left alone. No torch here.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOTS = ("inductor", "triton")  # which cache dir a relative path belongs to
SKIP_SUFFIXES = (".lock", ".tmp")
_LEN = struct.Struct("!I")
_BIG = struct.Struct("!Q")


def snapshot(dirs: dict[str, Path]) -> dict[str, float]:
    """Every file under the cache dirs, ``"root/relative/path" -> mtime``."""
    seen: dict[str, float] = {}
    for root, base in dirs.items():
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            if path.is_file() and not path.name.endswith(SKIP_SUFFIXES):
                with contextlib.suppress(OSError):
                    seen[f"{root}/{path.relative_to(base)}"] = path.stat().st_mtime
    return seen


def new_files(dirs: dict[str, Path], before: dict[str, float]) -> dict[str, bytes]:
    """The files written since ``before`` (new, or rewritten), with their bytes."""
    return read(dirs, [name for name, mtime in snapshot(dirs).items()
                       if before.get(name) != mtime])


def names_under(dirs: dict[str, Path], name: str) -> list[str]:
    """The names of the files under ``"root/relative/dir"`` (none if it is absent)."""
    root, rel = name.split("/", 1)
    base = dirs[root] / rel
    if not base.is_dir():
        return []
    return [f"{root}/{path.relative_to(dirs[root])}" for path in base.rglob("*")
            if path.is_file() and not path.name.endswith(SKIP_SUFFIXES)]


def read(dirs: dict[str, Path], names: Iterable[str]) -> dict[str, bytes]:
    """``"root/relative/path"`` -> bytes, for those of ``names`` that can be read."""
    out: dict[str, bytes] = {}
    for name in names:
        root, rel = name.split("/", 1)
        with contextlib.suppress(OSError):
            out[name] = (dirs[root] / rel).read_bytes()
    return out


def pack(response: bytes, files: dict[str, bytes]) -> bytes:
    """``response`` and ``files`` as one blob (lengths and bytes; no pickle)."""
    parts = [_BIG.pack(len(response)), response, _LEN.pack(len(files))]
    for name, data in sorted(files.items()):
        encoded = name.encode()
        parts += [_LEN.pack(len(encoded)), encoded, _BIG.pack(len(data)), data]
    return b"".join(parts)


def unpack(blob: bytes) -> tuple[bytes, dict[str, bytes]]:
    view = memoryview(blob)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise ValueError(f"bundle truncated at byte {pos} of {len(view)}")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    response = bytes(take(_BIG.unpack(take(_BIG.size))[0]))
    files = {}
    for _ in range(_LEN.unpack(take(_LEN.size))[0]):
        name = bytes(take(_LEN.unpack(take(_LEN.size))[0])).decode()
        files[name] = bytes(take(_BIG.unpack(take(_BIG.size))[0]))
    if pos != len(view):
        raise ValueError(f"bundle has {len(view) - pos} trailing bytes")
    return response, files


def write_into(dirs: dict[str, Path], files: dict[str, bytes]) -> list[str]:
    """Write the files the client lacks (atomically); the names written. A name that
    would leave its cache dir is refused."""
    written: list[str] = []
    for name, data in files.items():
        root, _, rel = name.partition("/")
        base = dirs.get(root)
        if base is None or not rel:
            raise ValueError(f"bundle entry {name!r} names no cache dir")
        path = (base / rel).resolve()
        if not path.is_relative_to(base.resolve()):
            raise ValueError(f"bundle entry {name!r} leaves its cache dir")
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fxoffload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o755 if name.endswith(".so") else 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        written.append(name)
    return written
