"""The same contract on CUDA (Triton): run on the device machine; skipped without a GPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from conftest import assert_same_code, settings_for
from models import MLP, Block, GraphBreak
from torch._inductor.utils import run_and_get_code

import fxoffload
from fxoffload.private_config import config_can_be_private

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MODES = ("serde", "subprocess")


def _compare(make: Any, run: Any, mode: str, tmp_path: Any, min_graphs: int = 1) -> None:
    torch.manual_seed(0)
    stock_fn = make()
    ours_fn = copy.deepcopy(stock_fn)
    torch._dynamo.reset()
    torch.manual_seed(1234)  # same dropout masks for both (drawn at run time)
    s_out, s_code = run_and_get_code(lambda: run(torch.compile(stock_fn)))
    torch._dynamo.reset()
    fxoffload.reset_stats()
    torch.manual_seed(1234)
    backend = fxoffload.backend(**settings_for(mode, tmp_path))
    o_out, o_code = run_and_get_code(lambda: run(torch.compile(ours_fn, backend=backend)))
    for o, s in zip(torch.utils._pytree.tree_leaves(o_out),
                    torch.utils._pytree.tree_leaves(s_out), strict=True):
        torch.testing.assert_close(o, s)
    assert_same_code(o_code, s_code)
    assert "triton" in "".join(o_code)
    snap = fxoffload.stats()
    assert dict(snap.fallbacks) == {}
    assert snap.graphs_offloaded == len(s_code) >= min_graphs
    # serde's load takes every Triton kernel from the in-process compile (none loaded twice)
    kernels = sum(code.count("= async_compile.triton(") for code in o_code)
    assert snap.kernels_reused == (kernels if mode == "serde" else 0)
    assert kernels > 0


@pytest.mark.parametrize("mode", MODES)
def test_mlp(mode: str, tmp_path: Any) -> None:
    x = torch.randn(8, 16, device="cuda")
    _compare(lambda: MLP().cuda(), lambda f: f(x), mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_block_training(mode: str, tmp_path: Any) -> None:
    x = torch.randn(2, 16, 32, device="cuda")

    def run(f: Any) -> list[torch.Tensor]:
        out = f(x)
        out.pow(2).mean().backward()
        return [out.detach()] + [p.grad for p in f.parameters()]

    _compare(lambda: Block().cuda(), run, mode, tmp_path, min_graphs=2)


@pytest.mark.parametrize("mode", MODES)
def test_dynamic_and_graph_break(mode: str, tmp_path: Any) -> None:
    xs = [torch.randn(n, 8, device="cuda") for n in (4, 6, 9)]

    def run(f: Any) -> list[torch.Tensor]:
        outs = []
        for x in xs:
            x = x.clone()
            torch._dynamo.mark_dynamic(x, 0)
            outs.append(f(x))
        return outs

    _compare(lambda: GraphBreak().cuda(), run, mode, tmp_path, min_graphs=2)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_transformers_subprocess(name: str, train: bool, tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    from models import transformers_model

    def make() -> Any:
        model, _ = transformers_model(name, "cuda")
        return model.train(train)

    _, inputs = transformers_model(name, "cuda")

    def run(f: Any) -> list[torch.Tensor]:
        if not train:
            with torch.no_grad():
                return [f(**inputs()).logits]
        logits = f(**inputs()).logits
        logits.pow(2).mean().backward()
        return [logits.detach()] + [p.grad for p in f.parameters() if p.grad is not None]

    _compare(make, run, "subprocess", tmp_path, min_graphs=2 if train else 1)


SCRIPT = textwrap.dedent("""
    import json, sys, torch, fxoffload
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.LayerNorm(64))
    m = m.cuda()
    backend = "inductor" if sys.argv[1] == "stock" else fxoffload.backend(
        mode=sys.argv[1], workers=1)
    if sys.argv[1].endswith("subprocess"):  # cold, the compile would run in-process
        fxoffload.warmup(mode=sys.argv[1], workers=1)
    with torch.no_grad():
        f = torch.compile(m, backend=backend)
        out = f(torch.ones(8, 64, device="cuda"))
        if sys.argv[1].startswith("async"):  # the cache entry is written on arrival
            assert fxoffload.wait(300)
            out = f(torch.ones(8, 64, device="cuda"))
    print(json.dumps({"inductor": dict(counters["inductor"]),
                      "offloaded": fxoffload.stats().graphs_offloaded,
                      "sum": out.sum().item()}))
    fxoffload.shutdown()
""")


def _run(kind: str, cache: str, triton: str) -> dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=triton)
    out = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True,
                         text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", [*MODES, "async+subprocess", "async+serde"])
def test_worker_triton_kernels_reach_the_parents_cache_entry(mode: str, tmp_path: Any) -> None:
    stock = _run("stock", str(tmp_path / "stock"), str(tmp_path / "t-stock"))
    first = _run(mode, str(tmp_path / "ours"), str(tmp_path / "t1"))
    assert first["offloaded"] == 1
    saved = first["inductor"].get("triton_bundler_save_kernel", 0)
    assert saved == stock["inductor"].get("triton_bundler_save_kernel", 0) > 0
    # A second process with an empty Triton cache: FX cache hit, kernels come from the
    # bundle in the parent's cache entry, nothing is compiled or offloaded.
    second = _run(mode, str(tmp_path / "ours"), str(tmp_path / "t2"))
    assert second["offloaded"] == 0
    assert second["inductor"].get("fxgraph_cache_hit", 0) == 1
    assert second["inductor"].get("triton_bundler_read_and_emit_kernel", 0) == saved
    assert second["sum"] == first["sum"]


def test_async_eager_forward_meets_compiled_backward_with_padding(tmp_path: Any) -> None:
    """On a GPU Inductor pads tensors saved for backward; async pins them to eager's
    strides, so eager and compiled halves of a training step fit together either way."""
    from extensions import WaitsForFile
    from models import OddWidth

    torch.manual_seed(0)
    stock = OddWidth().cuda()
    ours = copy.deepcopy(stock)
    x = torch.randn(8, 16, device="cuda")
    for _ in range(2):
        stock(x).pow(2).mean().backward()
    gate = tmp_path / "release"
    with torch._inductor.config.patch(post_grad_custom_post_pass=WaitsForFile(str(gate)),
                                      padding_stride_threshold=1):
        # Traced on the caller: the eager stand-in is then AOTAutograd's forward graph,
        # whose saved tensors the compiled backward meets.
        compiled = torch.compile(ours, backend=fxoffload.backend(
            **settings_for("async+subprocess", defer_trace=False)))
        out_a, out_b = compiled(x), compiled(x)  # eager forwards
        out_a.pow(2).mean().backward()  # eager backward
    gate.touch()
    assert fxoffload.wait(300)
    out_b.pow(2).mean().backward()  # compiled backward, saved tensors from eager
    ours_grads = [p.grad.clone() for p in ours.parameters()]
    for p, q in zip(ours_grads, [q.grad for q in stock.parameters()], strict=True):
        torch.testing.assert_close(p, q)
    ours.zero_grad()
    stock.zero_grad()
    compiled(x).pow(2).mean().backward()  # compiled forward and backward
    stock(x).pow(2).mean().backward()
    for p, q in zip(ours.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    snap = fxoffload.stats()
    assert snap.swaps == 2 and snap.fallback_count == 0, snap


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_async_transformers_training(name: str) -> None:
    """First step eager with no compile in this process, later steps compiled in a worker;
    each equals stock torch.compile's step."""
    pytest.importorskip("transformers")
    from models import transformers_model

    torch.manual_seed(0)
    stock, inputs = transformers_model(name, "cuda")
    ours = copy.deepcopy(stock)
    batch = inputs()

    def step(f: Any) -> list[torch.Tensor]:
        f.zero_grad()
        logits = f(**batch).logits
        logits.float().pow(2).mean().backward()
        return [logits.detach()] + [p.grad for p in f.parameters() if p.grad is not None]

    torch.manual_seed(1234)
    expected = step(torch.compile(stock.eval()))
    compiled = torch.compile(ours.eval(), backend=fxoffload.backend(
        **settings_for("async+subprocess")))
    for phase in ("eager", "compiled"):
        torch.manual_seed(1234)
        got = step(compiled)
        for o, s in zip(got, expected, strict=True):
            torch.testing.assert_close(o, s, atol=2e-3, rtol=2e-3)
        if phase == "eager":
            snap = fxoffload.stats()
            assert snap.eager_runs >= 1 and snap.swaps == 0, snap
            # static: traced on our thread, where torch's config can be made private to it
            assert (snap.background_traces >= 1) == config_can_be_private(), snap
            assert fxoffload.wait(600)
    snap = fxoffload.stats()
    # forward and backward each swapped in (the backward went to the pool with it)
    assert snap.swaps >= 2 and snap.compiled_runs >= 2 and snap.fallback_count == 0, snap


@pytest.mark.parametrize(("mode", "pools"), [("subprocess", 1), ("async+serde", 1),
                                             ("async+subprocess", 1), ("farm", 0)])
def test_inductor_compile_pool_started_where_this_process_compiles(
        mode: str, pools: int, tmp_path: Any) -> None:
    """Inductor's Triton compile pool (one process per core, each importing torch) is
    started when the backend is made, as stock does, where a graph may compile in this
    process: sync (no warm worker yet), async+serde (always), async+subprocess with a
    cold pool (the cold route). Otherwise it is made at the first kernel and used only
    once ready: the kernels of that compile build one by one. A farm client compiles only
    if the farm fails: no pool (4 GPU ranks spent most of their CPU on those pools)."""
    if mode == "farm":
        pytest.importorskip("ray")
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    farm = ", farm='127.0.0.1:1'" if mode == "farm" else ""
    code = textwrap.dedent(f"""
        import fxoffload
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads
        fxoffload.backend(mode={mode!r}{farm})
        print(get_compile_threads(), AsyncCompile.process_pool.cache_info().currsize)
        fxoffload.shutdown()
    """)
    env = {**os.environ, "FXOFFLOAD_FARM_KEY_FILE": str(key),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # empty: a cold start
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    threads, made = map(int, out.stdout.split()[-2:])
    assert threads > 1, "a machine with one core shows nothing here"
    assert made == pools
