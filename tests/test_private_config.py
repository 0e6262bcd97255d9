"""A thread of ours compiles under its own view of torch's config: its ``config.patch``
never shows on, and never undoes, the user's thread; ``uninstall_overlay`` puts torch's
config entries back. The overlay exists where config is process-global (torch 2.11-2.12;
the GPU machine runs this on 2.11); on 2.13 a copy of the caller's context is private
already and the calls are no-ops."""

from __future__ import annotations

import contextvars
import threading

import pytest
from torch._inductor import config

from fxoffload import patches, private_config


def test_on_213_nothing_is_replaced() -> None:
    if not private_config.config_is_context_local():
        pytest.skip("torch's config is process-global here (the overlay test runs)")
    assert private_config.config_snapshot() is None
    assert not patches.is_installed("config")


def test_our_thread_patches_its_own_view_and_uninstall_restores_torch() -> None:
    if private_config.config_is_context_local():
        pytest.skip("torch 2.13: config patches are context variables, no overlay")
    entry = config._config["max_autotune"]
    base = type(entry)
    before = config.max_autotune
    snapshot = private_config.config_snapshot()
    assert snapshot is not None and patches.is_installed("config")
    seen: dict[str, object] = {}
    patched = threading.Event()
    user_done = threading.Event()

    def ours() -> None:
        with private_config.private_config(snapshot), config.patch(max_autotune=not before):
            seen["ours_inside"] = config.max_autotune
            patched.set()
            user_done.wait(30)
            seen["ours_after_user"] = config.max_autotune
        seen["ours_after"] = config.max_autotune

    thread = threading.Thread(target=contextvars.copy_context().run, args=(ours,))
    thread.start()
    assert patched.wait(30)
    assert config.max_autotune == before  # the user's thread never sees our patch
    with config.patch(max_autotune=not before):  # and its own patch is its own
        assert config.max_autotune == (not before)
    user_done.set()
    thread.join(30)
    assert seen == {"ours_inside": not before, "ours_after_user": not before,
                    "ours_after": before}
    assert config.max_autotune == before

    private_config.uninstall_overlay()
    assert type(entry) is base and not patches.is_installed("config")
    with config.patch(max_autotune=not before):
        assert config.max_autotune == (not before)
    assert config.max_autotune == before
