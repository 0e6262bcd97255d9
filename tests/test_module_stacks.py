"""A backward graph's module stacks name the model's classes; they cross by name, so a
worker compiles the graph without importing the model's library (a fresh farm worker
imported ``transformers``, 11 s on a cold disk, to unpickle its first backward)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import fxoffload
from fxoffload import protocol

MODULE = "fxo_stack_model"
SOURCE = textwrap.dedent("""
    import torch

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.linear(x))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x) * 2
""")

# In a fresh process that could import the module: decode and compile the backward.
WORKER = textwrap.dedent("""
    import json, sys
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from fxoffload import child, protocol
    data = open(sys.argv[1], "rb").read()
    _, body = protocol.split_request(data)
    request = protocol.decode_request_body(body, FakeTensorMode(shape_env=ShapeEnv()))
    classes = sorted({(c.__module__, c.__qualname__, c.__doc__ or "")
                      for n in request.gm.graph.nodes
                      for _, c in (n.meta.get("fwd_nn_module_stack") or {}).values()})
    _, response = child.compile_request_status(data)
    print(json.dumps({"classes": classes, "error": response.error,
                      "imported": "fxo_stack_model" in sys.modules}))
""")


def test_module_classes_cross_by_name(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(MODULE)
    capture = tmp_path / "capture"
    model = module.Block()
    x = torch.randn(4, 8, requires_grad=True)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out = torch.compile(model, backend=fxoffload.backend(mode="capture",
                                                             capture_dir=capture))(x)
        out.sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(expected_grad, x.grad)

    [backward] = capture.glob("*-backward-*.request.fxo")
    # Here, where the module is imported, the classes come back as themselves.
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    _, body = protocol.split_request(backward.read_bytes())
    here = protocol.decode_request_body(body, FakeTensorMode(shape_env=ShapeEnv()))
    stacks = [n.meta["fwd_nn_module_stack"] for n in here.gm.graph.nodes
              if n.meta.get("fwd_nn_module_stack")]
    assert stacks, "the backward graph has no module stacks to check"
    assert module.Inner in {cls for stack in stacks for _, cls in stack.values()}

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WORKER, str(backward)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] is None
    assert not result["imported"], "decoding imported the model's module"
    classes = {(m, q) for m, q, _ in result["classes"]}
    assert (MODULE, "Inner") in classes, classes
    assert all("Stands in" in doc for m, _, doc in result["classes"] if m == MODULE)
