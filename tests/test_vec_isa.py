"""A parent that loads a CPU graph compiled by a worker takes the worker's vector-ISA
probe result (same CPU flags) instead of building probe libraries of its own, about 9 s
in a fresh cache dir on the CI machine; a result that does not match what this CPU's
flags say is not taken, and the process probes as stock does. Without ``warmup()``, a
synchronous backend runs those probes in a thread from the moment it is made, beside
Dynamo's trace, instead of at the first compile's first kernel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_LOAD = textwrap.dedent("""
    import sys, torch, fxoffload
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    from fxoffload import _compat

    fxoffload.warmup(wait=True)  # FXOFFLOAD_MODE=subprocess: no probes in the parent

    def f(x):
        return torch.nn.functional.gelu(x) * 2 + x.sum(-1, keepdim=True)

    x = torch.randn(16, 32)
    assert valid_vec_isa_list.cache_info().currsize == 0, "probed before the load"
    out = torch.compile(f, backend="fxoffload")(x)
    torch.testing.assert_close(out, f(x))
    stats = fxoffload.stats()
    assert stats.graphs_offloaded == 1 and stats.fallbacks == {}, stats
    print("adopted", stats.vec_isa_adopted, [str(i) for i in valid_vec_isa_list()])
    fxoffload.shutdown()
""")

_MISMATCH = textwrap.dedent("""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    from fxoffload import _compat

    assert _compat.adopt_vec_isa(("no such isa",)) is False
    assert valid_vec_isa_list.cache_info().currsize == 0  # left for a real probe
    names = _compat.vec_isa_names()  # probes, as stock
    assert _compat.adopt_vec_isa(names) is False  # probed already: nothing to adopt
    print("ok")
""")


_AHEAD = textwrap.dedent("""
    import glob, os, torch, fxoffload
    from fxoffload import _compat, prepare

    def f(x):
        return torch.nn.functional.gelu(x) * 2 + x.sum(-1, keepdim=True)

    isas = _compat.vec_isa_to_probe()
    assert isas, "an x86 CI machine reports vector ISAs"
    fxoffload.backend(mode="inprocess")  # stock: nothing of ours
    assert prepare._isa_probe is None
    compiled = torch.compile(f, backend=fxoffload.backend(mode="serde"))
    assert prepare._isa_probe is not None, "no probe started with the backend"
    prepare._isa_probe.join(300)

    def libs():
        return sorted(glob.glob(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "**",
                                             "*.so"), recursive=True))

    built = libs()
    assert built, "the probe built nothing"
    usable = _compat.vec_isa_names()  # Inductor's probe, as the first compile runs it
    assert libs() == built, "the probe left builds to the compile"
    assert usable == tuple(str(isa) for isa in isas if isa), usable
    assert tuple(prepare._isa_probed) == usable, prepare._isa_probed
    x = torch.randn(16, 32)
    torch.testing.assert_close(compiled(x), f(x))
    assert fxoffload.stats().compiled_in_process == {}, fxoffload.stats()
    print("ok", usable)
""")


_STOPPED = textwrap.dedent("""
    import fxoffload
    from fxoffload import _compat, prepare

    isas = _compat.vec_isa_to_probe()
    if len(isas) < 2:
        raise SystemExit(print("fewer than 2 ISAs to probe"))
    fxoffload.backend()  # subprocess: probes ahead
    assert prepare._isa_probe is not None
    # what warmup() of an out-of-process mode does first: a worker's result is adopted
    prepare.prepare_parent("cpu", probe_cpu_isa=False)
    prepare._isa_probe.join(300)
    assert len(prepare._isa_probed) <= 1, (prepare._isa_probed, isas)
    print("ok")
""")


def _run(code: str, tmp_path: Path) -> str:
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PATH": "/usr/bin:/bin",
           "FXOFFLOAD_MODE": "subprocess", "FXOFFLOAD_WORKERS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_parent_adopts_the_workers_probe_result(tmp_path: Path) -> None:
    out = _run(_LOAD, tmp_path)
    assert "adopted 1 [" in out, out
    # whatever the worker found, the parent now uses it: a non-empty list on x86/arm CI
    assert "adopted 1 []" not in out, out


def test_a_result_this_cpu_does_not_report_is_not_adopted(tmp_path: Path) -> None:
    assert _run(_MISMATCH, tmp_path).strip() == "ok"


def test_a_backend_made_without_warmup_probes_while_dynamo_traces(tmp_path: Path) -> None:
    assert _run(_AHEAD, tmp_path).startswith("ok ("), "no ISA probed"


def test_warmup_after_the_backend_stops_the_probes(tmp_path: Path) -> None:
    out = _run(_STOPPED, tmp_path).strip()
    if out.startswith("fewer"):
        pytest.skip(out)
    assert out == "ok"


_NO_IMPORTS = textwrap.dedent("""
    import sys
    import fxoffload
    from fxoffload import prepare

    fxoffload.backend()  # subprocess: the probes start in a thread
    if prepare._isa_probe is None:
        raise SystemExit(print("no probe started"))
    before = set(sys.modules)
    prepare._isa_probe.join(300)
    print("imported in the thread:", sorted(set(sys.modules) - before))
""")


def test_the_probe_thread_imports_nothing(tmp_path: Path) -> None:
    # An import on a thread of ours while Dynamo imports on the caller's can make the
    # caller's fail (setuptools' distutils hack edits sys.meta_path): _compat's
    # import_before_threads. Before it, the probes imported setuptools here (93 modules).
    out = _run(_NO_IMPORTS, tmp_path).strip()
    if out.startswith("no probe"):
        pytest.skip(out)
    assert out == "imported in the thread: []", out
