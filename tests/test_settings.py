"""Configuration from keywords and FXOFFLOAD_* variables; bad values are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fxoffload
from fxoffload import ConfigError, Settings


def test_keywords_override_environment() -> None:
    s = Settings.resolve({"FXOFFLOAD_MODE": "serde", "FXOFFLOAD_WORKERS": "3"}, workers=2)
    assert (s.mode, s.workers) == ("serde", 2)


def test_environment() -> None:
    s = Settings.resolve({"FXOFFLOAD_MODE": "capture", "FXOFFLOAD_CAPTURE_DIR": "/tmp/x",
                          "FXOFFLOAD_TIMEOUT": "12.5", "FXOFFLOAD_ON_FAILURE": "raise",
                          "FXOFFLOAD_WORKER_IMPORTS": "a.b, c"})
    assert s.capture_dir == Path("/tmp/x") and s.timeout == 12.5
    assert s.on_failure == "raise" and s.worker_imports == ("a.b", "c")
    assert Settings.resolve({}).farm_graph_wait == 120.0
    assert Settings.resolve({"FXOFFLOAD_FARM_GRAPH_WAIT": "0"}).farm_graph_wait == 0.0


@pytest.mark.parametrize(("var", "value", "words"), [
    ("FXOFFLOAD_MODE", "fast", ["FXOFFLOAD_MODE", "serde", "subprocess"]),
    ("FXOFFLOAD_WORKERS", "0", ["FXOFFLOAD_WORKERS", "positive integer"]),
    ("FXOFFLOAD_WORKERS", "many", ["FXOFFLOAD_WORKERS"]),
    ("FXOFFLOAD_TIMEOUT", "-1", ["FXOFFLOAD_TIMEOUT", "seconds"]),
    ("FXOFFLOAD_ON_FAILURE", "ignore", ["FXOFFLOAD_ON_FAILURE", "fallback", "raise"]),
    ("FXOFFLOAD_WORKER_IMPORTS", "not a module", ["FXOFFLOAD_WORKER_IMPORTS"]),
    ("FXOFFLOAD_MODE", "async+inprocess", ["FXOFFLOAD_MODE", "serde, capture, subprocess"]),
    ("FXOFFLOAD_MODE", "async+fast", ["FXOFFLOAD_MODE", "async+"]),
    ("FXOFFLOAD_STAGES", "[{}, {\"max_autotun\": true}]", ["FXOFFLOAD_STAGES", "max_autotun"]),
    ("FXOFFLOAD_STAGES", "{}", ["FXOFFLOAD_STAGES", "list"]),
    ("FXOFFLOAD_STAGES", "[{", ["FXOFFLOAD_STAGES", "JSON"]),
    ("FXOFFLOAD_PROGRESS", "maybe", ["FXOFFLOAD_PROGRESS"]),
    ("FXOFFLOAD_FARM_GRAPH_WAIT", "-1", ["FXOFFLOAD_FARM_GRAPH_WAIT", "0 or more"]),
    ("FXOFFLOAD_FARM_GRAPH_WAIT", "soon", ["FXOFFLOAD_FARM_GRAPH_WAIT", "seconds"]),
])
def test_invalid_environment_is_named(var: str, value: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.resolve({var: value})
    for word in words:
        assert word in str(info.value)


def test_background_modes() -> None:
    s = Settings.resolve({"FXOFFLOAD_MODE": "progressive+subprocess",
                          "FXOFFLOAD_STAGES": '[{}, {"max_autotune": true}]',
                          "FXOFFLOAD_ON_FAILURE": "eager", "FXOFFLOAD_PROGRESS": "0"})
    assert s.background and s.progressive and s.base_mode == "subprocess"
    assert s.config_stages == ({}, {"max_autotune": True})
    assert s.on_failure == "eager" and s.show_progress is False
    assert s.worker_nice > 0  # background workers yield to the user's steps
    a = Settings.resolve({}, mode="async+serde")
    assert a.background and not a.progressive and a.config_stages == ({},)
    assert Settings.resolve({}, mode="subprocess").worker_nice > 0  # beside a cold compile
    assert Settings.resolve({}, mode="async+subprocess", nice=3).worker_nice == 3


def test_invalid_keyword() -> None:
    with pytest.raises(ConfigError, match="mode='nope'"):
        fxoffload.backend(mode="nope")
    with pytest.raises(ConfigError, match="unknown fxoffload setting"):
        fxoffload.backend(wokers=2)


def test_capture_gets_a_default_directory() -> None:
    assert Settings.resolve({}, mode="capture").capture_dir is not None


def test_import_starts_nothing() -> None:
    code = (
        "import sys, threading, fxoffload\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert 'torch' not in sys.modules, 'importing fxoffload imported torch'\n"
        "import fxoffload.integration, fxoffload.executors\n"
        "assert threading.active_count() == 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FXOFFLOAD_MODE": "bogus", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_entry_point_registered() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="torch_dynamo_backends")}
    assert "fxoffload" in names


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"mode": "fast"}, ["mode", "subprocess"]),
    ({"workers": 0}, ["workers", "positive integer"]),
    ({"timeout": "soon"}, ["timeout", "seconds"]),
    ({"on_failure": "ignore"}, ["on_failure", "raise"]),
    ({"worker_imports": 3}, ["worker_imports", "module"]),
])
def test_settings_objects_are_checked_when_made(kwargs: dict, words: list[str]) -> None:
    """Settings(...) itself, not only resolve(): a backend made from a bad Settings object
    fails where it is made."""
    with pytest.raises(ConfigError) as info:
        fxoffload.backend(Settings(**kwargs))
    for word in words:
        assert word in str(info.value)


def test_bad_environment_fails_at_torch_compile_not_at_the_first_call(tmp_path: Path) -> None:
    script = (
        "import torch, fxoffload\n"
        "try:\n"
        "    f = torch.compile(lambda x: x + 1, backend='fxoffload')\n"
        "except fxoffload.ConfigError as e:\n"
        "    print('ConfigError at torch.compile:', e)\n"
        "else:\n"
        "    print('no error at torch.compile')\n"
    )
    env = {**__import__("os").environ, "FXOFFLOAD_MODE": "fast",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert "ConfigError at torch.compile: FXOFFLOAD_MODE='fast'" in out.stdout, \
        out.stdout + out.stderr[-2000:]


def test_unwritable_capture_dir_fails_when_the_backend_is_made(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"capture_dir.*not a writable directory"):
        fxoffload.backend(mode="capture", capture_dir=blocker / "captures")
    with pytest.raises(ConfigError, match="FXOFFLOAD_CAPTURE_DIR"):
        with fxoffload.enabled(mode="capture", capture_dir=blocker / "captures"):
            pass


def test_too_many_workers_are_capped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    from fxoffload.settings import machine_workers

    with caplog.at_level("WARNING", logger="fxoffload"):
        a = Settings.resolve({"FXOFFLOAD_WORKERS": "1000"})
        b = Settings.resolve({}, workers=1000)
    assert a.workers == b.workers == machine_workers() < 1000
    warned = [r.getMessage() for r in caplog.records if "workers=1000" in r.getMessage()]
    assert len(warned) == 1 and f"using {machine_workers()}" in warned[0]


def test_torch_fx_compile_mode_beside_fxoffload_is_named(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from fxoffload import integration

    monkeypatch.setenv("TORCHINDUCTOR_FX_COMPILE_MODE", "SUBPROCESS")
    monkeypatch.setattr(integration, "_overlap_warned", False)
    with caplog.at_level("WARNING", logger="fxoffload"):
        fxoffload.backend(mode="serde")
    assert any("TORCHINDUCTOR_FX_COMPILE_MODE=SUBPROCESS" in r.getMessage()
               for r in caplog.records)
