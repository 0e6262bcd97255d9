"""What crosses the boundary: prims ops, custom ops from an importable module, custom
passes; and what cannot, falls back under a named reason with one warning."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch
from conftest import MODES, settings_for
from extensions import Noisy, ReluToSigmoidWarn, scaled_add

import fxoffload


def _run(fn: Any, *args: Any, mode: str, tmp_path: Any, **kw: Any) -> Any:
    torch._dynamo.reset()
    return torch.compile(fn, backend=fxoffload.backend(**settings_for(mode, tmp_path, **kw)))(
        *args)


@pytest.mark.parametrize("mode", MODES)
def test_prims_ops_cross(mode: str, tmp_path: Any) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        # arange → prims.iota; .to(dtype) → prims.convert_element_type
        return (x * torch.arange(x.shape[0]).to(x.dtype)).to(torch.float64).sum()

    x = torch.randn(6)
    out = _run(f, x, mode=mode, tmp_path=tmp_path)
    torch.testing.assert_close(out, f(x))
    assert fxoffload.stats().graphs_offloaded == 1
    assert dict(fxoffload.stats().fallbacks) == {}


@pytest.mark.parametrize("mode", MODES)
def test_custom_op_from_importable_module(mode: str, tmp_path: Any) -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scaled_add(x.sin(), y, 0.5).cos()

    x, y = torch.randn(5), torch.randn(5)
    out = _run(f, x, y, mode=mode, tmp_path=tmp_path)
    torch.testing.assert_close(out, f(x, y))
    assert fxoffload.stats().graphs_offloaded == 1
    assert dict(fxoffload.stats().fallbacks) == {}


@pytest.mark.parametrize("mode", MODES)
def test_custom_pass_is_carried(mode: str, tmp_path: Any) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2

    x = torch.randn(8)
    with torch._inductor.config.patch(post_grad_custom_post_pass=ReluToSigmoidWarn()), \
            pytest.warns(UserWarning, match="custom pass ran in pid") as record:
        out = _run(f, x, mode=mode, tmp_path=tmp_path)
    # The pass ran where the code was generated: relu became sigmoid.
    torch.testing.assert_close(out, torch.sigmoid(x) * 2)
    assert fxoffload.stats().graphs_offloaded == 1
    pids = {int(str(w.message).rsplit(" ", 1)[1]) for w in record
            if "custom pass ran" in str(w.message)}
    if mode == "subprocess":  # re-raised here, raised in a worker
        assert os.getpid() not in pids
    else:
        assert pids == {os.getpid()}


def test_custom_op_in_main_falls_back_with_reason(caplog: Any, tmp_path: Any) -> None:
    lib = torch.library.Library("fxoffload_main_test", "FRAGMENT")
    try:
        @torch.library.custom_op("fxoffload_main_test::double", mutates_args=())
        def double(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        double.register_fake(lambda x: torch.empty_like(x))
        # A module-level op whose module the worker could not import is what __main__ is.
        from torch._library.custom_ops import OPDEFS

        OPDEFS["fxoffload_main_test::double"]._init_fn.__module__ = "__main__"

        def f(x: torch.Tensor) -> torch.Tensor:
            return double(x) + 1

        x = torch.randn(4)
        with caplog.at_level(logging.WARNING, logger="fxoffload"):
            for _ in range(2):
                out = _run(f, x, mode="serde", tmp_path=tmp_path)
                torch.testing.assert_close(out, x * 2 + 1)
        assert dict(fxoffload.stats().fallbacks) == {"custom_op_in_main": 2}
        warned = [r for r in caplog.records if "custom_op_in_main" in r.getMessage()]
        assert len(warned) == 1, "one WARNING per reason"
    finally:
        del lib


def test_unpicklable_custom_pass_falls_back(tmp_path: Any) -> None:
    class LocalPass(ReluToSigmoidWarn):  # defined in a function: not picklable by name
        pass

    x = torch.randn(8)
    with torch._inductor.config.patch(post_grad_custom_post_pass=LocalPass()), \
            pytest.warns(UserWarning):
        out = _run(lambda x: torch.relu(x) * 2, x, mode="serde", tmp_path=tmp_path)
    torch.testing.assert_close(out, torch.sigmoid(x) * 2)  # in-process, with the pass
    assert dict(fxoffload.stats().fallbacks) == {"unpicklable_config": 1}


@pytest.mark.parametrize("mode", MODES)
def test_higher_order_op_cond_crosses(mode: str, tmp_path: Any) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t.sin() * 2, lambda t: t.cos() - 1, (x,))

    for x in (torch.ones(4), -torch.ones(4)):
        torch.testing.assert_close(_run(f, x, mode=mode, tmp_path=tmp_path), f(x))
    assert fxoffload.stats().graphs_offloaded >= 1
    assert dict(fxoffload.stats().fallbacks) == {}


def test_worker_output_does_not_corrupt_the_channel(tmp_path: Any) -> None:
    x = torch.randn(8)
    with torch._inductor.config.patch(post_grad_custom_post_pass=Noisy()):
        out = _run(lambda x: x.sin() + 1, x, mode="subprocess", tmp_path=tmp_path)
    torch.testing.assert_close(out, x.sin() + 1)
    assert fxoffload.stats().graphs_offloaded == 1
    assert dict(fxoffload.stats().fallbacks) == {}
