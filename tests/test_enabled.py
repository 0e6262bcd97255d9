"""``with fxoffload.enabled():`` makes stock torch.compile offload, and only inside."""

from __future__ import annotations

import torch
from models import MLP

import fxoffload


def test_enabled_scopes_stock_compile() -> None:
    x = torch.randn(2, 16)
    model = MLP()
    with fxoffload.enabled(mode="serde") as settings:
        assert settings.mode == "serde"
        out = torch.compile(model)(x)
    assert fxoffload.stats().graphs_offloaded == 1
    torch.testing.assert_close(out, model(x))
    torch._dynamo.reset()
    torch.compile(MLP())(x)  # outside: stock, nothing offloaded
    assert fxoffload.stats().graphs_offloaded == 1


def test_backend_by_name_reads_environment(monkeypatch: object) -> None:
    from fxoffload import integration

    integration._env_backend.cache_clear()
    monkeypatch.setenv("FXOFFLOAD_MODE", "serde")  # type: ignore[attr-defined]
    try:
        x = torch.randn(2, 16)
        torch.compile(MLP(), backend="fxoffload")(x)
        assert fxoffload.stats().graphs_offloaded == 1
    finally:
        integration._env_backend.cache_clear()


def test_inprocess_mode_is_stock() -> None:
    torch.compile(MLP(), backend=fxoffload.backend(mode="inprocess"))(torch.randn(2, 16))
    assert fxoffload.stats().graphs_offloaded == 0
