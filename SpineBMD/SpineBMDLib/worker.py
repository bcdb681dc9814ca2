"""Long work off the GUI thread, polled by the Widget's QTimer (no Qt in here).

The work gets a progress callback; Cancel sets a flag that the next progress call turns into
``spinekit.progress.Cancelled``, so the core stops between steps and writes nothing partial.
The Widget polls ``state()`` from a QTimer and, once done, shows the result on the main thread
(MRML must only be touched there).
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from spinekit.progress import Cancelled


@dataclass
class WorkerState:
    fraction: float = 0.0
    message: str = ""
    done: bool = False
    cancelled: bool = False
    result: Any = None
    error: Optional[BaseException] = None
    traceback: str = ""


class BackgroundRun:
    """Run ``work(progress)`` in a daemon thread; poll ``state()``; ``cancel()`` sticks."""

    def __init__(self, work: Callable[[Callable[[float, str], None]], Any]):
        self._work = work
        self._state = WorkerState()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="SpineBMD", daemon=True)

    def start(self) -> "BackgroundRun":
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")
        with self._lock:
            self._state.fraction, self._state.message = float(fraction), str(message)

    def _run(self) -> None:
        try:
            result = self._work(self._progress)
            with self._lock:
                self._state.result = result
        except Cancelled:
            with self._lock:
                self._state.cancelled = True
        except BaseException as exc:  # shown to the user by the Widget
            with self._lock:
                self._state.error, self._state.traceback = exc, traceback.format_exc()
        finally:
            with self._lock:
                self._state.done = True

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    def state(self) -> WorkerState:
        with self._lock:
            return WorkerState(**vars(self._state))

    def wait(self, timeout: Optional[float] = None) -> WorkerState:
        """Block until done (the module's waitForCompletion switch, and tests)."""
        self._thread.join(timeout)
        return self.state()
