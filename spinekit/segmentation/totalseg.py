"""TotalSegmentator backend (optional): runs its `total` task (vertebrae subset) and its
`vertebrae_body` task in a subprocess, then imports the results with the label-map backend.

Never downloads: the weights must already be on disk (TOTALSEG_WEIGHTS_PATH, or
TOTALSEG_HOME_DIR/nnunet/results, default ~/.totalsegmentator/nnunet/results), and the
subprocess runs with proxies pointed at a closed local port so a fetch fails fast instead of
reaching the internet.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .. import levels as lv
from ..errors import InputError, MissingDependencyError
from ..image import Image, write_image
from ..progress import Progress, report
from .base import SegmentationResult
from .labelmap import import_labelmap

INSTALL_HINT = (
    "install it with `pip install TotalSegmentator` and put its pre-downloaded weights where "
    "TOTALSEG_WEIGHTS_PATH (or TOTALSEG_HOME_DIR/nnunet/results, default "
    "~/.totalsegmentator/nnunet/results) points"
)

# roi_subset names of the vertebrae in the `total` task (v2 class names).
VERTEBRA_ROIS = ["sacrum", "vertebrae_S1"] + [
    f"vertebrae_{name}" for name in lv.LUMBAR + lv.THORACIC + lv.CERVICAL
]


def find_command() -> Optional[list[str]]:
    """The command that starts TotalSegmentator, or None when it is not installed."""
    exe = shutil.which("TotalSegmentator")
    if exe:
        return [exe]
    if importlib.util.find_spec("totalsegmentator") is not None:
        return [sys.executable, "-m", "totalsegmentator.bin.TotalSegmentator"]
    return None


def weights_dir() -> Path:
    """Where TotalSegmentator looks for its weights (its own variables, then its default)."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"]).expanduser()
    home = Path(os.environ.get("TOTALSEG_HOME_DIR") or (Path.home() / ".totalsegmentator")).expanduser()
    return home / "nnunet" / "results"


def check_available() -> list[str]:
    """The command to run; MissingDependencyError (one sentence) when the tool or weights are missing."""
    cmd = find_command()
    if cmd is None:
        raise MissingDependencyError(f"TotalSegmentator is not installed: {INSTALL_HINT}.")
    wdir = weights_dir()
    if not wdir.is_dir() or not any(wdir.iterdir()):
        raise MissingDependencyError(
            f"TotalSegmentator weights were not found in {wdir} and SpineKit never downloads them: {INSTALL_HINT}.")
    return cmd


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    # Any HTTP(S) request goes to a closed local port and fails at once.
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[key] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    env.setdefault("TOTALSEG_WEIGHTS_PATH", str(weights_dir()))
    return env


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stdout.strip().splitlines()[-3:])
        raise MissingDependencyError(
            f"TotalSegmentator task {what} failed (exit {proc.returncode}: {tail or 'no output'}); "
            f"check its installation and weights ({INSTALL_HINT}).")


def segment_totalsegmentator(image: Image, progress: Optional[Progress] = None, *, fast: bool = False,
                             device: Optional[str] = None, bodies: bool = True,
                             keep_temp: bool = False) -> SegmentationResult:
    """Segment vertebrae with TotalSegmentator and import them in VerSe ids.

    fast: its 3 mm `--fast` model (lower accuracy). device: "cpu", "gpu" or None (its default).
    bodies: also run `vertebrae_body`; when that task fails (e.g. a licence is needed) the
    bodies are derived geometrically and a warning says so.
    keep_temp: keep the temporary folder (debugging); it is removed otherwise.
    """
    if image.ndim != 3:
        raise InputError("TotalSegmentator needs a 3D CT.")
    cmd = check_available()
    env = _offline_env()
    tmp = Path(tempfile.mkdtemp(prefix="spinekit-totalseg-"))
    try:
        ct_path = write_image(image, tmp / "ct.nii.gz")
        common = ["--ml", "--nr_thr_resamp", "1", "--nr_thr_saving", "1"]
        if fast:
            common.append("--fast")
        if device:
            common += ["--device", device]
        report(progress, 0.05, "TotalSegmentator: vertebrae (task total)")
        vert_path = tmp / "vertebrae.nii.gz"
        _run(cmd + ["-i", str(ct_path), "-o", str(vert_path), "--task", "total",
                    "--roi_subset", *VERTEBRA_ROIS] + common, env, "total")
        body_path = None
        warns: list[str] = []
        if bodies:
            report(progress, 0.55, "TotalSegmentator: vertebral bodies (task vertebrae_body)")
            body_path = tmp / "vertebrae_body.nii.gz"
            try:
                _run(cmd + ["-i", str(ct_path), "-o", str(body_path), "--task", "vertebrae_body"] + common,
                     env, "vertebrae_body")
            except MissingDependencyError as exc:
                warns.append(f"{exc} Bodies were derived geometrically instead.")
                body_path = None
        for p in (vert_path, body_path):
            if p is not None and not p.exists():
                raise MissingDependencyError(f"TotalSegmentator finished without writing {p.name}; {INSTALL_HINT}.")
        report(progress, 0.9, "importing TotalSegmentator labels")
        result = import_labelmap(image, vert_path, convention="totalsegmentator_total", bodies=body_path,
                                 backend="totalsegmentator", warnings=warns)
        result.warnings.append("labels by TotalSegmentator (task total, vertebrae subset"
                               + (", fast model" if fast else "") + ").")
        report(progress, 1.0, "TotalSegmentator done")
        return result
    finally:
        if not keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
