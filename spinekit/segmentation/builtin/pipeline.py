"""segment_builtin: the builtin backend's pipeline (see the package docstring), from the CT to the
label maps and level records."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from ... import levels as lv
from ...errors import InputError
from ...image import Image
from ...masks import fill_holes
from ...progress import Progress, report, scaled
from ..base import LevelRecord, SegmentationResult, superior_axis
from ..metal import reduce_metal_streaks
from .common import (BONE_HU, COARSE_MM, ROI_ANTERIOR_MM, ROI_LATERAL_MM, ROI_POSTERIOR_MM, TRABECULAR_HU,
                     TRABECULAR_MIN_DIRS, _SLICE, _Segment, _body_mask, _check_ct, _flood, _working_grid,
                     _working_spacing)
from .canal import _track_canal
from .discs import _disc_planes
from .vessels import VESSEL_HU, _blood_pools, _find_vessels, _front_crop, _pool_wedges
from .outline import _fill_body_holes, _native_labels
from .ribs import _body_frames, _drop_contradicted_stubs, _find_rib_stubs, _find_ribs, _give_rib_heads_back
from .naming import _find_sacrum, _name_levels


EDGE_HU = 200.0          # outline voxels darker than this are partial-volume soft tissue
SACRUM_BELOW_CANAL_MM = 80.0  # the column box reaches this far below the lowest tracked canal (110 mm
#                              takes in the phantom's sacral tip, sacrum 0.85 -> 0.90, but shifts the
#                              L5/S1 split on real CT: L5 0.853 -> 0.848)
MAX_SLICE_MM = 3.0       # thicker slices: level names flagged uncertain (0.8 mm pixels: T11-L5 phantoms at 4-5 mm
#                          split and named right, Dice >= 0.887; thin thoracic discs at 4-5 mm are missed, 6 mm fails)
BLOOD_CORTEX_CLEARANCE_MM = 4.5  # trabecular-HU voxels this close to the cortex are outline, not blood
PEDICLE_BAND_MM = 25.0   # pedicles / laminae: beside and just behind the canal
PEDICLE_CLEARANCE_MM = 3.0  # ... seeded only this far from a disc plane (5 mm left the L5/S1 facets to the
#                             flood: real 3 mm CT L5 0.848 -> 0.864, 3 mm phantom T12 0.894 -> 0.900)
PEDICLE_CUT_BAND_MM = 5.0   # ... or, where under PEDICLE_CUT_FRACTION of a vertebra's ring lies this far
PEDICLE_CUT_FRACTION = 0.2  # from its disc plane (cut by the view), up to the plane
THORACIC_ARCH_SLOPE = 0.6   # above a rib-bearing vertebra their plane drops this much (mm per mm behind the
#                             canal, ~30 deg): shingled thoracic laminae (TotalSegmentator's T11/T12 arch border on
#                             the real 2 mm slab drops 0.55-0.75 mm/mm; phantom T10 / T11 spinous processes 35 / 25 deg).
#                             It drops from the canal's posterior wall: dropped from the canal's centre it gave the
#                             upper vertebra the pedicle tops and superior articular processes of the one below
#                             (random T4-T7 at 0.8x0.8x3 mm: T5 / T6 whole 0.880 / 0.900 -> 0.901 / 0.918)
PEDICLE_ROOT_MM = 4.0    # body / pedicle border lateral to the canal, in front of the tracked canal front
#                          (phantoms 2-4 mm within 0.01 of each other; real 3 mm CT vs TotalSegmentator
#                          bodies L4 0.919 -> 0.956, L5 0.887 -> 0.906 at 4 mm; 6 mm cuts into L1/L2)
BODY_CLOSING_MM = 4.0    # gaps in a body's cortical ring bridged before filling
CONTINUED_FRONT_MARGIN_MM = 7.5  # ... within the body zone, which reaches this far behind a continued canal
#                                  track's anterior wall (a guess there): the ring's back must be in the zone
#                                  to close (real 3 mm CT 30 HU darker: T12 whole 0.64 -> 0.85 at 4.5 mm). With
#                                  the track continued along its pockets (canal.CANAL_TOP_FIT_MM) the wall lies
#                                  nearer the bodies' back than along the old, lagging line, and 4.5 mm left
#                                  T12's ring open on the copy 30 HU darker (T12 0.748 at 4.5-6.5 mm, 0.879 at
#                                  7.5; a narrow window: at 8.5 mm a dip mid-L1 of that copy, with a band, was
#                                  taken for a disc, L1 0.374; the other 17 altered copies within 0.009)


def segment_builtin(image: Image, progress: Optional[Progress] = None, *, min_levels: int = 1) -> SegmentationResult:
    """Segment and name the vertebrae of a CT (HU) with classic image processing.

    Returns whole-vertebra and vertebral-body label maps (VerSe ids) on the input grid and one
    LevelRecord per level. Raises InputError for non-CT input, or when no vertebral column (or
    fewer than ``min_levels`` vertebrae) is found.
    """
    _check_ct(image)
    # Screws' streaks lift soft tissue above the bone threshold; every step below sees them reduced.
    report(progress, 0.0, "builtin: metal streaks")
    image = reduce_metal_streaks(image, scaled(progress, 0.0, 0.05))
    report(progress, 0.05, "builtin: resampling")
    native_min = float(min(image.spacing_mm))
    sp = _working_spacing(image)
    grid = _working_grid(image, sp)
    hu = grid.hu
    warnings: list[str] = []

    report(progress, 0.15, "builtin: bone and canal")
    body = _body_mask(hu)
    # Light smoothing first: noise must neither punch holes in bone nor make bone of soft tissue.
    hu_s = ndi.gaussian_filter(hu, 1.0 / sp)
    bone = (hu_s > BONE_HU) & body
    if bone.sum() * sp ** 3 < 20000.0:
        raise InputError("no vertebral column found in the CT (too little bone in view).")
    canal = _track_canal(hu_s, bone, body, sp)
    if canal is None:
        raise InputError("no vertebral column found in the CT (no bone-enclosed spinal canal in view).")
    nz, ny, nx = hu.shape
    z_lo = max(0, canal["z_lo"] - int(round(SACRUM_BELOW_CANAL_MM / sp)))
    # Cranially the box reaches the view's top: the track is held there from its last pocket, at
    # most CANAL_LOST_TOP_MM below, or continued along its end direction (_track_canal).
    z_hi = nz - 1

    # --- column mask in a box around the canal -----------------------------------------------
    report(progress, 0.35, "builtin: vertebral column")
    bone_c = ndi.binary_closing(bone, structure=_SLICE, iterations=1) | bone
    # Blood-like voxels, candidates for the vessel tests below: contrast-phase HU, or (portal-venous
    # blood, ~150 HU, as bright as trabecular bone) trabecular HU outside the cortex, where bone
    # meets it from one side only (trabecular bone in an open cortical ring has bone in most
    # in-plane directions). Voxels next to the cortex are left out: partial volume at the outline.
    # (only in front of the canal, where the vessel tests look)
    fc = _front_crop(canal, z_lo, z_hi, hu.shape, sp)
    blood = np.zeros(hu.shape, bool)
    h = hu_s[fc]
    blood[fc] = ((h > VESSEL_HU[0]) & (h < VESSEL_HU[1])) | (
        (h > TRABECULAR_HU) & (canal["enc"][fc] < TRABECULAR_MIN_DIRS)
        & ~ndi.binary_dilation(bone_c[fc], structure=_SLICE,
                               iterations=max(1, int(round(BLOOD_CORTEX_CLEARANCE_MM / sp)))))
    # (the enclosure count is kept in the front crop: the aorta's growth below stops at it)
    enc_fc = canal.pop("enc")[fc]
    del h
    # Solid bone = filled cortical rings (low-density bodies) or trabecular-density voxels.
    raw = bone_c | (hu_s > TRABECULAR_HU)
    del bone_c
    column = fill_holes(raw, structure=_SLICE)
    yy = np.arange(ny)[None, :, None]
    xx = np.arange(nx)[None, None, :]
    dy = (yy - canal["cy"][:, None, None]) * sp
    dx = (xx - canal["cx"][:, None, None]) * sp
    box = (dy > -ROI_ANTERIOR_MM) & (dy < ROI_POSTERIOR_MM) & (np.abs(dx) < ROI_LATERAL_MM)
    box[:z_lo] = False
    front_mm = (canal["front"][:, None, None] - canal["cy"][:, None, None]) * sp  # negative
    # The canal inside a closed bony ring is a filled hole: take such holes out again.
    canal_disc = (dy ** 2 + dx ** 2) < (np.maximum(canal["rad"], 3.0 / sp)[:, None, None] * sp) ** 2
    # The lumbar canal is wider than deep: a circle of its area reaches past its anterior wall
    # into the back of the body, which stays.
    canal_disc &= dy >= front_mm
    holes = column & ~raw
    hl, _ = ndi.label(holes, structure=_SLICE)
    # (only holes reaching the canal's central part: a low-density body's interior is a hole
    # too, and it touches the canal's outline through a thin posterior wall)
    core = (dy ** 2 + dx ** 2) < (np.maximum(0.5 * canal["rad"], 1.0)[:, None, None] * sp) ** 2
    canal_holes = np.unique(hl[core & holes])
    del core
    canal_holes = canal_holes[canal_holes > 0]
    if canal_holes.size:
        column &= ~np.isin(hl, canal_holes)
    del hl, holes, raw
    column &= box & ~canal_disc
    # Smoothing and the low trabecular threshold widen the outline by about a voxel: drop
    # outline voxels that are not themselves bone-bright (interior low-density bone stays).
    # (At native spacing coarser than the working grid the outline blur is the scan's own and
    # stays, as in reference segmentations of such scans.)
    if native_min < COARSE_MM:
        shell = column & ~ndi.binary_erosion(column, border_value=1)   # (the view's end is no outline)
        column &= ~(shell & (hu < EDGE_HU))
        del shell
    anterior = dy < front_mm
    # Contrast-filled heart chambers (and aneurysms) touching the thoracic bodies: blood pools
    # too thick to be bone (a ball no vertebral body can hold, discs cut bodies in height).
    pool, pool_hu = _blood_pools(blood, hu_s, body, canal, front_mm, fc, enc_fc, sp)
    if pool is not None:
        column &= ~pool
    # A contrast-filled aorta touching the bodies: smooth, homogeneous (no bright cortex) and
    # continuous over many levels, where bodies are interrupted by discs.
    vessel = np.zeros_like(column)
    zone = anterior & box & (dy < front_mm - 4.0)
    cand = blood & zone
    del blood
    pool_edge = np.zeros_like(cand)
    if pool is not None:
        cand &= ~pool
        # (a vessel running into a pool keeps only part of its cross-section there)
        pool_edge = ndi.binary_dilation(pool, structure=_SLICE, iterations=2) & ~pool
    # (blood found, pools and vessels: the native outline below must not grow back over it)
    blood_found = pool if pool is not None else np.zeros_like(column)
    found, lumen_min_hu, lumen_max_hu = _find_vessels(cand[fc], zone[fc], pool_edge[fc], hu_s[fc],
                                                      np.broadcast_to(dx, hu.shape)[fc],
                                                      np.broadcast_to(front_mm - dy, hu.shape)[fc],
                                                      enc_fc, nz, fc[0].start, sp)
    vessel[fc] = found
    if pool is not None:
        wedges = _pool_wedges(pool[fc], found, cand[fc], hu_s[fc], enc_fc, pool_hu, sp)
        vessel[fc] |= wedges    # (taken out as the vessels are, nor filled back below)
        del wedges
    del pool
    column &= ~vessel
    blood_found |= vessel
    del cand, pool_edge, enc_fc, found
    # Low-density bodies whose cortical ring is not closed in a slice (thin cortex, partial
    # volume): close small gaps in-plane and fill, within the body zone only.
    r = max(1, int(round(BODY_CLOSING_MM / sp)))
    disk = np.zeros((1, 2 * r + 1, 2 * r + 1), bool)
    disk[0] = (np.add.outer(np.arange(-r, r + 1) ** 2, np.arange(-r, r + 1) ** 2) <= r * r)
    zone = anterior & box
    zc = canal["z_continued"]
    zone[zc:] = (dy[zc:] < front_mm[zc:] + CONTINUED_FRONT_MARGIN_MM) & box[zc:]
    if not zone.any():
        raise InputError("no vertebral column found in the CT (no bone in front of the spinal canal).")
    zs_, ys_, xs_ = ndi.find_objects(zone.astype(np.uint8))[0]
    crop = (zs_, slice(max(0, ys_.start - r), ys_.stop + r), slice(max(0, xs_.start - r), xs_.stop + r))
    closed = ndi.binary_closing(column[crop] & zone[crop], structure=disk)
    column[crop] |= fill_holes(closed, structure=_SLICE) & zone[crop] & ~vessel[crop]
    del closed, zone, vessel

    # Keep the column: components that reach near the canal.
    lab, n = ndi.label(column)
    if n == 0:
        raise InputError("no vertebral column found in the CT (no bone around the spinal canal).")
    near = ndi.binary_dilation(canal_disc & box, iterations=max(1, int(round(6.0 / sp))))
    if lumen_min_hu < lumen_max_hu:
        # Branches of the contrast-filled tube found above (common iliac arteries: thinner than
        # the aorta, so not found as tubes, and partly hidden by the iliac veins) may hang on a
        # body by a thin contact of blurred voxels. Pieces in front of the canal that stand free
        # of the column after a one-voxel in-plane erosion, away from the canal, and mostly hold
        # the tube's own lumen HU are taken out with their rim: marrow is darker than the lumen,
        # cortex brighter, and a body's core is joined to its pedicles.
        cb = tuple(slice(max(0, o.start - 1), o.stop + 1) for o in ndi.find_objects(column.astype(np.uint8))[0])
        core = ndi.binary_erosion(column[cb], structure=_SLICE)
        clab, cn = ndi.label(core)
        if cn:
            cidx = np.arange(1, cn + 1)
            h = hu_s[cb]
            size = ndi.sum_labels(core, clab, cidx)
            lumen_share = ndi.sum_labels((h >= lumen_min_hu) & (h < lumen_max_hu), clab, cidx) / np.maximum(size, 1)
            front_share = ndi.sum_labels(np.broadcast_to(anterior, column.shape)[cb], clab, cidx) / np.maximum(size, 1)
            reach = ndi.maximum(near[cb], clab, cidx).astype(bool)
            drop = cidx[(lumen_share > 0.5) & (front_share == 1.0) & ~reach]
            if drop.size:
                column[cb] &= ~ndi.binary_dilation(np.isin(clab, drop), structure=_SLICE)
                lab, n = ndi.label(column)
            del h
        del core, clab
    keep = np.unique(lab[near & column])
    keep = keep[keep > 0]
    column = np.isin(lab, keep)
    del lab, near

    # --- bodies and discs --------------------------------------------------------------------
    report(progress, 0.5, "builtin: discs and bodies")
    planes, arch_planes = _disc_planes(column, anterior, hu_s, dx, canal["cx"], sp)

    def segment_index(z, y, x):
        idx = np.zeros(z.size, np.int32)
        pts = np.stack([z, y, x], axis=1).astype(float)
        for pnt, nrm in planes:
            idx += ((pts - pnt) @ nrm > 0)
        return idx

    # Every anterior column voxel (bodies with their full width) gets a segment.
    za, ya, xa = np.nonzero(column & anterior)
    seg_a = segment_index(za, ya, xa)
    counts = np.bincount(seg_a, minlength=len(planes) + 1)
    # Drop end segments too small to be a vertebra (a cut-off sliver at the field-of-view edge).
    typical = np.median(counts[counts > 0]) if np.any(counts > 0) else 0
    keep_seg = [i for i in range(len(counts)) if counts[i] >= 0.15 * typical and counts[i] > 0]
    if len(keep_seg) < max(1, min_levels):
        raise InputError(f"no vertebral column found in the CT (found {len(keep_seg)} vertebrae, "
                         f"need at least {min_levels}).")
    segs = []
    lut_seg = np.zeros(len(counts), np.uint8)
    for j, i in enumerate(keep_seg):
        segs.append(_Segment(float(i), float(i + 1), label=j + 1))
        lut_seg[i] = j + 1
    body_markers = np.zeros(hu.shape, np.uint8)
    body_markers[za, ya, xa] = lut_seg[seg_a]
    del za, ya, xa, seg_a
    # Pedicles and laminae beside the canal lie level with their own body: seed them from the
    # disc planes too (away from the planes), so the flood only decides the processes that
    # overhang the next level (spinous and articular processes).
    ring = column & ~anterior & (np.abs(dx) < PEDICLE_BAND_MM) & (dy < canal["rad"][:, None, None] * sp + 8.0)
    zp, yp, xp = np.nonzero(ring)
    del ring
    # (distance behind the canal's posterior wall, for the caudal slope of thoracic laminae below;
    # the pedicles beside the canal stay level with their body)
    behind_mm = np.maximum((yp - canal["cy"][zp] - canal["rad"][zp]) * sp, 0.0)
    pts = np.stack([zp, yp, xp], axis=1).astype(float)

    def ring_sides(slopes):
        """Per ring voxel: its segment from the arch planes, each lowered by slopes[k] mm per mm
        behind the canal's posterior wall, and its distance (mm) to the nearest of them."""
        idx = np.zeros(zp.size, np.int32)
        gap_mm = np.full(zp.size, np.inf)
        for (pnt, nrm), slope in zip(arch_planes, slopes):
            d = (pts - pnt) @ nrm * sp + slope * behind_mm
            idx += d > 0
            np.minimum(gap_mm, np.abs(d), out=gap_mm)
        return idx, gap_mm

    # A vertebra cut by the field of view just beyond its disc keeps its arch in view but
    # not its pedicles (they leave the body's upper part): nearly all of its ring lies in
    # a band PEDICLE_CUT_BAND_MM about the plane and the neighbour's seeds would flood the arch.
    # Its side is seeded up to the plane. (Real 2 mm slab: T11 has 6 of 352 ring voxels clear;
    # whole vertebrae on phantoms and the 3 mm abdomen keep >= 39%.) Judged on the level planes:
    # the cut is the view's, whatever the slope.
    level_sides = ring_sides(np.zeros(len(arch_planes)))
    idx, gap_mm = level_sides
    clear = gap_mm > PEDICLE_CUT_BAND_MM
    n_clear = np.bincount(idx[clear], minlength=len(lut_seg))
    n_ring = np.bincount(idx, minlength=len(lut_seg))
    cut = (lut_seg > 0) & (n_clear < PEDICLE_CUT_FRACTION * n_ring)
    del idx, gap_mm, clear

    def arch_seeds(sides):
        """Markers: the bodies, and the ring seeded from `sides` (ring_sides' answer): voxels
        PEDICLE_CLEARANCE_MM clear of the planes, or anywhere on a vertebra cut by the view."""
        seeds = body_markers.copy()
        if zp.size and planes:
            idx, gap_mm = sides
            clear = (gap_mm > PEDICLE_CLEARANCE_MM) | cut[idx]
            seeds[zp[clear], yp[clear], xp[clear]] = lut_seg[idx[clear]]
        return seeds

    # --- whole vertebrae: watershed from the bodies over the column ----------------------------
    report(progress, 0.65, "builtin: posterior elements")

    if not column.any():
        raise InputError("no vertebral column found in the CT (no bone around the spinal canal).")
    zs, ys, xs = ndi.find_objects(column.astype(np.uint8))[0]
    zs = slice(max(0, zs.start - 1), min(nz, zs.stop + 1))
    crop = (zs, ys, xs)
    # Flood over the inverted distance map: posterior arches join their own body through the
    # pedicles (thick necks) before a neighbour can reach them through a facet joint (thin).
    elev = -ndi.distance_transform_edt(column[crop])

    vert = np.zeros(hu.shape, np.uint8)
    vert[crop] = _flood(elev, arch_seeds(level_sides)[crop], column[crop])
    bodies = np.where(anterior & column, body_markers, 0).astype(np.uint8)
    # Bodies are solid: low-density marrow whose axial ring was open in a slice (thin or
    # partial-volume cortex) is left as a hole; fill it in all three orientations.
    _fill_body_holes(vert, bodies)
    # Lateral to the canal the pedicle roots continue the body's posterior cortex: there the body
    # ends PEDICLE_ROOT_MM in front of the tracked canal front (the first soft-tissue row, which
    # lies about a voxel behind the bright wall after smoothing); behind the body's middle, the
    # canal's own width, its posterior wall stays.
    dyf = (np.arange(ny)[None, :, None] - canal["front"][:, None, None]) * sp
    root = (dyf >= -PEDICLE_ROOT_MM) & (np.abs(dx) > canal["rad"][:, None, None] * sp)
    bodies[np.broadcast_to(root, bodies.shape)] = 0
    del dyf, root

    # --- anchors -----------------------------------------------------------------------------
    report(progress, 0.8, "builtin: naming levels")
    # The sacrum first: neither it nor L5 bears ribs, and bone the rib search finds beside them
    # is pelvis (real 3 mm CT cut through the sacrum: a sacral ala cut by the view came out as a
    # rib stub, the sacrum was taken for a thoracic vertebra and its alae cut off as rib heads).
    sacrum_seg = _find_sacrum(segs, vert, dx, anterior)
    ribless = frozenset() if sacrum_seg is None else frozenset(sg.label for sg in segs[:sacrum_seg + 2])
    frames = _body_frames(segs, bodies, planes)   # (one pass over the bodies for both rib counts)
    ribs = _find_ribs(segs, vert, frames, bone, box, dx, sp, ribless)
    _find_rib_stubs(segs, vert, frames, dx, dy, sp, ribless)
    _drop_contradicted_stubs(segs)
    # Thoracic laminae and spinous processes slope caudally and overlap the vertebra below like
    # roof shingles: above a rib-bearing vertebra (both thoracic; the upper one's ribs may be out
    # of view) the arch split is flooded again with the arch plane sloping down behind the canal.
    # (T12's inferior articular and spinous processes are lumbar-like: T12/L1 and the lumbar
    # discs keep the level plane.)
    slopes = np.zeros(len(arch_planes))
    for k in range(len(arch_planes)):
        lo, hi = lut_seg[k], lut_seg[k + 1]
        if lo and hi and segs[lo - 1].rib_bearing:
            slopes[k] = THORACIC_ARCH_SLOPE
    if slopes.any():
        ws = _flood(elev, arch_seeds(ring_sides(slopes))[crop], column[crop])
        # (voxels the first flood did not label are body holes filled since: they stay)
        vert[crop] = np.where(ws > 0, ws, vert[crop])
        del ws
    del elev
    rib_bone = _give_rib_heads_back(segs, vert, bodies, ribs, box, dx, dy, frames, sp)
    del dy, ribs
    # (how far above the scan's caudal end each body's top, where rib heads articulate, lies)
    body_top_mm = {i + 1: (o[0].stop - 1) * sp for i, o in enumerate(ndi.find_objects(bodies)) if o is not None}
    names, confidence, uncertain, t12 = _name_levels(segs, sacrum_seg, body_top_mm, warnings)
    thickest_mm = float(max(image.spacing_mm))
    if thickest_mm > MAX_SLICE_MM + 1e-6:
        warnings.append(f"slices {thickest_mm:.1f} mm thick (validated up to {MAX_SLICE_MM:g} mm): a disc may be "
                        "missed or one found inside a body, so level names are not reliable")
        uncertain = True
        confidence = min(confidence, 0.3)

    # --- labels in VerSe ids on the native grid ------------------------------------------------
    report(progress, 0.9, "builtin: writing labels")
    vert_native, bodies_native = _native_labels(segs, names, sacrum_seg, vert, bodies, grid, image, blood_found,
                                                rib_bone, progress)
    del vert, bodies

    levels = _records(segs, vert_native, bodies_native, image, grid, confidence, uncertain)
    n_vertebrae = len([r for r in levels if r.name != "sacrum"])
    if n_vertebrae < max(1, min_levels):
        raise InputError(f"no vertebral column found in the CT (found {n_vertebrae} vertebrae besides the sacrum, "
                         f"need at least {max(1, min_levels)}).")
    report(progress, 1.0, "builtin: done")
    return SegmentationResult(
        vertebrae=image.with_array(vert_native.astype(np.uint8)),
        bodies=image.with_array(bodies_native.astype(np.uint8)),
        levels=levels,
        backend="builtin",
        labels_uncertain=uncertain,
        warnings=warnings,
        provenance={
            "method": "builtin: canal tracking, disc profile, marker watershed (no trained weights)",
            "working_spacing_mm": sp,
            "anchors": {"sacrum": sacrum_seg is not None, "last_rib_T12": t12 is not None,
                        "rib_bearing_levels": [sg.name for sg in segs if sg.rib_bearing and sg.name]},
        },
    )


def _label_counts(labels: np.ndarray, boxes) -> np.ndarray:
    """Voxels of each uint8 label (index = label value), given its boxes (ndi.find_objects)."""
    counts = np.zeros(256, np.int64)
    for i, box in enumerate(boxes):
        if box is not None:
            counts[i + 1] = np.count_nonzero(labels[box] == i + 1)
    return counts


def _records(segs, vert, bodies, image, grid, confidence, uncertain):
    # Voxels per label counted inside its own box (a bincount over the whole CT converts it to
    # 8-byte integers first: 0.8 GB and ~1.5 s on 512x512x400).
    boxes = ndi.find_objects(vert)
    counts, bcounts = _label_counts(vert, boxes), _label_counts(bodies, ndi.find_objects(bodies))
    # Which native array axis/direction is superior: the truncation side follows from it.
    axis_arr, sign = superior_axis(image)
    up = sign > 0
    n_ax = vert.shape[axis_arr]
    out = []
    seen = set()
    for sg in segs:
        if not sg.name or sg.name in seen:
            continue
        seen.add(sg.name)
        vid = lv.level_id(sg.name)
        if counts[vid] == 0:
            continue
        ext = boxes[vid - 1][axis_arr]
        truncated = None
        if ext.stop >= n_ax:
            truncated = "cranial" if up else "caudal"
        elif ext.start <= 0:
            truncated = "caudal" if up else "cranial"
        flags = list(sg.flags)
        if truncated:
            flags.append("truncated")
        if uncertain:
            flags.append("label_uncertain")
        if sg.rib_bearing:
            flags.append("rib_bearing")
        out.append(LevelRecord(name=sg.name, verse_id=vid, present=True, complete=truncated is None,
                               truncated=truncated, confidence=confidence, voxels=int(counts[vid]),
                               body_voxels=int(bcounts[vid]), flags=flags))
    out.sort(key=lambda r: lv.order_index(r.name))
    return out
