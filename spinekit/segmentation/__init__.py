"""Vertebra segmentation behind one protocol.

``segment(image, backend)`` returns a :class:`SegmentationResult`: whole-vertebra labels and
vertebral-body labels in VerSe ids on the CT grid, plus one record per level (present,
complete or cut by the field of view, naming confidence, flags). Backends:

- ``builtin``: SpineKit's own CT segmenter (no weights needed);
- ``labelmap``: import a label map (file, Image or array) in any known convention;
- ``totalsegmentator``: run TotalSegmentator when it and its weights are installed;
- ``bundle``: a user's MONAI bundle or TorchScript model, checked against its SHA-256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..image import Image
from ..progress import Progress
from .base import LevelRecord, SegmentationResult, records_from_labels, write_segmentation  # noqa: F401
from .labelmap import bodies_from_vertebrae, import_labelmap  # noqa: F401

BACKENDS: tuple[str, ...] = ("builtin", "labelmap", "totalsegmentator", "bundle")

LabelInput = Union[Image, str, Path, np.ndarray]


def segment(image: Image, backend: str = "builtin", *, labels: Optional[LabelInput] = None,
            convention: Optional[str] = None, bodies: Optional[LabelInput] = None,
            model_dir: Optional[Union[str, Path]] = None, progress: Optional[Progress] = None,
            **options) -> SegmentationResult:
    """Segment and label the vertebrae of a CT with the chosen backend.

    image: the CT (HU) as an Image.
    backend: one of BACKENDS.
    labels / convention / bodies: the label-map backend's input (``convention`` is one of
        ``spinekit.levels.CONVENTIONS``, guessed when None). ``bodies`` (a body map) is also
        used by the bundle backend.
    model_dir: the bundle backend's model folder.
    options: passed to the backend (e.g. ``sha256=`` for bundle, ``fast=True`` for
        totalsegmentator, ``min_levels=`` for builtin).
    """
    if not isinstance(image, Image):
        raise InputError(f"segment() needs a spinekit Image, not {type(image).__name__}.")
    if image.ndim != 3:
        raise InputError(f"segmentation needs a 3D CT but the image is {image.ndim}D.")
    name = (backend or "").strip().lower()
    if name not in BACKENDS:
        raise InputError(f"unknown segmentation backend '{backend}' (known: {', '.join(BACKENDS)}).")
    if name != "labelmap" and labels is not None:
        raise InputError(f"--labels is only used by the labelmap backend, not '{name}'.")

    if name == "builtin":
        try:
            from .builtin import segment_builtin
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("spinekit"):
                raise MissingDependencyError("the builtin segmenter is not part of this installation; "
                                             "use --backend labelmap, totalsegmentator or bundle.") from None
            raise
        return segment_builtin(image, progress, **options)
    if name == "labelmap":
        if labels is None:
            raise InputError("the labelmap backend needs a label map (--labels FILE).")
        return import_labelmap(image, labels, convention=convention, bodies=bodies, progress=progress, **options)
    if name == "totalsegmentator":
        from .totalseg import segment_totalsegmentator

        return segment_totalsegmentator(image, progress, **options)
    # bundle
    if model_dir is None:
        raise InputError("the bundle backend needs a model folder (--model DIR).")
    from .bundle import segment_bundle

    return segment_bundle(image, model_dir, progress, convention=convention, bodies=bodies, **options)
