"""Calibration: phantomless (physics fit of the effective energy), phantom rods (Mindways / ESP),
asynchronous table and the `spinekit calibration` command.

Truth comes from the digital phantom (spinekit.phantom: same NIST physics, plus noise, blur and
partial volume) or from synthetic numbers whose answer is known by construction.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from spinekit import physics
from spinekit.bmd.calibration import (CalibrationEntry, CalibrationTable, calibrate_asynchronous,
                                      calibrate_phantom, calibrate_phantomless, default_table_path,
                                      fit_effective_energy, mindways_ct_coefficients, mindways_fit,
                                      rod_hu_from_labels)
from spinekit.bmd.calibration_bench import level_errors, phantom_rod_calibration, rod_labels_from_phantom
from spinekit.errors import InputError
from spinekit.image import write_image
from spinekit.phantom import CTPhantomConfig, generate_ct_phantom

BASE = dict(first_level="T12", last_level="L2", include_sacrum=False, include_ribs=False,
            densities_mg_cm3={"T12": 150.0, "L1": 100.0, "L2": 60.0})


# --- phantomless -----------------------------------------------------------------------------
@pytest.mark.parametrize("kev", [50.0, 72.5, 95.0])
def test_phantomless_inverts_the_physics_exactly(kev):
    hu = {t: physics.tissue_hu(t, kev) for t in ("air", "fat", "muscle", "blood")}
    cal = calibrate_phantomless(hu)
    assert cal.mode == "phantomless" and cal.mineral == "ha"
    assert cal.effective_kev == pytest.approx(kev, abs=0.05)
    assert cal.residual_hu < 0.05
    for rho in (0.0, 80.0, 200.0):
        assert cal.to_mg_cm3(physics.trabecular_hu(rho, kev)) == pytest.approx(rho, abs=0.1)
    k2 = calibrate_phantomless(hu, mineral="k2hpo4")
    assert k2.to_mg_cm3(physics.trabecular_hu(120.0, kev, mineral="k2hpo4")) == pytest.approx(120.0, abs=0.1)


def test_phantomless_fit_is_robust_to_one_bad_tissue_and_drops_blood_when_enhanced():
    kev = 65.0
    hu = {t: physics.tissue_hu(t, kev) for t in ("air", "fat", "muscle")}
    hu["aorta"] = 180.0  # contrast-filled
    native = calibrate_phantomless(hu, phase="native")
    pv = calibrate_phantomless(hu, phase="portal-venous")
    assert "blood" in pv.details["tissues_excluded"]
    assert pv.effective_kev == pytest.approx(kev, abs=0.1)
    # treating enhanced blood as native pulls the fit away and shows up in the residual
    assert native.residual_hu > 5 * max(pv.residual_hu, 0.1)
    kev_fit, resid, _ = fit_effective_energy({**hu, "blood": physics.tissue_hu("blood", kev)})
    assert kev_fit == pytest.approx(kev, abs=0.05) and abs(resid["fat"]) < 0.05


def test_phantomless_without_fat_is_an_input_error_naming_the_tissue():
    with pytest.raises(InputError, match="subcutaneous-fat"):
        calibrate_phantomless({"air": -1000.0, "muscle": 40.0})


@pytest.mark.parametrize("kev,noise,spacing", [(55.0, 15.0, 2.0), (78.0, 25.0, 3.0)])
def test_phantomless_recovers_phantom_energy_and_density(kev, noise, spacing):
    from spinekit.bmd.tissues import find_reference_tissues

    ph = generate_ct_phantom(CTPhantomConfig(**BASE, spacing_mm=(spacing,) * 3, effective_kev=kev,
                                             noise_hu=noise, seed=3))
    tissues = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    cal = calibrate_phantomless(tissues, phase="native")
    assert abs(cal.effective_kev - kev) <= 3.0
    errors = level_errors(ph, cal)
    assert set(errors) == {"T12", "L1", "L2"}
    err = np.abs(list(errors.values()))
    # published phantomless-vs-phantom agreement: bias 0-3, SD 3-9 mg/cm3 (DESIGN.md section 4);
    # the mean error must stay inside that bias + noise, a single level within ~1.3 worst SD
    assert err.mean() <= 5.0 and err.max() <= 12.0
    js = cal.to_json()
    assert js["mode"] == "phantomless" and set(js["tissue_hu"]) >= {"air", "fat", "muscle", "aorta"}
    json.dumps(js)  # QC record is serialisable


def test_marrow_fat_biases_phantomless_density_low():
    from spinekit.bmd.tissues import find_reference_tissues

    cfg = dict(BASE, spacing_mm=(2.0,) * 3, effective_kev=70.0, noise_hu=10.0, seed=4)
    out = {}
    for fat in (0.0, 0.3):
        ph = generate_ct_phantom(CTPhantomConfig(**cfg, marrow_fat_fraction=fat))
        cal = calibrate_phantomless(find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array))
        out[fat] = np.mean(list(level_errors(ph, cal).values()))
    # fat (-100 HU) replacing fat-free marrow (+33 HU) reads as missing mineral:
    # expected bias = 0.3 * (fat_hu - marrow_base_hu) / slope at 70 keV
    expected = 0.3 * (physics.tissue_hu("fat", 70) - physics.tissue_hu(physics.MARROW_BASE, 70)) / physics.mineral_hu_per_mg_cm3(70)
    assert abs(out[0.0]) < 3.0
    assert out[0.3] - out[0.0] == pytest.approx(expected, abs=4.0)


# --- phantom (rods) -----------------------------------------------------------------------------
def test_mindways_algebra_round_trip():
    sigma, beta = 1.237, -1003.2
    conc = np.array([0.0, 50.0, 100.0, 200.0])
    water = np.array([1012.0, 1045.0, 1020.0, 1035.0])
    hu = water + sigma * conc + beta
    s, b, rms = mindways_fit(hu, conc, water)
    assert (s, b) == pytest.approx((sigma, beta), abs=1e-9) and rms < 1e-9
    s_ct, b_ct = mindways_ct_coefficients(s, b)
    assert s_ct == pytest.approx(sigma - 0.2174) and b_ct == pytest.approx(beta + 999.6)
    cal = calibrate_phantom(hu, conc, convention="mindways", rod_water_density_mg_cm3=water, method="classic")
    assert cal.mineral == "k2hpo4"
    bmd = 87.0
    assert cal.to_mg_cm3(b_ct + s_ct * bmd) == pytest.approx(bmd, abs=1e-9)


def test_esp_classic_line_and_input_checks():
    conc = [0.0, 100.0, 200.0]
    hu = [3.0 + 1.1 * c for c in conc]
    cal = calibrate_phantom(hu, conc, convention="esp", method="classic")
    assert cal.mineral == "ha" and cal.slope_hu_per_mg_cm3 == pytest.approx(1.1) and cal.intercept_hu == pytest.approx(3.0)
    with pytest.raises(InputError, match="rod"):
        calibrate_phantom([1.0, 2.0], [0.0, 50.0, 100.0])
    with pytest.raises(InputError, match="convention"):
        calibrate_phantom(hu, conc, convention="qrm")


def test_esp_physics_rods_recover_energy():
    kev = 62.0
    conc = np.array([0.0, 50.0, 100.0, 200.0])
    from spinekit.bmd.calibration import rod_model_hu

    hu = rod_model_hu(kev, conc, None, "ha") + 4.0  # scanner reads 4 HU high
    cal = calibrate_phantom(hu, conc, convention="esp")
    assert cal.effective_kev == pytest.approx(kev, abs=0.05)
    assert cal.details["hu_offset"] == pytest.approx(-4.0, abs=0.01)
    assert cal.to_mg_cm3(physics.trabecular_hu(150.0, kev) + 4.0) == pytest.approx(150.0, abs=0.1)


@pytest.mark.parametrize("kev,noise", [(55.0, 10.0), (75.0, 20.0)])
def test_phantom_mode_with_the_phantoms_rods(kev, noise):
    ph = generate_ct_phantom(CTPhantomConfig(**BASE, spacing_mm=(1.5, 1.5, 2.0), effective_kev=kev, noise_hu=noise,
                                             calibration_rods=True, seed=5))
    cal = phantom_rod_calibration(ph)
    assert cal.mode == "phantom" and cal.mineral == "ha"
    assert abs(cal.effective_kev - kev) <= 1.0
    # the calibration line itself: exact physics HU back to density
    for rho in (50.0, 100.0, 200.0):
        assert abs(cal.to_mg_cm3(physics.trabecular_hu(rho, kev)) - rho) <= 2.0
    # and on the phantom's vertebrae (truth labels as ROI)
    err = np.abs(list(level_errors(ph, cal).values()))
    assert err.max() <= 2.0


def test_rod_hu_from_labels_checks_grid_and_labels():
    ct = np.zeros((4, 10, 10))
    lab = np.zeros((4, 10, 10), np.uint8)
    lab[:, 1:4, 1:4] = 1
    ct[:, 1:4, 1:4] = 100.0
    lab[:, 5:9, 5:9] = 2
    ct[:, 5:9, 5:9] = 200.0
    assert rod_hu_from_labels(ct, lab) == pytest.approx([100.0, 200.0])
    with pytest.raises(InputError, match="1..N"):
        rod_hu_from_labels(ct, np.where(lab == 2, 3, lab))
    with pytest.raises(InputError, match="grid"):
        rod_hu_from_labels(ct, lab[:2])


# --- asynchronous -------------------------------------------------------------------------------
def _entry(kernel, slope, created="2026-01-01T00:00:00+00:00"):
    return CalibrationEntry(manufacturer="SIEMENS", model="Biograph40_mCT", kvp=120.0, kernel=kernel,
                            slope_hu_per_mg_cm3=slope, intercept_hu=-2.0, mineral="ha", convention="esp",
                            created=created, source_note="test")


def test_calibration_table_lookup_exact_fallback_missing(tmp_path):
    path = tmp_path / "table.json"
    table = CalibrationTable([_entry("Br38f", 1.30), _entry(None, 1.25)])
    table.save(path)
    loaded = CalibrationTable.load(path)
    assert len(loaded.entries) == 2
    meta = {"Manufacturer": "Siemens ", "ManufacturerModelName": "Biograph40_mCT", "KVP": "120",
            "ConvolutionKernel": ["Br38f", "3"]}
    # multi-valued kernel as pydicom gives it: "Br38f\\3" does not equal "Br38f" -> fallback
    e, note = loaded.lookup(meta)
    assert e.kernel is None and "kernel" in note
    e, note = loaded.lookup({**meta, "ConvolutionKernel": "br38f"})
    assert e.kernel == "Br38f" and note is None and e.slope_hu_per_mg_cm3 == 1.30
    cal = calibrate_asynchronous({**meta, "ConvolutionKernel": "B30f"}, path)
    assert cal.mode == "asynchronous" and cal.slope_hu_per_mg_cm3 == 1.25
    assert cal.details["fallback"] and cal.details["warnings"]
    assert cal.to_mg_cm3(-2.0 + 1.25 * 90.0) == pytest.approx(90.0)
    with pytest.raises(InputError) as exc:
        calibrate_asynchronous({**meta, "KVP": 100}, path)
    assert "100 kVp" in str(exc.value) and str(path) in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        CalibrationTable.load(tmp_path / "absent.json")


def test_table_add_replaces_same_scanner_and_default_location(tmp_path, monkeypatch):
    table = CalibrationTable()
    assert table.add(_entry("Br38f", 1.3)) is False
    assert table.add(_entry("Br38f", 1.4)) is True
    assert len(table.entries) == 1 and table.entries[0].slope_hu_per_mg_cm3 == 1.4
    monkeypatch.setenv("SPINEKIT_HOME", str(tmp_path))
    assert default_table_path() == tmp_path / "calibration_table.json"


def test_calibration_command_create_and_list(tmp_path, capsys):
    from spinekit.cli import main

    ph = generate_ct_phantom(CTPhantomConfig(**BASE, spacing_mm=(1.5, 1.5, 2.0), effective_kev=68.0, noise_hu=10.0,
                                             calibration_rods=True, seed=6))
    ct = write_image(ph.image, tmp_path / "phantom.nii.gz")
    rods = write_image(ph.image.with_array(rod_labels_from_phantom(ph)), tmp_path / "rods.nii.gz")
    table = tmp_path / "cal.json"
    conc = ",".join(str(r["k2hpo4_mg_cm3"]) for r in ph.truth["rods"])
    water = ",".join(str(r["water_density_mg_cm3"]) for r in ph.truth["rods"])
    args = ["calibration", "create", str(ct), "--rods", str(rods), "--concentrations", conc, "--water", water,
            "--table", str(table), "--manufacturer", "ACME", "--model", "CT-1", "--kvp", "120", "--kernel", "B30"]
    assert main(args) == 0
    assert main(["calibration", "list", "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "ACME CT-1 120 kVp kernel B30" in out
    entries = json.loads(table.read_text())
    assert len(entries) == 1 and abs(entries[0]["effective_kev"] - 68.0) < 1.0
    # the stored coefficients calibrate a later scan of the same scanner
    cal = calibrate_asynchronous({"Manufacturer": "ACME", "ManufacturerModelName": "CT-1", "KVP": 120,
                                  "ConvolutionKernel": "B30"}, table)
    assert abs(cal.to_mg_cm3(physics.trabecular_hu(100.0, 68.0)) - 100.0) <= 2.0
    # the same scan measured with circular ROIs instead of masks replaces the entry
    centres = ";".join(",".join(str(v) for v in r["center_lps_mm"]) for r in ph.truth["rods"])
    assert main(["calibration", "create", str(ct), f"--rod-centres={centres}", "--rod-radius", str(ph.truth["rods"][0]["radius_mm"]),
                 "--concentrations", conc, "--water", water, "--table", str(table), "--manufacturer", "ACME",
                 "--model", "CT-1", "--kvp", "120", "--kernel", "B30"]) == 0
    entries = json.loads(table.read_text())
    assert len(entries) == 1 and abs(entries[0]["effective_kev"] - 68.0) < 1.0
    assert "Replaced" in capsys.readouterr().out
    # bad input: one sentence, exit code 2
    assert main(args[:5] + ["--concentrations", "0,50", "--table", str(table), "--manufacturer", "A",
                            "--model", "B", "--kvp", "120"]) == 2
    err = capsys.readouterr().err
    assert "4 rods but 2 concentrations" in err and "Traceback" not in err


def test_mindways_physics_without_certificate_assumes_1000_mg_water_and_says_so():
    from spinekit.bmd.calibration import rod_model_hu

    kev = 74.0
    conc = np.array([0.0, 50.0, 100.0, 200.0])
    hu = rod_model_hu(kev, conc, np.full(4, 1000.0), "k2hpo4")
    cal = calibrate_phantom(hu, conc, convention="mindways")
    assert cal.effective_kev == pytest.approx(kev, abs=0.05)
    assert cal.to_mg_cm3(physics.trabecular_hu(120.0, kev)) == pytest.approx(120.0, abs=0.1)
    assert any("1000 mg/cm3 water" in w for w in cal.details["warnings"])


def test_rod_rois_from_circles_match_rod_masks():
    from spinekit.bmd.calibration import rod_labels_from_circles

    ph = generate_ct_phantom(CTPhantomConfig(**BASE, spacing_mm=(1.0, 1.0, 2.0), effective_kev=66.0, noise_hu=10.0,
                                             calibration_rods=True, seed=7))
    rods = ph.truth["rods"]
    labels = rod_labels_from_circles(ph.image, [r["center_lps_mm"] for r in rods], rods[0]["radius_mm"])
    hu = rod_hu_from_labels(ph.image.array, labels, erode_voxels=0)
    # every ROI voxel is inside its rod, and the rod HU match the truth
    assert (ph.tissues.array[labels > 0] == ph.truth["tissue_ids"]["calibration_rod"]).all()
    assert hu == pytest.approx([r["hu_true"] for r in rods], abs=1.5)
    cal = calibrate_phantom(hu, [r["k2hpo4_mg_cm3"] for r in rods],
                            rod_water_density_mg_cm3=[r["water_density_mg_cm3"] for r in rods])
    assert abs(cal.effective_kev - 66.0) < 1.0


def test_asynchronous_lookup_from_real_dicom_tags(tmp_path):
    from conftest import shared_data_path
    from spinekit.image import read_image

    ct = read_image(shared_data_path("ct_dicom_2mm", "dicom"))
    meta = ct.metadata
    entry = CalibrationEntry(manufacturer=str(meta["Manufacturer"]), model=str(meta["ManufacturerModelName"]),
                             kvp=float(meta["KVP"]), kernel=str(meta["ConvolutionKernel"]), slope_hu_per_mg_cm3=1.2,
                             intercept_hu=1.0, mineral="ha", convention="esp", source_note="test entry")
    CalibrationTable([entry]).save(tmp_path / "t.json")
    cal = calibrate_asynchronous(meta, tmp_path / "t.json")
    assert cal.details["fallback"] is None and cal.to_mg_cm3(1.0 + 1.2 * 75.0) == pytest.approx(75.0)
    with pytest.raises(InputError, match="Biograph40_mCT"):
        calibrate_asynchronous({**meta, "KVP": 140}, tmp_path / "t.json")
