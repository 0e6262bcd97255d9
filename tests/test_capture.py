"""mode='capture' when its files cannot be written: a typed error, never a crash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from models import MLP

import fxoffload
from fxoffload import protocol


@pytest.fixture(scope="module")
def request_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("good")
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        torch.compile(MLP().eval(), backend=fxoffload.backend(
            mode="capture", capture_dir=directory))(torch.randn(4, 16))
    torch._dynamo.reset()
    (path,) = directory.glob("*.request.fxo")
    return path.read_bytes()


def _unwritable(tmp_path: Path) -> Path:
    """A capture dir whose parent is a regular file: no one can create it, root included."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    return blocker / "captures"


def test_compile_falls_back_when_the_capture_dir_goes_away(tmp_path: Path) -> None:
    # The dir is checked when the backend is made; it is replaced by a file afterwards.
    parent = tmp_path / "blocker"
    backend = fxoffload.backend(mode="capture", capture_dir=parent / "captures")
    shutil.rmtree(parent)
    assert _unwritable(tmp_path) == parent / "captures"
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        torch.testing.assert_close(out, model(x))
    stats = fxoffload.stats()
    assert dict(stats.fallbacks) == {"capture_write_failed": 1}
    assert stats.graphs_offloaded == 0


def test_request_write_fails_the_future(request_bytes: bytes, tmp_path: Path) -> None:
    from fxoffload.executors.capture import CaptureExecutor

    directory = _unwritable(tmp_path)
    future = CaptureExecutor(directory).submit(request_bytes)
    error = future.exception(timeout=0)
    assert isinstance(error, fxoffload.CaptureWriteFailed), error
    assert isinstance(error, fxoffload.WorkerError)
    assert error.reason == "capture_write_failed"
    assert str(directory) in str(error) and ".request.fxo" in str(error)
    assert "Not a directory" in str(error) and "NotADirectoryError" in str(error)
    assert isinstance(error.__cause__, NotADirectoryError)


def test_response_write_fails_the_future(request_bytes: bytes, tmp_path: Path) -> None:
    from fxoffload.executors.capture import CaptureExecutor, capture_stem

    preamble, _ = protocol.split_request(request_bytes)
    directory = tmp_path / "captures"
    stem = capture_stem(preamble, 0)
    (directory / f"{stem}.response.fxo").mkdir(parents=True)  # a dir where the file goes
    with torch._inductor.config.patch(fx_graph_cache=False):
        future = CaptureExecutor(directory).submit(request_bytes)
    error = future.exception(timeout=60)
    assert isinstance(error, fxoffload.CaptureWriteFailed), error
    assert f"{stem}.response.fxo" in str(error) and "IsADirectoryError" in str(error)
    assert sorted(p.name for p in directory.iterdir()) == [f"{stem}.request.fxo",
                                                          f"{stem}.response.fxo"]
