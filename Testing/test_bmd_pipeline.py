"""SpineBMD end to end: phantom (truth labels), CLI, bad input, and the real CT vs TotalSegmentator."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from spinekit.bmd import interpret as ip
from spinekit.bmd.pipeline import LEVELS_COLUMNS, SUMMARY_KEYS, BMDOptions, run_bmd, write_bmd_outputs
from spinekit.errors import InputError
from spinekit.image import Image
from spinekit.morphometry import measure_morphometry
from spinekit.phantom import CTPhantomConfig, generate_ct_phantom
from spinekit.segmentation.base import SegmentationResult, records_from_labels

# Phantomless vs phantom QCT in the literature: bias 0-3, SD 3-9 mg/cm3 (DESIGN.md section 4);
# a single level on a noise-10 phantom must land within 10 mg/cm3 (about 1 SD of the worst
# published agreement plus its bias).
VBMD_TOL_MG_CM3 = 10.0
DENSITIES = {"T12": 130.0, "L1": 70.0, "L2": 95.0, "L3": 115.0}


def _truth_seg(ph) -> SegmentationResult:
    return SegmentationResult(vertebrae=ph.vertebrae, bodies=ph.bodies,
                              levels=records_from_labels(ph.vertebrae.array, ph.bodies.array), backend="truth")


@pytest.fixture(scope="module")
def phantom_run():
    # Metal (pedicle screws) in L1: L1 must be flagged and the next pair (L2-L3) used.
    ph = generate_ct_phantom(CTPhantomConfig(first_level="T12", last_level="L3", spacing_mm=(1.5, 1.5, 1.5),
                                             densities_mg_cm3=DENSITIES, noise_hu=10.0, metal_level="L1", metal_artifacts=1.0,
                                             include_sacrum=False, seed=2))
    res = run_bmd(ph.image, _truth_seg(ph), BMDOptions(age=70, sex="F"))
    return ph, res


def test_phantom_vbmd_per_level(phantom_run):
    ph, res = phantom_run
    assert [r.level for r in res.levels] == list(DENSITIES)
    for r in res.levels:
        t = ph.truth["levels"][r.level]
        if r.level == "L1":
            assert "metal" in r.flags
            continue
        assert abs(r.trabecular_hu_mean - t["true_trabecular_hu"]) < 4.0, r
        assert abs(r.vbmd_mg_cm3 - t["density_mg_cm3"]) < VBMD_TOL_MG_CM3, r
        assert r.roi_voxels > 300 and r.genant_grade == 0
        assert abs(r.body_volume_cm3 - t["body_volume_cm3"]) < 1e-6 + 0.01 * t["body_volume_cm3"]


def test_phantom_summary_pair_and_category(phantom_run):
    ph, res = phantom_run
    s = res.summary
    assert list(s)[: len(SUMMARY_KEYS)] == SUMMARY_KEYS
    assert s["levels_used"] == ["L2", "L3"]                      # L1 holds metal
    assert s["excluded_levels"]["L1"].startswith("metal")
    assert any("L1" in w and "metal" in w for w in s["warnings"])
    truth_pair = (DENSITIES["L2"] + DENSITIES["L3"]) / 2            # 105: 15 from both thresholds
    assert abs(s["vbmd_l1_l2"] - truth_pair) < VBMD_TOL_MG_CM3
    assert s["category"] == ip.acr_category(truth_pair) == "osteopenia"
    assert s["t_score"] == pytest.approx(ip.t_score(s["vbmd_l1_l2"], "F"), abs=0.01)
    assert s["z_score"] == pytest.approx(ip.z_score(s["vbmd_l1_l2"], "F", 70), abs=0.01)
    assert s["calibration"]["mode"] == "phantomless"
    assert abs(s["calibration"]["effective_kev"] - ph.truth["scanner"]["effective_kev"]) < 5
    assert s["contrast_phase"] == {**s["contrast_phase"], "detected": "native", "used": "native", "corrected": False}
    # the reference tissues behind the calibration: right HU (noise 10 HU, thousands of voxels)
    # and QC masks on the CT grid inside the right phantom structures
    ids = ph.truth["tissue_ids"]
    for name, tid in {"air": "air", "fat": "subcutaneous_fat", "muscle": "paraspinal_muscle", "aorta": "aorta",
                      "ivc": "ivc"}.items():
        assert res.tissues.hu[name] == pytest.approx(ph.truth["tissue_hu"][name], abs=2.0), name
        mask = res.tissues.masks[name]
        assert mask.shape == ph.image.shape
        assert (ph.tissues.array[mask] == ids[tid]).mean() >= (0.95 if name != "muscle" else 0.75), name


def test_outputs_written(phantom_run, tmp_path):
    ph, res = phantom_run
    files = write_bmd_outputs(res, ph.image, tmp_path)
    df = pd.read_csv(files["levels"])
    assert list(df.columns) == LEVELS_COLUMNS and len(df) == len(DENSITIES)
    # the file holds the result's numbers, and they are the phantom's densities (L1: metal)
    for row in df.itertuples():
        assert row.vbmd_mg_cm3 == pytest.approx(res.level(row.level).vbmd_mg_cm3, abs=0.05), row.level
        if row.level != "L1":
            assert abs(row.vbmd_mg_cm3 - DENSITIES[row.level]) < VBMD_TOL_MG_CM3, row.level
    summary = json.loads(files["summary"].read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["vbmd_l1_l2"] == pytest.approx(res.summary["vbmd_l1_l2"], abs=0.05)
    assert summary["levels_used"] == ["L2", "L3"] and summary["category"] == "osteopenia"
    html = files["report"].read_text()
    assert "DIGITAL PHANTOM" in html                           # metadata["phantom"] is true
    assert html.count("data:image/png;base64,") == 2 and "src=\"http" not in html
    assert not list(tmp_path.glob(".tmp-*"))


def test_portal_venous_phantom_is_corrected_to_native():
    dens = {"L1": 90.0, "L2": 110.0}
    ph = generate_ct_phantom(CTPhantomConfig(first_level="L1", last_level="L2", spacing_mm=(1.5, 1.5, 1.5),
                                             densities_mg_cm3=dens, contrast_phase="portal-venous",
                                             include_sacrum=False, seed=4))
    seg = _truth_seg(ph)
    auto = run_bmd(ph.image, seg)
    assert auto.summary["contrast_phase"]["detected"] == "portal-venous"
    assert auto.summary["contrast_phase"]["corrected"] is True
    forced = run_bmd(ph.image, seg, BMDOptions(phase="native"))
    assert forced.summary["contrast_phase"]["corrected"] is False
    for name, truth in dens.items():
        apparent = ph.truth["levels"][name]["apparent_density_mg_cm3"]
        assert apparent > truth + 3  # the contrast really raises the uncorrected reading
        # same ROI HU, calibrated once as native-phase tissues (blood used) and once as
        # portal-venous (blood excluded): compare each against its own truth
        assert abs(auto.level(name).vbmd_mg_cm3 - truth) < VBMD_TOL_MG_CM3
        assert abs(forced.level(name).vbmd_mg_cm3 - apparent) < VBMD_TOL_MG_CM3


def test_phantom_morphometry_and_genant():
    # every fracture type at every grade across three phantoms; z at 0.75 mm because the grade-1
    # band (20-25 % loss) is ~1.3 mm of a 26 mm body
    sets = [{"T11": ("wedge", 1), "L1": ("biconcave", 2), "L3": ("crush", 3)},
            {"T11": ("crush", 1), "L1": ("wedge", 3), "L3": ("biconcave", 1)},
            {"T11": ("biconcave", 3), "L1": ("crush", 2), "L3": ("wedge", 2)}]
    for fr in sets:
        ph = generate_ct_phantom(CTPhantomConfig(first_level="T10", last_level="L4", spacing_mm=(1.5, 1.5, 0.75),
                                                 include_ribs=False, include_sacrum=False, fractures=fr, seed=0))
        m = measure_morphometry(ph.bodies.array, ph.bodies.spacing_zyx_mm, vertebrae=ph.vertebrae.array,
                                direction=ph.image.direction)
        for name, got in m.items():
            t = ph.truth["levels"][name]
            assert got.genant_grade == t["genant_grade"], (name, fr, got)
            if t["genant_grade"]:
                assert got.deformity == t["fracture_type"]
            for k in ("height_anterior_mm", "height_middle_mm", "height_posterior_mm"):
                assert abs(getattr(got, k) - t[k]) <= 1.5, (name, k)  # one in-plane voxel


def test_no_lumbar_level_keeps_rows(tmp_path):
    ph = generate_ct_phantom(CTPhantomConfig(first_level="T10", last_level="T12", spacing_mm=(2.0, 2.0, 2.0),
                                             include_ribs=False, seed=1))
    res = run_bmd(ph.image, _truth_seg(ph))
    s = res.summary
    assert s["vbmd_l1_l2"] is None and s["category"] is None and s["levels_used"] == []
    assert any("No lumbar vertebra" in w for w in s["warnings"])
    assert [r.level for r in res.levels] == ["T10", "T11", "T12"]
    for r in res.levels:  # rows still carry a calibrated value, close to the phantom's density
        assert abs(r.vbmd_mg_cm3 - ph.truth["levels"][r.level]["density_mg_cm3"]) < VBMD_TOL_MG_CM3, r
    files = write_bmd_outputs(res, ph.image, tmp_path, segmentation_files=False)
    assert json.loads(files["summary"].read_text())["vbmd_l1_l2"] is None


def test_missing_reference_tissue_is_named_and_rows_kept(monkeypatch):
    from spinekit.bmd import tissues as tissues_mod

    ph = generate_ct_phantom(CTPhantomConfig(first_level="L1", last_level="L2", spacing_mm=(2.0, 2.0, 2.0),
                                             include_sacrum=False, seed=1))
    # The tissue finder reports the fat as missing (e.g. a field of view cut inside the skin).
    monkeypatch.setattr(tissues_mod, "find_reference_tissues", lambda image, vertebrae=None, bodies=None:
                        tissues_mod.ReferenceTissues(hu={"air": -1000.0, "muscle": 40.0, "aorta": 40.0}, missing=["fat"],
                                                     warnings=["Subcutaneous fat reference not found."]))
    res = run_bmd(ph.image, _truth_seg(ph))
    assert res.calibration is None and res.summary["vbmd_l1_l2"] is None
    assert any("fat" in w for w in res.summary["warnings"] if w.startswith("No vBMD"))
    assert res.summary["calibration"]["missing_tissues"] == ["fat"]
    assert all(r.trabecular_hu_mean is not None and r.vbmd_mg_cm3 is None for r in res.levels)


def test_non_ct_modality_is_refused():
    img = Image(np.zeros((8, 8, 8), np.int16) - 1000, metadata={"Modality": "MR"})
    seg = SegmentationResult(vertebrae=img.with_array(np.zeros((8, 8, 8), np.uint8)),
                             bodies=img.with_array(np.zeros((8, 8, 8), np.uint8)), levels=[], backend="truth")
    with pytest.raises(InputError, match="modality is MR"):
        run_bmd(img, seg)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinekit.cli", "bmd", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_end_to_end_on_written_phantom(tmp_path):
    truth = {"T12": 150.0, "L1": 140.0, "L2": 150.0}
    ph = generate_ct_phantom(CTPhantomConfig(first_level="T12", last_level="L2", spacing_mm=(2.0, 2.0, 2.0),
                                             densities_mg_cm3=truth, include_ribs=False, include_sacrum=False,
                                             seed=3))
    files = ph.write(tmp_path / "ph")
    out = tmp_path / "out"
    cp = _cli(str(files["ct"]), "--out", str(out), "--segmentation", str(files["vertebrae"]),
              "--bodies", str(files["bodies"]), "--label-convention", "verse", "--age", "50", "--sex", "M", "--quiet")
    assert cp.returncode == 0, cp.stderr
    assert "L1-L2 vBMD" in cp.stdout and "normal" in cp.stdout           # truth 145 mg/cm3
    df = pd.read_csv(out / "levels.csv")
    assert list(df.columns) == LEVELS_COLUMNS and list(df.level) == ["T12", "L1", "L2"]
    for row in df.itertuples():
        assert abs(row.vbmd_mg_cm3 - truth[row.level]) < VBMD_TOL_MG_CM3, row.level
    s = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(s) and s["category"] == "normal" and s["levels_used"] == ["L1", "L2"]
    assert abs(s["vbmd_l1_l2"] - 145.0) < VBMD_TOL_MG_CM3
    assert (out / "report.html").stat().st_size > 10_000


def test_cli_bad_input_one_sentence(tmp_path):
    cp = _cli(str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o"))
    assert cp.returncode == 2
    lines = [l for l in cp.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "missing.nii.gz" in lines[0] and "Traceback" not in cp.stderr
    # an MR-like image (no negative values) is not a CT in HU
    from spinekit.image import write_image
    mr = write_image(Image(np.full((10, 12, 12), 300, np.int16)), tmp_path / "mr.nii.gz")
    cp = _cli(str(mr), "--out", str(tmp_path / "o2"), "--segmentation", str(mr), "--quiet")
    assert cp.returncode == 2 and "Traceback" not in cp.stderr
    assert len([l for l in cp.stderr.strip().splitlines() if l]) == 1
    assert not (tmp_path / "o2" / "levels.csv").exists()


@pytest.mark.realdata
def test_real_ct_against_totalsegmentator_report(shared_data):
    from spinekit.image import read_image
    from spinekit.segmentation.labelmap import import_labelmap

    d = shared_data / "ct_abdomen_3mm"
    if not d.exists():
        pytest.skip(f"real test data not available: {d}")
    image = read_image(d / "ct.nii.gz")
    seg = import_labelmap(image, d / "ts_vertebrae.nii.gz", convention="totalsegmentator_total",
                          bodies=d / "ts_vertebrae_body.nii.gz")
    ts = json.loads((d / "ts_spine_report.json").read_text())["results"]
    res = run_bmd(image, seg, BMDOptions(age=55, sex="M"))
    assert res.summary["contrast_phase"]["detected"] == json.loads((d / "ts_contrast_phase.json").read_text())["phase"]
    seen = 0
    for r in res.levels:
        key = f"vertebrae_{r.level}_volume_ml"
        if key not in ts:
            continue
        seen += 1
        # Adult lumbar trabecular bone: 30-250 mg/cm3 covers osteoporotic to young adults.
        assert 30.0 < r.vbmd_mg_cm3 < 250.0, r
        # TS erodes its body by 4 mm at its native resolution; our shell is 8.5 mm at 3 mm voxels,
        # so our ROI carries less cortical partial volume: never brighter than TS, and within
        # 25 HU (~20 mg/cm3) of TS's median.
        ts_mean, ts_median = ts[f"vertebrae_{r.level}_intensity"], ts[f"vertebrae_{r.level}_intensity_median"]
        assert r.trabecular_hu_median <= ts_median and r.trabecular_hu_mean < ts_mean, r
        assert ts_median - r.trabecular_hu_median < 25.0, r
        # Body volume: TS measured on its own masks at the original resolution; ours counts the
        # 3-mm resampled body voxels (boundary voxels inflate it): agreement within 25 %.
        rel = r.body_volume_cm3 / ts[key] - 1.0
        assert -0.05 < rel < 0.25, (r.level, r.body_volume_cm3, ts[key])
        for k in ("height_anterior_mm", "height_middle_mm", "height_posterior_mm"):
            assert abs(getattr(r, k) - ts[f"vertebrae_{r.level}_{k}"]) <= 6.0, (r.level, k)  # 2 voxels
    assert seen == 5


def test_phantom_rod_calibration_path():
    ph = generate_ct_phantom(CTPhantomConfig(first_level="L1", last_level="L2", spacing_mm=(2.0, 2.0, 2.0),
                                             include_sacrum=False, calibration_rods=True, seed=6))
    rods = ph.truth["rods"]
    # rod label map (rod k = k): discs 2 mm inside each rod's radius on every slice
    centres = ph.image.physical_to_index(np.array([r["center_lps_mm"] for r in rods]))
    zz, yy, xx = np.indices(ph.image.shape)
    labels = np.zeros(ph.image.shape, np.uint8)
    sy, sx = ph.image.spacing_zyx_mm[1:]
    for k, (r, c) in enumerate(zip(rods, centres), start=1):
        inside = ((yy - c[1]) * sy) ** 2 + ((xx - c[2]) * sx) ** 2 <= (r["radius_mm"] - 2.0) ** 2
        labels[inside & (ph.tissues.array == ph.truth["tissue_ids"]["calibration_rod"])] = k
    conc = [r["k2hpo4_mg_cm3"] for r in rods]
    water = [r["water_density_mg_cm3"] for r in rods]
    res = run_bmd(ph.image, _truth_seg(ph), BMDOptions(calibration="phantom", mineral="ha", rod_masks=labels,
                                                       rod_concentrations_mg_cm3=conc, rod_water_density_mg_cm3=water,
                                                       rod_convention="mindways"))
    assert res.summary["calibration"]["mode"] == "phantom" and res.calibration is not None
    measured = [res.calibration.tissue_hu[f"rod{k}"] for k in range(1, len(rods) + 1)]
    # rod HU measured in the masks agree with the phantom's rod truth (noise 10 HU, >100 voxels)
    assert np.allclose(measured, [r["hu_true"] for r in rods], atol=3.0)
    # phantom-mode target of the issue: per level within 2 mg/cm3 of the true HA density
    for r in res.levels:
        assert r.vbmd_mg_cm3 == pytest.approx(ph.truth["levels"][r.level]["density_mg_cm3"], abs=2.0), r.level
    with pytest.raises(InputError, match="rod"):
        run_bmd(ph.image, _truth_seg(ph), BMDOptions(calibration="phantom"))


def test_malformed_header_age_is_ignored_not_an_error():
    """A broken PatientAge in the header is not the user's argument: no T/Z-score needing age,
    no exception; a well-formed one is used when no age is given."""
    ph = generate_ct_phantom(CTPhantomConfig(first_level="L1", last_level="L2", spacing_mm=(2.0, 2.0, 2.0),
                                             include_sacrum=False, seed=4))
    ph.image.metadata.update({"Modality": "CT", "PatientAge": "abc", "PatientSex": "F"})
    res = run_bmd(ph.image, _truth_seg(ph))
    assert res.summary["vbmd_l1_l2"] is not None and res.summary["z_score"] is None
    ph.image.metadata["PatientAge"] = "070Y"
    res = run_bmd(ph.image, _truth_seg(ph))
    assert res.summary["z_score"] is not None and res.summary["bmd_age"] is not None
