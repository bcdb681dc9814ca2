"""Voxel grid, local-frame sampling and the material table of the phantom renderer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._spine import Frame

# Tissue ids of ``CTPhantom.tissues``; documented in ``spinekit.phantom.ct``.
TISSUE_IDS: dict[str, int] = {
    "subcutaneous_fat": 1, "visceral_fat": 2, "paraspinal_muscle": 3, "psoas": 4, "aorta": 5,
    "ivc": 6, "disc": 7, "canal": 8, "rib": 9, "sacrum_pelvis": 10, "metal": 11,
    "calibration_rod": 12, "air": 13, "wall_muscle": 14, "viscera": 15, "lung": 16,
    "vertebra": 17, "calibration_base": 18, "liver": 19, "kidney": 20, "heart": 21, "portal_vein": 22,
    "basivertebral_vein": 23,
}
FIRST_FREE_MATERIAL = 32


class Materials:
    """uint8 material ids: 0-31 are the tissue ids (one HU each); 32+ are (tissue, HU) pairs
    for tissues whose HU varies (bone per level, cortex, rods). The renderer paints materials;
    tissues and noise-free HU are two lookups at the end, so no float volume is kept."""

    def __init__(self, tissue_hu: dict[int, float]):
        self.tissue = np.arange(256, dtype=np.uint8)
        self.hu = np.zeros(256, np.float32)
        for tid, hu in tissue_hu.items():
            self.hu[tid] = hu
        self._next = FIRST_FREE_MATERIAL
        self._index: dict[tuple[int, float], int] = {}

    def __call__(self, tissue_id: int, hu: float) -> int:
        key = (int(tissue_id), round(float(hu), 4))
        if key not in self._index:
            if self._next > 255:
                raise RuntimeError("phantom material table is full (more than 224 bone materials)")
            m = self._next
            self._next += 1
            self.tissue[m] = tissue_id
            self.hu[m] = hu
            self._index[key] = m
        return self._index[key]


@dataclass
class Grid:
    shape: tuple[int, int, int]  # z, y, x
    origin: np.ndarray  # x, y, z (LPS mm of voxel [0, 0, 0])
    spacing: np.ndarray  # x, y, z

    @property
    def spacing_zyx(self) -> np.ndarray:
        return self.spacing[::-1]

    def axis(self, k: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """World coordinates (float32) along axis k (0 = x, 1 = y, 2 = z), indices lo..hi."""
        n = self.shape[2 - k]
        hi = n if hi is None else hi
        return (self.origin[k] + np.arange(lo, hi) * self.spacing[k]).astype(np.float32)

    def bbox(self, pts_world: np.ndarray, margin_mm: float = 1.0):
        """Index slices (z, y, x) covering the points, clipped to the grid; None if outside."""
        idx = (np.asarray(pts_world, float).reshape(-1, 3) - self.origin) / self.spacing
        lo = np.floor(idx.min(axis=0) - margin_mm / self.spacing).astype(int)
        hi = np.ceil(idx.max(axis=0) + margin_mm / self.spacing).astype(int) + 1
        n = np.array(self.shape[::-1])
        lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def coords(self, sl):
        """Broadcastable world x (1,1,nx), y (1,ny,1), z (nz,1,1) of a bbox."""
        x = self.axis(0, sl[2].start, sl[2].stop)[None, None, :]
        y = self.axis(1, sl[1].start, sl[1].stop)[None, :, None]
        z = self.axis(2, sl[0].start, sl[0].stop)[:, None, None]
        return x, y, z


def box_corners(frame: Frame, u: tuple, v: tuple, w: tuple) -> np.ndarray:
    uu, vv, ww = np.meshgrid(u, v, w, indexing="ij")
    return frame.to_world(uu.ravel(), vv.ravel(), ww.ravel())


def local_coords(grid: Grid, frame: Frame, sl):
    """Local (u lateral, v posterior, w superior) float32 coordinates of every voxel of a bbox."""
    x, y, z = grid.coords(sl)
    o, la, po, su = ([float(c) for c in a] for a in (frame.origin, frame.lateral, frame.posterior, frame.superior))
    dx, dy, dz = x - o[0], y - o[1], z - o[2]
    u = dx * la[0] + dy * la[1] + dz * la[2]
    v = dx * po[0] + dy * po[1] + dz * po[2]
    w = dx * su[0] + dy * su[1] + dz * su[2]
    return u, v, w


def cortex(mask: np.ndarray, spacing_zyx, thickness_mm: float = 1.2) -> np.ndarray:
    """Outer shell of a bone mask (about one cortical thickness, at least one voxel). Faces of the
    array are not surfaces (border_value=1): bone cut by a box or the field of view has no cortex
    there, so boxes and sub-sample slabs can be drawn piecewise."""
    it = cortex_iterations(spacing_zyx, thickness_mm)
    inner = ndimage.binary_erosion(mask, iterations=it, border_value=1)
    return mask & ~inner


def cortex_iterations(spacing_zyx, thickness_mm: float = 1.2) -> int:
    return max(1, int(round(thickness_mm / float(np.min(spacing_zyx)))))
