"""Trabecular region of interest per vertebral body, and its HU statistics.

Two modes:
- ``whole``: the body minus a shell that holds the cortex and the endplates. The shell width
  grows with the voxel size so that cortical partial volume (blur of about one voxel either
  side of a ~1 mm cortex) stays out; TotalSegmentator erodes by a fixed 4 mm.
- ``mid``: a QCT-style elliptical cylinder in the middle of the body (Comp2Comp: centre at 58 %
  of the AP depth, AP semi-axis 25 % of the depth, LR semi-axis 32.5 % of the width, ~7.5 mm
  tall), placed in the vertebra's own frame because the spine is curved.

Everything works in "voxel-mm" space: array index [z, y, x] times spacing_zyx_mm. The
vertebra frame (superior-inferior, anterior-posterior, left-right axes) is found from the
spine's centre line (neighbouring body centroids) or the body's principal axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..masks import largest_component, true_runs

ROI_MODES = ("whole", "mid")

# Comp2Comp's mid-vertebral elliptical cylinder (fractions of the body's own depth/width).
MID_DEPTH_CENTRE_FROM_POSTERIOR = 0.58  # centre a little anterior of the middle: away from the basivertebral vein
MID_AP_SEMI_AXIS = 0.25
MID_LR_SEMI_AXIS = 0.325
MID_HEIGHT_MM = 7.5

# A ROI smaller than this holds too few independent voxels (and too much partial volume)
# for a stable mean: flagged and left out of the L1-L2 mean.
MIN_ROI_VOLUME_MM3 = 1000.0
MIN_ROI_VOXELS = 30
METAL_HU = 2000.0
# Adaptive shell: a layer within this many HU of the core median counts as trabecular.
ADAPTIVE_TOL_HU = 8.0


def roi_margin_mm(spacing_zyx_mm) -> float:
    """Shell width removed in ``whole`` mode: the cortex (~1 mm) plus 2.5 voxels of the coarsest
    spacing for the blur of the bright cortex and the +-half-voxel uncertainty of the mask edge.

    3.5 mm at 1 mm voxels (TotalSegmentator: a fixed 4 mm), 6 mm at 2 mm, 8.5 mm at 3 mm. On
    phantoms with a blur of 0.5-0.8 voxel this keeps the cortical bias of the mean below ~4 HU
    from 1 to 3 mm voxels, where 3 mm fixed gives 9-58 HU at 1.5-3 mm (bench: ``margin_sweep``).
    """
    return float(max(3.0, 1.0 + 2.5 * max(float(s) for s in spacing_zyx_mm)))


# --- the vertebra's own frame ----------------------------------------------------------------
@dataclass
class VertebraFrame:
    """Local axes of one vertebral body in voxel-mm space ([z, y, x] * spacing).

    centre_mm: body centroid; si: unit vector towards cranial; ap: unit vector towards anterior;
    lr: unit vector completing the right-handed frame.
    """

    centre_mm: np.ndarray
    si: np.ndarray
    ap: np.ndarray
    lr: np.ndarray
    source: str = "principal_axes"

    def to_local(self, points_mm: np.ndarray) -> np.ndarray:
        """N x 3 voxel-mm points -> N x 3 local (lr, ap, si) coordinates in mm."""
        rel = np.asarray(points_mm, dtype=float) - self.centre_mm
        return np.stack([rel @ self.lr, rel @ self.ap, rel @ self.si], axis=-1)

    def to_mm(self, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=float)
        return self.centre_mm + local[..., :1] * self.lr + local[..., 1:2] * self.ap + local[..., 2:3] * self.si


def _scanner_axes_zyx(direction: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Physical superior (+z LPS) and anterior (-y LPS) as unit vectors in [z, y, x] index order."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    # Column k of `direction` is the physical direction of index axis k (x, y, z order); the
    # component of the physical axis j along index axis k is d[j, k].
    sup = np.array([d[2, 2], d[2, 1], d[2, 0]])
    ant = -np.array([d[1, 2], d[1, 1], d[1, 0]])
    return sup / np.linalg.norm(sup), ant / np.linalg.norm(ant)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def vertebra_frame(body_mask: np.ndarray, spacing_zyx_mm, *, offset_zyx: tuple[int, int, int] = (0, 0, 0),
                   neighbour_centres_mm: list[np.ndarray] | None = None,
                   vertebra_centre_mm: np.ndarray | None = None,
                   direction: np.ndarray | None = None) -> VertebraFrame:
    """Local frame of a vertebral body.

    si: the spine's centre line through the neighbouring body centroids when given (robust on a
    curved spine), else the principal axis of the body closest to the scanner's SI axis.
    ap: from the whole vertebra's centroid (posterior elements) towards the body's when given,
    else the scanner's anterior direction; made orthogonal to si.
    """
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    pts = (np.argwhere(body_mask) + np.asarray(offset_zyx)) * spacing
    centre = pts.mean(axis=0)
    sup, ant = _scanner_axes_zyx(direction)
    source = "principal_axes"
    si = None
    if neighbour_centres_mm:
        # Tangent of the centre line: average of the directions to the available neighbours.
        dirs = []
        for c in neighbour_centres_mm:
            v = np.asarray(c, dtype=float) - centre
            if np.linalg.norm(v) > 1e-6:
                dirs.append(_unit(v) * np.sign(np.dot(v, sup) or 1.0))
        if dirs:
            si = _unit(np.sum(dirs, axis=0))
            source = "centre_line"
    if si is None:
        cov = np.cov((pts - centre).T) if len(pts) > 3 else np.eye(3)
        _, vecs = np.linalg.eigh(cov)
        k = int(np.argmax(np.abs(vecs.T @ sup)))
        si = vecs[:, k]
    if np.dot(si, sup) < 0:
        si = -si
    ap0 = ant
    if vertebra_centre_mm is not None:
        v = centre - np.asarray(vertebra_centre_mm, dtype=float)
        v = v - np.dot(v, si) * si
        if np.linalg.norm(v) > 2.0:  # posterior elements shift the centroid by centimetres
            ap0 = _unit(v)
    ap = _unit(ap0 - np.dot(ap0, si) * si)
    lr = np.cross(si, ap)
    return VertebraFrame(centre_mm=centre, si=si, ap=ap, lr=lr, source=source)


def profile_extent_mm(mask: np.ndarray, spacing_zyx_mm, frame: VertebraFrame, axis: str,
                      offsets_local: list[tuple[float, float, float]] | None = None,
                      half_length_mm: float = 60.0, step_mm: float = 0.25) -> tuple[float, float, float]:
    """Extent of a binary mask along a local axis through given local offsets.

    The mask is sampled with linear interpolation along lines parallel to ``axis`` ('lr', 'ap'
    or 'si'); the extent is where it is >= 0.5, which for axis-aligned lines equals
    voxel count x spacing. Returns (length_mm, low_mm, high_mm) along the axis (medians over the
    lines; length 0 when no line hits the mask). ``mask`` is indexed like the frame's coordinates
    (pass the crop and a frame computed with the crop's offset 0).
    """
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    vec = {"lr": frame.lr, "ap": frame.ap, "si": frame.si}[axis]
    t = np.arange(-half_length_mm, half_length_mm + step_mm / 2, step_mm)
    offsets_local = offsets_local or [(0.0, 0.0, 0.0)]
    lows, highs, lengths = [], [], []
    src = mask.astype(np.float32)
    for off in offsets_local:
        start = frame.to_mm(np.asarray(off, dtype=float))
        pts_mm = start[None, :] + t[:, None] * vec[None, :]
        idx = (pts_mm / spacing).T
        vals = ndimage.map_coordinates(src, idx, order=1, mode="constant", cval=0.0)
        inside = vals >= 0.5
        if not inside.any():
            continue
        # Longest run of inside samples (ignores a stray neighbour touching the line).
        starts, ends = true_runs(inside)
        # Prefer the run closest to the line centre; else the longest.
        centre_i = len(t) // 2
        runs = list(zip(starts, ends))
        containing = [r for r in runs if r[0] <= centre_i < r[1]]
        s, e = containing[0] if containing else max(runs, key=lambda r: r[1] - r[0])
        # Sub-sample edges: linear interpolation of the 0.5 crossing.
        lo = t[s]
        if s > 0:
            v0, v1 = vals[s - 1], vals[s]
            lo = t[s - 1] + (0.5 - v0) / max(v1 - v0, 1e-6) * step_mm
        hi = t[e - 1]
        if e < len(t):
            v0, v1 = vals[e - 1], vals[e]
            hi = t[e - 1] + (v0 - 0.5) / max(v0 - v1, 1e-6) * step_mm
        lows.append(lo)
        highs.append(hi)
        lengths.append(hi - lo)
    if not lengths:
        return 0.0, 0.0, 0.0
    return float(np.median(lengths)), float(np.median(lows)), float(np.median(highs))


# --- ROI construction ------------------------------------------------------------------------
def _crop_slices(mask_slices: tuple[slice, ...], shape: tuple[int, ...], pad: int) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(mask_slices, shape))


def main_body_component(body: np.ndarray) -> np.ndarray:
    """The body mask without detached pieces and thin bridges (a vessel or rib fragment a
    segmenter gave the level): the largest connected part of the mask opened by one voxel,
    grown back by one voxel inside the original mask, so a clean body is returned unchanged
    up to single-voxel spurs."""
    if not body.any():
        return body
    struct = ndimage.generate_binary_structure(3, 1)
    core = ndimage.binary_opening(body, struct)
    core = largest_component(core if core.any() else body, struct)
    return body & ndimage.binary_dilation(core, struct)


def clean_body_labels(bodies: np.ndarray, crops: dict[int, tuple[slice, ...]] | None = None
                      ) -> tuple[np.ndarray, dict[int, float]]:
    """``main_body_component`` for every level: (cleaned label map, fraction removed per id)."""
    crops = level_crops(bodies) if crops is None else crops
    out = np.array(bodies, copy=True)
    removed: dict[int, float] = {}
    for vid, crop in crops.items():
        raw = bodies[crop] == vid
        keep = main_body_component(raw)
        drop = raw & ~keep
        n = int(raw.sum())
        removed[vid] = float(drop.sum()) / n if n else 0.0
        if drop.any():
            out[crop][drop] = 0
    return out, removed


def _body_depth_mm(body: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    # Distance (mm) from each inside voxel to the nearest outside voxel: exact in mm for
    # anisotropic voxels, unlike iterated binary erosion.
    padded = np.pad(body, 1)
    return ndimage.distance_transform_edt(padded, sampling=spacing_zyx_mm)[1:-1, 1:-1, 1:-1]


def adaptive_margin_mm(depth_mm: np.ndarray, hu: np.ndarray, base_margin_mm: float, step_mm: float,
                       tol_hu: float = ADAPTIVE_TOL_HU) -> float:
    """Deepen the shell while the next layer is still brighter than the core (cortex inside).

    A body mask one voxel too generous (a segmenter's typical error) brings the cortex within
    the fixed margin; the mean HU of successive one-voxel layers then stays above the core's
    median. The shell grows until a layer is within ``tol_hu`` of the core, at most to 60 % of
    the body's depth so that a ROI always remains.
    """
    max_depth = float(depth_mm.max())
    limit = 0.6 * max_depth
    if max_depth <= base_margin_mm + step_mm:
        return base_margin_mm
    core = hu[depth_mm > max(base_margin_mm, 0.5 * max_depth)]
    if core.size < MIN_ROI_VOXELS:
        return base_margin_mm
    core_hu = float(np.median(core))
    d = base_margin_mm
    while d + step_mm < limit:
        layer = hu[(depth_mm > d) & (depth_mm <= d + step_mm)]
        if layer.size >= 10 and float(layer.mean()) - core_hu <= tol_hu:
            break
        d += step_mm
    return min(d, limit)


def _whole_roi(body: np.ndarray, spacing_zyx_mm, margin_mm: float, hu: np.ndarray | None = None) -> np.ndarray:
    depth = _body_depth_mm(body, spacing_zyx_mm)
    if hu is not None:
        margin_mm = adaptive_margin_mm(depth, hu, margin_mm, float(min(spacing_zyx_mm)))
    return depth > margin_mm


def _mid_roi(body: np.ndarray, spacing_zyx_mm, frame: VertebraFrame, margin_mm: float,
             height_mm: float, hu: np.ndarray | None = None) -> np.ndarray:
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    # Body depth (AP) and width (LR) through the centre, in the vertebra's own frame.
    depth, ant_lo, ant_hi = profile_extent_mm(body, spacing, frame, "ap")
    width, lr_lo, lr_hi = profile_extent_mm(body, spacing, frame, "lr")
    _, si_lo, si_hi = profile_extent_mm(body, spacing, frame, "si")
    if depth <= 0 or width <= 0:
        return np.zeros_like(body, dtype=bool)
    # ap axis points anterior: posterior wall at ant_lo.
    c_ap = ant_lo + MID_DEPTH_CENTRE_FROM_POSTERIOR * depth
    c_lr = 0.5 * (lr_lo + lr_hi)
    c_si = 0.5 * (si_lo + si_hi)
    a_ap = MID_AP_SEMI_AXIS * depth
    a_lr = MID_LR_SEMI_AXIS * width
    pts = np.indices(body.shape).reshape(3, -1).T * spacing
    loc = frame.to_local(pts)
    inside = (((loc[:, 0] - c_lr) / a_lr) ** 2 + ((loc[:, 1] - c_ap) / a_ap) ** 2 <= 1.0) & (
        np.abs(loc[:, 2] - c_si) <= height_mm / 2.0)
    roi = inside.reshape(body.shape)
    # Never let the ellipse reach the cortex or an endplate (wedged or small bodies).
    return roi & _whole_roi(body, spacing_zyx_mm, margin_mm, hu)


def level_crops(labels: np.ndarray, pad: int = 2) -> dict[int, tuple[slice, ...]]:
    """Bounding box (padded) of every VerSe id present, in one pass over the volume."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int32)
    # find_objects over a whole 512x512x400 CT takes 0.5 s; over the labels' box a tenth of that.
    box = []
    for axis in range(labels.ndim):
        hit = np.flatnonzero(labels.any(axis=tuple(a for a in range(labels.ndim) if a != axis)))
        if hit.size == 0:
            return {}
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    out = {}
    for i, sl in enumerate(ndimage.find_objects(labels[tuple(box)]), start=1):
        if sl is not None and i in lv.VERSE_NAMES:
            whole = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(sl, box))
            out[i] = _crop_slices(whole, labels.shape, pad)
    return out


def _centroids_mm(labels: np.ndarray, ids, spacing, crops: dict[int, tuple[slice, ...]] | None = None,
                  sizes_out: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """Centroid (voxel-mm) per id, computed inside each id's bounding box (cheap on big CTs).
    sizes_out, when given, receives each id's voxel count."""
    crops = level_crops(labels) if crops is None else crops
    sp = np.asarray(spacing, dtype=float)
    out = {}
    for i in ids:
        i = int(i)
        if i not in crops:
            continue
        sl = crops[i]
        pts = np.argwhere(labels[sl] == i)
        if len(pts):
            out[i] = (pts.mean(axis=0) + np.array([s.start for s in sl])) * sp
        if sizes_out is not None:
            sizes_out[i] = len(pts)
    return out


# A neighbour whose body is smaller than this fraction of the level's own body (a level cut by
# the field of view, or a fragment such as a vessel labelled as a vertebra) has a centroid that
# says nothing about the spine's axis, so it is not used to orient the level.
NEIGHBOUR_MIN_SIZE_FRACTION = 0.4


def _neighbour_centres(vid: int, centres: dict[int, np.ndarray],
                       sizes: dict[int, int] | None = None) -> list[np.ndarray]:
    name = lv.level_name(vid)

    def usable(i: int) -> bool:
        return sizes is None or sizes.get(i, 0) >= NEIGHBOUR_MIN_SIZE_FRACTION * sizes.get(vid, 0)

    out = []
    for n in lv.neighbours(name):
        if n is not None and lv.VERSE_IDS.get(n) in centres and usable(lv.VERSE_IDS[n]):
            out.append(centres[lv.VERSE_IDS[n]])
    # Transitional levels sit between the standard ones.
    if not out:
        order = sorted(centres, key=lambda i: lv.order_index(lv.level_name(i)))
        k = order.index(vid) if vid in order else -1
        for j in (k - 1, k + 1):
            if k >= 0 and 0 <= j < len(order) and usable(order[j]):
                out.append(centres[order[j]])
    return out


def trabecular_rois(bodies: np.ndarray, spacing_zyx_mm, mode: str = "whole", *,
                    levels: list[int] | None = None, margin_mm: float | None = None,
                    vertebrae: np.ndarray | None = None, direction: np.ndarray | None = None,
                    height_mm: float = MID_HEIGHT_MM, ct: np.ndarray | None = None,
                    crops: dict | None = None, vertebra_crops: dict | None = None,
                    clean: bool = True) -> np.ndarray:
    """Trabecular ROIs of all (or the given) levels as one uint8 label map of VerSe ids.

    ct (HU, same grid): when given, the shell adapts per level (``adaptive_margin_mm``): it is
    deepened while the next layer is still brighter than the core, which keeps the cortex out
    of a body mask that is larger than the bone. crops / vertebra_crops: ``level_crops`` of
    bodies / vertebrae when the caller already has them (each is a pass over the volume).
    clean: drop detached pieces of each body first (``main_body_component``); pass False when
    the labels were already cleaned with ``clean_body_labels``.
    """
    if mode not in ROI_MODES:
        raise ValueError(f"ROI mode must be one of {ROI_MODES}, not {mode!r}")
    bodies = np.asarray(bodies)
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    margin = roi_margin_mm(spacing) if margin_mm is None else float(margin_mm)
    crops = level_crops(bodies) if crops is None else crops
    present = list(crops)
    wanted = present if levels is None else [int(i) for i in levels if int(i) in crops]
    out = np.zeros(bodies.shape, dtype=np.uint8)
    if not wanted:
        return out
    sizes: dict[int, int] = {}
    centres = _centroids_mm(bodies, present, spacing, crops, sizes_out=sizes) if mode == "mid" else {}
    vcentres = (_centroids_mm(vertebrae, wanted, spacing, vertebra_crops)
                if (mode == "mid" and vertebrae is not None) else {})
    for vid in wanted:
        crop = crops[vid]
        body = bodies[crop] == vid
        if clean:
            body = main_body_component(body)
        if mode == "whole":
            roi = _whole_roi(body, spacing, margin, None if ct is None else ct[crop])
        else:
            offset = np.array([s.start for s in crop]) * np.asarray(spacing)
            frame = vertebra_frame(body, spacing,
                                   neighbour_centres_mm=[c - offset for c in _neighbour_centres(vid, centres, sizes)],
                                   vertebra_centre_mm=(vcentres[vid] - offset) if vid in vcentres else None,
                                   direction=direction)
            roi = _mid_roi(body, spacing, frame, margin, height_mm, None if ct is None else ct[crop])
        out[crop][roi] = vid
    return out


def trabecular_roi(bodies: np.ndarray, spacing_zyx_mm, level_id: int, mode: str = "whole", *,
                   margin_mm: float | None = None, vertebrae: np.ndarray | None = None,
                   direction: np.ndarray | None = None, height_mm: float = MID_HEIGHT_MM,
                   ct: np.ndarray | None = None) -> np.ndarray:
    """Boolean trabecular ROI of one level (VerSe id) on the bodies' grid."""
    labels = trabecular_rois(bodies, spacing_zyx_mm, mode, levels=[level_id], margin_mm=margin_mm,
                             vertebrae=vertebrae, direction=direction, height_mm=height_mm, ct=ct)
    return labels == int(level_id)


# --- statistics ------------------------------------------------------------------------------
@dataclass
class RoiStats:
    level: str
    verse_id: int
    voxels: int
    volume_mm3: float
    hu_mean: float | None
    hu_median: float | None
    hu_sd: float | None
    metal_voxels: int
    flags: list[str] = field(default_factory=list)


def roi_statistics(ct: np.ndarray, roi_labels: np.ndarray, spacing_zyx_mm, *,
                   levels: list[int] | None = None, min_volume_mm3: float = MIN_ROI_VOLUME_MM3,
                   min_voxels: int = MIN_ROI_VOXELS, metal_hu: float = METAL_HU,
                   crops: dict[int, tuple[slice, ...]] | None = None) -> dict[int, RoiStats]:
    """Mean / median / SD HU per ROI, voxel count, and flags 'roi_small', 'roi_empty', 'metal'.

    The median resists the basivertebral vein (low) and sclerotic islands (high); metal is any
    voxel above ``metal_hu`` inside the ROI (the mean is then meaningless).
    """
    ct = np.asarray(ct)
    roi_labels = np.asarray(roi_labels)
    voxel_mm3 = float(np.prod(spacing_zyx_mm))
    # Boxes holding each ROI: the caller's (e.g. the bodies' crops) or one find_objects pass
    # (np.unique would sort 10^8 voxels).
    if crops is None:
        crops = {i + 1: sl for i, sl in enumerate(ndimage.find_objects(roi_labels)) if sl is not None}
    ids = sorted(set(crops) | set(levels or []))
    out: dict[int, RoiStats] = {}
    for vid in ids:
        if vid not in lv.VERSE_NAMES:
            continue
        sl = crops.get(vid)
        vals = ct[sl][roi_labels[sl] == vid].astype(np.float64) if sl is not None else np.empty(0)
        n = int(vals.size)
        flags: list[str] = []
        metal = int((vals > metal_hu).sum())
        if n == 0:
            flags.append("roi_empty")
        elif n < min_voxels or n * voxel_mm3 < min_volume_mm3:
            flags.append("roi_small")
        if metal:
            flags.append("metal")
        out[vid] = RoiStats(
            level=lv.level_name(vid), verse_id=vid, voxels=n, volume_mm3=n * voxel_mm3,
            hu_mean=float(vals.mean()) if n else None,
            hu_median=float(np.median(vals)) if n else None,
            hu_sd=float(vals.std(ddof=1)) if n > 1 else None,
            metal_voxels=metal, flags=flags)
    return out
