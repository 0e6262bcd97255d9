"""Progressive mode: config stages compiled in the background, each swapped in when it
arrives; a later stage replaces an earlier one; a stage that fails leaves the previous
one running."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from conftest import settings_for
from extensions import Misbehave, ReluToSigmoidWarn, WaitsForFile

import fxoffload


class ReluNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def _arrived(n: int, seconds: float = 300) -> None:
    """Wait until ``n`` compiles have come back (``wait()`` waits for all of them)."""
    end = time.monotonic() + seconds
    while fxoffload.stats().graphs_offloaded < n:
        assert time.monotonic() < end, fxoffload.stats()
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["progressive+serde", "progressive+subprocess"])
def test_each_stage_swaps_in_order(mode: str, tmp_path: Any) -> None:
    """Stage 0 (stock config) swaps in first; stage 1 (a visible rewrite: relu becomes
    sigmoid) replaces it when it arrives."""
    torch.manual_seed(0)
    model, x = ReluNet(), torch.randn(4, 16)
    gate = tmp_path / "release-stage-1"
    stages = [{}, {"post_grad_custom_pre_pass": WaitsForFile(str(gate)),
                   "post_grad_custom_post_pass": ReluToSigmoidWarn()}]
    if mode == "progressive+serde":  # one compile thread: no gate there, stage 1 follows
        stages[1].pop("post_grad_custom_pre_pass")
    compiled = torch.compile(model, backend=fxoffload.backend(
        **settings_for(mode, tmp_path, stages=stages)))
    with torch.no_grad():
        expected, rewritten = torch.relu(model.fc(x)), torch.sigmoid(model.fc(x))
        torch.testing.assert_close(compiled(x), expected)  # eager
        if mode == "progressive+subprocess":
            _arrived(1)
            torch.testing.assert_close(compiled(x), expected)  # stage 0: stock code
            assert fxoffload.stats().swaps == 1
            gate.touch()
        assert fxoffload.wait(300)
        with pytest.warns(UserWarning, match="custom pass ran"):
            torch.testing.assert_close(compiled(x), rewritten)  # stage 1
    snap = fxoffload.stats()
    assert snap.background_compiles == 2 and snap.fallback_count == 0
    assert snap.swaps == (2 if mode == "progressive+subprocess" else 1)


def test_failed_stage_keeps_the_previous_one(caplog: Any) -> None:
    torch.manual_seed(0)
    model, x = ReluNet(), torch.randn(4, 16)
    stages = [{}, {"post_grad_custom_post_pass": Misbehave("raise")}]
    compiled = torch.compile(model, backend=fxoffload.backend(
        **settings_for("progressive+subprocess", stages=stages)))
    with torch.no_grad(), caplog.at_level("WARNING", logger="fxoffload"):
        torch.testing.assert_close(compiled(x), torch.relu(model.fc(x)))
        assert fxoffload.wait(300)
        for _ in range(2):
            torch.testing.assert_close(compiled(x), torch.relu(model.fc(x)))
    snap = fxoffload.stats()
    # A warm worker can return stage 0 before the first call, which then runs compiled.
    assert snap.swaps == 1 and snap.eager_runs + snap.compiled_runs == 3, snap
    assert snap.compiled_runs >= 2, snap
    assert dict(snap.fallbacks) == {"remote_compile_error": 1}
    assert "stage 1 failed" in caplog.text


def test_default_stages_end_in_max_autotune() -> None:
    settings = fxoffload.Settings.resolve({}, mode="progressive+subprocess")
    assert settings.config_stages[0] == {} and settings.config_stages[-1] == {
        "max_autotune": True}
