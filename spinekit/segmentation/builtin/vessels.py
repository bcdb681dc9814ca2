"""Contrast blood taken out of the column: the aorta / IVC as long homogeneous tubes beside the
bodies (carried on where a pool hides them, with their branches and rim) and heart chambers too
thick for any vertebral body."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ...masks import fill_holes, true_runs
from .common import (BONE_HU, ENCLOSURE_REACH_MM, ROI_ANTERIOR_MM, ROI_LATERAL_MM, TRABECULAR_HU, TRABECULAR_MIN_DIRS,
                     _SLICE, _enclosed)


VESSEL_HU = (160.0, 520.0)  # contrast-filled aorta (arterial phase up to ~350-450 HU)
VESSEL_BAND_HU = 120.0   # ... also searched in narrower bands this wide (a 3 mm lumen apart from blurred marrow)
VESSEL_BAND_STEP_HU = 40.0
VESSEL_BAND_LOW_HU = 100.0  # ... from here, so portal-venous blood (150-180 HU) has its bands too (from
#                             160 HU a 160 HU aorta fell apart in noise: T6-T11 phantom T11 0.82)
VESSEL_MIN_LENGTH_MM = 70.0  # the aorta runs past several levels; a body ends at its discs
VESSEL_ERODE = 1         # in-plane erosion that cuts a vessel's contact with the bodies
VESSEL_MIDLINE_MM = 8.0     # the aorta runs beside the midline: under VESSEL_MIDLINE_SHARE of a tube
VESSEL_MIDLINE_SHARE = 0.35  # lies this close to it (bodies straddle it) ...
VESSEL_MIDLINE_DEPTH_MM = 30.0  # ... within this distance in front of the canal (the bodies' depth)
VESSEL_MAX_AREA_MM2 = 700.0  # larger cross-sections are vessel merged with a body: kept
VESSEL_CLEAN_SHARE = 0.25  # a tube is clean (vessel-sized, off the midline) in at least this share of its slices ...
VESSEL_CLEAN_RUN_MM = 8.0  # ... or over a run of slices this long
TUBE_AXIS_SLICES = 7      # a vessel's axis in a tube: its lumen's deepest point, median over this many slices
TUBE_AXIS_ON_VOX = 2.0    # ... the in-plane pieces of lumen within this many voxels of it are the vessel's
TUBE_AXIS_MARGIN_VOX = 2.0  # ... and pieces of the lumen's HU within its radius and this far of it
TUBE_AXIS_SUPPORT = 0.5   # a second vessel in the tube: pieces on its axis in this share of the slices
TUBE_CARRY_SHARE = 0.7    # a tube is carried on past its end while this share of its disc is lumen
TUBE_HOLD_MM = 30.0       # a tube's axis is held past its clean slices this far at most (about a vertebra)
TUBE_MAX_AXES = 3         # vessels looked for in one tube (the aorta and the IVC where they touch, and one more)
VESSEL_LUMEN_MARGIN_HU = 20.0  # a lumen voxel is at most this much brighter than the tube's 99th centile
VESSEL_MAX_IQR_HU = 60.0  # a contrast lumen is homogeneous (interquartile range ~10-30 HU with noise)
VESSEL_ENCLOSED_SHARE = 0.5  # ... and no more of it than this (a lumen darker than bone) enclosed in-plane
BRANCH_MIN_LENGTH_MM = 15.0  # a contrast tube's branch (common iliac artery) runs at least this far ...
BRANCH_GAP_MM = 15.0        # ... starting this close to the tube
BRANCH_MAX_AREA_MM2 = 300.0  # ... with a cross-section no larger (a body's is ~1000 mm2)
BRANCH_BLUR_HU = 80.0       # ... and, blurred at coarse spacing, down to this much below the lumen's HU
VESSEL_RIM_MM = 6.0      # the lumen's rim against a body, missed by the cortex clearance (real 2 mm slab:
#                          aorta voxels left in the labels 2650 -> 1080 at 6 mm; 4.5 mm: 1650)
VESSEL_ENCLOSED_DIRS = 6  # ... grown only over voxels with bone in fewer in-plane directions (marrow
#                           inside a body's ring has it in 6-8; the aorta beside a body in 2-5)
BLOOD_POOL_RADIUS_MM = 20.0  # a ball this size fits in heart chambers, not in a vertebral body
POOL_HOLE_MM2 = 300.0    # noise pockets inside a blood pool (in-plane), filled before the balls are fitted,
POOL_HOLE_BELOW_HU = 40.0  # ... where they are at most this much darker than the blood threshold
BLOOD_POOL_RIM_VOX = 1   # the opening misses a pool's rim where it meets a body: grown back this far
POOL_WEDGE_MM = 14.0     # ... and, once the vessels are known, a pool's wedges this far (_pool_wedges)


def _find_vessels(cand_full, zone_fc, edge_fc, h_fc, dx_fc, ahead_fc, enc_fc, nz, z_off, sp):
    """A contrast-filled aorta (and its rim) among the blood-like candidates in front of the
    canal, all arrays cropped to the front crop: `zone_fc` where vessels are looked for, `edge_fc`
    the rim of blood pools, `h_fc` smoothed HU, `dx_fc` mm from the canal's centre line,
    `ahead_fc` mm in front of the canal's anterior wall,
    `enc_fc` in-plane directions with bone, `nz` slices in the scan. Returns the vessel mask and
    the lumen's HU range (-inf/inf when no homogeneous tube was seen)."""
    # One in-plane erosion cuts the thin contacts between the vessel and the bodies. At coarse
    # spacing the bodies' blurred marrow falls in the wide blood band too and stays joined to the
    # lumen after the erosion: narrower bands then hold the lumen apart from the marrow (and from
    # the cortex), each put through the same tube tests. (All within the front crop: no candidate
    # lies outside it.)
    # Noise leaves holes in the blood-like mask: portal-venous blood (~150 HU) is a candidate
    # only by the trabecular rule, so at 28 HU noise a third of an aorta's voxels dropped out and
    # the erosion below broke it into 22-26 mm pieces, too short for a tube (the aorta stayed on
    # T11 and L1: 520 and 1,588 voxels, L1 body Dice 0.79). Voxels whose in-plane 3x3
    # neighbourhood is mostly candidates join them (a majority vote: edges stay where they are).
    cand_full = cand_full | (ndi.uniform_filter(cand_full.astype(np.float32), size=(1, 3, 3)) > 0.5)
    vessel_fc = np.zeros_like(cand_full)
    tubes = []      # (box, good slices, main axis, lumen HU range) of each tube found
    lumen_max_hu = -np.inf
    lumen_min_hu = np.inf
    for lo_hu, hi_hu in _vessel_bands():
        cand = ndi.binary_erosion(cand_full & (h_fc > lo_hu) & (h_fc < hi_hu), structure=_SLICE,
                                  iterations=VESSEL_ERODE)
        lab, n = ndi.label(cand)
        if not n:
            continue
        objs = ndi.find_objects(lab)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for i, o in enumerate(objs):
            if o is None:
                continue
            z_ext = (o[0].stop - o[0].start) * sp
            area = sizes[i + 1] * sp ** 3 / max(z_ext, sp)
            if not 60.0 <= area <= 800.0:
                continue
            comp = lab[o] == i + 1
            # A short scan (a few vertebrae) holds less aorta: a tube through nearly all of it.
            # A vessel that runs into a blood pool (the IVC into the right atrium) or out of the
            # view is seen only up to there: half the length. (T6-T11 portal-venous phantom: a
            # 51 mm IVC from the view's end, 1568 voxels in the T11 label, Dice 0.81 -> 0.94)
            min_len_mm = min(VESSEL_MIN_LENGTH_MM, 0.8 * nz * sp)
            cut = o[0].start + z_off == 0 or o[0].stop + z_off >= nz
            if cut or (comp & edge_fc[o]).any():
                min_len_mm *= 0.5
            if z_ext < min_len_mm:
                continue
            # The aorta runs beside the midline; bodies (and a column merged with them) straddle it.
            # (the midline level with the bodies: an aorta in front of them crosses it; lumbar
            # aorta in front of a scoliotic column, 41 % of its voxels within 8 mm of the canal's
            # line, 35-58 mm in front of its wall, was kept: arterial L1-L5 phantom, Dice 0.83)
            # (per slice, below, every voxel near the midline counts: a slice where the tube has
            # merged with a body holds the body's front too)
            mid_vox = comp & (np.abs(dx_fc[o]) < VESSEL_MIDLINE_MM)
            if (mid_vox & (ahead_fc[o] < VESSEL_MIDLINE_DEPTH_MM)).sum() < VESSEL_MIDLINE_SHARE * comp.sum():
                per_slice = comp.sum(axis=(1, 2)) * sp * sp
                # Clean slices: a vessel-sized cross-section away from the midline (a slice
                # holding body bone straddles the midline).
                good = ((per_slice >= 60.0) & (per_slice <= VESSEL_MAX_AREA_MM2)
                        & (mid_vox.sum(axis=(1, 2)) * sp * sp < VESSEL_MIDLINE_SHARE * np.maximum(per_slice, 1.0)))
                # ... of the tube's own size (a partly merged slice is bigger; a smaller one is the
                # tube partly hidden in a blood pool).
                if good.any():
                    ref_area = float(np.median(per_slice[good]))
                    in_pool = (comp & edge_fc[o]).any(axis=(1, 2))
                    good &= (np.abs(per_slice - ref_area) < 0.3 * ref_area) | (
                        in_pool & (per_slice < 1.3 * ref_area))
                # A vessel keeps its cross-section along its run: it merges with a body in some
                # slices, but the discs between leave it clean. The marrow of a row of bodies whose
                # front cortex is faint (a native CT turned a few degrees, resampled linearly) runs
                # as a tube of the portal-venous band and passes the tests here only in scattered
                # slices, the bodies wider and the discs narrower than a vessel: 2-20 % of them
                # (under 15 % in runs of at most 6 mm) on the real 3 mm CT turned or shifted
                # (turned 2 degrees about the long axis: 8,700 working voxels of T12 and L1 taken,
                # L1 whole 0.767 -> 0.888; 5 degrees sagittally: 18,000 of T12-L3; at 15 % four
                # copies kept a false tube of 16-20 %, turned 5 degrees about the long axis T12
                # 0.667 -> 0.858 at 25 %). Tubes of the phantoms' vessels: 9-100 %, each under 25 %
                # in a run of 8 mm or more (in the widest band, an aorta merged with the column
                # along a kyphotic chest view: 5 %, a 12 mm run). The real slab's contrast tubes:
                # 7-33 % (one of 22 %, a vessel at 15 %, no longer is; the slab's results unchanged).
                run_starts, run_ends = true_runs(good)
                longest_run_mm = (run_ends - run_starts).max(initial=0) * sp
                if good.sum() < VESSEL_CLEAN_SHARE * good.size and longest_run_mm < VESSEL_CLEAN_RUN_MM:
                    continue
                # The lumen's own HU (contrast is uniform along the tube): brighter voxels next to
                # it are cortex or a calcified wall, and stay.
                in_good = comp & good[:, None, None]   # (the tube in its clean slices)
                lumen_hu = h_fc[o][in_good]
                q1, q3 = np.percentile(lumen_hu, [25, 75])
                # Only a homogeneous tube is a vessel. Runs of bone pass the shape tests above:
                # on a short scan a tube of dense marrow and disc (real 2 mm slab, IQR 126 HU; the
                # aorta 10 HU), on a native CT the L5/S1 bodies with the sacral alae in the
                # trabecular band (real 3 mm CT: IQR 68 and 137 HU, 4146 working voxels of bone
                # taken out with L5's posterior wall while they were taken as vessels).
                if q3 - q1 > VESSEL_MAX_IQR_HU:
                    continue
                tube_min_hu, tube_max_hu = _lumen_hu_range(lumen_hu)
                # Nor a tube inside the bodies' cortical rings: a vessel runs in front of or beside
                # them, so most of its lumen has bone in few in-plane directions. (Only where the
                # lumen is darker than bone: a contrast lumen brighter than BONE_HU counts as bone
                # there and encloses itself.) Marrow of the trabecular band ran as a 60 mm "tube"
                # through T12 and L1 of the native real 3 mm CT cut one slice short (half the length
                # suffices at the view's end): 79 % of it enclosed, T12 / L1 whole 0.902 / 0.915 ->
                # 0.860 / 0.876; the phantoms' dark lumens 0-15 %, the real slab's aorta 5-10 %.
                if (tube_min_hu <= BONE_HU and (enc_fc[o][in_good] >= TRABECULAR_MIN_DIRS).mean()
                        > VESSEL_ENCLOSED_SHARE):
                    continue
                lumen_max_hu = max(lumen_max_hu, tube_max_hu)
                lumen_min_hu = min(lumen_min_hu, tube_min_hu)
                del lumen_hu
                # (not the voxels brighter than the lumen: where the cortex of a body next to the
                # tube is dim (low-density bone at high keV) its flanks join the band and the tube,
                # and the rim growth below ran from them into the marrow. Arterial T10-L3 phantom at
                # 79 keV: 5,400 marrow voxels of T10 taken, body Dice 0.82 -> 0.95)
                # Nor a thin crescent of a body's cortex, blurred to the lumen's HU, that joins the
                # tube in a clean slice: the tube is opened in-plane (its lumen is several voxels
                # across, the crescent one), then regrown two voxels within itself, which restores
                # the lumen's thin wedge against a body but not the crescent running on along the
                # body's ring. (Random arterial T10-L1 at 2x2x1.25 mm, T10 at 82 mg/cm3: the rim
                # growth ran from the crescent into the marrow, T10 / L1 bodies 0.828 / 0.906 ->
                # 0.964 / 0.946; opened only, the wedges stayed as bone: arterial T4-T8 bodies
                # -0.002 to -0.006.) A piece the opening cut off stays where the opened tube of the
                # slice above or below holds it: noise splits a lumen in one slice, not a crescent
                # from the body's ring in the next (random noisy arterial T9-T12 at 0.7x0.7x1 mm:
                # a lumen island left in T12, body 0.902 -> 0.899 without this).
                opened = ndi.binary_opening(comp, structure=_SLICE)
                lumen = ndi.binary_dilation(opened, structure=_SLICE, iterations=2, mask=comp)
                lumen[1:] |= comp[1:] & opened[:-1]
                lumen[:-1] |= comp[:-1] & opened[1:]
                del opened
                lumen &= good[:, None, None]
                # A tube is round and moves little from slice to slice: in-plane pieces away from
                # its axis (a body's marrow or blurred endplate of the lumen's HU, joined to the
                # tube in another slice) are not this vessel, nor pieces beside it that are not of
                # the lumen's HU (a body's blurred cortex or marrow). (One component can hold two
                # vessels side by side, the aorta and the IVC where they touch: each has its axis.)
                pieces, _ = ndi.label(lumen, structure=_SLICE)
                lumen_like = _lumen_like_pieces(pieces, h_fc[o], *_core_hu_range(h_fc[o], in_good))
                axes, on_axis, beside_axis = _tube_axes(pieces, lumen_like)
                lumen = (on_axis | (beside_axis & lumen_like))[pieces]
                del pieces
                vessel_fc[o] |= lumen & (h_fc[o] <= tube_max_hu)
                # Slices where the vessel has merged with a body (too big a cross-section): the
                # vessels' cross-sections carried over from the clean slices around (a disc of
                # each one's radius on its axis), so the body's own bone stays.
                bad = np.nonzero(~good & (per_slice > 0))[0]
                # (Beyond the clean slices the axis is the nearest one's, held still while the
                # vessel moves on: only up to TUBE_HOLD_MM. Random arterial T8-T12 at 0.7x0.7x2.5
                # mm: in the widest band the aorta's tube was clean only from 45 mm above T12, and
                # the disc held there lay on T12's blurred lateral wall: 1,199 of the body's voxels
                # taken as blood, T12 body 0.866 -> 0.946. At 15 mm the lumbar views' discs carried
                # to L5 went too: L5 -0.006 to -0.034.)
                clean = np.nonzero(good)[0]
                bad = bad[np.maximum(clean[0] - bad, bad - clean[-1]) * sp <= TUBE_HOLD_MM]
                if good.sum() >= 2 and bad.size:
                    yy_o = np.arange(o[1].stop - o[1].start)[:, None]
                    xx_o = np.arange(o[2].stop - o[2].start)[None, :]
                    for k in bad:
                        k_o = (o[0].start + k, o[1], o[2])
                        for axis_y, axis_x, r_vox in axes:
                            tube = (yy_o - axis_y[k]) ** 2 + (xx_o - axis_x[k]) ** 2 <= (r_vox + 0.5) ** 2
                            vessel_fc[k_o] |= tube & cand[k_o] & (h_fc[k_o] < lumen_max_hu)
                if good.sum() >= 2:
                    tubes.append((o, good, axes[0], tube_min_hu, tube_max_hu))
                del lumen
    found = vessel_fc.copy()
    bright_enc = None
    for o, good, axis, tube_min_hu, tube_max_hu in tubes:
        enc = enc_fc
        if tube_min_hu > BONE_HU:
            if bright_enc is None:
                bright_enc = _bright_lumen_enclosure(h_fc, lumen_max_hu, sp)
            enc = bright_enc
        _carry_tube(vessel_fc, found, h_fc, enc, o, good, axis, tube_min_hu, tube_max_hu)
    del found
    if vessel_fc.any():
        vessel_fc |= _vessel_branches(cand_full, vessel_fc, h_fc, dx_fc, lumen_min_hu, lumen_max_hu, sp)
        vessel_fc |= (ndi.binary_dilation(vessel_fc, structure=_SLICE, iterations=VESSEL_ERODE) & cand_full
                      & (h_fc < lumen_max_hu))
        # The lumen's rim next to a body lies within the cortex clearance, so it was never a
        # blood candidate (a calcified wall is cortex-bright too): grown there over lumen-HU
        # voxels in front of the canal that no cortical ring encloses in-plane (portal-venous
        # marrow has the lumen's HU, but it lies inside the body's ring; the ring is brighter).
        vessel_fc = _grow_rim(vessel_fc, zone_fc, h_fc, lumen_min_hu, lumen_max_hu, enc_fc, sp)
        if lumen_min_hu < lumen_max_hu:
            # The lumen's partial-volume rim, darker than the lumen (a voxel or two thick at
            # coarse spacing, and trabecular-bright): grown downhill only, each voxel no
            # brighter than its grown neighbour, so it stops in the soft-tissue valley before a
            # body, and never over a voxel of lumen HU or brighter, so never across a cortex.
            # (The lumen counts as bone in the enclosure count: that count cannot guard it.)
            # Nor into marrow darker than bone that a bright ring encloses in-plane: a thin
            # cortex blurred to the lumen's HU is no brighter than the lumen, so the growth
            # crossed it into an osteoporotic body (arterial T5 at 43 mg/cm3, 0.7x0.7x3 mm:
            # body 0.852 -> 0.920).
            ring = h_fc > BONE_HU
            lower = zone_fc & (h_fc < lumen_min_hu) & ~(fill_holes(ring, structure=_SLICE) & ~ring)
            del ring
            for _ in range(max(1, int(round(VESSEL_RIM_MM / sp)))):
                vessel_fc |= lower & (h_fc <= ndi.maximum_filter(np.where(vessel_fc, h_fc, -np.inf), footprint=_SLICE))
    return vessel_fc, lumen_min_hu, lumen_max_hu


def _bright_lumen_enclosure(h_fc, lumen_max_hu, sp):
    """In-plane directions with bone about a lumen brighter than BONE_HU, for carrying its tube on.
    Such a lumen counts as bone in the enclosure count, so every voxel of it is enclosed there
    and the carry stopped at once; its bone is what is brighter than the lumens, the cortex.
    (Random arterial T7-T12 at 1.5x1.5x1.25 mm, 19 mm scoliosis: the aorta's tube merged with T12
    over the view's last 33 mm, where a disc held on the tube's end missed half the bending
    lumen; it stayed in T12, whole / body 0.880 / 0.854.)"""
    return _enclosed(h_fc > lumen_max_hu, int(round(ENCLOSURE_REACH_MM / sp)))


def _carry_tube(vessel_fc, found, h_fc, enc_fc, o, good, axis, min_hu, max_hu) -> None:
    """Carry a vessel found as a tube on past its tube's ends towards the view's ends, slice by
    slice, while a disc of its radius about its axis is still mostly lumen (in place). Where the
    aorta runs beside a blood pool (the heart at a thoracic view's top) the pool's edge takes
    part of its candidates, the tube ends there, and the lumen left beyond joins the column
    (portal-venous T7-L1 at 2x2x3 mm: 85 aorta voxels in T7, its top 54 mm of aorta unfound).
    Only where no tube is `found` further on along it (between two tubes of one vessel it has
    merged with a body, and a disc carried there took the body's rim: portal-venous T4-T10 at
    1x1x3 mm, T5 body 0.914 -> 0.873), and only voxels of the lumen's HU that no bone ring
    encloses in-plane (a body's marrow has the lumen's HU there)."""
    axis_y, axis_x, r_vox = axis
    ks = np.nonzero(good)[0]
    ny, nx = vessel_fc.shape[1:]
    yy = np.arange(ny)[:, None]
    xx = np.arange(nx)[None, :]
    r = max(r_vox, 1.5)
    for k_end, step, stop in ((ks[-1], 1, vessel_fc.shape[0]), (ks[0], -1, -1)):
        cy, cx = axis_y[k_end] + o[1].start, axis_x[k_end] + o[2].start
        k = k_end + o[0].start + step
        ahead = found[o[0].stop:] if step > 0 else found[:o[0].start]   # (beyond its own tube's box)
        if (ahead.any(axis=0) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2.0) ** 2)).any():
            continue
        while k != stop:
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            like = (h_fc[k] >= min_hu) & (h_fc[k] <= max_hu) & (enc_fc[k] < VESSEL_ENCLOSED_DIRS)
            disc = d2 <= r * r
            if (like & disc).sum() < TUBE_CARRY_SHARE * disc.sum():
                break
            lumen = like & (d2 <= (r + 1.0) ** 2)     # (and its rim)
            vessel_fc[k] |= lumen
            ly, lx = np.nonzero(lumen)
            cy, cx = ly.mean(), lx.mean()          # (it follows the vessel's bends)
            k += step


def _tube_axes(pieces, lumen_like=None):
    """The vessels in a tube's lumen, given as its in-plane pieces (labels, slices first, 0
    outside), and which pieces are theirs. `lumen_like`: per label, whether the piece has the
    lumen's HU (all, if None). Returns [(axis_y, axis_x, radius)] in voxels (axes per slice), and
    per label whether it lies on an axis (within TUBE_AXIS_ON_VOX) and whether it reaches within
    radius + TUBE_AXIS_MARGIN_VOX of one. An axis is the deepest point of the lumen not yet given
    to an axis (farthest in-plane from its outline), median-filtered over TUBE_AXIS_SLICES slices
    that hold some (one slice's deepest point may lie in a piece that is not the vessel),
    interpolated over the slices without; its radius, from the median in-plane area of the pieces
    on it. The first axis always counts; a further one where pieces of the lumen's HU lie on it in
    at least TUBE_AXIS_SUPPORT of the slices with lumen (a second vessel along the first, not
    marrow pieces here and there, nor a body's blurred wall)."""
    nz, ny, nx = pieces.shape
    lumen = pieces > 0
    area = np.bincount(pieces.ravel())
    like = np.ones(area.size, bool) if lumen_like is None else np.asarray(lumen_like, bool)
    piece_z = np.array([sl[0].start for sl in ndi.find_objects(pieces)], int)
    yy = np.arange(ny)[None, :, None]
    xx = np.arange(nx)[None, None, :]
    k_all = np.arange(nz)
    with_lumen = lumen.any(axis=(1, 2)).sum()
    axes = []
    on_axis = np.zeros(area.size, bool)
    beside = np.zeros(area.size, bool)
    left = lumen.copy()
    while left.any() and len(axes) < TUBE_MAX_AXES:
        ks = np.nonzero(left.any(axis=(1, 2)))[0]
        depth = ndi.distance_transform_edt(left, sampling=(1e3, 1.0, 1.0))   # in-plane only
        ys, xs = np.unravel_index(depth[ks].reshape(ks.size, -1).argmax(axis=1), (ny, nx))
        del depth
        w = min(TUBE_AXIS_SLICES, ks.size if ks.size % 2 else ks.size - 1)
        if w > 1:
            ys = ndi.median_filter(ys.astype(float), size=w, mode="nearest")
            xs = ndi.median_filter(xs.astype(float), size=w, mode="nearest")
        axis_y, axis_x = np.interp(k_all, ks, ys), np.interp(k_all, ks, xs)
        d2 = (yy - axis_y[:, None, None]) ** 2 + (xx - axis_x[:, None, None]) ** 2
        on = np.unique(pieces[left & (d2 <= TUBE_AXIS_ON_VOX ** 2)])
        on = on[on > 0]
        per_slice = np.bincount(piece_z[on - 1], weights=area[on], minlength=nz)
        # (A crescent of a low-density body's wall, cortex-bright inside and joined to the aorta in
        # other slices, lay on a second axis in most slices; taken as a vessel, its rim growth took
        # the marrow. Arterial T4-T7 at 0.9x0.9x3 mm, T5 at 74 mg/cm3: 16 % of that axis's pieces
        # had the lumen's HU, the aorta's 89 %; T5 0.828 / 0.776 -> 0.885 / 0.891.)
        like_slices = np.bincount(piece_z[on - 1], weights=like[on], minlength=nz) > 0
        if axes and like_slices.sum() < TUBE_AXIS_SUPPORT * with_lumen:
            break
        r_vox = float(np.sqrt(np.median(per_slice[per_slice > 0]) / np.pi)) if on.size else 1.0
        axes.append((axis_y, axis_x, r_vox))
        near = np.unique(pieces[left & (d2 <= (r_vox + TUBE_AXIS_MARGIN_VOX) ** 2)])
        on_axis[on] = True
        beside[near] = True
        left &= ~beside[pieces]
    on_axis[0] = beside[0] = False
    return axes, on_axis, beside


def _lumen_hu_range(hu):
    """HU range of a lumen from its voxels' HU: Tukey-fenced (the few marrow / cortex voxels a
    tube takes in drop out), from the 1st to the 99th centile widened by VESSEL_LUMEN_MARGIN_HU."""
    q1, q3 = np.percentile(hu, [25, 75])
    fence = 1.5 * (q3 - q1)
    hu = hu[(hu >= q1 - fence) & (hu <= q3 + fence)]
    return (float(np.percentile(hu, 1)) - VESSEL_LUMEN_MARGIN_HU,
            float(np.percentile(hu, 99)) + VESSEL_LUMEN_MARGIN_HU)


def _core_hu_range(h, tube):
    """HU range of a tube's lumen from its core: two in-plane steps in from its outline, so
    neither the lumen's partial-volume rim nor a thin piece of a body's cortex or marrow joined
    to it (the whole tube where the core is under 20 voxels)."""
    core = ndi.binary_erosion(tube, structure=_SLICE, iterations=2)
    return _lumen_hu_range(h[core] if core.sum() >= 20 else h[tube])


def _lumen_like_pieces(pieces, h, min_hu, max_hu):
    """Per label of a tube's in-plane lumen pieces (`pieces`, 0 outside): whether its HU is the
    lumen's, median between min_hu and max_hu and homogeneous (interquartile range under
    VESSEL_MAX_IQR_HU). A slice of a tube can hold, beside the vessel's cross-section, pieces of a
    body's blurred cortex or low-density marrow joined to it in the slices above or below:
    brighter than the lumen, or darker, or mixed (the rim growth ran from them into the marrow)."""
    n = int(pieces.max())
    keep = np.zeros(n + 1, bool)
    if n:
        idx = np.arange(1, n + 1)
        stats = ndi.labeled_comprehension(h, pieces, idx, lambda v: np.percentile(v, [25, 50, 75]), object, None)
        for i, (q1, med, q3) in zip(idx, stats):
            keep[i] = min_hu <= med <= max_hu and q3 - q1 <= VESSEL_MAX_IQR_HU
    return keep


def _grow_rim(blood, zone, h, lumen_min_hu, lumen_max_hu, enc, sp, rim_mm=VESSEL_RIM_MM):
    """`blood` grown in-plane by `rim_mm` over `zone` voxels of the lumen's HU (between
    lumen_min_hu and lumen_max_hu) that no cortical ring encloses (`enc`, in-plane directions with
    bone, under VESSEL_ENCLOSED_DIRS): the rim of a vessel or blood pool against a body, which the
    cortex clearance kept out of the blood candidates. All arrays on one crop."""
    room = zone & (h > lumen_min_hu) & (h < lumen_max_hu) & (enc < VESSEL_ENCLOSED_DIRS)
    return ndi.binary_dilation(blood, structure=_SLICE, mask=room | blood,
                               iterations=max(1, int(round(rim_mm / sp))))


def _vessel_branches(cand_full, vessel_fc, h_fc, dx_fc, lumen_min_hu, lumen_max_hu, sp):
    """Branches of the contrast tubes found (common iliac arteries): too short and too thin to be
    found as tubes themselves, and at coarse spacing blurred below the lumen's HU range. Pieces
    of the blood candidates (one in-plane erosion, as for the tubes) no brighter than the lumen,
    homogeneous, of a vessel's cross-section, off the midline, at least BRANCH_MIN_LENGTH_MM
    long, whose median HU is the lumen's, within BRANCH_GAP_MM of a tube found."""
    lo_hu = lumen_min_hu - BRANCH_BLUR_HU
    cand = ndi.binary_erosion(cand_full & (h_fc > lo_hu) & (h_fc < lumen_max_hu) & ~vessel_fc,
                              structure=_SLICE, iterations=VESSEL_ERODE)
    lab, n = ndi.label(cand)
    out = np.zeros_like(vessel_fc)
    if not n:
        return out
    near = ndi.distance_transform_edt(~vessel_fc, sampling=sp) <= BRANCH_GAP_MM
    for i, o in enumerate(ndi.find_objects(lab)):
        comp = lab[o] == i + 1
        if (o[0].stop - o[0].start) * sp < BRANCH_MIN_LENGTH_MM or not (comp & near[o]).any():
            continue
        per_slice = comp.sum(axis=(1, 2)) * sp * sp
        if per_slice.max() > BRANCH_MAX_AREA_MM2:
            continue
        if (comp & (np.abs(dx_fc[o]) < VESSEL_MIDLINE_MM)).sum() >= VESSEL_MIDLINE_SHARE * comp.sum():
            continue
        h = h_fc[o][comp]
        q1, med, q3 = np.percentile(h, [25, 50, 75])
        if q3 - q1 <= VESSEL_MAX_IQR_HU and lumen_min_hu <= med <= lumen_max_hu:
            out[o] |= comp
    return out


def _vessel_bands():
    """HU bands the vessel tubes are searched in: all blood candidates first (the contrast band
    and portal-venous blood), then narrower bands stepped over VESSEL_HU."""
    lo = np.arange(VESSEL_BAND_LOW_HU, VESSEL_HU[1] - VESSEL_BAND_HU + 1.0, VESSEL_BAND_STEP_HU)
    return [(-np.inf, np.inf)] + [(float(a), float(a + VESSEL_BAND_HU)) for a in lo]


def _front_crop(canal, z_lo, z_hi, shape, sp):
    """The region in front of the canal that the vessel tests search: the column box widened
    by a blood pool ball's diameter anteriorly and its radius laterally, so a pool the box cuts
    is still seen whole."""
    r_mm = BLOOD_POOL_RADIUS_MM
    cy, cx = canal["cy"][z_lo:z_hi + 1], canal["cx"][z_lo:z_hi + 1]
    ny, nx = shape[1:]
    y0 = max(0, int(np.floor(cy.min() - (ROI_ANTERIOR_MM + 2 * r_mm) / sp)))
    y1 = min(ny, int(np.ceil(cy.max())) + 1)
    x0 = max(0, int(np.floor(cx.min() - (ROI_LATERAL_MM + r_mm) / sp)))
    x1 = min(nx, int(np.ceil(cx.max() + (ROI_LATERAL_MM + r_mm) / sp)) + 1)
    return slice(z_lo, z_hi + 1), slice(y0, y1), slice(x0, x1)


def _blood_pools(blood, hu_s, body, canal, front_mm, crop, enc_fc, sp):
    """Contrast-enhanced blood pools in front of the column (heart chambers, aneurysms): the
    union of balls of radius BLOOD_POOL_RADIUS_MM inside blood-like tissue (a morphological
    opening by distance maps) in the front crop. No vertebral body holds such a ball: bodies are
    under 40 mm tall between their discs. Returns the mask (full grid) and the pool's HU range
    (None, None when there is none)."""
    r_mm = BLOOD_POOL_RADIUS_MM
    zs, ys, _ = crop
    cy = canal["cy"][zs]
    dy = (np.arange(ys.start, ys.stop)[None, :, None] - cy[:, None, None]) * sp
    zone = body[crop] & (dy < front_mm[zs] - 4.0)
    cand = blood[crop] & zone
    if not cand.any():
        return None, None
    # Noise leaves single voxels of a pool below the blood threshold (portal-venous blood,
    # 150 HU, 28 HU noise at 2 mm: ~4 %, in clusters), and no ball fits between them: pockets up
    # to POOL_HOLE_MM2 that a slice of blood encloses are blood too. (Noisy T8-L1 phantom: largest
    # ball 12 mm, 12,208 heart voxels stayed in the labels and merged T8 with T9; pockets up to
    # 16 / 120 / 320 mm2 filled: merged / T9 0.877 / 0.896.) Larger pockets, and any pocket of
    # soft tissue or bone, stay out: filling them took tissue between the heart, the aorta and
    # the bodies (arterial T8-T12 phantom, T8 body 0.896 -> 0.859; arterial T8-L2, 0.924 ->
    # 0.906); the same fill in the vessel bands took the real 2 mm slab's T12 0.710 -> 0.668.
    h = hu_s[crop]
    holes = fill_holes(cand, structure=_SLICE) & ~cand
    lab, n = ndi.label(holes, structure=_SLICE)
    if n:
        small = np.bincount(lab.ravel(), minlength=n + 1) * sp * sp <= POOL_HOLE_MM2
        small[0] = False
        # (only voxels just darker than blood: soft tissue and bone in a pocket stay out)
        cand |= small[lab] & (h > TRABECULAR_HU - POOL_HOLE_BELOW_HU) & (h < VESSEL_HU[0])
    del holes, lab
    seeds = ndi.distance_transform_edt(cand, sampling=sp) > r_mm
    if not seeds.any():
        return None, None
    core = (ndi.distance_transform_edt(~seeds, sampling=sp) <= r_mm) & cand
    # The opening leaves the pool's rim where it meets a body: grown back a voxel over voxels
    # no brighter than the pool itself (the cortex is brighter and stays).
    lumen_max_hu = float(np.percentile(h[core], 99)) + VESSEL_LUMEN_MARGIN_HU
    core = ndi.binary_dilation(core, structure=_SLICE, iterations=BLOOD_POOL_RIM_VOX, mask=cand & (h < lumen_max_hu))
    # Portal-venous blood (~150 HU) is a candidate only BLOOD_CORTEX_CLEARANCE_MM clear of the
    # cortex, so a pool lying on a body keeps a rim that thick there: grown over it as the
    # aorta's rim is, over voxels of the pool's HU that no cortical ring encloses (marrow has
    # that HU too, but lies inside its ring). (T6-T11 portal-venous phantom: 617-778 heart
    # voxels in the T7/T8 labels, whole Dice 0.90/0.88; now 38-43, 0.937/0.94)
    lumen_min_hu = float(np.percentile(h[core], 1)) - VESSEL_LUMEN_MARGIN_HU
    core = _grow_rim(core, zone, h, lumen_min_hu, lumen_max_hu, enc_fc, sp)
    pool = np.zeros(blood.shape, bool)
    pool[crop] = core
    return pool, (lumen_min_hu, lumen_max_hu)


def _pool_wedges(pool_fc, vessel_fc, cand_fc, h_fc, enc_fc, pool_hu, sp):
    """Where a blood pool narrows into a wedge (a heart chamber between a body and the lung), no
    ball of the opening reaches, and the rim growth stops VESSEL_RIM_MM short: the wedge's blood,
    joined to the body, stayed in its labels. Once the vessels are known, the pool is grown
    POOL_WEDGE_MM over blood candidates (`cand_fc`, clear of the cortex) of its HU that no ring
    encloses, neither over the vessels nor through them. Returns the voxels added; all arrays on
    the front crop. (Noisy portal-venous T8-L1 at 2 mm: 270 heart voxels in T9, 2-12 mm from the
    balls' reach; T9 0.894 / 0.882 -> 0.911 / 0.916. Grown so far before the vessel search, the
    pool took an aorta beside a chamber as its rim and lost its tube; grown over any voxel of the
    pool's HU, it took the front of the discs and moved a disc plane.)"""
    free = ~vessel_fc
    grown = _grow_rim(pool_fc & free, cand_fc & free, h_fc, *pool_hu, enc_fc, sp, POOL_WEDGE_MM)
    return grown & ~pool_fc     # (grown within `free` only)
