"""Trabecular ROI: cortex kept out, mid-vertebral ellipse in the body's own frame, robust stats, flags."""

from __future__ import annotations

import numpy as np
import pytest

from spinekit import levels as lv
from spinekit.bmd.bench import synthetic_column
from spinekit.bmd.roi import (MID_AP_SEMI_AXIS, MID_DEPTH_CENTRE_FROM_POSTERIOR, MID_HEIGHT_MM, MID_LR_SEMI_AXIS,
                              level_crops, roi_margin_mm, roi_statistics, trabecular_roi, trabecular_rois)

DENSITIES = {"T12": 60.0, "L1": 100.0, "L2": 150.0, "L3": 200.0, "L4": 80.0}


@pytest.fixture(scope="module", params=[1.5, 2.0])
def column(request):
    sp = request.param
    # Blur of 0.7 voxel (a standard kernel) and 10 HU noise; tilted 12 degrees.
    return synthetic_column(spacing_zyx_mm=(sp, sp, sp), densities_mg_cm3=DENSITIES, noise_hu=10.0,
                            blur_mm=0.7 * sp, tilt_deg=12.0, seed=1)


@pytest.mark.parametrize("mode", ["whole", "mid"])
def test_roi_mean_matches_true_trabecular_hu(column, mode):
    sp = column.spacing_zyx_mm
    rois = trabecular_rois(column.bodies, sp, mode)
    stats = roi_statistics(column.ct, rois, sp)
    whole_body = roi_statistics(column.ct, column.bodies, sp)
    assert set(lv.level_name(k) for k in stats) == set(DENSITIES)
    for vid, st in stats.items():
        truth = column.truth[st.level]["trabecular_hu"]
        # Noise 10 HU: the standard error is < 0.6 HU for >= 300 voxels; allow 3 HU of
        # residual cortical partial volume (the whole body reads > 100 HU too high).
        assert abs(st.hu_mean - truth) < 3.0, (mode, st.level, st.hu_mean, truth)
        assert abs(st.hu_median - truth) < 3.0
        assert whole_body[vid].hu_mean - truth > 100.0  # the cortex is really there
        assert not st.flags
        # every ROI voxel is in the (noise-free) trabecular interior of its own body
        assert column.trabecular[rois == vid].all()
        assert (column.bodies[rois == vid] == vid).all()


def test_margin_scales_with_resolution():
    assert roi_margin_mm((1.0, 1.0, 1.0)) < roi_margin_mm((2.0, 1.0, 1.0)) < roi_margin_mm((3.0, 3.0, 3.0))
    assert roi_margin_mm((0.5, 0.5, 0.5)) >= 3.0


def test_mid_roi_is_comp2comp_ellipse_in_the_body_frame():
    sp = (1.0, 1.0, 1.0)
    depth, width, tilt = 32.0, 42.0, 15.0
    col = synthetic_column(spacing_zyx_mm=sp, depth_mm=depth, width_mm=width, tilt_deg=tilt)
    vid = lv.level_id("L2")
    roi = trabecular_roi(col.bodies, sp, vid, mode="mid")
    assert roi.any()
    pts = np.argwhere(roi) * np.asarray(sp)
    centre_body = np.argwhere(col.bodies == vid).mean(axis=0) * np.asarray(sp)
    # local axes of the synthetic column: superior w, anterior v (see synthetic_column)
    th = np.deg2rad(tilt)
    w_ax = np.array([np.cos(th), -np.sin(th), 0.0])
    v_ax = -np.array([np.sin(th), np.cos(th), 0.0])
    u_ax = np.array([0.0, 0.0, 1.0])
    rel = pts - centre_body
    w, v, u = rel @ w_ax, rel @ v_ax, rel @ u_ax
    # height ~7.5 mm along the tilted axis, AP ~ 2 x 25 % of depth, LR ~ 2 x 32.5 % of width
    assert abs((w.max() - w.min() + 1.0) - MID_HEIGHT_MM) <= 1.5
    assert abs((v.max() - v.min() + 1.0) - 2 * MID_AP_SEMI_AXIS * depth) <= 2.0
    assert abs((u.max() - u.min() + 1.0) - 2 * MID_LR_SEMI_AXIS * width) <= 2.0
    # centre at 58 % of the depth from the posterior wall, i.e. 0.08 x depth anterior of the centre
    assert abs(v.mean() - (MID_DEPTH_CENTRE_FROM_POSTERIOR - 0.5) * depth) <= 1.0
    assert abs(w.mean()) <= 1.0 and abs(u.mean()) <= 1.0
    # inside the body, away from its cortex
    assert col.trabecular[roi].all()


def test_median_resists_basivertebral_vein_and_island():
    sp = (1.0, 1.0, 1.0)
    col = synthetic_column(spacing_zyx_mm=sp, densities_mg_cm3={"L1": 120.0}, levels=("T12", "L1", "L2"),
                           noise_hu=8.0, seed=3)
    vid = lv.level_id("L1")
    roi = trabecular_roi(col.bodies, sp, vid)
    ct = col.ct.copy()
    pts = np.argwhere(roi)
    c = pts.mean(axis=0)
    # a dark vein channel (blood, ~40 HU) in the posterior middle and a sclerotic island (900 HU)
    zz, yy, xx = np.indices(ct.shape)
    vein = roi & (np.abs(zz - c[0]) < 6) & (yy > c[1] + 4) & (np.abs(xx - c[2]) < 5)
    island = roi & ((zz - c[0]) ** 2 + (yy - c[1] + 6) ** 2 + (xx - c[2] - 8) ** 2 < 9)
    ct[vein] = 40
    ct[island] = 900
    st = roi_statistics(ct, roi.astype(np.uint8) * vid, sp)[vid]
    truth = col.truth["L1"]["trabecular_hu"]
    assert vein.sum() > 0.02 * roi.sum() and island.sum() > 50
    assert abs(st.hu_median - truth) < abs(st.hu_mean - truth)
    assert abs(st.hu_median - truth) < 6.0


def test_small_roi_and_metal_are_flagged():
    sp = (2.0, 2.0, 2.0)
    # a tiny body (crushed to 12 mm): the resolution-scaled shell leaves almost nothing
    col = synthetic_column(spacing_zyx_mm=sp, levels=("T12", "L1", "L2"), deformity={"L1": ("crush", 0.6)})
    rois = trabecular_rois(col.bodies, sp, "whole")
    ct = col.ct.copy()
    l2 = lv.level_id("L2")
    z0 = int(np.argwhere(rois == l2)[0][0])
    ct[z0][rois[z0] == l2] = 2500  # a screw through one ROI slice
    screw_voxels = int((rois[z0] == l2).sum())
    stats = roi_statistics(ct, rois, sp, levels=[lv.level_id("L1")])
    l1 = stats[lv.level_id("L1")]
    assert ("roi_small" in l1.flags) or ("roi_empty" in l1.flags)
    # exactly the screw voxels count as metal (trabecular bone stays far below 2000 HU)
    assert "metal" in stats[l2].flags and stats[l2].metal_voxels == screw_voxels > 0
    assert "metal" not in stats[lv.level_id("T12")].flags and not stats[lv.level_id("T12")].flags


def test_adaptive_shell_keeps_cortex_out_of_a_generous_mask():
    from scipy import ndimage

    sp = (2.0, 2.0, 2.0)
    col = synthetic_column(spacing_zyx_mm=sp, densities_mg_cm3=DENSITIES, noise_hu=10.0, blur_mm=1.4, seed=5)
    # a segmenter one voxel too generous: every body dilated by a voxel into the disc / soft tissue
    grown = ndimage.grey_dilation(col.bodies, size=(3, 3, 3))
    fixed = roi_statistics(col.ct, trabecular_rois(grown, sp, "whole"), sp)
    adaptive = roi_statistics(col.ct, trabecular_rois(grown, sp, "whole", ct=col.ct), sp)
    worst_fixed = max(abs(st.hu_mean - col.truth[st.level]["trabecular_hu"]) for st in fixed.values())
    assert worst_fixed > 5.0  # the cortex does leak into the fixed shell
    for vid, st in adaptive.items():
        assert abs(st.hu_mean - col.truth[st.level]["trabecular_hu"]) < 3.0, st
        assert st.voxels > 300
    # on a correct mask the adaptive shell changes nothing that matters
    exact = roi_statistics(col.ct, trabecular_rois(col.bodies, sp, "whole", ct=col.ct), sp)
    for st in exact.values():
        assert abs(st.hu_mean - col.truth[st.level]["trabecular_hu"]) < 3.0


def test_level_crops_are_each_level_s_padded_box_in_the_whole_volume():
    labels = np.zeros((30, 40, 50), np.uint8)
    labels[5:9, 10:20, 30:35] = 20           # L1, well inside
    labels[0:3, 38:40, 0:4] = 21             # L2, against three faces: the pad is clipped there
    labels[20, 22, 44] = 20                  # a stray L1 voxel widens L1's box
    labels[12:14, 5:7, 5:7] = 99             # no VerSe id: left out
    crops = level_crops(labels, pad=2)
    assert crops == {20: (slice(3, 23), slice(8, 25), slice(28, 47)),
                     21: (slice(0, 5), slice(36, 40), slice(0, 6))}
    assert level_crops(np.zeros((4, 4, 4), np.int16)) == {}
