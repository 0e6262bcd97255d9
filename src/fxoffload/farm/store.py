"""The farm's artifact store: signed compile responses by content key, bounded by bytes
(least recently used out first), optionally persisted to a directory so that a farm
restarted on the same directory hits.

Only the farm writes here (the registry actor, with what its workers returned). Entries
are kept exactly as the workers signed them: a reader checks the signature before it
unpickles anything, so a file planted in the directory is refused, not run.

    DIR/<key[:2]>/<key>.fxr      one signed response envelope per content key

No Ray, no torch: plain bytes and files.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import tempfile
from pathlib import Path

_KEY = re.compile(r"^[0-9a-f]{16,128}$")
SUFFIX = ".fxr"


class ArtifactStore:
    """A bounded LRU map ``content key -> bytes``; ``directory`` makes it persistent."""

    def __init__(self, *, max_bytes: int, directory: Path | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes!r} must be positive")
        self.max_bytes = max_bytes
        self.directory = directory
        self._entries: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.bytes = 0
        self.evictions = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._load(directory)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> bytes | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
            if self.directory is not None:
                # a restarted farm orders entries by mtime: a read counts as a use
                with contextlib.suppress(OSError):
                    os.utime(self._path(key))
        return data

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        if len(data) > self.max_bytes:
            return  # larger than the whole store: serving it once is all we can do
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[key] = data
        self.bytes += len(data)
        if self.directory is not None:
            _write_atomic(self._path(key), data)
        while self.bytes > self.max_bytes:
            self._evict_oldest()

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _evict_oldest(self) -> None:
        key = next(iter(self._entries))
        self._drop(key)
        self.evictions += 1

    def _drop(self, key: str) -> None:
        self.bytes -= len(self._entries.pop(key))
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def _load(self, directory: Path) -> None:
        """Entries of an earlier run, oldest access first (by mtime)."""
        files = [p for p in directory.glob(f"*/*{SUFFIX}") if _KEY.match(p.stem)]
        files.sort(key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            self._entries[path.stem] = data
            self.bytes += len(data)
        while self.bytes > self.max_bytes:
            self._evict_oldest()


def _check_key(key: str) -> None:
    if not _KEY.match(key):
        raise ValueError(f"{key!r} is not a content key (lowercase hex)")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
