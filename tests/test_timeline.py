"""FXOFFLOAD_TRACE writes a Chrome-trace timeline: parent and worker tracks per graph."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent("""
    import os, torch, fxoffload
    fxoffload.warmup(mode="subprocess", workers=1)  # a cold pool's first compile stays here
    torch.compile(lambda x: x.sin() * 2, backend=fxoffload.backend(mode="subprocess",
                  workers=1))(torch.randn(8))
    print(os.getpid())
    fxoffload.shutdown()
""")


def test_trace_has_parent_and_worker_tracks(tmp_path: Any) -> None:
    trace = tmp_path / "trace.json"
    env = dict(os.environ, FXOFFLOAD_TRACE=str(trace),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    parent = int(out.stdout.split()[-1])
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"]: e["tid"] for e in events if e["ph"] == "M"}
    workers = [n for n in names if n.startswith("worker ")]
    assert "parent" in names and len(workers) == 1
    assert int(workers[0].split()[1]) != parent  # compiled in another process
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["name"].split(" graph")[0] for e in spans} >= {
        "serialize", "wait for subprocess", "compile", "deserialize + replay"}
    compile_span = next(e for e in spans if e["name"].startswith("compile"))
    assert compile_span["tid"] == names[workers[0]] and compile_span["dur"] > 0


# -- FXOFFLOAD_TRACE that cannot be written ------------------------------------------------


def test_check_env_names_the_variable_and_the_os_error(tmp_path: Any, monkeypatch: Any) -> None:
    from fxoffload import timeline
    from fxoffload.errors import ConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for bad in (blocker / "trace.json", tmp_path):  # under a file; a directory
        monkeypatch.setenv("FXOFFLOAD_TRACE", str(bad))
        with pytest.raises(ConfigError, match=r"FXOFFLOAD_TRACE=.*(Not a directory|Is a "
                                              r"directory)"):
            timeline.check_env()
    fine = tmp_path / "new" / "dir" / "trace.json"
    monkeypatch.setenv("FXOFFLOAD_TRACE", str(fine))
    timeline.check_env()
    assert not (tmp_path / "new").exists()  # what the check made is gone again
    monkeypatch.delenv("FXOFFLOAD_TRACE")
    timeline.check_env()


def test_a_failed_write_warns_once_and_never_raises(tmp_path: Any, caplog: Any) -> None:
    from fxoffload import timeline

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tl = timeline.Timeline(blocker / "trace.json")
    tl.instant("x", 0.0)
    with caplog.at_level(logging.WARNING, logger="fxoffload"):
        tl.flush()
        tl.flush()
    warnings = [r for r in caplog.records if "FXOFFLOAD_TRACE" in r.getMessage()]
    assert len(warnings) == 1 and "a-file" in warnings[0].getMessage()


# -- bench/plot_timeline.py, as the README documents it --------------------------------


def _small_trace(path: Any) -> None:
    from fxoffload import timeline

    tl = timeline.Timeline(path)
    graph = {"compile_id": "0/0", "stage": 0, "nodes": 5}
    tl.span("serialize graph 0/0", 1.0, 1.1, track=0, track_name="parent", **graph)
    tl.span("compile graph 0/0", 1.1, 2.0, track=4242, track_name="worker 4242", pid=4242,
            **graph)
    tl.span("start worker 4242", 0.0, 0.9, track=4242, track_name="worker 4242", pid=4242)
    tl.instant("swap graph 0/0", 2.1, **graph)
    tl.flush()


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_plot_timeline_runs_as_documented(tmp_path: Any, suffix: str) -> None:
    """README: ``python bench/plot_timeline.py TRACE.json OUT.png`` draws it."""
    if suffix == "png":
        pytest.importorskip("matplotlib")
    trace, out = tmp_path / "trace.json", tmp_path / f"plot.{suffix}"
    _small_trace(trace)
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "plot_timeline.py")
    run = subprocess.run([sys.executable, script, str(trace), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    data = out.read_bytes()
    if suffix == "png":
        assert data.startswith(b"\x89PNG")
    else:
        text = data.decode()
        assert text.startswith("<svg") and "worker 4242" in text and ">0/0<" in text
