"""The one-line progress report of background compiles on an interactive terminal:

    fxoffload: 3 of 7 graphs compiled in the background, 4 compiling

It is drawn on stderr with a carriage return and erased when nothing is in flight; it is
shown only when ``Settings.show_progress`` (async/progressive on a TTY, or
``FXOFFLOAD_PROGRESS=1``) and never when stderr is not a terminal, unless forced."""

from __future__ import annotations

import sys
import threading

from .tally import STATS

_lock = threading.Lock()
_enabled = False
_drawn = 0


def enable() -> None:
    global _enabled
    _enabled = True


def update() -> None:
    global _drawn
    if not _enabled:
        return
    snap = STATS.snapshot()
    done = snap.background_compiles - snap.background_pending
    with _lock:
        if snap.background_pending:
            line = (f"fxoffload: {done} of {snap.background_compiles} graphs compiled in the "
                    f"background, {snap.background_pending} compiling")
        else:
            line = ""
        pad = max(0, _drawn - len(line))
        try:
            sys.stderr.write("\r" + line + " " * pad + ("\r" if not line else ""))
            sys.stderr.flush()
        except (OSError, ValueError):  # closed at interpreter exit
            return
        _drawn = len(line)
