"""The spinal canal's centreline: CSF-like pockets enclosed by bone, chained through the slices."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .common import ENCLOSURE_REACH_MM, _SLICE, _enclosed


SOFT_LOW_HU = -250.0     # canal content (CSF, cord, epidural fat) lies above this
CANAL_HIGH_HU = 60.0     # ... and below this (osteoporotic trabecular bone is ~85 HU)
CANAL_MEAN_HU = 50.0     # mean of a canal blob after extra smoothing (noise pockets in bone fail)
CANAL_CORE_MEAN_HU = 35.0  # ... or of its core, up to CANAL_CORE_STEPS voxels in from the rim (narrow
CANAL_CORE_STEPS = 2       #     canals: their rim takes up the blur of the bone around them)
CANAL_AREA_MM2 = (25.0, 700.0)  # cross-section of a canal candidate
CANAL_GAP_MM = 40.0      # the canal track bridges slices without an enclosed pocket up to this far
CANAL_LOST_TOP_MM = 40.0  # a track ending further below the view's top is continued up to it
CANAL_TOP_FIT_MM = 60.0   # ... along the line fitted to its pockets over this length below its end (a narrow
#                           choice on the altered real CTs: 40-50 mm misnamed the copy 30 HU darker, 70 mm cost
#                           the copy turned -5 deg about the long axis T12 0.867 -> 0.786; README "Honest limits")
MIDLINE_BAND_MM = 45.0   # canal centre within this distance of the torso centre (scoliosis)


def _smooth_track(z_idx: np.ndarray, values: np.ndarray, nz: int, window: int, in_slices: bool = False) -> np.ndarray:
    """Median-filter a sparse per-slice track and interpolate it over all slices. The window
    counts samples, or with in_slices the samples within window // 2 slices either side."""
    order = np.argsort(z_idx)
    z_idx, values = np.asarray(z_idx, float)[order], np.asarray(values, float)[order]
    if in_slices:
        lo = np.searchsorted(z_idx, z_idx - window // 2, side="left")
        hi = np.searchsorted(z_idx, z_idx + window // 2, side="right")
        med = np.array([np.median(values[i:j]) for i, j in zip(lo, hi)])
    elif len(values) >= 3:
        med = ndi.median_filter(values, size=min(window, len(values) | 1), mode="nearest")
    else:
        med = values
    return np.interp(np.arange(nz), z_idx, med)


def _track_canal(hu, bone, body, sp):
    """Per-slice canal centre (y, x), radius and anterior wall, or None when not found."""
    nz, ny, nx = hu.shape
    # Torso centre per slice (left-right) and its anterior-posterior extent (from per-slice
    # projections: the torso's voxel indices would take ~170 MB on a large CT).
    cols = body.sum(axis=1, dtype=np.int64)                     # (nz, nx)
    cnt = cols.sum(axis=1).astype(float)
    has = cnt > 0
    if not has.any():
        return None
    xc = (cols @ np.arange(nx, dtype=float)) / np.maximum(cnt, 1)
    del cols
    rows = body.any(axis=2)                                     # (nz, ny)
    y_front = np.where(has, rows.argmax(axis=1), np.inf)
    y_back = np.where(has, ny - 1 - rows[:, ::-1].argmax(axis=1), -np.inf)
    del rows

    enc = _enclosed(bone, int(round(ENCLOSURE_REACH_MM / sp)))
    # Canal content by a more smoothed HU: noise pockets inside a low-density body (~85 HU)
    # must not pass for CSF (~10 HU).
    hu_c = ndi.gaussian_filter(hu, 1.5 / sp)

    def candidates(min_dirs):
        cand = (enc >= min_dirs) & (hu > SOFT_LOW_HU) & (hu < CANAL_HIGH_HU) & body
        lab, n = ndi.label(cand, structure=_SLICE)
        if n == 0:
            return np.zeros((0, 5))
        objs = ndi.find_objects(lab)
        zz_, yy_, xx_ = np.nonzero(lab)
        ll = lab[zz_, yy_, xx_]
        cnt = np.bincount(ll, minlength=n + 1)[1:].astype(float)
        area = cnt * sp * sp
        com = np.stack([np.bincount(ll, weights=w, minlength=n + 1)[1:] / np.maximum(cnt, 1)
                        for w in (zz_, yy_, xx_)], axis=1)
        mean_c = np.bincount(ll, weights=hu_c[zz_, yy_, xx_], minlength=n + 1)[1:] / np.maximum(cnt, 1)
        del zz_, yy_, xx_, ll
        rows = []
        for k, (a, c, o, mc) in enumerate(zip(area, com, objs, mean_c), start=1):
            if not (CANAL_AREA_MM2[0] <= a <= CANAL_AREA_MM2[1]):
                continue
            by_core = mc > CANAL_MEAN_HU
            if by_core and _core_mean_hu(lab[o] == k, hu_c[o], CANAL_CORE_STEPS) > CANAL_CORE_MEAN_HU:
                continue
            z = int(round(c[0]))
            if not has[z] or abs(c[2] - xc[z]) * sp > MIDLINE_BAND_MM:
                continue
            # Posterior half of the torso: the spine lies behind the abdominal / thoracic centre.
            if c[1] < 0.5 * (y_front[z] + y_back[z]):
                continue
            rows.append((z, c[1], c[2], a, o[1].start, by_core))
        return np.array(rows, float) if rows else np.zeros((0, 6))

    rows8 = candidates(8)
    if len(rows8) == 0:
        return None
    rows7 = candidates(7)
    # Pockets found only by their core do not take the track below the lowest pocket that the
    # pockets found whole chain to: there the sacral canal leaves the column's curve, which the
    # caudal extrapolation and the sacrum's column box were fitted to (taking them: sacrum
    # 0.87 -> 0.93 on most lumbar phantoms, but 0.71-0.84 on 40-80 mg/cm3 ones, whose straight
    # track missed the sacrum's back).
    whole8, whole7 = rows8[rows8[:, 5] == 0], rows7[rows7[:, 5] == 0]
    if len(whole8) and len(whole8) + len(whole7) < len(rows8) + len(rows7):   # (any found by core)
        z_low = min(_canal_chain(whole8, whole7, sp))
        rows8, rows7 = (r[(r[:, 5] == 0) | (r[:, 0] >= z_low)] for r in (rows8, rows7))
    win = max(3, int(round(40.0 / sp)) | 1)
    # The canal: the best chain of pockets through the slices (sacral foramina and other
    # enclosed pockets lie off it).
    picked = _canal_chain(rows8, rows7, sp)
    sel = np.array([picked[z] for z in sorted(picked)])
    z_sel = sel[:, 0]
    if (z_sel.max() - z_sel.min()) * sp < 20.0 or len(sel) < max(3, int(10.0 / sp)):
        return None
    # The centre over 40 mm of slices: where the canal is enclosed in few slices (the thoracic
    # arch opens between pedicles), 27 samples spanned the whole track and flattened a scoliotic
    # curve 7 mm off the canal (random T4-T8 phantom: the canal filled as bone, T6 0.87). The
    # radius and anterior wall keep their wider window: the body / arch border follows the
    # anterior wall, and the real 3 mm CT's T12 body lost its top (0.962 -> 0.905) on a 40 mm one.
    cy = _smooth_track(z_sel, sel[:, 1], nz, win, in_slices=True)
    cx = _smooth_track(z_sel, sel[:, 2], nz, win, in_slices=True)
    rad = np.sqrt(_smooth_track(z_sel, sel[:, 3], nz, win) / np.pi) / sp
    front = _smooth_track(z_sel, sel[:, 4], nz, win)
    # Beyond the tracked range (the thin sacral canal, the field-of-view ends) continue the
    # track along its end direction rather than straight down / up.
    z0, z1 = int(z_sel.min()), int(z_sel.max())
    n_fit = max(3, int(round(20.0 / sp)))
    # Caudally the thin sacral canal is lost. Cranially the view usually ends within a vertebra of
    # the last pocket, and the track is held there; where it ends further above (the canal lost in
    # the top vertebrae), the track runs on along its end direction too. The column box reaches
    # the view's top either way.
    lost_top = (nz - 1 - z1) * sp > CANAL_LOST_TOP_MM
    for lo_end in (True, False) if lost_top else (True,):
        zz = np.arange(z0, min(z1, z0 + n_fit) + 1) if lo_end else np.arange(max(z0, z1 - n_fit), z1 + 1)
        if zz.size < 3:
            continue
        out = np.arange(0, z0) if lo_end else np.arange(z1 + 1, nz)
        ref_z = z0 if lo_end else z1
        # Cranially the direction comes from the pockets themselves over CANAL_TOP_FIT_MM: the
        # median-filtered track flattens over its last window, and its last 20 mm lagged behind
        # the canal of a scan turned a few degrees (turned 5 degrees sagittally: the continued
        # track ran into the back of T12's body, which went to the arch; T12 whole 0.789 -> 0.861).
        near = z_sel >= z1 - CANAL_TOP_FIT_MM / sp
        on_pockets = not lo_end and np.count_nonzero(near) >= 3
        for arr, col in (cy, 1), (cx, 2), (front, 4):   # (sel's columns: z, y, x, area, front, by core)
            z_fit, v_fit = (z_sel[near], sel[near, col]) if on_pockets else (zz, arr[zz])
            slope = float(np.clip(np.polyfit(z_fit, v_fit, 1)[0], -1.0, 1.0))
            arr[out] = arr[ref_z] + slope * (out - ref_z)
    # (z_continued: the first slice of the cranial continuation, nz where the track is held)
    return dict(cy=cy, cx=cx, rad=rad, front=front, z_lo=z0, z_hi=z1, z_continued=z1 + 1 if lost_top else nz,
                enc=enc)


def _core_mean_hu(pocket: np.ndarray, hu: np.ndarray, steps: int) -> float:
    """Mean HU of a pocket's deepest core: the pocket eroded in-plane by up to `steps` voxels
    (inf when not even one voxel in from the rim is left). A narrow canal's rim takes up the blur
    of the bone around it (upper thoracic canal at 1.5 mm: 60-75 HU in all, 12-16 two voxels in;
    one voxel in 21-30, up to 44 with 22 HU noise), the marrow pockets of a 40 mg/cm3 body stay at
    45-51 however deep."""
    mean = np.inf
    for _ in range(steps):
        pocket = ndi.binary_erosion(pocket, structure=_SLICE)
        if not pocket.any():
            break
        mean = float(hu[pocket].mean())
    return mean


def _canal_chain(rows8, rows7, sp) -> dict:
    """The canal as the best chain of candidate pockets, one per slice at most, caudal to
    cranial: each pocket adds to the chain (a fully enclosed one more), each step between two
    costs by its slice gap and its in-plane jump, and a step is allowed only within
    CANAL_GAP_MM in height and (7 mm + half the gap) in-plane. A dynamic programme over the
    slices finds the chain of highest total, so one off-centre pocket or a run of slices where
    the arch does not close (a vertebra tilted against the slices) neither ends the track nor
    bends it off the canal. Returns {slice: candidate row}."""
    nodes = [(r, 1.0) for r in rows8] + [(r, 0.7) for r in rows7]
    nodes.sort(key=lambda t: t[0][0])
    z = np.array([t[0][0] for t in nodes])
    yx = np.array([t[0][1:3] for t in nodes])
    score = np.array([t[1] for t in nodes])
    prev = np.full(len(nodes), -1)
    max_dz = CANAL_GAP_MM / sp
    start = 0
    for i in range(len(nodes)):
        while z[start] < z[i] - max_dz:
            start += 1
        j = np.arange(start, i)
        j = j[z[j] < z[i]]
        if not j.size:
            continue
        dz = z[i] - z[j]
        limit = (7.0 + 0.5 * dz * sp) / sp
        dist = np.hypot(*(yx[j] - yx[i]).T)
        ok = dist < limit
        if not ok.any():
            continue
        gain = score[j] - 0.1 * (dz - 1) - 0.5 * (dist / limit) ** 2
        gain[~ok] = -np.inf
        k = int(np.argmax(gain))
        if gain[k] > 0:
            score[i] += gain[k]
            prev[i] = j[k]
    chain = {}
    i = int(np.argmax(score))
    while i >= 0:
        chain[int(z[i])] = nodes[i][0]
        i = int(prev[i])
    # Where the chain passes a 7-direction pocket, a fully enclosed one in the same slice within
    # a step of it is the canal proper (the 7-direction pocket takes in a lateral recess or
    # foramen and shifts the centre, the radius and the anterior wall).
    by_z8: dict[int, list] = {}
    for r in rows8:
        by_z8.setdefault(int(r[0]), []).append(r)
    for zi, r in chain.items():
        near = [q for q in by_z8.get(zi, []) if np.hypot(q[1] - r[1], q[2] - r[2]) < 7.0 / sp]
        if near:
            chain[zi] = min(near, key=lambda q: np.hypot(q[1] - r[1], q[2] - r[2]))
    return chain
