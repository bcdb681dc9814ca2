"""Small mask operations shared by the segmentation and BMD steps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected object of a boolean mask (the mask itself when it is empty)."""
    labels, n = ndimage.label(mask, structure)
    if n == 0:
        return np.asarray(mask, bool)
    if n == 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1.0, float(a.sum() + b.sum()))
