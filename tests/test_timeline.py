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
    # A cold pool's first compile stays here (sync and async): warm both pools first.
    fxoffload.warmup(mode="subprocess", workers=1)
    fxoffload.warmup(mode="async+subprocess", workers=1)

    def f(x):
        return x.sin() * 2

    def g(x):
        return x.cos() + 1

    torch.compile(f, backend=fxoffload.backend(mode="subprocess", workers=1))(torch.randn(8))
    cg = torch.compile(g, backend=fxoffload.backend(mode="async+subprocess", workers=1))
    cg(torch.randn(8))
    assert fxoffload.wait(240)
    cg(torch.randn(8))  # the swap
    print(os.getpid())
    fxoffload.shutdown()
""")


def _run_traced(tmp_path: Any) -> tuple[int, list[dict[str, Any]]]:
    trace = tmp_path / "trace.json"
    env = dict(os.environ, FXOFFLOAD_TRACE=str(trace),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]), json.loads(trace.read_text())["traceEvents"]


def test_trace_names_graphs_by_compile_id_with_args(tmp_path: Any) -> None:
    parent, events = _run_traced(tmp_path)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    workers = {tid for tid, name in tracks.items() if name.startswith("worker ")}
    assert tracks[0] == "parent" and len(workers) == 2  # the sync pool's and async's
    assert parent not in workers  # compiled in other processes

    # Worker start-up: a span on each worker's own track, its phases as args.
    starts = [e for e in events if e["name"].startswith("start worker")]
    assert {e["tid"] for e in starts} == workers
    for e in starts:
        assert e["args"]["pid"] == e["tid"] and e["args"]["import_s"] > 0
        assert {"popen_s", "interpreter_s"} <= set(e["args"])

    graph_events = [e for e in events if e["ph"] in ("X", "i") and e not in starts]
    by_frame: dict[str, list[dict[str, Any]]] = {}
    for e in graph_events:  # every event names its graph: Dynamo's compile id
        assert e["args"].get("compile_id"), e
        by_frame.setdefault(e["args"].get("frame"), []).append(e)
    assert set(by_frame) == {"f", "g"}
    for frame, steps in (("f", {"serialize", "wait for subprocess", "compile",
                                "deserialize + replay"}),
                         ("g", {"wait for Dynamo", "trace", "queue", "compile", "decode",
                                "swap"})):
        ids = {e["args"]["compile_id"] for e in by_frame[frame]}
        assert len(ids) == 1, (frame, ids)  # one name across every span of the graph
        cid = ids.pop()
        assert {e["name"].split(" graph ")[0] for e in by_frame[frame]} == steps
        assert all(e["name"].endswith(f"graph {cid}") for e in by_frame[frame])
        compiled = next(e for e in by_frame[frame] if e["name"].startswith("compile"))
        assert compiled["tid"] in workers and compiled["dur"] > 0
        assert compiled["args"]["pid"] == compiled["tid"] and compiled["args"]["nodes"] > 0
    assert by_frame["f"][0]["args"]["compile_id"] != by_frame["g"][0]["args"]["compile_id"]
    received = [e for e in by_frame["g"] if e["name"].split(" graph ")[0] in
                ("queue", "compile", "decode")]
    assert len({e["args"]["request"] for e in received}) == 1
    assert all(e["args"]["bytes_sent"] > 0 and e["args"]["bytes_received"] > 0
               for e in received)


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
