"""The farm never unpickles bytes from a peer that has not proven its key: a pickle that
would create a canary file is sent to the registry and straight to a worker, unsigned,
signed with another key, and signed for the wrong purpose; the canary never appears, and
the registry keeps none of them as a client's graphs (``farm.graphs``).
A client holding another key is refused, and its step still runs (compiled locally)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from conftest import settings_for
from models import MLP

import fxoffload
from fxoffload import signing
from fxoffload.farm.actors import NAMESPACE


class _Canary:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.touch, (self.path,))


def _payloads(canary: Path, tmp_path: Path) -> dict[str, bytes]:
    evil = pickle.dumps(_Canary(canary))
    other_key = signing.create_key(tmp_path / "other.key")
    return {"unsigned": evil,
            "other key": signing.sign(other_key, evil, purpose=b"request"),
            "wrong purpose": signing.sign(other_key, evil, purpose=b"response")}


def test_canary_never_runs(farm: Any, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    registry = farm.registry()
    worker_name = farm.stats()["workers"][0]["name"]
    worker = ray.get_actor(worker_name, namespace=NAMESPACE)
    for what, payload in _payloads(canary, tmp_path).items():
        how, (reason, message) = ray.get(registry.compile.remote("ab" * 16, payload, None))
        assert how == "refused" and reason == "unauthenticated", (what, how, message)
        with pytest.raises(ray.exceptions.RayTaskError, match="Unauthenticated"):
            ray.get(worker.compile.remote(payload))
        # a client's graphs (farm.graphs) are kept only when signed with the farm's key
        assert ray.get(registry.put_graphs.remote("cd" * 16, payload)) is False, what
        assert ray.get(registry.get_graphs.remote("cd" * 16)) == ("miss", None), what
        assert not canary.exists(), f"{what}: the payload ran"
    assert farm.stats()["refused"] >= 6


def test_client_with_another_key_is_refused(farm: Any, tmp_path: Path) -> None:
    import conftest

    conftest.CURRENT_FARM = farm
    wrong = tmp_path / "wrong.key"
    signing.create_key(wrong)
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 16)
    backend = fxoffload.backend(**settings_for("farm", farm_key=wrong))
    out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x))
    assert dict(fxoffload.stats().fallbacks) == {"unauthenticated": 1}
