"""Reference tissues (air, subcutaneous fat, paraspinal muscle, aorta, IVC) and contrast phase.

Phantom truth: the tissue id map and the documented tissue HU of spinekit.phantom.
Real data: TotalSegmentator masks (aorta 52, IVC 63, autochthon 86/87) as an independent
reference, and its phase estimate (native) for ct_abdomen_3mm.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data_path
from spinekit import physics
from spinekit.bmd.calibration import calibrate_phantomless
from spinekit.bmd.contrast import (ARTERIAL_AORTA_MIN_HU, NATIVE_AORTA_MAX_HU, PHASES, correct_vbmd_for_phase,
                                   detect_contrast_phase)
from spinekit.bmd.tissues import ReferenceTissues, find_reference_tissues
from spinekit.errors import InputError
from spinekit.image import Image, read_image
from spinekit.levels import to_verse
from spinekit.phantom import CTPhantomConfig, generate_ct_phantom

BASE = dict(first_level="T12", last_level="L2", include_sacrum=False, include_ribs=False)
TRUTH_ID = {"air": "air", "fat": "subcutaneous_fat", "muscle": "paraspinal_muscle", "aorta": "aorta", "ivc": "ivc"}


NOISE_HU = 15.0


def _phantom(phase="native", kev=70.0, noise=NOISE_HU, spacing=2.5, seed=0, **kw):
    return generate_ct_phantom(CTPhantomConfig(**BASE, spacing_mm=(spacing,) * 3, effective_kev=kev, noise_hu=noise,
                                               contrast_phase=phase, seed=seed, **kw))


@pytest.fixture(scope="module")
def phantoms():
    return {p: _phantom(p, kev=k, seed=i) for i, (p, k) in enumerate(zip(PHASES, (70.0, 60.0, 80.0)))}


@pytest.mark.parametrize("phase", PHASES)
def test_tissues_found_in_the_right_place_with_the_right_hu(phantoms, phase):
    ph = phantoms[phase]
    res = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    assert res.missing == [] and res.warnings == []
    ids = ph.truth["tissue_ids"]
    truth = ph.truth["tissue_hu"]
    for name, tid in TRUTH_ID.items():
        mask = res.masks[name]
        assert mask.shape == ph.image.shape and mask.dtype == bool
        assert (ph.tissues.array[mask] == ids[tid]).mean() >= (0.95 if name != "muscle" else 0.75), name
        # noise 15 HU, thousands of voxels: a couple of HU at most (partial volume excluded)
        assert res.hu[name] == pytest.approx(truth[name], abs=2.0), name
        # the robust SD recovers the phantom's noise (15 HU): thousands of voxels pin it within
        # a few %; 10 % leaves room for the 5-95 % trimming. Air is clipped at -1024 HU, so its
        # noise is not Gaussian and it is left out.
        if name != "air":
            assert res.sd_hu[name] == pytest.approx(NOISE_HU, rel=0.10), name


def test_fine_voxels_are_searched_on_a_coarse_grid_and_measured_on_all_voxels():
    """1 mm voxels: the search subsamples (~3 mm) inside find_reference_tissues; the HU must still
    match the truth as closely as a full-resolution search (noise 15 HU, >5000 voxels per
    vessel: the mean is pinned to a few tenths of a HU, so 1 HU is a real bound), and the QC
    masks come back on the caller's grid, inside the right structures."""
    ph = generate_ct_phantom(CTPhantomConfig(**BASE, spacing_mm=(1.0, 1.0, 1.25), effective_kev=65.0,
                                             noise_hu=NOISE_HU, contrast_phase="arterial", seed=7))
    res = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    assert res.missing == []
    ids = ph.truth["tissue_ids"]
    for name, tid in TRUTH_ID.items():
        mask = res.masks[name]
        assert mask.shape == ph.image.shape and mask.dtype == bool
        assert (ph.tissues.array[mask] == ids[tid]).mean() >= (0.95 if name != "muscle" else 0.75), name
        assert res.hu[name] == pytest.approx(ph.truth["tissue_hu"][name], abs=1.0), name
    assert detect_contrast_phase(res).detected == "arterial"
    # stored RAS-style (x and y reversed): the subsampled search is re-oriented, and its masks
    # come back on this grid, on the same structures
    img = ph.image
    flipped = Image(img.array[:, ::-1, ::-1].copy(), img.spacing_mm,
                    origin_mm=tuple(img.index_to_physical(np.array([[0, img.shape[1] - 1, img.shape[2] - 1]]))[0]),
                    direction=img.direction @ np.diag([-1.0, -1.0, 1.0]))
    res = find_reference_tissues(flipped, ph.vertebrae.array[:, ::-1, ::-1], ph.bodies.array[:, ::-1, ::-1])
    tis = ph.tissues.array[:, ::-1, ::-1]
    for name in ("aorta", "ivc", "muscle"):
        assert res.masks[name].shape == img.shape
        assert (tis[res.masks[name]] == ids[TRUTH_ID[name]]).mean() >= (0.95 if name != "muscle" else 0.75), name
        assert res.hu[name] == pytest.approx(ph.truth["tissue_hu"][name], abs=1.0), name


def test_tissues_without_labels_and_reoriented(phantoms):
    """No vertebra labels (the bone column is found by threshold) and an RAS-stored volume."""
    ph = phantoms["native"]
    img = ph.image
    flipped = Image(img.array[:, ::-1, ::-1].copy(), img.spacing_mm,
                    origin_mm=tuple(np.asarray(img.index_to_physical(np.array([[0, img.shape[1] - 1, img.shape[2] - 1]]))[0])),
                    direction=img.direction @ np.diag([-1.0, -1.0, 1.0]))
    res = find_reference_tissues(flipped)
    tis = ph.tissues.array[:, ::-1, ::-1]
    ids = ph.truth["tissue_ids"]
    for name in ("fat", "aorta", "ivc"):
        assert (tis[res.masks[name]] == ids[TRUTH_ID[name]]).mean() >= 0.95, name
    assert res.hu["aorta"] == pytest.approx(ph.truth["tissue_hu"]["aorta"], abs=2.0)


def test_missing_tissues_are_named_and_the_rest_is_kept(phantoms):
    ph = phantoms["native"]
    # crop to a rectangle inscribed in the (elliptical) body: no air and no skin in view
    tis = ph.tissues.array
    body = (tis != ph.truth["tissue_ids"]["air"]).all(axis=0)
    ys, xs = np.nonzero(body)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    hy, hx = int(0.65 * (ys.max() - ys.min()) / 2), int(0.65 * (xs.max() - xs.min()) / 2)
    y0, y1, x0, x1 = cy - hy, cy + hy, cx - hx, cx + hx
    assert body[y0:y1, x0:x1].all()
    crop = Image(ph.image.array[:, y0:y1, x0:x1], ph.image.spacing_mm, ph.image.origin_mm)
    res = find_reference_tissues(crop, ph.vertebrae.array[:, y0:y1, x0:x1], ph.bodies.array[:, y0:y1, x0:x1])
    assert set(res.missing) == {"air", "fat"}
    assert "air" not in res.hu and "fat" not in res.masks
    for name in ("Air", "Subcutaneous fat"):
        assert any(w.startswith(f"{name} reference not found") and w.count(".") == 1 for w in res.warnings)
    # partial results are kept and still right
    assert res.hu["muscle"] == pytest.approx(ph.truth["tissue_hu"]["muscle"], abs=2.0)
    assert res.hu["aorta"] == pytest.approx(ph.truth["tissue_hu"]["aorta"], abs=2.0)
    assert detect_contrast_phase(res).detected == "native"
    # without fat the energy is undetermined: one clear sentence naming the tissue
    with pytest.raises(InputError, match="subcutaneous-fat"):
        calibrate_phantomless(res)
    # air alone missing does not stop the calibration (air is -1000 HU at every energy)
    full = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    no_air = {k: v for k, v in full.hu.items() if k != "air"}
    assert abs(calibrate_phantomless(no_air).effective_kev - 70.0) < 3.0


@pytest.mark.parametrize("phase", PHASES)
def test_contrast_phase_detected_on_phantoms(phantoms, phase):
    ph = phantoms[phase]
    res = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    cp = detect_contrast_phase(res)
    assert cp.detected == phase and cp.confidence > 0.6
    assert cp.aorta_hu == pytest.approx(ph.truth["tissue_hu"]["aorta"], abs=3.0)


def test_contrast_rules_and_unknown():
    assert detect_contrast_phase({"aorta": 45.0, "ivc": 40.0}).detected == "native"
    assert detect_contrast_phase({"aorta": 320.0, "ivc": 95.0}).detected == "arterial"
    assert detect_contrast_phase({"aorta": 170.0, "ivc": 150.0}).detected == "portal-venous"
    assert detect_contrast_phase({"aorta": 320.0}).detected == "arterial"
    cp = detect_contrast_phase(ReferenceTissues(missing=["aorta"]))
    assert cp.detected == "unknown" and cp.confidence == 0.0
    # confidence falls toward the thresholds
    assert detect_contrast_phase({"aorta": NATIVE_AORTA_MAX_HU - 5}).confidence < \
        detect_contrast_phase({"aorta": NATIVE_AORTA_MAX_HU - 40}).confidence
    assert ARTERIAL_AORTA_MIN_HU > NATIVE_AORTA_MAX_HU


def test_correction_equations_toelly_2017():
    assert correct_vbmd_for_phase(100.0, "native") == 100.0
    assert correct_vbmd_for_phase(100.0, "arterial") == pytest.approx(-2.287 + 96.4)
    assert correct_vbmd_for_phase(100.0, "portal-venous") == pytest.approx(-4.517 + 97.8)
    assert correct_vbmd_for_phase(100.0, "unknown") == 100.0
    arr = correct_vbmd_for_phase(np.array([50.0, 150.0]), "portal-venous")
    assert arr == pytest.approx([-4.517 + 0.978 * 50, -4.517 + 0.978 * 150])


def test_phase_correction_recovers_native_density_on_a_portal_venous_phantom(phantoms):
    from spinekit.bmd.calibration_bench import level_trabecular_hu

    ph = phantoms["portal-venous"]
    res = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    phase = detect_contrast_phase(res).detected
    cal = calibrate_phantomless(res, phase=phase)
    hu = level_trabecular_hu(ph.image, ph.bodies.array)
    for name, h in hu.items():
        truth = ph.truth["levels"][name]["density_mg_cm3"]
        raw = cal.to_mg_cm3(h)
        corrected = correct_vbmd_for_phase(raw, phase)
        # the enhanced scan reads ~5 % high; Toelly's equation brings it back to the native truth
        assert raw - truth > 5.0
        assert abs(corrected - truth) <= 2.0


# --- real CT (TotalSegmentator references) -------------------------------------------------------
def _ts_on_grid(image: Image, path) -> np.ndarray:
    ts = sitk.Resample(sitk.ReadImage(str(path)), image.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(ts)


def test_real_native_ct_against_totalsegmentator():
    ct = read_image(shared_data_path("ct_abdomen_3mm", "ct_crop30.nii.gz"))
    ts = _ts_on_grid(ct, shared_data_path("ct_abdomen_3mm", "ct_crop30_ts_total.nii.gz"))
    expected_phase = json.loads(shared_data_path("ct_abdomen_3mm", "ts_contrast_phase.json").read_text())["phase"]
    vert = to_verse(np.where((ts >= 25) & (ts <= 50), ts, 0), "totalsegmentator_total")
    a = ct.array.astype(float)
    for labels in (vert, None):
        res = find_reference_tissues(ct, vertebrae=labels)
        assert {"air", "fat", "muscle", "aorta"} <= set(res.hu)
        # the automatic regions lie inside TotalSegmentator's structures ...
        assert np.isin(ts[res.masks["aorta"]], [52]).mean() >= 0.6
        assert np.isin(ts[res.masks["muscle"]], [86, 87]).mean() >= 0.8
        # ... and read the same HU as TotalSegmentator's masks (median, independent reference).
        # Measured: aorta -1.6, muscle +0.6..0.8, IVC +2.2..2.3 HU off; TS's masks reach into the
        # vessel wall / fascia (partial volume) where ours are eroded, so a few HU stay allowed.
        assert res.hu["aorta"] == pytest.approx(np.median(a[ts == 52]), abs=4.0)
        assert res.hu["muscle"] == pytest.approx(np.median(a[np.isin(ts, [86, 87])]), abs=3.0)
        # native IVC (TotalSegmentator 63) beside the liver of nearly the same HU
        assert np.isin(ts[res.masks["ivc"]], [63]).mean() >= 0.6
        assert res.hu["ivc"] == pytest.approx(np.median(a[ts == 63]), abs=4.0)
        assert -1030 < res.hu["air"] < -960 and -130 < res.hu["fat"] < -70
        assert detect_contrast_phase(res).detected == expected_phase == "native"


def test_real_contrast_ct_against_totalsegmentator():
    ct = read_image(shared_data_path("ct_dicom_2mm", "dicom"))
    ts = _ts_on_grid(ct, shared_data_path("ct_dicom_2mm", "ts_total.nii.gz"))
    vert = to_verse(np.where((ts >= 25) & (ts <= 50), ts, 0), "totalsegmentator_total")
    a = ct.array.astype(float)
    # 0.98 mm voxels: the search runs on every 3rd voxel in-plane, the HU on all voxels found
    for labels in (vert, None):
        res = find_reference_tissues(ct, vertebrae=labels)
        assert np.isin(ts[res.masks["aorta"]], [52]).mean() >= 0.9
        # measured +0.7..0.9 HU (the enhanced lumen is homogeneous; TS's mask adds its wall)
        assert res.hu["aorta"] == pytest.approx(np.median(a[ts == 52]), abs=3.0)
        # measured +5.0 (labels) / +5.7 HU (none): a tenth of our region is liver (bare area,
        # ~65 HU enhanced) or unlabelled muscle; TS's autochthon median is 30 HU
        assert np.isin(ts[res.masks["muscle"]], [86, 87]).mean() >= 0.8
        assert res.hu["muscle"] == pytest.approx(np.median(a[np.isin(ts, [86, 87])]), abs=7.0)
        # contrast applied (DICOM tag) and an aorta near 150 HU: enhanced, not native
        phase = detect_contrast_phase(res, ct.metadata)
        assert phase.detected in ("portal-venous", "arterial")
        assert phase.features["contrast_bolus_agent"] == "APPLIED"
        assert res.hu["aorta"] > physics.tissue_hu("blood", 70) + 50


@pytest.mark.xfail(strict=True, reason="known weakness: on the enhanced DICOM the IVC search picks a "
                   "structure beside the IVC (13 % of its mask inside TotalSegmentator's IVC)")
def test_real_contrast_ct_ivc_against_totalsegmentator():
    ct = read_image(shared_data_path("ct_dicom_2mm", "dicom"))
    ts = _ts_on_grid(ct, shared_data_path("ct_dicom_2mm", "ts_total.nii.gz"))
    vert = to_verse(np.where((ts >= 25) & (ts <= 50), ts, 0), "totalsegmentator_total")
    res = find_reference_tissues(ct, vertebrae=vert)
    assert np.isin(ts[res.masks["ivc"]], [63]).mean() >= 0.6


def test_thoracic_aorta_beside_the_spine_not_the_heart():
    """Thoracic levels: the descending aorta lies against the left side of the bodies and the
    enhanced heart fills the front of the chest; the aorta must be the one found."""
    ph = generate_ct_phantom(CTPhantomConfig(first_level="T5", last_level="T10", include_sacrum=False,
                                             spacing_mm=(2.5,) * 3, effective_kev=65.0, noise_hu=15.0,
                                             contrast_phase="arterial", seed=8))
    res = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    ids = ph.truth["tissue_ids"]
    assert (ph.tissues.array[res.masks["aorta"]] == ids["aorta"]).mean() >= 0.95
    assert res.hu["aorta"] == pytest.approx(ph.truth["tissue_hu"]["aorta"], abs=3.0)
    assert detect_contrast_phase(res).detected == "arterial"


def test_native_aorta_at_coarse_voxels_not_taken_for_bone_brightened_muscle():
    """3 mm voxels, little noise: muscle next to the blurred vertebra reads >110 HU on the
    smoothed image; the native aorta must still be found, and the scan called native."""
    ph = generate_ct_phantom(CTPhantomConfig(first_level="T12", last_level="L3", include_sacrum=False, include_ribs=False,
                                             spacing_mm=(3.0,) * 3, effective_kev=50.0, noise_hu=5.0, seed=3,
                                             densities_mg_cm3={"T12": 160.0, "L1": 120.0, "L2": 90.0, "L3": 60.0}))
    res = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    assert (ph.tissues.array[res.masks["aorta"]] == ph.truth["tissue_ids"]["aorta"]).mean() >= 0.95
    assert res.hu["aorta"] == pytest.approx(ph.truth["tissue_hu"]["aorta"], abs=2.0)
    assert detect_contrast_phase(res).detected == "native"
