"""A farm worker on a GPU warms up with a small training step (``worker._warm_training``);
a step that fails there is recorded in the worker's phases and never stops the worker.
(The step itself runs on CUDA only; bench/worker_first_compile.py measures it.)"""

from __future__ import annotations

import logging

from fxoffload import worker


def test_a_failing_training_warm_up_is_recorded_not_raised() -> None:
    phases: dict[str, float] = {}
    worker._warm_training(phases, "nosuchdevice")
    assert phases["warm_training_failed"] == 1.0
    assert "warm_training_nosuchdevice_s" in phases
    assert logging.root.manager.disable == logging.NOTSET  # logging given back
