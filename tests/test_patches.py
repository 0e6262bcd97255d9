"""What fxoffload replaces in torch is recorded in one place and put back: leaving the last
``enabled()`` block, and ``shutdown()``; a backend made before still offloads after it.

Run in a fresh interpreter, so that torch's originals are known before fxoffload touches
anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

from fxoffload import patches

SCRIPT = r"""
import json, sys
import torch
import fxoffload
from fxoffload import patches

def snapshot():
    import torch._dynamo.testing, torch._functorch.aot_autograd
    from torch._inductor import compile_fx
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.codecache import FxGraphCache
    from torch.fx import _symbolic_trace as st
    from torch.utils import _config_module as cm
    seen = {
        "fx_codegen_and_compile": compile_fx.fx_codegen_and_compile,
        "_save_graph": FxGraphCache.__dict__["_save_graph"],
        "is_fx_tracing": st.is_fx_tracing.__code__,
        "is_fx_symbolic_tracing": st.is_fx_symbolic_tracing.__code__,
        "flag_visible": st.__dict__.get("_fxoffload_fx_flag_visible"),
        "trace": st.Tracer.__dict__["trace"],
        "patch": st._Patcher.__dict__["patch"],
        "patch_method": st._Patcher.__dict__["patch_method"],
        "triton": AsyncCompile.__dict__["triton"],
        "get_hash": cm.ConfigModule.__dict__["get_hash"],
    }
    for name in ("torch._dynamo.utils", "torch._functorch.aot_autograd",
                 "torch._inductor.select_algorithm", "torch._inductor.codegen.triton"):
        seen[name + ".preserve_rng_state"] = getattr(
            sys.modules.get(name), "preserve_rng_state", None)
    for name in ("torch._dynamo.testing", "torch._inductor.select_algorithm",
                 "torch._inductor.autotune_process"):
        seen[name + ".rand_strided"] = getattr(sys.modules.get(name), "rand_strided", None)
    return seen

def changed(before):
    now = snapshot()
    # A module imported later (None before) must not hold a wrapper of ours either.
    return sorted(k for k in before if getattr(now[k], "_fxoffload", False)
                  or (before[k] is not None and now[k] is not before[k]))

def f(x):
    return torch.sin(x) * 2 + torch.arange(x.shape[0])

torch.manual_seed(0)
x = torch.randn(8)
# Stock Inductor's output: its vectorized sin is 1 ulp off ATen's now and then, which
# allclose's atol fails near 0 (1% of inputs against aot_eager's).
expected = torch.compile(f, backend="inductor")(x)
torch._dynamo.reset()
before = snapshot()
out = {}

with fxoffload.enabled(mode="serde"):
    got = torch.compile(f)(x)
    out["inside_enabled"] = changed(before)
torch._dynamo.reset()
out["enabled_equal"] = bool(torch.allclose(got, expected))
out["after_enabled"] = changed(before)
out["after_enabled_installed"] = patches.installed()

fn = torch.compile(f, backend=fxoffload.backend(mode="async+serde", defer_trace=True))
fn(x)
fxoffload.wait()
got = fn(x)
out["async_equal"] = bool(torch.allclose(got, expected))
out["while_backend"] = changed(before)
out["offloaded_before"] = fxoffload.stats().graphs_offloaded

fxoffload.shutdown()
out["after_shutdown"] = changed(before)
out["after_shutdown_installed"] = patches.installed()

torch._dynamo.reset()
sync = fxoffload.backend(mode="serde")
fxoffload.shutdown()  # a backend made before shutdown() still offloads after it
got = torch.compile(f, backend=sync)(x)
out["sync_equal"] = bool(torch.allclose(got, expected))
out["offloaded_after"] = fxoffload.stats().graphs_offloaded
fxoffload.shutdown()
out["end"] = changed(before)
print("RESULT " + json.dumps(out))
"""


def test_torch_is_put_back() -> None:
    env = dict(os.environ, FXOFFLOAD_PROGRESS="0", TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])

    assert "fx_codegen_and_compile" in out["inside_enabled"]
    assert "_save_graph" in out["inside_enabled"]
    assert out["enabled_equal"]
    assert out["after_enabled"] == [] and out["after_enabled_installed"] == []

    assert out["async_equal"]
    assert out["offloaded_before"] >= 1
    # A background backend: the hook and the isolation shims are in place.
    for name in ("fx_codegen_and_compile", "is_fx_tracing", "trace", "patch",
                 "torch._dynamo.utils.preserve_rng_state",
                 "torch._dynamo.testing.rand_strided"):
        assert name in out["while_backend"], name

    assert out["after_shutdown"] == [], out["after_shutdown"]
    assert out["after_shutdown_installed"] == []

    assert out["sync_equal"]
    assert out["offloaded_after"] > out["offloaded_before"]
    assert out["end"] == []


def test_groups_undo_newest_first() -> None:
    owner = types.SimpleNamespace(a=1)
    cls = type("C", (), {"m": lambda self: 1})

    def fn() -> int:
        return 1

    def other() -> int:
        return 2

    code = fn.__code__
    obj = cls()
    patches.replace("test", owner, "a", 2)
    patches.replace("test", owner, "a", 3)  # the first original is kept
    patches.replace("test", owner, "new", 4)
    patches.replace("test", cls, "m", lambda self: 5)
    patches.replace_code("test", fn, other.__code__)
    patches.replace_class("test", obj, type("D", (cls,), {}))
    assert (owner.a, owner.new, obj.m(), fn()) == (3, 4, 5, 2)
    assert patches.is_installed("test")
    assert any(label.startswith("test: ") for label in patches.installed())
    patches.uninstall("test")
    assert owner.a == 1 and not hasattr(owner, "new")
    assert "m" in cls.__dict__ and obj.m() == 1 and type(obj) is cls
    assert fn.__code__ is code
    assert not patches.is_installed("test")
