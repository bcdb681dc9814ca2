"""Qt-free parts of the SpineBMD Slicer module (importable in plain Python with slicer-core)."""

from .dependencies import CORE_REQUIREMENTS, MODEL_REQUIREMENTS, ensure, missing
from .logic import SpineBMDInputs, SpineBMDLogic, SpineBMDResults, summary_line
from .worker import BackgroundRun, WorkerState

__all__ = [
    "BackgroundRun", "CORE_REQUIREMENTS", "MODEL_REQUIREMENTS", "SpineBMDInputs", "SpineBMDLogic",
    "SpineBMDResults", "WorkerState", "ensure", "missing", "summary_line",
]
