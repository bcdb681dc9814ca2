"""Progress reporting shared by the CLI, the batch runner and the Slicer Logic.

A long step takes ``progress: Progress | None`` and calls ``progress(fraction, message)``
with fraction in [0, 1]. ``scaled`` maps a sub-step onto a slice of its parent's range.
A callback may raise ``Cancelled`` to stop the work (Slicer's Cancel button does).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

Progress = Callable[[float, str], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop long work; nothing partial is written."""


def report(progress: Optional[Progress], fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def scaled(progress: Optional[Progress], start: float, end: float) -> Optional[Progress]:
    """A callback for a sub-step that covers [start, end] of the parent's range."""
    if progress is None:
        return None
    return lambda f, msg: progress(start + (end - start) * min(max(f, 0.0), 1.0), msg)


def terminal(prefix: str = "spinekit", stream=None) -> Progress:
    """Progress printed on the terminal, one line per message."""
    out = stream or sys.stderr

    def _print(fraction: float, message: str) -> None:
        print(f"{prefix} [{fraction * 100:5.1f}%] {message}", file=out, flush=True)

    return _print
