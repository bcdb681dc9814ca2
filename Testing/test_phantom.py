"""Digital CT spine phantom: the image agrees with its own truth, independently measured.

Every check measures the rendered voxels (masks, HU) and compares with the truth record or with
physics; coarse spacing keeps the file fast. The 512x512x400 timing lives in ``bench_phantom``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from spinekit import physics
from spinekit.errors import InputError
from spinekit.image import read_image
from spinekit.levels import VERSE_IDS
from spinekit.phantom import TISSUE_IDS, CTPhantomConfig, generate_ct_phantom
from spinekit.phantom import ct

SP = (1.5, 1.5, 1.5)


def _kernel_sum_sq(cfg_spacing, blur_fwhm_mm, thickness_mm=None):  # independent of the generator
    """Sum of squared weights of the scanner kernel: the blurred noise's variance per unit white variance."""
    s = blur_fwhm_mm / (2 * np.sqrt(2 * np.log(2)))
    sig = [0.0, s / cfg_spacing[1], s / cfg_spacing[0]]
    if thickness_mm and thickness_mm > cfg_spacing[2]:
        sig[0] = thickness_mm / (2 * np.sqrt(2 * np.log(2))) / cfg_spacing[2]
    d = np.zeros((41, 41, 41))
    d[20, 20, 20] = 1
    return float(np.sum(ndimage.gaussian_filter(d, sig, mode="constant") ** 2))


def _mean_tol(noise_hu, n, ksq):
    """3 standard errors of a region mean under blur-correlated noise (white var = noise^2 / ksq)."""
    return 3.0 * noise_hu / np.sqrt(max(n, 1) * ksq)


def _erode_mm(mask, spacing_xyz, mm):
    """Erode by at least `mm` along every axis (anisotropic spacing aware)."""
    out = mask
    for axis, s in zip((2, 1, 0), spacing_xyz):
        n = int(np.ceil(mm / s))
        st = np.zeros((3, 3, 3), bool)
        st[1, 1, 1] = True
        idx = [1, 1, 1]
        for k in (0, 2):
            idx[axis] = k
            st[tuple(idx)] = True
        out = ndimage.binary_erosion(out, st, iterations=n)
    return out


@pytest.fixture(scope="module")
def default_phantom():
    return generate_ct_phantom(spacing_mm=SP, first_level="T10", last_level="L5",
                               fractures={"L1": ("wedge", 2), "L3": ("biconcave", 1), "T12": ("crush", 3)})


def _measure_heights(ph, name):
    """Body heights along the truth axis at 15/50/85 % of the AP depth (mid-sagittal line)."""
    t = ph.truth["levels"][name]
    c = np.array(t["center_lps_mm"])
    sup, post = np.array(t["axis_superior"]), np.array(t["axis_posterior"])
    b = t["body_depth_mm"] / 2
    ws = np.arange(-25, 25, 0.05)
    out = []
    for f in (0.15, 0.50, 0.85):
        pts = c + (-b + 2 * b * f) * post + ws[:, None] * sup
        idx = ph.bodies.physical_to_index(pts).T
        vals = ndimage.map_coordinates(ph.bodies.array, idx, order=0, mode="constant")
        out.append(float(np.sum(vals == t["verse_id"]) * 0.05))
    return out


# --- truth consistency -----------------------------------------------------------------------
def test_trabecular_core_hu_matches_truth(default_phantom):
    ph = default_phantom
    ksq = _kernel_sum_sq(SP, ph.config.blur_fwhm_mm)
    img = ph.image.array.astype(float)
    for name, t in ph.truth["levels"].items():
        core = _erode_mm(ph.bodies.array == t["verse_id"], SP, 4.0)
        n = int(core.sum())
        assert n > 50, name
        mean = img[core].mean()
        # Allowance 1 HU: int16 rounding is unbiased; the 1 mm cortex is >4 mm from the core.
        assert abs(mean - t["true_trabecular_hu"]) < _mean_tol(ph.config.noise_hu, n, ksq) + 1.0, name
        assert t["true_trabecular_hu"] == pytest.approx(
            physics.trabecular_hu(t["density_mg_cm3"], 70.0, 0.0), abs=1e-9)


def test_noise_free_core_is_exact_and_fat_marrow_obeys_physics():
    ph = generate_ct_phantom(spacing_mm=(2.0, 2.0, 2.0), first_level="L1", last_level="L3", noise_hu=0.0,
                             marrow_fat_fraction=0.4, effective_kev=60.0, include_sacrum=False,
                             densities_mg_cm3={"L1": 60.0, "L2": 110.0, "L3": 200.0})
    img = ph.image.array.astype(float)
    for name, dens in {"L1": 60.0, "L2": 110.0, "L3": 200.0}.items():
        t = ph.truth["levels"][name]
        core = _erode_mm(ph.bodies.array == t["verse_id"], (2, 2, 2), 4.0)
        expected = physics.trabecular_hu(dens, 60.0, 0.4)
        assert t["true_trabecular_hu"] == pytest.approx(expected)
        assert np.abs(img[core] - expected).max() <= 0.5 + 1e-6  # only int16 rounding
        assert physics.density_from_hu(img[core].mean(), 60.0, 0.4) == pytest.approx(dens, abs=1.0)


def test_body_volume_matches_analytic(default_phantom):
    for name, t in default_phantom.truth["levels"].items():
        mask_cm3 = int((default_phantom.bodies.array == t["verse_id"]).sum()) * np.prod(SP) / 1000
        assert mask_cm3 == pytest.approx(t["body_volume_cm3"])
        # Voxel-centre sampling of a smooth 20-40 cm3 body at 1.5 mm: a few percent at most.
        assert mask_cm3 == pytest.approx(t["body_volume_analytic_cm3"], rel=0.04), name
    l2 = default_phantom.truth["levels"]["L2"]
    a, b = l2["body_width_mm"] / 2, l2["body_depth_mm"] / 2
    assert l2["body_volume_analytic_cm3"] == pytest.approx(np.pi * a * b * l2["height_posterior_mm"] / 1000, rel=2e-3)


def test_heights_in_truth_match_mask(default_phantom):
    for name, t in default_phantom.truth["levels"].items():
        measured = _measure_heights(default_phantom, name)
        truth = [t["height_anterior_mm"], t["height_middle_mm"], t["height_posterior_mm"]]
        # Nearest-voxel sampling along a tilted line: within about one voxel diagonal.
        assert np.allclose(measured, truth, atol=2.0 * SP[2]), (name, measured, truth)


def test_fracture_heights_follow_genant_grade(default_phantom):
    lv = default_phantom.truth["levels"]
    bands = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 1.0)}
    checks = {"L1": ("wedge", 2, "height_ratio_wedge", 0), "L3": ("biconcave", 1, "height_ratio_biconcave", 1),
              "T12": ("crush", 3, "height_ratio_crush", 2)}
    for name, (kind, grade, key, which) in checks.items():
        t = lv[name]
        assert (t["fracture_type"], t["genant_grade"]) == (kind, grade)
        lo, hi = bands[grade]
        loss = 1 - t[key]
        assert lo < loss < hi, (name, loss)
        h = _measure_heights(default_phantom, name)
        ref = h[2] if kind != "crush" else t["height_posterior_normal_mm"]
        measured_loss = 1 - h[which] / ref
        assert measured_loss == pytest.approx(loss, abs=0.08), (name, h)
    for name in ("T10", "T11", "L2", "L4", "L5"):
        assert lv[name]["genant_grade"] == 0
        h = _measure_heights(default_phantom, name)
        assert min(h) / max(h) > 0.85, (name, h)


def test_vertebra_labels_and_centroids(default_phantom):
    ph = default_phantom
    present = set(np.unique(ph.vertebrae.array)) - {0}
    expected = {VERSE_IDS[n] for n in ph.truth["levels"]} | {VERSE_IDS["sacrum"]}
    assert present == expected
    # Bodies are inside the whole-vertebra labels with the same id.
    b = ph.bodies.array
    assert np.all(ph.vertebrae.array[b > 0] == b[b > 0])
    for name, t in ph.truth["levels"].items():
        assert t["complete"]
        assert np.allclose(t["centroid_lps_mm"], t["centroid_analytic_lps_mm"], atol=0.5), name
        if t["height_anterior_mm"] == pytest.approx(t["height_posterior_mm"]) and not t["genant_grade"]:
            assert np.allclose(t["centroid_analytic_lps_mm"], t["center_lps_mm"], atol=0.01)
    # Ordered cranio-caudally along z (z index grows superiorly).
    zs = [ph.truth["levels"][n]["center_lps_mm"][2] for n in ph.truth["levels_rendered"]]
    assert np.all(np.diff(zs) < 0)


def test_ribs_on_thoracic_levels_only(default_phantom):
    ph = default_phantom
    ribs, n = ndimage.label(ph.tissues.array == TISSUE_IDS["rib"])
    assert n > 0
    levels = ph.truth["levels"]
    z_of = {k: v["center_lps_mm"][2] for k, v in levels.items()}
    x_mid = np.mean([v["center_lps_mm"][0] for v in levels.values()])
    attach = []
    for k, objs in enumerate(ndimage.find_objects(ribs), start=1):
        idx = np.argwhere(ribs[objs] == k) + [s.start for s in objs]
        if len(idx) < 10:
            continue
        pts = ph.image.index_to_physical(idx)
        medial = pts[np.argmin(np.abs(pts[:, 0] - x_mid))]  # rib end next to the spine
        side = "L" if medial[0] > x_mid else "R"
        level = min(z_of, key=lambda nm: abs(z_of[nm] - medial[2]))
        attach.append((level, side))
    thoracic = [n for n in levels if n.startswith("T")]
    assert sorted(attach) == sorted((n, s) for n in thoracic for s in "LR")
    assert all(levels[n]["ribs"] == n.startswith("T") for n in levels)


def test_tissue_hu_matches_physics(default_phantom):
    ph = default_phantom
    ksq = _kernel_sum_sq(SP, ph.config.blur_fwhm_mm)
    img = ph.image.array.astype(float)
    want = {"subcutaneous_fat": physics.tissue_hu("fat", 70), "paraspinal_muscle": physics.tissue_hu("muscle", 70),
            "psoas": physics.tissue_hu("muscle", 70), "aorta": physics.tissue_hu("blood", 70)}
    for tissue, hu in want.items():
        m = _erode_mm(ph.tissues.array == TISSUE_IDS[tissue], SP, 2.0)
        n = int(m.sum())
        assert n > 30, tissue
        assert abs(img[m].mean() - hu) < _mean_tol(10.0, n, ksq) + 1.0, tissue
    assert ph.truth["tissue_hu"]["fat"] == pytest.approx(want["subcutaneous_fat"])
    assert ph.truth["tissue_hu"]["aorta"] == pytest.approx(want["aorta"])
    # Noise SD in a uniform region equals the requested SD.
    m = _erode_mm(ph.tissues.array == TISSUE_IDS["subcutaneous_fat"], SP, 2.0)
    assert img[m].std() == pytest.approx(10.0, rel=0.1)


# --- scanner / contrast / options --------------------------------------------------------------
def test_determinism_by_seed():
    kw = dict(spacing_mm=(2.5, 2.5, 2.5), first_level="L2", last_level="L3", include_sacrum=False)
    a, b, c = generate_ct_phantom(seed=3, **kw), generate_ct_phantom(seed=3, **kw), generate_ct_phantom(seed=4, **kw)
    assert np.array_equal(a.image.array, b.image.array)
    assert a.truth == b.truth
    assert not np.array_equal(a.image.array, c.image.array)
    assert np.array_equal(a.vertebrae.array, c.vertebrae.array)
    assert a.image.array.dtype == np.int16 and a.vertebrae.array.dtype == np.uint8


@pytest.mark.parametrize("phase,aorta,ivc,portal", [("arterial", 300.0, 90.0, 120.0),
                                                     ("portal-venous", 160.0, 150.0, 180.0)])
def test_contrast_enhancement_obeys_toelly(phase, aorta, ivc, portal):
    a, b = {"arterial": (-2.287, 0.964), "portal-venous": (-4.517, 0.978)}[phase]
    ph = generate_ct_phantom(spacing_mm=(2.0, 2.0, 2.0), first_level="L1", last_level="L4", contrast_phase=phase,
                             include_sacrum=False, seed=1)
    ksq = _kernel_sum_sq((2, 2, 2), 1.0)
    img = ph.image.array.astype(float)
    for name, t in ph.truth["levels"].items():
        assert a + b * t["apparent_density_mg_cm3"] == pytest.approx(t["density_mg_cm3"])
        assert t["apparent_density_mg_cm3"] > t["density_mg_cm3"]
        core = _erode_mm(ph.bodies.array == t["verse_id"], (2, 2, 2), 4.0)
        apparent = physics.density_from_hu(img[core].mean(), 70.0)
        tol = (_mean_tol(10.0, int(core.sum()), ksq) + 1.0) / physics.mineral_hu_per_mg_cm3(70.0)
        assert a + b * apparent == pytest.approx(t["density_mg_cm3"], abs=b * tol + 1e-6), name
    for tissue, hu in (("aorta", aorta), ("ivc", ivc), ("portal_vein", portal)):
        m = _erode_mm(ph.tissues.array == TISSUE_IDS[tissue], (2, 2, 2), 2.0)
        assert abs(img[m].mean() - hu) < _mean_tol(10.0, int(m.sum()), ksq) + 1.0
        assert ph.truth["tissue_hu"][tissue] == hu


def test_calibration_rods_follow_k2hpo4_physics():
    ph = generate_ct_phantom(spacing_mm=(1.0, 1.0, 4.0), first_level="L2", last_level="L3",
                             include_sacrum=False, calibration_rods=True, noise_hu=8.0)
    img = ph.image.array.astype(float)
    rods = ph.truth["rods"]
    assert len(rods) >= 3
    ksq = _kernel_sum_sq((1, 1, 4), 1.0)
    mu_w, mu_a = physics.mu_cm("water", 70), physics.mu_cm("air", 70)
    k_hu, hus = [], []
    for r in rods:
        zz, yy, xx = np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij")
        pts_idx = ph.image.physical_to_index(np.array([r["center_lps_mm"]]))[0]
        m = ((yy - pts_idx[1]) * 1.0) ** 2 + ((xx - pts_idx[2]) * 1.0) ** 2 <= (r["radius_mm"] - 2.0) ** 2
        assert np.all(ph.tissues.array[m] == TISSUE_IDS["calibration_rod"])
        assert abs(img[m].mean() - r["hu_true"]) < _mean_tol(8.0, int(m.sum()), ksq) + 1.0
        # HU_rod = rho_water + sigma * rho_K2HPO4 + beta with physics' sigma.
        k_hu.append(r["hu_true"] - (r["water_density_mg_cm3"] - 1000.0) * physics.mu_cm("water", 70) / (mu_w - mu_a))
        hus.append(r["k2hpo4_mg_cm3"])
    sigma = np.polyfit(hus, k_hu, 1)[0]
    expect = physics.mass_attenuation_cm2_g("k2hpo4", 70) / 1000 * 1000 / (mu_w - mu_a)
    assert sigma == pytest.approx(expect, rel=1e-6)


def test_basivertebral_vein_is_inside_bodies_and_reads_blood():
    ph = generate_ct_phantom(spacing_mm=(1.0, 1.0, 1.0), first_level="L2", last_level="L3", include_sacrum=False,
                             basivertebral_vein=True, noise_hu=0.0)
    vein = ph.tissues.array == TISSUE_IDS["basivertebral_vein"]
    assert vein.sum() > 50
    assert set(np.unique(ph.bodies.array[vein])) == {VERSE_IDS["L2"], VERSE_IDS["L3"]}
    # HU are volume averages: voxels of the label's rim are part trabecular bone, so the core is
    # two full (3x3x3) erosions in: the in-plane blur (1 mm FWHM) reaches only its neighbours, and
    # those are entirely blood (the vein is convex).
    core = ndimage.binary_erosion(vein, np.ones((3, 3, 3), bool), iterations=2)
    assert core.sum() > 10
    assert np.abs(ph.image.array[core] - physics.tissue_hu("blood", 70)).max() <= 0.5 + 1e-6
    assert not (generate_ct_phantom(spacing_mm=(3.0,) * 3, first_level="L2", last_level="L2").tissues.array
                == TISSUE_IDS["basivertebral_vein"]).any()


def test_metal_only_in_requested_level():
    ph = generate_ct_phantom(spacing_mm=(1.5, 1.5, 1.5), first_level="L2", last_level="L4",
                             include_sacrum=False, metal_level="L3", noise_hu=0.0)
    metal = ph.tissues.array == TISSUE_IDS["metal"]
    assert metal.sum() > 20
    assert set(np.unique(ph.vertebrae.array[metal])) == {VERSE_IDS["L3"]}
    assert ph.image.array[_erode_mm(metal, (1.5,) * 3, 1.5)].min() > 2500
    assert ph.truth["levels"]["L3"]["metal"] and not ph.truth["levels"]["L2"]["metal"]


def _rods(*centres_x, r_px=4, n=160):
    yy, xx = np.mgrid[:n, :n]
    return np.logical_or.reduce([(yy - n // 2) ** 2 + (xx - c) ** 2 <= r_px ** 2 for c in centres_x])[None]


def test_metal_streaks_are_the_dark_band_between_two_rods():
    # Beam hardening depends only on each ray's metal path: one round rod's error sinogram is the
    # same at every angle, so it reconstructs to a radially symmetric error inside the rod and
    # (up to discretisation) nothing outside it; two rods add the long paths through both, a dark
    # band between them and along their axis, brighter beside it. Measured at 0.5 mm pixels:
    # one rod p99 19 HU beyond 2 mm; two rods -585 HU midway, -102 HU beyond, +33 HU beside.
    spacing, n = (0.5, 0.5, 1.0), 160
    one = ct.metal_streaks_hu(_rods(80), spacing, 70.0)[0]
    two = ct.metal_streaks_hu(_rods(60, 100), spacing, 70.0)[0]
    mid, beyond, beside = two[80, 80], two[80, 120], two[60, 80]
    assert mid < -300 and beyond < -50 and beside > 0
    away = ndimage.distance_transform_edt(~_rods(80)[0]) * 0.5 >= 2.0
    assert np.percentile(np.abs(one[away]), 99) < 0.1 * abs(mid)
    half = ct.metal_streaks_hu(_rods(60, 100), spacing, 70.0, strength=0.5)[0]
    assert np.allclose(half, 0.5 * two, atol=0.01)
    assert ct.metal_streaks_hu(_rods(60, 100), spacing, 70.0, strength=0.0) == {}
    assert ct.metal_streaks_hu(np.zeros((3, n, n), bool), spacing, 70.0) == {}


def test_metal_streaks_stay_in_the_slices_with_metal():
    kw = dict(spacing_mm=(1.5, 1.5, 1.5), first_level="L3", last_level="L3", include_sacrum=False,
              include_ribs=False, metal_level="L3", noise_hu=0.0)
    clean, streaked = generate_ct_phantom(**kw), generate_ct_phantom(**kw, metal_artifacts=1.0)
    metal = clean.tissues.array == TISSUE_IDS["metal"]
    diff = streaked.image.array.astype(np.int32) - clean.image.array
    with_metal = metal.any(axis=(1, 2))
    # (the slice blur is off at isotropic spacing, so slices without metal are untouched)
    assert not diff[~with_metal].any()
    assert diff[with_metal].min() < -200 and diff[with_metal].max() > 200
    assert streaked.image.array[_erode_mm(metal, (1.5,) * 3, 1.5)].min() > 2500   # metal stays bright
    assert streaked.truth["scanner"]["metal_artifacts"] == 1.0
    assert np.array_equal(streaked.vertebrae.array, clean.vertebrae.array)          # truth unchanged
    with pytest.raises(InputError):
        generate_ct_phantom(**kw, metal_artifacts=-1.0)


def test_screw_and_rod_construct_over_two_levels():
    ph = generate_ct_phantom(spacing_mm=(1.5, 1.5, 1.5), first_level="L2", last_level="L5", include_sacrum=False,
                             metal_level="L3-L4", noise_hu=0.0)
    metal = ph.tissues.array == TISSUE_IDS["metal"]
    assert [n for n in ("L2", "L3", "L4", "L5") if ph.truth["levels"][n]["metal"]] == ["L3", "L4"]
    # screws in both levels (inside the bone, labelled), heads and rods behind them (unlabelled)
    assert set(np.unique(ph.vertebrae.array[metal])) == {0, VERSE_IDS["L3"], VERSE_IDS["L4"]}
    hardware = metal & (ph.vertebrae.array == 0)
    assert hardware.sum() * 1.5 ** 3 > 2 * 3.1416 * 2.75 ** 2 * 20    # two rods, >= 20 mm long each
    # one piece per side: each rod joins its side's screws of both levels
    pieces, n = ndimage.label(metal, structure=np.ones((3, 3, 3)))
    assert n == 2
    for k in (1, 2):
        assert set(np.unique(ph.vertebrae.array[pieces == k])) == {0, VERSE_IDS["L3"], VERSE_IDS["L4"]}
    # the hardware lies behind the canal: posterior (y grows posteriorly) of every screw tip
    tips_y = np.nonzero(metal & (ph.bodies.array > 0))[1]
    assert np.nonzero(hardware)[1].min() > tips_y.max()
    for bad in ("L3-L5", "L3-L4-L5"):
        with pytest.raises(InputError):
            generate_ct_phantom(first_level="L2", last_level="L4", metal_level=bad)


def test_partial_field_of_view_marks_cut_levels():
    full = generate_ct_phantom(spacing_mm=(2.0, 2.0, 2.0), first_level="T12", last_level="L4", include_sacrum=False)
    nz = full.image.shape[0]
    ph = generate_ct_phantom(spacing_mm=(2.0, 2.0, 2.0), first_level="T12", last_level="L4", include_sacrum=False,
                             shape_zyx=(nz // 2, 128, 128))
    lv = ph.truth["levels"]
    assert ph.image.shape == (nz // 2, 128, 128)
    assert lv["L2"]["complete"]
    assert not lv.get("T12", {"complete": False})["complete"]
    assert not lv.get("L4", {"complete": False})["complete"]


def test_scoliosis_moves_bodies_laterally():
    S = 15.0
    ph = generate_ct_phantom(spacing_mm=(2.0, 2.0, 2.0), first_level="T12", last_level="L4", include_sacrum=False,
                             scoliosis_mm=S, noise_hu=0.0)
    xs = [t["centroid_lps_mm"][0] for t in ph.truth["levels"].values()]
    assert 0.8 * S < max(xs) <= S + 1.0
    for t in ph.truth["levels"].values():
        assert np.allclose(t["centroid_lps_mm"], t["center_lps_mm"], atol=0.5)


def test_a_short_view_shows_part_of_a_realistic_scoliotic_curve():
    # The curve spans at least 250 mm of the column about the view's middle: over a T4-T7 view a
    # 20 mm scoliosis has its apex there and bends neighbours at most ~12 deg apart. Drawn over the
    # rendered range alone (scoliosis_span_mm=0, the stress geometry) they leaned ~50 deg apart.
    kw = dict(spacing_mm=(3.0, 3.0, 3.0), first_level="T4", last_level="T7", scoliosis_mm=20.0, noise_hu=0.0)

    def lean_deg(ph):
        sup = np.array([ph.truth["levels"][n]["axis_superior"] for n in ("T4", "T5", "T6", "T7")])
        return np.degrees(np.arctan2(sup[:, 0], sup[:, 2]))

    ph = generate_ct_phantom(**kw)
    assert ph.truth["curve"]["scoliosis_span_mm"] == 250.0
    assert np.abs(np.diff(lean_deg(ph))).max() < 13.0
    xs = [ph.truth["levels"][n]["center_lps_mm"][0] for n in ("T5", "T6")]
    assert min(xs) > 0.8 * 20.0                      # the apex in view
    assert np.abs(np.diff(lean_deg(generate_ct_phantom(scoliosis_span_mm=0.0, **kw)))).max() > 40.0


def test_interpenetrating_bodies_go_to_the_one_a_voxel_lies_deeper_in():
    # A 20 mm scoliosis drawn over a 4-level view alone (scoliosis_span_mm=0) bends the column so
    # sharply that adjacent bodies lean up to 50 deg apart and interpenetrate on the concave side
    # (T4-T7 at 0.9x0.9x2.5 mm: 585 voxels). Such a voxel went to the body painted last; it goes
    # to the one it lies deeper in.
    from spinekit.phantom._bone import paint_vertebra
    from spinekit.phantom._grid import Grid, Materials
    from spinekit.phantom._spine import frame_from_tangent, level_dims

    d = level_dims("T6")
    grid = Grid((70, 60, 90), np.array([-45.0, -30.0, -35.0]), np.array([1.0, 1.0, 1.0]))
    tilt = np.radians(25.0)
    half = d.body_height_mm / 2 + 1.0           # 2 mm apart on the axis, overlapping to one side
    upper = frame_from_tangent(np.array([0.0, 0.0, half]), np.array([np.sin(tilt), 0.0, np.cos(tilt)]))
    lower = frame_from_tangent(np.array([0.0, 0.0, -half]), np.array([-np.sin(tilt), 0.0, np.cos(tilt)]))
    mat, vert, bodies = (np.zeros(grid.shape, np.uint8) for _ in range(3))
    args = (Materials({}), vert, bodies, grid)
    geo_up = paint_vertebra(mat, *args, upper, d, None, 1, None, 200.0, 1000.0, truth=False)
    geo_lo = paint_vertebra(mat, *args, lower, d, d, 2, None, 200.0, 1000.0, truth=False,
                            body_above=geo_up["body_depth"])

    def depth(geo):
        full = np.full(grid.shape, -np.inf, np.float32)
        sl, dep = geo["body_depth"]
        full[sl] = dep
        return full

    d_up, d_lo = depth(geo_up), depth(geo_lo)
    both = (d_up >= 0) & (d_lo >= 0)
    gap = np.zeros(grid.shape, np.float32)
    gap[both] = d_up[both] - d_lo[both]
    clear = both & (np.abs(gap) > 1.0)
    assert clear.sum() > 100, clear.sum()          # they do interpenetrate
    assert np.all(bodies[clear] == np.where(gap > 0, 1, 2)[clear])
    assert np.all(vert[clear] == bodies[clear])
    # Away from the overlap each keeps its own voxels.
    assert np.all(bodies[(d_up >= 0) & (d_lo < 0)] == 1) and np.all(bodies[(d_lo >= 0) & (d_up < 0)] == 2)


def test_slice_thickness_keeps_noise_sd():
    ph = generate_ct_phantom(spacing_mm=(2.0, 2.0, 1.0), first_level="L2", last_level="L3", include_sacrum=False,
                             slice_thickness_mm=3.0, noise_hu=12.0)
    m = _erode_mm(ph.tissues.array == TISSUE_IDS["subcutaneous_fat"], (2, 2, 1), 3.0)
    assert ph.image.array[m].std() == pytest.approx(12.0, rel=0.12)
    assert ph.truth["scanner"]["slice_thickness_mm"] == 3.0
    # Slice profile: a 5 mm FWHM smears the 1 mm endplate along z but leaves the core's HU alone.
    kw = dict(spacing_mm=(2.0, 2.0, 1.0), first_level="L2", last_level="L2", include_sacrum=False, noise_hu=0.0,
              lordosis_deg=0.0, kyphosis_deg=0.0)
    thin, thick = generate_ct_phantom(**kw), generate_ct_phantom(slice_thickness_mm=5.0, **kw)
    t = thin.truth["levels"]["L2"]
    iz, iy, ix = np.round(thin.image.physical_to_index(np.array([t["center_lps_mm"]]))[0]).astype(int)
    col_thin, col_thick = thin.image.array[:, iy, ix].astype(float), thick.image.array[:, iy, ix].astype(float)
    assert col_thin.max() > t["true_trabecular_hu"] + 800  # endplate cortex resolved in thin slices
    assert col_thick.max() < col_thin.max() - 500
    assert col_thick[iz] == pytest.approx(t["true_trabecular_hu"], abs=1.0)


def test_progress_is_reported_and_cancel_stops():
    from spinekit.progress import Cancelled

    seen = []
    generate_ct_phantom(spacing_mm=(3.0, 3.0, 3.0), first_level="L1", last_level="L2", include_sacrum=False,
                        progress=lambda f, msg: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and np.all(np.diff(seen) >= 0)

    def cancel(f, msg):
        if f > 0.2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        generate_ct_phantom(spacing_mm=(3.0, 3.0, 3.0), first_level="L1", last_level="L2", progress=cancel)


def test_bad_configuration_raises_input_error():
    for kw in ({"first_level": "L3", "last_level": "L1"}, {"first_level": "C5"}, {"contrast_phase": "venous"},
               {"fractures": {"L1": ("wedgy", 2)}}, {"fractures": {"L1": ("wedge", 4)}},
               {"fractures": {"T3": ("wedge", 2)}}, {"metal_level": "T1"}, {"marrow_fat_fraction": 1.5},
               {"spacing_mm": (0, 1, 1)}, {"effective_kev": 10.0}, {"no_such_option": 1}):
        with pytest.raises(InputError):
            generate_ct_phantom(**kw)


# --- files, command line, previews -------------------------------------------------------------
def test_write_round_trip(tmp_path):
    ph = generate_ct_phantom(spacing_mm=(2.5, 2.5, 2.5), first_level="L1", last_level="L2", include_sacrum=False)
    paths = ph.write(tmp_path / "out")
    assert set(paths) == {"ct", "vertebrae", "bodies", "tissues", "truth"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    for key, img in (("ct", ph.image), ("vertebrae", ph.vertebrae), ("bodies", ph.bodies), ("tissues", ph.tissues)):
        back = read_image(paths[key])
        assert np.array_equal(back.array, img.array)
        assert back.same_grid(img)
    assert json.loads(paths["truth"].read_text()) == json.loads(json.dumps(ph.truth))


def test_command_line_writes_phantom_and_rejects_bad_input(tmp_path, capsys):
    from spinekit.cli import main

    out = tmp_path / "ph"
    rc = main(["phantom", "--out", str(out), "--levels", "L1-L2", "--spacing", "2.5,2.5,2.5", "--fracture",
               "L1:wedge:2", "--no-sacrum", "--seed", "5", "--previews", "--metal", "L2", "--metal-artifacts", "0.5",
               "--scoliosis", "10", "--scoliosis-span", "0"])
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["curve"]["scoliosis_mm"] == 10.0 and truth["curve"]["scoliosis_span_mm"] == 0.0
    assert truth["levels"]["L1"]["genant_grade"] == 2 and truth["scanner"]["seed"] == 5
    assert truth["levels"]["L2"]["metal"] and truth["scanner"]["metal_artifacts"] == 0.5
    assert (out / "preview_sagittal.png").stat().st_size > 1000
    for bad in (["--levels", "L2-L1"], ["--spacing", "1,1"], ["--fracture", "L1-wedge"], ["--size", "12x12"],
                ["--scoliosis-span", "-5"]):
        assert main(["phantom", "--out", str(tmp_path / "bad"), *bad]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 5


def test_render_previews(tmp_path, default_phantom):
    import matplotlib.image as mpimg

    from spinekit.phantom.preview import render_previews

    paths = render_previews(default_phantom, default_phantom.vertebrae, tmp_path)
    assert [p.name for p in paths] == ["preview_sagittal.png", "preview_axial.png"]
    sag = mpimg.imread(paths[0])
    # Physical aspect: the sagittal view is taller than wide for a T10-sacrum phantom.
    nz, ny, _ = default_phantom.image.shape
    assert sag.shape[0] / sag.shape[1] == pytest.approx(nz * SP[2] / (ny * SP[1]), rel=0.05)
    assert sag[..., :3].std() > 0.05


# --- realism against a real CT (TotalSegmentator reference in ../shared/data) ------------------
@pytest.mark.realdata
def test_sizes_are_those_of_a_real_adult_spine(shared_data, default_phantom):
    """Lumbar body heights/volumes and aortic calibre within 30 % of a real abdominal CT
    (TotalSegmentator's spine report and `total` labels of the shared test case)."""
    ref = json.loads((shared_data / "ct_abdomen_3mm" / "ts_spine_report.json").read_text())["results"]
    lv = default_phantom.truth["levels"]
    for name in ("L1", "L2", "L3", "L4", "L5"):
        t = lv[name]
        if t["genant_grade"]:
            continue
        vol_ref = ref[f"vertebrae_{name}_volume_ml"]
        assert t["body_volume_cm3"] == pytest.approx(vol_ref, rel=0.30), name
        for where in ("anterior", "middle", "posterior"):
            assert t[f"height_{where}_mm"] == pytest.approx(ref[f"vertebrae_{name}_height_{where}_mm"], rel=0.30)
    labels = read_image(shared_data / "ct_abdomen_3mm" / "ct_crop30_ts_total.nii.gz")
    area_ref = (labels.array == 52).sum(axis=(1, 2)) * labels.spacing_mm[0] * labels.spacing_mm[1]
    d_ref = np.median(2 * np.sqrt(area_ref[area_ref > 0] / np.pi))
    aorta = default_phantom.tissues.array == TISSUE_IDS["aorta"]
    z_l2 = default_phantom.image.physical_to_index(np.array([lv["L2"]["center_lps_mm"]]))[0, 0]
    area = aorta[int(round(z_l2))].sum() * SP[0] * SP[1]
    assert 2 * np.sqrt(area / np.pi) == pytest.approx(d_ref, rel=0.30)


# --- benchmark (not collected by pytest: run `python Testing/test_phantom.py`) ---------------------
def bench_phantom():
    rows = []
    for shape, sp in (((400, 512, 512), (0.8, 0.8, 1.0)), ((200, 256, 256), (1.6, 1.6, 2.0))):
        t0 = time.perf_counter()
        ph = generate_ct_phantom(CTPhantomConfig(first_level="T11", last_level="L5", shape_zyx=shape, spacing_mm=sp))
        rows.append((shape, sp, time.perf_counter() - t0, len(ph.truth["levels"])))
    print(f"{'shape zyx':>16} {'spacing':>16} {'seconds':>8} {'levels':>6}")
    for shape, sp, sec, n in rows:
        print(f"{str(shape):>16} {str(sp):>16} {sec:8.2f} {n:6d}")


if __name__ == "__main__":  # pragma: no cover
    bench_phantom()


# --- partial volume (coarse spacing) -----------------------------------------------------------
def _body_frame_coords(img, t):
    """Local (lateral, posterior, superior) mm of every voxel centre, in the body frame of truth t."""
    idx = np.indices(img.shape).reshape(3, -1).T
    pts = img.index_to_physical(idx) - np.array(t["center_lps_mm"])
    return [(pts @ np.array(t[k])).reshape(img.shape) for k in ("axis_lateral", "axis_posterior", "axis_superior")]


def _low_density_phantom(sp):
    return generate_ct_phantom(spacing_mm=(sp,) * 3, first_level="L1", last_level="L3", include_sacrum=False,
                               densities_mg_cm3={"L2": 40.0}, seed=3)


@pytest.mark.parametrize("sp", [2.0, 3.0])
def test_cortical_rim_is_continuous_at_coarse_spacing(sp):
    """A 1 mm cortex must show on every ray through the outline of a 40 mg/cm3 body, as partial
    volume does in real CT (point sampling at voxel centres breaks the ring)."""
    from spinekit.phantom._bone import CORTEX_MM
    ph = _low_density_phantom(sp)
    t = ph.truth["levels"]["L2"]
    trab, cort = t["true_trabecular_hu"], ph.truth["tissue_hu"]["cortical_bone"]
    assert trab == pytest.approx(physics.trabecular_hu(40.0, 70.0, 0.0))
    a, b = t["body_width_mm"] / 2, t["body_depth_mm"] / 2
    c, lat, post = (np.array(t[k]) for k in ("center_lps_mm", "axis_lateral", "axis_posterior"))
    # A band of width CORTEX_MM covers at least CORTEX_MM / (sqrt(2) sp) of some voxel along any ray;
    # demand half of that cortex excess over the trabecular HU (the blur spreads it a little).
    threshold = trab + 0.5 * CORTEX_MM / (np.sqrt(2.0) * sp) * (cort - trab)
    peaks = []
    for th in np.radians(np.arange(0.0, 360.0, 5.0)):
        d = np.cos(th) * lat + np.sin(th) * post
        r_edge = 1.0 / np.hypot(np.cos(th) / a, np.sin(th) / b)
        r = np.arange(0.0, r_edge + sp, 0.25)
        idx = ph.image.physical_to_index(c + r[:, None] * d).T
        peaks.append(ndimage.map_coordinates(ph.image.array.astype(float), idx, order=1).max())
    assert min(peaks) > threshold, (sp, min(peaks), threshold)


@pytest.mark.parametrize("sp", [2.0, 3.0])
def test_body_hu_is_the_volume_weighted_mix_of_cortex_and_trabecular_bone(sp):
    """HU is conserved by the partial-volume rendering: the HU summed around the body, minus the
    surrounding tissue (at voxel centres outside the label), over the analytic volume equals the
    cortex/trabecular mix implied by the truth (1 mm cortex and endplates). Only the part in front
    of the pedicles is used, so no posterior-element bone enters the sum."""
    from spinekit.phantom._bone import CORTEX_MM, ENDPLATE_MM
    ph = _low_density_phantom(sp)
    t = ph.truth["levels"]["L2"]
    trab, cort = t["true_trabecular_hu"], ph.truth["tissue_hu"]["cortical_bone"]
    a, b = t["body_width_mm"] / 2, t["body_depth_mm"] / 2
    v_cut = b - 4.0 - sp  # pedicles start 4 mm in front of the back wall; one voxel of margin
    # Analytic cut body: height linear in depth through (15 %, Ha) and (85 %, Hp); core = 1 mm inside.
    gu, gv = np.meshgrid(np.linspace(-a, a, 801), np.linspace(-b, b, 801), indexing="ij")
    f = (gv + b) / (2 * b)
    h = t["height_anterior_mm"] + (t["height_posterior_mm"] - t["height_anterior_mm"]) * (f - 0.15) / 0.70
    da = (gu[1, 0] - gu[0, 0]) * (gv[0, 1] - gv[0, 0])
    keep = gv < v_cut
    vol = np.sum(h[keep & ((gu / a) ** 2 + (gv / b) ** 2 <= 1)]) * da
    core_in = keep & ((gu / (a - CORTEX_MM)) ** 2 + (gv / (b - CORTEX_MM)) ** 2 <= 1)
    core = np.sum(np.clip(h[core_in] - 2 * ENDPLATE_MM, 0, None)) * da
    mix = trab + (1 - core / vol) * (cort - trab)

    img, tissues = ph.image.array.astype(float), ph.tissues.array
    label = ph.bodies.array == t["verse_id"]
    _, v, _ = _body_frame_coords(ph.image, t)
    region = ndimage.binary_dilation(label, iterations=2) & (v < v_cut)
    outside = region & ~label
    assert not np.isin(ph.vertebrae.array[outside], [0], invert=True).any()  # no other bone in the sum
    hu_of = {TISSUE_IDS[k]: ph.truth["tissue_hu"][n] for k, n in (
        ("subcutaneous_fat", "fat"), ("visceral_fat", "fat"), ("paraspinal_muscle", "muscle"),
        ("psoas", "muscle"), ("wall_muscle", "muscle"), ("aorta", "aorta"), ("ivc", "ivc"),
        ("disc", "disc"), ("canal", "csf"), ("viscera", "viscera"), ("kidney", "kidney"), ("liver", "liver"))}
    assert set(np.unique(tissues[outside])) <= set(hu_of)
    surround = np.vectorize(hu_of.get)(tissues[outside]).astype(float)
    voxel_mm3 = sp ** 3
    measured = (img[region].sum() - surround.sum()) * voxel_mm3 / vol
    # Allowance: noise of the region sum, the label's volume error times the surrounding HU (the
    # surroundings are counted on label voxels, not on the analytic volume), and int16 rounding.
    ksq = _kernel_sum_sq((sp,) * 3, ph.config.blur_fwhm_mm)
    n = int(region.sum())
    noise = 3.0 * ph.config.noise_hu * np.sqrt(n / ksq) * voxel_mm3 / vol
    label_err = abs(int((label & (v < v_cut)).sum()) * voxel_mm3 / vol - 1) * np.abs(surround).max()
    assert abs(measured - mix) < noise + label_err + 1.0, (sp, measured, mix, noise, label_err)


def test_partial_volume_does_not_depend_on_how_slabs_are_cut(monkeypatch):
    """The sub-sampled scene is drawn in z slabs (with a halo for the eroded shells): cutting it
    into many more slabs must give the same HU, i.e. no seams."""
    import spinekit.phantom.ct as ct
    kw = dict(spacing_mm=(3.0, 3.0, 3.0), first_level="L4", last_level="L5", noise_hu=0.0, blur_fwhm_mm=0.0)
    ref = generate_ct_phantom(**kw).image.array
    monkeypatch.setattr(ct, "PV_CHUNK_SAMPLES", 500_000)
    thin = generate_ct_phantom(**kw).image.array
    assert np.array_equal(ref, thin)
