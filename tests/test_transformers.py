"""GPT-2, BERT and Llama built from ``transformers`` configs (random weights), inference
and training: outputs and generated code equal stock's, with zero fallbacks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import assert_same_code, settings_for
from torch._inductor.utils import run_and_get_code

import fxoffload

pytest.importorskip("transformers")
from models import transformers_model

MODELS = ("gpt2", "bert", "llama")


def _step(model: Any, inputs: dict[str, Any], train: bool) -> list[torch.Tensor]:
    if not train:
        with torch.no_grad():
            return [model(**inputs).logits]
    model.zero_grad()
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [logits.detach(), *grads]


@pytest.fixture(scope="module")
def stock() -> dict[tuple[str, bool], tuple[list[torch.Tensor], list[str]]]:
    return {}


def _stock(cache: dict[Any, Any], name: str, train: bool) -> Any:
    if (name, train) not in cache:
        model, make = transformers_model(name)
        model.train(train)
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            cache[name, train] = run_and_get_code(
                lambda: _step(torch.compile(model, backend="inductor"), make(), train))
        torch._dynamo.reset()
    return cache[name, train]


def _cases() -> list[Any]:
    cases = []
    for mode in ("serde", "subprocess", "capture"):
        for name in MODELS:
            for train in (False, True):
                # serde compiles in the test's own process, a training graph pair about
                # 25 s on two cores: one model trains there (the others train through
                # subprocess and capture, which cross the same boundary)
                if mode == "serde" and train and name != "llama":
                    continue
                marks = [pytest.mark.slow] if mode == "capture" else []
                cases.append(pytest.param(
                    mode, name, train, marks=marks,
                    id=f"{mode}-{name}-{'training' if train else 'inference'}"))
    return cases


@pytest.mark.parametrize(("mode", "name", "train"), _cases())
def test_model(mode: str, name: str, train: bool, stock: Any, tmp_path: Any) -> None:
    stock_out, stock_code = _stock(stock, name, train)
    model, make = transformers_model(name)
    model.train(train)
    model = copy.deepcopy(model)
    fxoffload.reset_stats()
    backend = fxoffload.backend(**settings_for(mode, tmp_path))
    ours_out, ours_code = run_and_get_code(
        lambda: _step(torch.compile(model, backend=backend), make(), train))
    snap = fxoffload.stats()
    assert dict(snap.fallbacks) == {}
    assert snap.graphs_offloaded == len(stock_code) >= (2 if train else 1)
    assert len(ours_out) == len(stock_out)
    for o, s in zip(ours_out, stock_out, strict=True):
        torch.testing.assert_close(o, s)
    assert_same_code(ours_code, stock_code)
