"""The child's state, replayed in the parent: log records at the parent's levels, through
the parent's handlers; metrics and counters as stock; save_output_code hooks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from conftest import MODES, settings_for
from models import MLP
from torch._inductor import metrics

import fxoffload


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _compile_and_record(mode: str, tmp_path: Any) -> _ListHandler:
    """Compile an MLP; return what reached a handler on the parent's torch._inductor."""
    handler = _ListHandler()
    root = logging.getLogger("torch._inductor")
    root.addHandler(handler)
    try:
        torch.compile(MLP(), backend=fxoffload.backend(**settings_for(mode, tmp_path)))(
            torch.randn(2, 16))
    finally:
        root.removeHandler(handler)
    return handler


@pytest.mark.parametrize("mode", MODES)
def test_output_code_log_arrives_through_parent_handlers(mode: str, tmp_path: Any) -> None:
    torch._logging.set_logs(output_code=True)
    try:
        handler = _compile_and_record(mode, tmp_path)
    finally:
        torch._logging.set_logs()
    code = [r for r in handler.records if "def call(" in r.getMessage()]
    assert code, "the generated code was not logged in the parent"
    if mode == "subprocess":
        assert all(r.process != os.getpid() for r in code)  # logged in a worker


@pytest.mark.parametrize("mode", MODES)
def test_levels_respected_nothing_below(mode: str, tmp_path: Any) -> None:
    handler = _compile_and_record(mode, tmp_path)
    # At default levels (WARNING) a clean compile logs nothing at DEBUG/INFO.
    assert [r for r in handler.records if r.levelno < logging.WARNING] == []


@pytest.mark.parametrize("mode", MODES)
def test_metrics_read_as_stock(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 16)
    torch.manual_seed(0)
    metrics.reset()
    torch.compile(MLP(), backend="inductor")(x)
    stock = (metrics.generated_kernel_count, metrics.generated_cpp_vec_kernel_count)
    torch._dynamo.reset()
    metrics.reset()
    torch.compile(MLP(), backend=fxoffload.backend(**settings_for(mode, tmp_path)))(x)
    ours = (metrics.generated_kernel_count, metrics.generated_cpp_vec_kernel_count)
    assert stock[0] > 0
    assert ours == stock


def test_torch_logs_env_prints_worker_code(tmp_path: Any) -> None:
    script = textwrap.dedent("""
        import torch, fxoffload
        fxoffload.warmup(mode="subprocess", workers=1)
        f = torch.compile(lambda x: (x.sin() * 3).sum(), backend=fxoffload.backend(
            mode="subprocess", workers=1))
        f(torch.randn(8))
        assert fxoffload.stats().graphs_offloaded == 1
        fxoffload.shutdown()
    """)
    env = dict(os.environ, TORCH_LOGS="output_code",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("def call(") == 1, "printed exactly once (replayed, not twice)"
    assert "Output code" in out.stderr
