"""The ``fxoffload`` command line: replay, inspect and demo, on real captures."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import MLP

import fxoffload
from fxoffload import cli, inspection, wire

SRC = Path(fxoffload.__file__).resolve().parent.parent
TORCH_HINT = ("install it with: pip install torch==2.13.0 (fxoffload supports torch 2.11 "
              "through 2.13)")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fxoffload.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _run_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -S``: no site-packages, so no torch; PYTHONPATH still finds fxoffload."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def _capture(directory: Path, x: torch.Tensor) -> Path:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP().eval()
    backend = fxoffload.backend(mode="capture", capture_dir=directory)
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad(), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend=backend)(x)
    torch._dynamo.reset()
    (request,) = sorted(directory.glob("*.request.fxo"))
    assert request.with_name(request.name.replace(".request.", ".response.")).is_file()
    return request


@pytest.fixture(scope="module")
def static_request(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _capture(tmp_path_factory.mktemp("static"), torch.randn(4, 16))


@pytest.fixture(scope="module")
def dynamic_request(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = torch.randn(6, 16)
    torch._dynamo.mark_dynamic(x, 0)
    return _capture(tmp_path_factory.mktemp("dynamic"), x)


@pytest.fixture(scope="module")
def training_requests(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("training")
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = fxoffload.backend(mode="capture", capture_dir=directory)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(MLP(), backend=backend)(torch.randn(4, 16)).sum().backward()
    torch._dynamo.reset()
    return sorted(directory.glob("*.request.fxo"))


_NAME = re.compile(r"^(\d+)-(\d{4})-(forward|backward|inference)-(\d+)_(\d+)-([0-9a-f]{12})"
                   r"\.request\.fxo$")


def test_capture_names_say_which_graph(static_request: Path, training_requests: list[Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    match = _NAME.match(static_request.name)
    assert match and match.group(3) == "inference", static_request.name
    assert int(match.group(1)) == os.getpid()
    names = [_NAME.match(p.name) for p in training_requests]
    assert all(names), [p.name for p in training_requests]
    assert [(m.group(3), m.group(4), m.group(5)) for m in names if m] == [
        ("forward", names[0].group(4), names[0].group(5)),
        ("backward", names[0].group(4), names[0].group(5))]  # one frame, two graphs
    for path, m in zip(training_requests, names, strict=True):
        assert path.with_name(path.name.replace(".request.", ".response.")).is_file()
        assert cli.main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert m and f"request id:   {m.group(6)}" in out
        assert f"graph:        {m.group(3)}, Dynamo compile id {m.group(4)}/{m.group(5)}" in out
        assert f"compile_id={m.group(4)}/{m.group(5)}" in out  # in the summary


def test_capture_name_without_compile_id(static_request: Path) -> None:
    from fxoffload import protocol
    from fxoffload.executors.capture import capture_stem

    preamble, _ = protocol.split_request(static_request.read_bytes())
    preamble.summary.pop("compile_id", None)  # a request made outside Dynamo
    assert capture_stem(preamble, 7) == \
        f"{os.getpid()}-0007-inference-na-{preamble.request_id}"
    preamble.summary.update(compile_id="!2/0/1", is_inference=False, is_backward=True)
    assert capture_stem(preamble, 8) == \
        f"{os.getpid()}-0008-backward-ca2_0_1-{preamble.request_id}"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["replay"], ["inspect"], ["demo"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert "usage: fxoffload" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "fxoffload", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "replay" in proc.stdout and "demo" in proc.stdout


def test_replay_matches_capture(static_request: Path) -> None:
    proc = _run("replay", str(static_request))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    request_id = static_request.name.split(".")[0].split("-")[-1]
    assert f"request id:    {request_id}" in out
    assert f"torch:         {torch.__version__}" in out
    assert re.search(r"graph: +\d+ nodes, \d+ inputs, devices cpu \(inference\)", out)
    match = _NAME.match(static_request.name)
    assert match and f"compile id:    {match.group(4)}/{match.group(5)}\n" in out
    assert re.search(r"compile: +\d+\.\d+ s", out)
    assert re.search(r"kernels: +[1-9]\d* generated", out)
    assert re.search(r"source code: +[1-9]\d* chars", out)
    assert "result:        ok" in out
    assert "matches capture: yes" in out


def test_replay_failed_compile_exits_1(static_request: Path, tmp_path: Path) -> None:
    # A well-formed request that names a custom op no process registers: the compile
    # side reports custom_op_unavailable and replay must say so with exit code 1.
    envelope = wire.decode(static_request.read_bytes())
    preamble, body = pickle.loads(envelope.payload)
    preamble["custom_ops"] = ["fxoffload_cli_test::missing"]
    bad = tmp_path / "bad.request.fxo"
    bad.write_bytes(wire.encode(wire.Kind.REQUEST, pickle.dumps((preamble, body))))
    proc = _run("replay", "--quiet", str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED (custom_op_unavailable)" in proc.stdout
    assert "fxoffload_cli_test::missing" in proc.stdout


def test_inspect_dynamic_request(dynamic_request: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(dynamic_request)]) == 0
    out = capsys.readouterr().out
    assert "def forward(" in out and "torch.ops.aten.addmm" in out
    symbol = re.search(r"\[\d+\] tensor shape=\((s\d+), 16\) dtype=torch\.float32 "
                       r"stride=\(16, 1\) device=cpu", out)
    assert symbol, out
    sym = symbol.group(1)
    assert re.search(rf"{sym}: hint 6, range \[2, int_oo\], from L\['x'\]\.size\(\)\[0\]", out)
    assert "guards: " in out
    assert "== inductor config (differs from defaults) ==" in out
    assert "lowerings fall back to eager" in out
    assert "float32_matmul_precision = highest" in out


def test_inspect_static_request_and_response(static_request: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(static_request)]) == 0
    out = capsys.readouterr().out
    assert "tensor shape=(4, 16) dtype=torch.float32 stride=(16, 1) device=cpu" in out
    assert "no symbols: all shapes static" in out
    assert "is_inference=True" in out
    response = static_request.with_name(static_request.name.replace(".request.", ".response."))
    assert cli.main(["inspect", str(response)]) == 0
    out = capsys.readouterr().out
    assert "CompiledFxGraph, source code" in out
    assert re.search(r"metrics: +.*generated_kernel_count=[1-9]", out)
    assert "log records:" in out and "warnings:" in out


def _with_cache_dirs(request: Path, dest: Path, inductor: Path, triton: Path) -> Path:
    """A copy of ``request`` whose preamble names these cache dirs (as a run elsewhere)."""
    preamble, body = pickle.loads(wire.decode(request.read_bytes()).payload)
    preamble.update(cache_dir=str(inductor), triton_cache_dir=str(triton))
    dest.write_bytes(wire.encode(wire.Kind.REQUEST, pickle.dumps((preamble, body))))
    return dest


def test_replay_uses_a_fresh_cache_dir(static_request: Path, tmp_path: Path) -> None:
    # The captured run's cache dirs were deleted since: replay must not recreate them.
    gone = tmp_path / "captured-run"
    request = _with_cache_dirs(static_request, tmp_path / "r.request.fxo",
                               gone / "inductor", gone / "triton")
    proc = _run("replay", "--quiet", str(request))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    used = re.search(r"^cache dir: +(\S+) \(fresh, removed afterwards\)$", proc.stdout,
                     re.MULTILINE)
    assert used, proc.stdout
    assert not gone.exists()
    assert not Path(used.group(1)).exists()

    mine = tmp_path / "mine"
    proc = _run("replay", "--quiet", "--cache-dir", str(mine), str(request))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^cache dir: +{re.escape(str(mine))} \(--cache-dir\)$", proc.stdout,
                     re.MULTILINE), proc.stdout
    assert any(p.suffix == ".py" for p in mine.rglob("*"))  # the compile wrote here
    assert not gone.exists()


def test_replay_use_captured_cache(static_request: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    captured = tmp_path / "captured-run"
    request = _with_cache_dirs(static_request, tmp_path / "r.request.fxo",
                               captured / "inductor", captured / "triton")
    proc = _run("replay", "--quiet", "--use-captured-cache", str(request))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^cache dir: +{re.escape(str(captured / 'inductor'))} \(the captured "
                     r"run's, --use-captured-cache\)$", proc.stdout, re.MULTILINE), proc.stdout
    assert any(p.suffix == ".py" for p in (captured / "inductor").rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["replay", "--cache-dir", str(tmp_path), "--use-captured-cache",
                  str(request)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["replay", "inspect"])
def test_bad_input(command: str, static_request: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    data = static_request.read_bytes()
    cases = {
        "truncated.request.fxo": (data[: len(data) // 2], "truncated envelope"),
        "short.request.fxo": (data[:10], "truncated envelope"),
        "random.request.fxo": (b"\x00" + os.urandom(4095), "not an fxoffload file"),
        "flipped.request.fxo": (data[:-1] + bytes([data[-1] ^ 1]), "checksum mismatch"),
        "foreign.request.fxo": (
            wire.encode(wire.Kind.REQUEST, wire.decode(data).payload, torch_version="0.0.1"),
            "torch 0.0.1"),
        "missing.request.fxo": (None, "no such file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        assert cli.main([command, str(path)]) == 2, name
        captured = capsys.readouterr()
        assert message in captured.err, (name, captured.err)
        assert "Traceback" not in captured.err + captured.out
        assert len(captured.err.strip().splitlines()) == 1


def test_bad_input_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "x.request.fxo"
    path.write_bytes(b"FXOF\x00\x01")
    proc = _run("replay", str(path))
    assert proc.returncode == 2
    assert "truncated envelope" in proc.stderr and "Traceback" not in proc.stderr


def test_version() -> None:
    for module in ("fxoffload", "fxoffload.cli"):
        proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [f"fxoffload {fxoffload.__version__}",
                                            f"torch {torch.__version__}"]


def test_without_torch(static_request: Path) -> None:
    assert _run_without_torch("-c", "import torch").returncode != 0  # the premise
    proc = _run_without_torch("-m", "fxoffload", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"fxoffload {fxoffload.__version__}",
                                        f"torch not installed in {sys.executable}"]
    for argv in (["replay", str(static_request)], ["inspect", str(static_request)],
                 ["demo", "--model", "block"]):
        proc = _run_without_torch("-m", "fxoffload", *argv)
        assert proc.returncode == 2, (argv, proc.stdout + proc.stderr)
        assert proc.stderr.strip() == (f"fxoffload: error: torch is not installed in "
                                       f"{sys.executable}; {TORCH_HINT}"), argv
    script = ("import fxoffload\n"
              "for call in (fxoffload.backend, fxoffload.enabled, fxoffload.warmup):\n"
              "    try:\n"
              "        call()\n"
              "    except ImportError as e:\n"
              "        print(type(e).__name__, e)\n")
    proc = _run_without_torch("-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"ImportError torch is not installed in {sys.executable}; {TORCH_HINT}"] * 3


@pytest.mark.parametrize("command", ["replay", "inspect"])
def test_not_an_fxoffload_file(command: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = {"twelve.py": b"print('hi')\n", "empty.request.fxo": b"", "x.fxo": b"FXOA",
             "elf.fxo": b"\x7fELF" + bytes(60)}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert cli.main([command, str(path)]) == 2, name
        err = capsys.readouterr().err
        assert "not an fxoffload file" in err and "truncated" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1
    (tmp_path / "fx").write_bytes(b"FX")  # a prefix of the magic: a truncated capture
    assert cli.main([command, str(tmp_path / "fx")]) == 2
    assert "truncated envelope" in capsys.readouterr().err


def test_normalize_source() -> None:
    a = "# AOT ID: ['3_inference']\n# kernel path: /tmp/x/ab/cabc123def456ghi789jkl012mno.py\n" \
        "def call(args):\n    return kernel_0(args)\n"
    b = "# AOT ID: ['0_inference']\n# kernel path: /tmp/y/cd/c9zz123def456ghi789jkl012xyz.py\n" \
        "\ndef call(args):\n    return kernel_0(args)\n"
    assert inspection.compare_sources(a, b) == []
    assert inspection.compare_sources(a, b.replace("kernel_0", "kernel_1"))


@pytest.mark.slow
def test_demo_block_serde() -> None:
    proc = subprocess.run([sys.executable, "-m", "fxoffload", "demo", "--model", "block",
                           "--mode", "serde"], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outputs match stock's: yes" in proc.stdout
    assert re.search(r"warmed ahead: [1-9]\d* graphs offloaded, compiled in-process 0, "
                     r"0 fallbacks", proc.stdout), proc.stdout
    assert re.search(r"first output against stock: [\d.]+x with no warm-up; [\d.]+x with "
                     r"the pool warmed ahead \([\d.]+x counting the warm-up\)", proc.stdout)
