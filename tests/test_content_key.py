"""content_key: the same compile in two processes gets the same key; anything that can
change the compiled artifact changes it; per-process noise does not."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from models import MLP

import fxoffload
from fxoffload import offload, protocol
from fxoffload.content_key import content_key

TESTS = Path(__file__).resolve().parent

# One training step (forward, backward), an inference call, and a dynamic-shape step, all
# through capture mode; prints nothing: the request files are the output.
CHILD = textwrap.dedent("""
    import os, sys
    import torch, fxoffload
    from models import MLP

    torch.manual_seed(0)
    extra = {"fallback_random": True} if os.environ["CK_VARIANT"] == "config" else {}
    backend = fxoffload.backend(mode="capture", capture_dir=sys.argv[1])
    with torch._inductor.config.patch(fx_graph_cache=False, **extra), \\
            torch._functorch.config.patch(enable_autograd_cache=False):
        step = torch.compile(MLP(), backend=backend)
        step(torch.randn(4, 16)).sum().backward()
        with torch.no_grad():
            step(torch.randn(4, 16))
        dynamic = torch.compile(MLP(), backend=backend, dynamic=True)
        dynamic(torch.randn(6, 16)).sum().backward()
""")


def _start(tmp: Path, name: str, variant: str, seed: str) -> tuple[subprocess.Popen[str], Path]:
    """A fresh process with its own cache dir, hash seed, cwd and a temp sys.path entry."""
    root = tmp / name
    (root / "junk").mkdir(parents=True)
    env = dict(os.environ, CK_VARIANT=variant, PYTHONHASHSEED=seed,
               TORCHINDUCTOR_CACHE_DIR=str(root / "cache"),
               PYTHONPATH=os.pathsep.join([str(root / "junk"), str(TESTS)]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root / "capture")], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, root / "capture"


def _keys(capture: Path) -> list[tuple[str, str]]:
    """(graph kind, key) per request, in the order the process compiled them."""
    files = sorted(capture.glob("*.request.fxo"), key=lambda p: int(p.name.split("-")[1]))
    out = []
    for path in files:
        data = path.read_bytes()
        out.append((protocol.graph_kind(protocol.split_request(data)[0].summary),
                    content_key(data)))
    return out


@pytest.mark.slow
def test_fresh_processes_agree_graph_by_graph(tmp_path: Path) -> None:
    # A config change giving other keys is checked in this process (test_config_and_noise).
    runs = {}
    started = [(name, *_start(tmp_path, name, "same", seed))
               for name, seed in (("a", "1"), ("b", "2"))]  # two at a time: two cores
    for name, proc, capture in started:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        runs[name] = _keys(capture)
    a, b = runs["a"], runs["b"]
    kinds = [kind for kind, _ in a]
    assert kinds == ["forward", "backward", "inference", "forward", "backward"]
    assert a == b  # same key for each graph, other pid, cache dir, hash seed, sys.path
    assert len({key for _, key in a}) == len(a)  # five graphs, five keys


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[Any]]:
    """Requests of one MLP training step (serde mode), each built again in the same
    compile: plain, and under other Inductor configs; and build_request's arguments."""
    out: dict[str, list[Any]] = {"plain": [], "again": [], "max_autotune": [],
                                 "fallback_random": [], "args": []}
    build = offload.build_request

    def recording(settings: Any, *args: Any) -> bytes:
        data = build(settings, *args)
        out["plain"].append(data)
        out["again"].append(build(settings, *args))
        for name in ("max_autotune", "fallback_random"):
            with torch._inductor.config.patch({name: True}):
                out[name].append(build(settings, *args))
        out["args"].append(args)
        return data

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp, \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        mp.setattr(offload, "build_request", recording)
        step = torch.compile(MLP(), backend=fxoffload.backend(mode="serde"))
        step(torch.randn(4, 16)).sum().backward()
    torch._dynamo.reset()
    return out


def test_config_and_noise(recorded: dict[str, list[Any]]) -> None:
    plain = [content_key(d) for d in recorded["plain"]]
    assert len(plain) == 2 and plain[0] != plain[1]  # forward, backward
    assert [content_key(d) for d in recorded["again"]] == plain
    for name in ("max_autotune", "fallback_random"):
        assert all(content_key(d) != k for d, k in zip(recorded[name], plain, strict=True))

    preamble, body = protocol.split_request(recorded["plain"][0])
    noisy = dataclasses.replace(
        preamble, request_id="x", created=0.0, sys_path=["/tmp/elsewhere", *preamble.sys_path],
        cache_dir="/tmp/c1", triton_cache_dir="/tmp/t1",
        summary={**preamble.summary, "compile_id": "7/3"})
    assert content_key(protocol.join_request(noisy, body)) == plain[0]
    other_torch = dataclasses.replace(preamble, torch_version="2.99.0")
    assert content_key(protocol.join_request(other_torch, body)) != plain[0]
    flipped = body[:-40] + bytes([body[-40] ^ 1]) + body[-39:]
    assert content_key(protocol.join_request(preamble, flipped)) != plain[0]


def test_shape_and_dtype_change_the_key(recorded: dict[str, list[Any]]) -> None:
    """The same graph's request rebuilt over other example inputs."""
    settings = fxoffload.Settings.resolve(mode="serde")
    gm, inputs, to_check, kwargs, region, fake_mode = recorded["args"][0]
    x = next(i for i, t in enumerate(inputs) if tuple(t.shape) == (4, 16))  # the batch

    def key(example_inputs: list[Any]) -> str:
        return content_key(offload.build_request(settings, gm, example_inputs, to_check,
                                                 kwargs, region, fake_mode))

    base = key(list(inputs))
    assert key(list(inputs)) == base
    with fake_mode:
        for other in (torch.empty(8, 16), torch.empty(4, 16, dtype=torch.float64)):
            assert key([*inputs[:x], other, *inputs[x + 1:]]) != base, other


def test_stable_ids_stay_in_the_stream(recorded: dict[str, list[Any]]) -> None:
    """The backward graph's module stacks cross under stream ordinals; the parent's own
    graph keeps its id-keyed stacks."""
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = recorded["args"][1][0]
    parent = [n.meta["fwd_nn_module_stack"] for n in gm.graph.nodes
              if n.meta.get("fwd_nn_module_stack")]
    assert parent and all(int(k) > 1000 for s in parent for k in s)  # id()s, untouched
    _, body = protocol.split_request(recorded["plain"][1])
    request = protocol.decode_request_body(body, FakeTensorMode(shape_env=ShapeEnv()))
    sent = [n.meta["fwd_nn_module_stack"] for n in request.gm.graph.nodes
            if n.meta.get("fwd_nn_module_stack")]
    assert [list(s.values()) for s in sent] == [list(s.values()) for s in parent]
    assert all(int(k) < 100 for s in sent for k in s)


def test_another_cpu_is_another_key_and_is_refused(recorded: dict[str, list[Any]]) -> None:
    """C++ kernels are built for the compiling machine's CPU (-march=native): a request
    from a client on another CPU gets another key, and a worker refuses to build it."""
    from fxoffload import child

    data = recorded["plain"][0]
    preamble, body = protocol.split_request(data)
    assert preamble.host_cpu == protocol.cpu_fingerprint()
    elsewhere = protocol.join_request(
        dataclasses.replace(preamble, host_cpu="x86_64-0000000000000000"), body)
    assert content_key(elsewhere) != content_key(data)
    raw, status = child.compile_request_status(elsewhere, in_parent=True)
    assert status.error is not None
    response = protocol.decode_response(raw, None)
    assert response.error is not None and response.error[0] == "cpu_mismatch"
