"""The farm's artifact store (no Ray): bounded by bytes with the least recently used
entry out first, and persistent: a store opened on the directory of an earlier one (a
restarted farm) has its entries, in the order they were last used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fxoffload.farm.store import ArtifactStore


def _key(i: int) -> str:
    return f"{i:064x}"


def test_least_recently_used_entry_goes_first() -> None:
    store = ArtifactStore(max_bytes=30)
    for i in range(3):
        store.put(_key(i), bytes(10))
    assert store.get(_key(0)) is not None  # 0 is now the most recently used
    store.put(_key(3), bytes(10))
    assert _key(1) not in store and _key(0) in store and _key(3) in store
    assert store.bytes == 30 and store.evictions == 1


def test_an_entry_larger_than_the_store_is_not_kept() -> None:
    store = ArtifactStore(max_bytes=10)
    store.put(_key(0), bytes(5))
    store.put(_key(1), bytes(11))
    assert _key(1) not in store and _key(0) in store


def test_a_restarted_store_has_the_entries_in_last_use_order(tmp_path: Path) -> None:
    first = ArtifactStore(max_bytes=100, directory=tmp_path)
    for i in range(3):
        first.put(_key(i), bytes([i]) * 10)
    past = os.stat(first._path(_key(2))).st_mtime
    for i in range(3):  # written "long ago", oldest first
        os.utime(first._path(_key(i)), (past - 100 + i, past - 100 + i))
    assert first.get(_key(0)) == bytes(10)  # a read is a use, on disk too

    again = ArtifactStore(max_bytes=100, directory=tmp_path)
    assert len(again) == 3 and again.bytes == 30
    assert again.get(_key(2)) == bytes([2]) * 10
    # 1 is the least recently used: a restarted store that must shrink drops it first
    smaller = ArtifactStore(max_bytes=20, directory=tmp_path)
    assert _key(1) not in smaller and _key(0) in smaller and _key(2) in smaller
    assert not first._path(_key(1)).exists()


def test_clear_removes_the_files(tmp_path: Path) -> None:
    store = ArtifactStore(max_bytes=100, directory=tmp_path)
    store.put(_key(0), b"x")
    store.clear()
    assert len(store) == 0 and ArtifactStore(max_bytes=100, directory=tmp_path).bytes == 0


@pytest.mark.parametrize("key", ["", "ABC" * 10, "../" + "0" * 32, "0" * 8])
def test_a_key_that_is_not_a_content_key_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a content key"):
        ArtifactStore(max_bytes=10).put(key, b"x")


def test_stray_files_in_the_directory_are_not_entries(tmp_path: Path) -> None:
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "notes.fxr").write_bytes(b"planted")
    (tmp_path / "ab" / f"{_key(1)}.txt").write_bytes(b"planted")
    assert len(ArtifactStore(max_bytes=100, directory=tmp_path)) == 0
