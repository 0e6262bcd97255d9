"""TORCH_TRACE (torch's structured trace, read by tlparse) with graphs compiled in a
worker: one log, the parent's, holding the worker's Inductor artifacts for the offloaded
graph under the graph's own compile id, and nothing of the worker's warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

SCRIPT = textwrap.dedent("""
    import torch, fxoffload
    fxoffload.warmup(mode="subprocess", workers=1)  # a cold pool's first compile stays here
    f = torch.compile(lambda x: x.sin() * 2, backend=fxoffload.backend(mode="subprocess",
                      workers=1))
    f(torch.randn(8))
    print(fxoffload.stats().graphs_offloaded)
    fxoffload.shutdown()
""")


def test_one_trace_log_with_the_workers_output_code(tmp_path: Any) -> None:
    trace_dir = tmp_path / "trace"
    env = dict(os.environ, TORCH_TRACE=str(trace_dir),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"  # compiled in the worker
    logs = sorted(os.listdir(trace_dir))
    assert len(logs) == 1, logs  # the worker opened none of its own
    lines = (trace_dir / logs[0]).read_text().splitlines()
    heads = [json.loads(line.split("] ", 1)[1]) for line in lines
             if not line.startswith("\t") and "] {" in line]
    code = [h for h in heads if "inductor_output_code" in h]
    # One graph, compiled once: the warm-up's compile left nothing here.
    assert len(code) == 1, [next(iter(h)) for h in heads]
    assert (code[0].get("frame_id"), code[0].get("frame_compile_id")) == (0, 0)
    assert "stack" not in code[0]
    assert sum("inductor_post_grad_graph" in str(h) for h in heads) == 1
