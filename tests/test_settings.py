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
    assert Settings.resolve({}, mode="subprocess").worker_nice == 0
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
