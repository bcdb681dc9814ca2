"""Reference tissues found automatically in a CT: air, subcutaneous fat, paraspinal muscle,
aorta and IVC (mean HU, SD, voxel count and a QC mask for each).

They feed the phantomless calibration (air / fat / muscle / blood) and the contrast-phase
detector (aorta vs IVC). Classification uses a lightly smoothed image so that noise does not
truncate the HU windows; the HU that are reported are robust statistics (10 % trimmed mean and
a 5-95 % trimmed SD) of the raw voxels inside eroded regions, away from partial volume.

How each is found (LPS: +x patient left, -y anterior):
- body: largest object above -300 HU, holes filled per slice;
- air: 8-45 mm outside the body, anterior half, away from the image border, below -900 HU;
- subcutaneous fat: fat-HU voxels 3-25 mm below the skin (the image border is not skin);
- paraspinal muscle: muscle-HU voxels 10-90 mm behind the spinal column centre (the body's
  posterior wall when the column is found without labels) and 8-45 mm beside the midline,
  spine dilated out, the two largest pieces;
- aorta / IVC: a round homogeneous disc brighter than the ring around it, in a box
  anterior-left / anterior-right of the vertebral bodies, steady along z (slab-averaged score);
  the enhanced window is tried first, then the unenhanced one.
The spine is located by the vertebra labels when given, else by the bone column.

Speed: the search runs on every k-th voxel (~3 mm apart; strided samples, not block means, so
the noise seen by the HU windows is the scan's own), with per-slice 2D distance transforms and
one set of FFT convolutions shared by the enhanced and unenhanced aorta windows. A 512x512x400
CT takes ~1.1 s (16 s when searched at full resolution). The HU are then measured on all CT
voxels of the found blocks, their half-block rim trimmed (within ~0.3 HU of a full-resolution
search on the phantoms); regions of more than FULL_RES_MAX_VOXELS CT voxels use the samples.

Work happens on a copy re-oriented to LPS (array [z, y, x] with +x = patient left,
+y = posterior, +z = superior); masks are handed back on the caller's grid (made on access).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.fft import next_fast_len
from scipy.stats import trim_mean

from ..errors import InputError
from ..image import Image
from ..masks import IN_SLICE, fill_holes, largest_component

TISSUES = ("air", "fat", "muscle", "aorta", "ivc")

# HU windows (on the smoothed image).
BODY_MIN_HU = -300.0                 # body outline threshold
AIR_MAX_HU = -900.0                  # room air (lung parenchyma, ~ -850 HU, stays out)
FAT_HU = (-190.0, -30.0)             # adipose tissue
MUSCLE_HU = (0.0, 100.0)             # skeletal muscle
BONE_MIN_HU = 200.0                  # dense bone (kept out of the muscle region)
BONE_THRESHOLDS_HU = (200.0, 150.0, 110.0, 85.0)  # spine column search without labels, high to low
COLUMN_MIN_AREA_MM2 = 600.0          # a vertebra's axial cross-section (body + arch) is larger
SOFT_HU = (20.0, 100.0)              # unenhanced blood (30-60 HU) / soft tissue (native vessel search)
IVC_ENHANCED_MAX_HU = 250.0          # IVC window upper bound on enhanced scans
ENHANCED_HU = (110.0, 700.0)         # contrast-filled vessel
# Geometry (mm).
SMOOTH_SIGMA_MM = 1.2
AIR_BAND_MM = (8.0, 45.0)            # air sampled this far outside the body surface
EDGE_MARGIN_MM = 4.0                 # ... and this far from the image border
FAT_SHELL_MM = (3.0, 25.0)           # subcutaneous fat: this depth below the skin
MUSCLE_LATERAL_MM = (8.0, 45.0)      # paraspinal muscle: lateral distance from the midline
MUSCLE_POSTERIOR_MM = (10.0, 90.0)   # ... and posterior distance from the spinal column centre
VESSEL_RADII_MM = (6.0, 8.0, 10.0, 12.0, 14.0)  # lumen radii tried
VESSEL_CONTRAST_CAP_HU = 250.0       # disc-minus-ring contrast that counts as fully vessel-like
RING_SECTORS = 8                     # the ring around a candidate lumen, in angular sectors
RING_RANK = 3                        # ... compared with its 3rd brightest sector (2 may touch crus, bone)
VESSEL_MAX_BONE_FRACTION = 0.3      # a lumen disc may overlap the (dilated) spine this much
VESSEL_MIN_SCORE = 0.08              # below this no vessel is accepted (20 HU of contrast)
# expected lumen centre relative to (spine x, anterior edge y), mm, LPS: aorta anterior-left,
# IVC anterior-right; the score drops by the penalty per mm beyond 15 mm from it
VESSEL_EXPECTED_MM = {"left": (12.0, -12.0), "right": (-25.0, -15.0)}
VESSEL_DISTANCE_PENALTY_PER_MM = 0.005
VESSEL_SLAB_SCORE_RATIO = 0.5        # a slab joins the tube when its score is at least this x the best
SEARCH_SPACING_MM = 3.0              # the search runs on every k-th voxel, about this far apart
FULL_RES_MAX_VOXELS = 1_000_000      # regions with fewer CT voxels are measured on all of them
MIN_VOLUME_MM3 = 500.0               # ... and at least this volume (a few slices of a vessel lumen)
IVC_FIRST_LEVEL_ID = 18              # VerSe T11: above it the IVC has entered the heart
MIN_VOXELS = 30                      # a tissue needs at least this many voxels


@dataclass
class ReferenceTissues:
    """Per tissue ('air', 'fat', 'muscle', 'aorta', 'ivc'): HU, SD, number of voxels measured,
    QC mask (a mapping name -> bool array on the CT grid); tissues not found are listed in
    ``missing`` with a one-sentence warning each."""

    hu: dict[str, float] = field(default_factory=dict)
    sd_hu: dict[str, float] = field(default_factory=dict)
    voxels: dict[str, int] = field(default_factory=dict)
    masks: Mapping[str, np.ndarray] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"hu": {k: round(float(v), 2) for k, v in self.hu.items()},
                "sd_hu": {k: round(float(v), 2) for k, v in self.sd_hu.items()},
                "voxels": dict(self.voxels), "missing": list(self.missing), "warnings": list(self.warnings)}


_WHY = {
    "air": "no air outside the body is in the field of view",
    "fat": "no subcutaneous fat layer was found under the skin",
    "muscle": "no paraspinal muscle was found behind the spine",
    "aorta": "no round vessel was found anterior-left of the spine",
    "ivc": "no round vessel was found anterior-right of the spine",
}


def _missing_sentence(tissue: str) -> str:
    names = {"air": "Air", "fat": "Subcutaneous fat", "muscle": "Paraspinal muscle",
             "aorta": "Aorta", "ivc": "Inferior vena cava (IVC)"}
    return f"{names[tissue]} reference not found: {_WHY[tissue]}."


# --- orientation ------------------------------------------------------------------------------
def _to_lps(image: Image, arrays: list[np.ndarray | None]):
    """Re-orient image (and label arrays on its grid) to LPS; returns arrays + a back-mapper."""
    arrays = [a.array if isinstance(a, Image) else a for a in arrays]
    for a in arrays:
        if a is not None and np.shape(a) != image.shape:
            raise InputError(f"the vertebra labels {np.shape(a)} are not on the CT grid {image.shape}.")
    img = image.to_sitk()
    orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    if orient == "LPS":
        return image.array, [a for a in arrays], tuple(image.spacing_zyx_mm), (lambda m: m)

    def reorient(arr, target):
        s = sitk.GetImageFromArray(arr.astype(np.uint8) if arr.dtype == bool else arr)
        s.CopyInformation(img)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(s, target))

    ct = sitk.DICOMOrient(img, "LPS")
    spacing = tuple(reversed(ct.GetSpacing()))
    out = [None if a is None else reorient(np.asarray(a), "LPS") for a in arrays]

    def back(mask: np.ndarray) -> np.ndarray:
        s = sitk.GetImageFromArray(mask.astype(np.uint8))
        s.CopyInformation(ct)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(s, orient)).astype(bool)

    return sitk.GetArrayFromImage(ct), out, spacing, back


def _disk(radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    ry = max(int(round(radius_mm / spacing_yx[0])), 0)
    rx = max(int(round(radius_mm / spacing_yx[1])), 0)
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    return ((y * spacing_yx[0]) ** 2 + (x * spacing_yx[1]) ** 2) <= radius_mm ** 2 + 1e-6


def _erode_inplane(mask: np.ndarray, radius_mm: float, spacing: tuple) -> np.ndarray:
    if radius_mm <= 0:
        return mask
    st = _disk(radius_mm, spacing[1:])[None]
    if st.sum() <= 1:  # radius below one voxel: no erosion possible
        return mask
    return ndi.binary_erosion(mask, structure=st)


def _edt_inplane(mask: np.ndarray, spacing: tuple) -> np.ndarray:
    """In-plane distance (mm) of each True voxel to the nearest False one, slice by slice
    (several times faster than a 3D transform with a huge z sampling, same values)."""
    out = np.empty(mask.shape, np.float32)
    for z in range(mask.shape[0]):
        out[z] = ndi.distance_transform_edt(mask[z], sampling=spacing[1:]) if not mask[z].all() else np.inf
    return out


def _robust_stats(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, float)
    # 10 % trimmed mean: robust like a median, but not quantised to whole HU like the median
    # of integer CT numbers
    center = float(trim_mean(v, 0.1))
    lo, hi = np.percentile(v, [5, 95])
    core = v[(v >= lo) & (v <= hi)]
    # SD of the 5-95 % core of a normal sample is 0.79 of the full SD
    return center, float(np.std(core) / 0.79) if core.size > 2 else float(np.std(v))


# --- the steps --------------------------------------------------------------------------------
def body_mask(smooth: np.ndarray, spacing: tuple) -> np.ndarray:
    """Largest connected non-air object, holes filled per slice (lungs and bowel gas inside)."""
    m = smooth > BODY_MIN_HU
    # a thin opening cuts the patient off the table / blanket before taking the largest object
    st = _disk(2.0, spacing[1:])[None]
    py, px = st.shape[1], st.shape[2]
    # (edge padding: the image border must not erode a body that runs out of the field of view)
    m = ndi.binary_opening(np.pad(m, [(0, 0), (py, py), (px, px)], mode="edge"), structure=st)[:, py:-py, px:-px]
    m = largest_component(m)
    return fill_holes(m, structure=IN_SLICE)


def _bone_column_at(smooth: np.ndarray, body: np.ndarray, spacing: tuple, threshold_hu: float) -> np.ndarray:
    nz, ny, nx = smooth.shape
    col = np.zeros_like(body)
    half = int(round(35.0 / spacing[2]))
    for z in range(nz):
        if not body[z].any():
            continue
        yy, xx = np.nonzero(body[z])
        bx = int(np.median(xx))
        ylo, yhi = yy.min(), yy.max()
        strip = np.zeros((ny, nx), bool)
        strip[int(ylo + 0.35 * (yhi - ylo)):int(yhi - 0.05 * (yhi - ylo)) + 1, max(bx - half, 0):bx + half + 1] = True
        # filling the cortical ring makes the vertebral body one solid, largest object
        # (closing first: at coarse voxels the thin cortex of a porotic body has gaps)
        ring = ndi.binary_closing((smooth[z] > threshold_hu) & strip, structure=_disk(4.0, spacing[1:]))
        col[z] = largest_component(fill_holes(ring))
    # keep the column: the largest 3D object of the per-slice picks
    return largest_component(col)


def _bone_column(smooth: np.ndarray, body: np.ndarray, spacing: tuple) -> np.ndarray:
    """Vertebral column without labels: the highest bone threshold whose per-slice object is as
    large as a vertebra's cross-section (porotic bodies at coarse voxels read ~100 HU)."""
    col = np.zeros_like(body)
    for thr in BONE_THRESHOLDS_HU:
        col = _bone_column_at(smooth, body, spacing, thr)
        areas = col.sum(axis=(1, 2)) * spacing[1] * spacing[2]
        if areas.any() and np.median(areas[areas > 0]) >= COLUMN_MIN_AREA_MM2:
            return col
    return col


def _spine_track(smooth: np.ndarray, body: np.ndarray, spacing: tuple,
                 vertebrae: np.ndarray | None, bodies: np.ndarray | None):
    """Per slice: (x centre, y of the body's anterior edge, y centre of the column) in voxels.

    From the vertebral-body (or vertebra) labels when given; otherwise from the bone column
    (``_bone_column``) in the central posterior part of the body. Slices without a value
    (discs, gaps) take the nearest slice's value.
    """
    nz, ny, nx = smooth.shape
    xs = np.full(nz, np.nan)
    yant = np.full(nz, np.nan)
    ycen = np.full(nz, np.nan)
    lab = bodies if bodies is not None and np.any(bodies) else vertebrae
    labelled = lab is not None and np.any(lab)
    if labelled:
        col = lab > 0
    else:
        col = _bone_column(smooth, body, spacing)
    for z in range(nz):
        if col[z].sum() < 5:
            continue
        yy, xx = np.nonzero(col[z])
        xs[z] = np.median(xx)
        # the muscle reference; the bone column found without labels is the vertebral body only,
        # so its posterior wall stands in (its centre lets the liver's bare area into the region)
        ycen[z] = np.median(yy) if labelled else np.percentile(yy, 98)
        yant[z] = np.percentile(yy, 2)
    good = np.isfinite(xs)
    if not good.any():
        return None
    idx = np.arange(nz)
    near = idx[good][np.argmin(np.abs(idx[:, None] - idx[good][None, :]), axis=1)]
    return xs[near], yant[near], ycen[near], good, col


def _vessel_box(track, z: int, side: str, spacing: tuple, shape) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) voxel box anterior of the spine on one side (LPS: +x = patient left)."""
    xs, yant = track[0], track[1]
    sy, sx = spacing[1], spacing[2]
    if not np.isfinite(xs[z]):
        return None
    # the lumen centre lies on its own side of the midline (the aorta only a few mm left of it)
    if side == "left":    # aorta: from the midline to ~50 mm left
        x0, x1 = xs[z] - 2.0 / sx, xs[z] + 50.0 / sx
    else:                 # IVC: from ~60 mm right to the midline
        x0, x1 = xs[z] - 60.0 / sx, xs[z] + 2.0 / sx
    # the descending thoracic aorta runs beside (not in front of) the upper bodies
    y0, y1 = yant[z] - 55.0 / sy, yant[z] + (25.0 if side == "left" else 10.0) / sy
    x0, x1 = int(max(x0, 0)), int(min(x1, shape[2] - 1))
    y0, y1 = int(max(y0, 0)), int(min(y1, shape[1] - 1))
    if x1 <= x0 or y1 <= y0:
        return None
    return y0, y1, x0, x1


def _ring_kernels(r_mm: float, spacing: tuple):
    """Normalised disc (0.7 r) kernel and the ring (r + 1.5 .. r + 5 mm) split into angular
    sectors (unnormalised indicator kernels) for one radius."""
    sy, sx = spacing[1], spacing[2]
    R = r_mm + 5.0
    ry, rx = int(np.ceil(R / sy)), int(np.ceil(R / sx))
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    d = np.hypot(y * sy, x * sx)
    disc = d <= max(0.7 * r_mm, 0.75 * min(sy, sx))
    ring = (d >= r_mm + 1.5) & (d <= R)
    ang = np.floor((np.arctan2(y * sy, x * sx) + np.pi) / (2 * np.pi) * RING_SECTORS).astype(int) % RING_SECTORS
    sectors = [(ring & (ang == k)).astype(float) for k in range(RING_SECTORS)]
    return disc / disc.sum(), sectors


class _Spectra:
    """In-plane convolutions of a few fixed slice stacks with many kernels: the stacks are
    transformed once (FFT), each kernel once, each product back once. The crop has a margin, so
    the zero padding at its edge does not reach the search box."""

    def __init__(self, arrays: dict[str, np.ndarray], max_kernel: tuple[int, int]):
        nz, ny, nx = next(iter(arrays.values())).shape
        self.ny, self.nx = ny, nx
        self.shape = (next_fast_len(ny + max_kernel[0]), next_fast_len(nx + max_kernel[1]))
        # single precision: 3x faster FFTs; the disc / ring means need ~0.01 HU, not 1e-12
        self.f = {k: np.fft.rfft2(a.astype(np.float32), s=self.shape, axes=(1, 2)) for k, a in arrays.items()}

    def kernel(self, k2d: np.ndarray):
        return np.fft.rfft2(k2d.astype(np.float32), s=self.shape), (k2d.shape[0] // 2, k2d.shape[1] // 2)

    def conv(self, name: str, kern) -> np.ndarray:
        kf, (cy, cx) = kern
        full = np.fft.irfft2(self.f[name] * kf[None], s=self.shape, axes=(1, 2))
        return full[:, cy:cy + self.ny, cx:cx + self.nx]


def _vessel_score(sm: np.ndarray, raw: np.ndarray, excl: np.ndarray, spacing: tuple, hu_windows,
                  noise_hu: float):
    """Per voxel of a crop (slices x y x x): how much a round vessel (homogeneous disc brighter
    than the ring around it, mean HU inside the window) is centred there; best over radii.
    Returns [(score, radius_mm), ...], one per HU window (the convolutions are shared)."""
    best = [np.full(sm.shape, -np.inf, np.float32) for _ in hu_windows]
    best_r = [np.zeros(sm.shape, np.float32) for _ in hu_windows]
    keep = (~excl).astype(np.float32)
    big = _ring_kernels(max(VESSEL_RADII_MM), spacing)[0].shape
    sp = _Spectra({"keep": keep, "sm": sm * keep, "raw": raw * keep, "raw2": raw * raw * keep}, big)
    for r in VESSEL_RADII_MM:
        k_in, sectors = _ring_kernels(r, spacing)
        kin = sp.kernel(k_in)
        # disc and ring ignore bone: an aorta lying on the vertebral body (the thoracic aorta
        # touches it) keeps a clean lumen and a dark ring on its free sides
        w_in = np.maximum(sp.conv("keep", kin), 1e-3)
        m_in = sp.conv("sm", kin) / w_in
        sd_in = np.sqrt(np.maximum(sp.conv("raw2", kin) / w_in - (sp.conv("raw", kin) / w_in) ** 2, 0))
        bad = w_in < 1.0 - VESSEL_MAX_BONE_FRACTION
        # ring level = a bright-side sector (RING_RANK-th brightest of RING_SECTORS): a vessel is
        # darker-ringed nearly all around, a disc at the edge of a big organ is not; a sector
        # that is mostly bone counts as dark
        sec = []
        for k_sec in sectors:
            ks = sp.kernel(k_sec)
            w = sp.conv("keep", ks)
            sec.append(np.where(w > 0.5 * k_sec.sum(), sp.conv("sm", ks) / np.maximum(w, 1e-3), -1e4))
        sec = np.array(sec)
        m_ring = np.partition(sec, RING_SECTORS - RING_RANK, axis=0)[RING_SECTORS - RING_RANK]
        # a lumen lies against bone on one side at most (the spinal canal is ringed by bone)
        walled = (sec <= -1e4).sum(axis=0) > RING_SECTORS // 2 - 1
        contrast = np.minimum(m_in - m_ring, VESSEL_CONTRAST_CAP_HU)
        score0 = contrast / VESSEL_CONTRAST_CAP_HU - np.maximum(sd_in / max(noise_hu, 1.0) - 1.5, 0) * 0.5
        score0[bad | walled] = -np.inf
        for k, hu_window in enumerate(hu_windows):
            score = np.where((m_in < hu_window[0]) | (m_in > hu_window[1]), -np.inf, score0)
            better = score > best[k]
            best[k][better] = score[better]
            best_r[k][better] = r
    return list(zip(best, best_r))


def _find_vessel(sm: np.ndarray, raw: np.ndarray, excl: np.ndarray, track, spacing: tuple, side: str,
                 hu_windows, noise_hu: float, slab_mm: float = 40.0):
    """A vertical tube (aorta / IVC) inside a box anterior of the spine on one side.

    The vessel score (homogeneous disc brighter than its ring, minus a distance prior) is
    max-filtered in-plane and averaged over slabs of ~40 mm along z: a tube gives one steady
    maximum while bowel or crura come and go. The slab maximum fixes the centre, refined per
    slice within 6 mm; slabs far weaker than the best one, or off its path, are dropped.
    hu_windows: one or more lumen HU windows searched with the same convolutions.
    Returns one list [(z, y, x, r_mm), ...] per window.
    """
    nz, ny, nx = sm.shape
    sy, sx = spacing[1], spacing[2]
    rows = [z for z in range(nz) if np.isfinite(track[0][z])]
    per_slab = max(1, int(round(slab_mm / spacing[0])))
    slabs: list[list] = [[] for _ in hu_windows]
    start = 0
    while start < len(rows):
        zs = rows[start:start + per_slab]
        if len(rows) - (start + per_slab) < per_slab // 2:
            zs = rows[start:]  # fold a short tail into the last slab
        start += len(zs)
        box = _vessel_box(track, zs[len(zs) // 2], side, spacing, sm.shape)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        pad_y, pad_x = int(np.ceil(25.0 / sy)), int(np.ceil(25.0 / sx))
        cy0, cx0 = max(y0 - pad_y, 0), max(x0 - pad_x, 0)
        cy1, cx1 = min(y1 + pad_y, ny - 1), min(x1 + pad_x, nx - 1)
        crop = (zs, slice(cy0, cy1 + 1), slice(cx0, cx1 + 1))
        scored = _vessel_score(sm[crop].astype(np.float32), raw[crop].astype(np.float32), excl[crop],
                               spacing, hu_windows, noise_hu)
        # prior: the vessel hugs the spine; far candidates (bowel, organ edges) pay per mm
        ex, ey = VESSEL_EXPECTED_MM[side]
        zc = zs[len(zs) // 2]
        yy_mm = (np.arange(cy0, cy1 + 1)[:, None] - (track[1][zc] + ey / sy)) * sy
        xx_mm = (np.arange(cx0, cx1 + 1)[None, :] - (track[0][zc] + ex / sx)) * sx
        prior = VESSEL_DISTANCE_PENALTY_PER_MM * np.maximum(np.hypot(yy_mm, xx_mm) - 15.0, 0.0)[None]
        inbox = np.zeros(prior.shape[1:], bool)
        inbox[y0 - cy0:y1 - cy0 + 1, x0 - cx0:x1 - cx0 + 1] = True
        fy, fx = 2 * int(np.ceil(5.0 / sy)) + 1, 2 * int(np.ceil(5.0 / sx)) + 1
        ry, rx = int(np.ceil(6.0 / sy)), int(np.ceil(6.0 / sx))
        for w, (scores, radii) in enumerate(scored):
            scores = scores - prior
            # a slowly moving tube keeps a steady maximum once each slice's score is max-filtered
            spread = ndi.maximum_filter(np.where(np.isfinite(scores), scores, -1.0), size=(1, fy, fx))
            mean_sc = spread.mean(axis=0)
            mean_sc[~inbox] = -np.inf
            if not np.isfinite(mean_sc).any() or mean_sc.max() < VESSEL_MIN_SCORE:
                continue
            cy, cx = np.unravel_index(int(np.argmax(mean_sc)), mean_sc.shape)
            found = []
            for k, z in enumerate(zs):
                sub = np.where(inbox, scores[k], -np.inf)[max(cy - ry, 0):cy + ry + 1, max(cx - rx, 0):cx + rx + 1]
                if not np.isfinite(sub).any() or sub.max() < VESSEL_MIN_SCORE:
                    continue
                yy, xx = np.unravel_index(int(np.argmax(sub)), sub.shape)
                yy, xx = yy + max(cy - ry, 0), xx + max(cx - rx, 0)
                found.append((z, yy + cy0, xx + cx0, float(radii[k][yy, xx])))
            if found:
                slabs[w].append((float(mean_sc[cy, cx]), (cy + cy0) * sy, (cx + cx0) * sx, found))
    results = []
    for window_slabs in slabs:
        if not window_slabs:
            results.append([])
            continue
        # the clearest slab anchors the tube; other slabs must be nearly as clear and lie on its
        # path (an IVC hidden in a liver of the same HU is left out rather than replaced by a liver edge)
        best = max(window_slabs, key=lambda t: t[0])
        out = []
        for score, y_mm, x_mm, found in window_slabs:
            if score >= VESSEL_SLAB_SCORE_RATIO * best[0] and np.hypot(y_mm - best[1], x_mm - best[2]) <= 25.0:
                out += found
        results.append(out)
    return results


def _consistent_track(cands, spacing: tuple, max_jump_mm: float = 25.0):
    """Keep the candidates that agree with the median centre track (a tube along z)."""
    if not cands:
        return []
    arr = np.array(cands, float)
    my, mx = np.median(arr[:, 1]), np.median(arr[:, 2])
    dist = np.hypot((arr[:, 1] - my) * spacing[1], (arr[:, 2] - mx) * spacing[2])
    return [c for c, d in zip(cands, dist) if d <= max_jump_mm]


def _vessel_mask(shape, cands, spacing: tuple) -> np.ndarray:
    """Disc of 70 % of the fitted radius around each centre: the lumen without its wall."""
    mask = np.zeros(shape, bool)
    sy, sx = spacing[1], spacing[2]
    y, x = np.ogrid[:shape[1], :shape[2]]
    for z, yy, xx, r in cands:
        rr = max(0.7 * r, 0.75 * min(sy, sx))
        mask[int(z)] |= ((y - yy) * sy) ** 2 + ((x - xx) * sx) ** 2 <= rr ** 2
    return mask


class _BlockMasks(Mapping):
    """Tissue masks on the caller's CT grid, made on access from the search-grid masks (each
    search voxel stands for the block of CT voxels around it): five full-size masks of a large
    CT would cost hundreds of MB that nobody may read."""

    def __init__(self, coarse: dict[str, np.ndarray], step: tuple[int, int, int], shape):
        self._coarse, self._step, self._shape = coarse, step, tuple(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return _block_upsample(self._coarse[name], self._step, self._shape)

    def __contains__(self, name) -> bool:
        return name in self._coarse

    def __iter__(self):
        return iter(self._coarse)

    def __len__(self) -> int:
        return len(self._coarse)

    def coarse(self, name: str) -> np.ndarray:
        """The mask on the search grid (every step-th CT voxel, starting at step // 2)."""
        return self._coarse[name]


def _search_grid(shape, spacing_zyx: tuple) -> tuple[tuple[int, int, int], tuple[slice, slice, slice]]:
    """Integer steps giving voxels of about SEARCH_SPACING_MM; each sample is the centre of its block."""
    step = tuple(max(1, int(SEARCH_SPACING_MM / s + 0.5)) for s in spacing_zyx)
    return step, tuple(slice(k // 2, None, k) for k in step)


def _block_upsample(mask: np.ndarray, step: tuple[int, int, int], shape, box=None) -> np.ndarray:
    """Search-grid mask -> CT-grid mask (each sample fills its block); ``box`` = (lo, hi) search
    indices limits the output to that block range (returns the CT-grid crop)."""
    lo, hi = box if box is not None else ((0, 0, 0), mask.shape)
    m = mask[tuple(slice(l, h) for l, h in zip(lo, hi))]
    for ax, k in enumerate(step):
        if k > 1:
            m = m.repeat(k, axis=ax)
    if box is not None:
        return m[tuple(slice(0, min(m.shape[ax], shape[ax] - lo[ax] * step[ax])) for ax in range(3))]
    out = np.zeros(shape, bool)
    out[:min(m.shape[0], shape[0]), :min(m.shape[1], shape[1]), :min(m.shape[2], shape[2])] = \
        m[:shape[0], :shape[1], :shape[2]]
    return out


def _measure(full: np.ndarray, sampled: np.ndarray, mask: np.ndarray, step) -> tuple[float, float, int]:
    """Robust HU, SD and the number of voxels measured for a search-grid mask: on all CT voxels
    of its blocks when they are few enough (small regions such as a vessel lumen keep all their
    statistics), else on the samples."""
    n_full = int(mask.sum()) * int(np.prod(step))
    if n_full == int(mask.sum()) or n_full > FULL_RES_MAX_VOXELS:
        return (*_robust_stats(sampled[mask]), int(mask.sum()))
    zz, yy, xx = np.nonzero(mask)
    lo = (zz.min(), yy.min(), xx.min())
    hi = (zz.max() + 1, yy.max() + 1, xx.max() + 1)
    block = _block_upsample(mask, step, full.shape, box=(lo, hi))
    crop = full[tuple(slice(l * k, l * k + n) for l, k, n in zip(lo, step, block.shape))]
    # the blocks reach up to half a search voxel past the sampled region: trim that rim in-plane
    # (it may touch the vessel wall) unless too little is left
    core = ndi.binary_erosion(block, structure=np.ones((1, step[1], step[2]), bool))
    if core.sum() >= max(MIN_VOXELS, 0.25 * block.sum()):
        block = core
    return (*_robust_stats(crop[block]), int(block.sum()))


def find_reference_tissues(image: Image, vertebrae: np.ndarray | None = None,
                           bodies: np.ndarray | None = None) -> ReferenceTissues:
    """Air, subcutaneous fat, paraspinal muscle, aorta and IVC in a CT (HU).

    vertebrae / bodies: optional VerSe label arrays on the CT grid; they locate the spine
    (otherwise the bone column is found by threshold). A tissue that cannot be found goes to
    ``missing`` with a one-sentence warning naming it; the others are still reported.
    The search runs on every k-th voxel (about SEARCH_SPACING_MM apart: the tissues are large
    regions, and a 512x512x400 CT is searched in about a second); the HU are then measured on
    all CT voxels of the found blocks, or on the samples for regions of more than
    FULL_RES_MAX_VOXELS CT voxels (typically the air; the samples then pin the mean far below
    1 HU). ``voxels`` counts the voxels measured. Masks are on the CT grid (made on access,
    see _BlockMasks).
    """
    res = ReferenceTissues()
    for a in (vertebrae, bodies):
        a = a.array if isinstance(a, Image) else a
        if a is not None and np.shape(a) != image.shape:
            raise InputError(f"the vertebra labels {np.shape(a)} are not on the CT grid {image.shape}.")
    step, grid = _search_grid(image.shape, image.spacing_zyx_mm)
    if step == (1, 1, 1):
        sub = image
    else:
        # strided samples (not block means) keep the noise honest for the HU windows
        origin = image.index_to_physical(np.array([[k // 2 for k in step]], float))[0]
        sub = Image(np.ascontiguousarray(image.array[grid]),
                    spacing_mm=tuple(s * k for s, k in zip(image.spacing_mm, step[::-1])),
                    origin_mm=tuple(origin), direction=image.direction)
    labels = [None if a is None else np.asarray(a.array if isinstance(a, Image) else a)[grid]
              for a in (vertebrae, bodies)]
    arr, (vert, bod), spacing, back = _to_lps(sub, labels)
    arr = np.asarray(arr, dtype=np.float32)
    masks, notes = _detect(arr, vert, bod, spacing)
    res.warnings += notes
    sampled = np.asarray(sub.array)
    coarse = {}
    for name in TISSUES:
        mask = masks.get(name)
        n = 0 if mask is None else int(mask.sum())
        if n < MIN_VOXELS or n * float(np.prod(spacing)) < MIN_VOLUME_MM3:
            res.missing.append(name)
            res.warnings.append(_missing_sentence(name))
            continue
        coarse[name] = back(mask)
        res.hu[name], res.sd_hu[name], res.voxels[name] = _measure(np.asarray(image.array), sampled,
                                                                   coarse[name], step)
    res.masks = coarse if step == (1, 1, 1) else _BlockMasks(coarse, step, image.shape)
    return res


def _detect(arr: np.ndarray, vert, bod, spacing: tuple) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tissue masks on an LPS-oriented array (any of them may be empty) + extra warnings."""
    masks: dict[str, np.ndarray] = {}
    notes: list[str] = []
    # at least one voxel in-plane so that noise does not punch holes in the HU windows
    sigma_vox = [0.0] + [max(SMOOTH_SIGMA_MM / s, 1.0) for s in spacing[1:]]
    smooth = ndi.gaussian_filter(arr, sigma=sigma_vox)
    body = body_mask(smooth, spacing)

    def keep(name: str, mask: np.ndarray) -> None:
        masks[name] = mask

    # air: a band outside the body, away from the image border and behind-the-patient table
    outside = ~body
    d_out = _edt_inplane(outside, spacing)
    band = (d_out >= AIR_BAND_MM[0]) & (d_out <= AIR_BAND_MM[1]) & (smooth < AIR_MAX_HU)
    my, mx = int(round(EDGE_MARGIN_MM / spacing[1])), int(round(EDGE_MARGIN_MM / spacing[2]))
    border = np.zeros_like(band)
    border[:, my:arr.shape[1] - my, mx:arr.shape[2] - mx] = True
    band &= border
    # anterior and lateral air only: the table and the blanket lie behind the patient
    if body.any():
        zz, yy, _ = np.nonzero(body)
        ymid = np.median(yy)
        band[:, int(ymid):, :] = False
    # padding outside the reconstruction circle is a constant far below air (e.g. -2048, -3024)
    band &= arr > -1500
    keep("air", band)

    # subcutaneous fat: fat-HU voxels of the outer shell of the body, eroded against partial volume
    # depth below the skin; the image border is not skin, so the body is continued past it
    pad = [(0, 0)] + [(int(np.ceil(FAT_SHELL_MM[1] / s)) + 1,) * 2 for s in spacing[1:]]
    # and only room air counts as outside (a lung cut by the field of view is not)
    padded = np.pad(body | (smooth >= AIR_MAX_HU), pad, mode="edge")
    if padded.all():
        d_in = np.full(body.shape, np.inf)
    else:
        d_in = _edt_inplane(padded, spacing)[
            :, pad[1][0]:pad[1][0] + body.shape[1], pad[2][0]:pad[2][0] + body.shape[2]]
    shell = (d_in >= FAT_SHELL_MM[0]) & (d_in <= FAT_SHELL_MM[1])
    fat = shell & (smooth >= FAT_HU[0]) & (smooth <= FAT_HU[1])
    fat_e = _erode_inplane(fat, 1.5 * max(spacing[1], 1.0) if spacing[1] < 1.5 else spacing[1], spacing)
    if fat_e.sum() < MIN_VOXELS:
        fat_e = _erode_inplane(fat, min(spacing[1], spacing[2]), spacing)
    keep("fat", fat_e)

    track = _spine_track(smooth, body, spacing, vert, bod)
    if track is None:
        notes.append("The spine was not found, so the paraspinal muscle, aorta and IVC were not searched.")
        return masks, notes
    xs, yant, ycen, _, column = track
    nz, ny, nx = arr.shape
    sy, sx = spacing[1], spacing[2]

    # paraspinal muscle: muscle-HU voxels behind the column centre, beside the midline
    spine = None
    if vert is not None and np.any(vert):
        spine = vert > 0
    elif bod is not None and np.any(bod):
        spine = bod > 0
    else:
        # the bone column found by threshold (vertebral bodies, holes filled) plus dense bone
        spine = column | (smooth > 350.0)
    yidx = np.arange(ny)[None, :, None]
    xidx = np.arange(nx)[None, None, :]
    dy = (yidx - ycen[:, None, None]) * sy
    dx = np.abs(xidx - xs[:, None, None]) * sx
    region = ((dy >= MUSCLE_POSTERIOR_MM[0]) & (dy <= MUSCLE_POSTERIOR_MM[1])
              & (dx >= MUSCLE_LATERAL_MM[0]) & (dx <= MUSCLE_LATERAL_MM[1]))
    muscle = region & body & (smooth >= MUSCLE_HU[0]) & (smooth <= MUSCLE_HU[1]) & (d_in > FAT_SHELL_MM[0] + 5.0)
    muscle &= ~ndi.binary_dilation(spine | (smooth > BONE_MIN_HU), structure=_disk(3.0, spacing[1:])[None])
    muscle_e = _erode_inplane(muscle, max(spacing[1], 1.5), spacing)
    # the two largest connected pieces (left and right erector spinae)
    lab, n = ndi.label(muscle_e)
    if n > 2:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        big = np.argsort(sizes)[::-1][:2]
        muscle_e = np.isin(lab, big[sizes[big] > 0.1 * sizes[big[0]]])
    keep("muscle", muscle_e)

    # aorta: bright (enhanced) or soft-tissue round vessel anterior-left of the vertebral body
    exclude = ndi.binary_dilation(spine, structure=_disk(2.0, spacing[1:])[None])
    # noise from the muscle region (or a default) scales the homogeneity term
    noise = _robust_stats(arr[muscle_e])[1] if muscle_e.sum() >= MIN_VOXELS else 20.0
    enh, soft = (_consistent_track(c, spacing) for c in
                 _find_vessel(smooth, arr, exclude, track, spacing, "left", (ENHANCED_HU, SOFT_HU), noise))
    n_slices = int(np.isfinite(xs).sum())
    # an enhanced aorta is a bright tube through most of the slices, not a few bright spots
    enhanced = len(enh) >= max(3, 0.5 * len(soft), 0.3 * n_slices)
    if enhanced:
        # and its lumen really reads enhanced (not a muscle edge brightened by blurred bone)
        lumen = _vessel_mask(arr.shape, enh, spacing) & ~exclude
        enhanced = lumen.sum() >= 3 and _robust_stats(arr[lumen])[0] >= ENHANCED_HU[0]
    aorta_c = enh if enhanced else soft
    aorta = _vessel_mask(arr.shape, aorta_c, spacing) & ~exclude if aorta_c else np.zeros(arr.shape, bool)
    keep("aorta", aorta)

    # IVC: round vessel anterior-right; on enhanced scans anywhere from unenhanced to aorta-bright
    excl2 = exclude | ndi.binary_dilation(aorta, structure=_disk(6.0, spacing[1:])[None])
    window = (SOFT_HU[0], IVC_ENHANCED_MAX_HU if enhanced else SOFT_HU[1])
    ivc_track = track
    lab = vert if vert is not None and np.any(vert) else bod
    if lab is not None and np.any(lab):
        # the IVC runs below the heart only: with level labels, search from T11 down
        level = np.asarray(lab).reshape(lab.shape[0], -1).max(axis=1).astype(float)
        level[level == 0] = np.nan
        known = np.nonzero(np.isfinite(level))[0]
        level = level[known[np.argmin(np.abs(np.arange(len(level))[:, None] - known[None, :]), axis=1)]]
        xs_ivc = np.where(level >= IVC_FIRST_LEVEL_ID, xs, np.nan)  # (T13, L1-L6, sacrum ids are all larger)
        ivc_track = (xs_ivc,) + tuple(track[1:])
    best = _consistent_track(_find_vessel(smooth, arr, excl2, ivc_track, spacing, "right", (window,), noise)[0],
                             spacing)
    ivc = _vessel_mask(arr.shape, best, spacing) & ~excl2 if best else np.zeros(arr.shape, bool)
    keep("ivc", ivc)
    return masks, notes
