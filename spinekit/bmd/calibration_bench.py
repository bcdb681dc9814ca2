"""Calibration benchmark on digital phantoms (truth labels as segmentation, so the calibration
itself is measured; the pipeline benchmark measures end to end).

``run_bench(quick)`` returns rows {"section": "calibration", "metric", "value", "unit", "target"}:
phantomless per-level error over effective energy 50-80 keV, noise 5-30 HU and spacing
0.6-3 mm (marrow fat 0 %), repeat-scan CV, phantom-mode error, marrow-fat bias, and the time
taken by the reference-tissue search.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .. import levels as lv
from .calibration import Calibration, calibrate_phantom, calibrate_phantomless, rod_hu_from_labels
from .tissues import find_reference_tissues

# Trabecular ROI for the benchmark: body voxels at least this deep inside the labelled body
# (TotalSegmentator erodes 4 mm); grows with the voxel size so partial volume stays out.
ROI_MARGIN_MM = 4.0


def level_trabecular_hu(image, bodies: np.ndarray, margin_mm: float = ROI_MARGIN_MM) -> dict[str, float]:
    """Mean HU per level of the body labels eroded by ``margin_mm`` (at least 1.5 voxels)."""
    sp = image.spacing_zyx_mm
    margin = max(margin_mm, 1.5 * max(sp))
    out: dict[str, float] = {}
    arr = np.asarray(image.array, float)
    for vid in np.unique(bodies):
        if vid == 0 or int(vid) not in lv.VERSE_NAMES or int(vid) == lv.VERSE_IDS["sacrum"]:
            continue
        m = bodies == vid
        zs = np.nonzero(m.any(axis=(1, 2)))[0]
        sl = slice(max(zs.min() - 2, 0), zs.max() + 3)
        d = ndi.distance_transform_edt(m[sl], sampling=sp)
        roi = np.zeros_like(m)
        roi[sl] = d > margin
        if roi.sum() >= 10:
            out[lv.level_name(int(vid))] = float(arr[roi].mean())
    return out


def rod_labels_from_phantom(ph) -> np.ndarray:
    """Rod label map (rod k = label k, in the order of ph.truth['rods']) from the tissue map."""
    ids = ph.truth["tissue_ids"]
    lab, n = ndi.label(ph.tissues.array == ids["calibration_rod"])
    centres = []
    for k in range(1, n + 1):
        zz, yy, xx = np.nonzero(lab == k)
        centres.append(ph.image.index_to_physical(np.array([[zz.mean(), yy.mean(), xx.mean()]]))[0])
    truth = [np.asarray(r["center_lps_mm"][:2]) for r in ph.truth["rods"]]
    out = np.zeros(lab.shape, np.uint8)
    for i, c in enumerate(truth):
        k = int(np.argmin([np.hypot(*(cc[:2] - c)) for cc in centres]))
        out[lab == k + 1] = i + 1
    return out


def phantom_rod_calibration(ph, method: str = "physics") -> Calibration:
    """Phantom-mode calibration from the phantom's own rods (Mindways certificate values)."""
    rods = ph.truth["rods"]
    hu = rod_hu_from_labels(ph.image.array, rod_labels_from_phantom(ph))
    return calibrate_phantom(hu, [r["k2hpo4_mg_cm3"] for r in rods], convention="mindways",
                             rod_water_density_mg_cm3=[r["water_density_mg_cm3"] for r in rods], method=method)


def level_errors(ph, cal: Calibration) -> dict[str, float]:
    """vBMD − true density per level (mg/cm³), ROI from the truth body labels."""
    hu = level_trabecular_hu(ph.image, ph.bodies.array)
    return {n: float(cal.to_mg_cm3(h) - ph.truth["levels"][n]["density_mg_cm3"]) for n, h in hu.items()}


def phantomless_case(config) -> dict[str, Any]:
    """Generate one phantom, find its tissues, calibrate, return errors and timings."""
    from ..phantom import generate_ct_phantom

    ph = generate_ct_phantom(config)
    t0 = time.perf_counter()
    tissues = find_reference_tissues(ph.image, ph.vertebrae.array, ph.bodies.array)
    t_tissues = time.perf_counter() - t0
    cal = calibrate_phantomless(tissues, phase=config.contrast_phase)
    err = level_errors(ph, cal)
    return {"phantom": ph, "tissues": tissues, "calibration": cal, "errors": err,
            "kev_error": cal.effective_kev - ph.truth["scanner"]["effective_kev"], "seconds_tissues": t_tissues}


def _row(metric: str, value: float, unit: str, target: str = "") -> dict:
    return {"section": "calibration", "metric": metric, "value": round(float(value), 3), "unit": unit, "target": target}


def run_bench(quick: bool = False) -> list[dict]:
    from ..phantom import CTPhantomConfig

    rows: list[dict] = []
    base = dict(first_level="T12", last_level="L3", include_sacrum=False, include_ribs=False,
                densities_mg_cm3={"T12": 160.0, "L1": 120.0, "L2": 90.0, "L3": 60.0})
    energies = (50.0, 65.0, 80.0) if not quick else (50.0, 80.0)
    noises = (5.0, 15.0, 30.0) if not quick else (5.0, 30.0)
    spacings = (0.6, 1.0, 2.0, 3.0) if not quick else (1.0, 3.0)
    all_err: list[float] = []
    kev_err: list[float] = []
    secs: list[float] = []
    cases = [(e, n, s) for e in energies for n in noises for s in spacings]
    if quick:
        cases = cases[::2]
    for i, (kev, noise, sp) in enumerate(cases):
        if sp < 0.9 and noise != noises[0]:
            continue  # fine grids are slow; one noise level there is enough
        cfg = CTPhantomConfig(**base, spacing_mm=(sp, sp, max(sp, 1.0)), effective_kev=kev, noise_hu=noise, seed=i)
        r = phantomless_case(cfg)
        errs = list(r["errors"].values())
        all_err += errs
        kev_err.append(r["kev_error"])
        secs.append(r["seconds_tissues"])
        rows.append(_row(f"phantomless |error| mean, {kev:g} keV, noise {noise:g} HU, {sp:g} mm",
                         np.mean(np.abs(errs)), "mg/cm3", "<= 5"))
    a = np.abs(all_err)
    rows.append(_row("phantomless per-level |error| mean (sweep)", a.mean(), "mg/cm3", "<= 5"))
    rows.append(_row("phantomless per-level |error| max (sweep)", a.max(), "mg/cm3", "<= 12"))
    rows.append(_row("phantomless effective-energy |error| max (sweep)", np.max(np.abs(kev_err)), "keV", ""))
    rows.append(_row("reference-tissue search time, median per phantom", np.median(secs), "s", ""))

    # repeat scans: same patient, new noise
    per_level: dict[str, list[float]] = {}
    n_rep = 4 if quick else 8
    for seed in range(n_rep):
        cfg = CTPhantomConfig(**base, spacing_mm=(1.0, 1.0, 1.0), effective_kev=70.0, noise_hu=20.0, seed=100 + seed)
        r = phantomless_case(cfg)
        hu = level_trabecular_hu(r["phantom"].image, r["phantom"].bodies.array)
        for n, h in hu.items():
            per_level.setdefault(n, []).append(float(r["calibration"].to_mg_cm3(h)))
    cvs = [100.0 * np.std(v, ddof=1) / np.mean(v) for v in per_level.values()]
    rows.append(_row(f"repeat-scan CV, phantomless ({n_rep} scans, noise 20 HU), mean over levels", np.mean(cvs),
                     "%", "<= 1.5"))
    rows.append(_row("repeat-scan CV, phantomless, worst level", np.max(cvs), "%", "<= 1.5"))

    # phantom mode (Mindways-like K2HPO4 rods, physics conversion to HA)
    perr: list[float] = []
    for i, (kev, noise, sp) in enumerate([(55.0, 15.0, 1.0), (70.0, 10.0, 2.0), (80.0, 30.0, 1.0)]):
        from ..phantom import generate_ct_phantom

        ph = generate_ct_phantom(CTPhantomConfig(**base, spacing_mm=(sp, sp, sp), effective_kev=kev, noise_hu=noise,
                                                 calibration_rods=True, seed=200 + i))
        perr += list(level_errors(ph, phantom_rod_calibration(ph)).values())
    rows.append(_row("phantom mode per-level |error| mean", np.mean(np.abs(perr)), "mg/cm3", "<= 2"))
    rows.append(_row("phantom mode per-level |error| max", np.max(np.abs(perr)), "mg/cm3", ""))

    # marrow fat: the calibration assumes fat-free marrow, so fat reads as lower density
    for fat in (0.2, 0.3, 0.4):
        cfg = CTPhantomConfig(**base, spacing_mm=(1.5, 1.5, 1.5), effective_kev=70.0, noise_hu=10.0,
                              marrow_fat_fraction=fat, seed=300)
        r = phantomless_case(cfg)
        bias = float(np.mean(list(r["errors"].values())))
        rows.append(_row(f"marrow fat {int(fat * 100)} % bias (phantomless, 70 keV)", bias, "mg/cm3", "report"))
        rows.append(_row(f"marrow fat {int(fat * 100)} % bias per 10 % fat", bias / (fat * 10), "mg/cm3", "report"))
    for kev in (50.0, 80.0):  # the bias scales with (fat - marrow HU) / mineral slope at the energy
        cfg = CTPhantomConfig(**base, spacing_mm=(1.5, 1.5, 1.5), effective_kev=kev, noise_hu=10.0,
                              marrow_fat_fraction=0.3, seed=301)
        bias = float(np.mean(list(phantomless_case(cfg)["errors"].values())))
        rows.append(_row(f"marrow fat 30 % bias per 10 % fat (phantomless, {kev:g} keV)", bias / 3.0, "mg/cm3", "report"))
    rows += real_data_rows()
    return rows


def real_data_rows(data_dir=None) -> list[dict]:
    """Automatic tissue HU vs TotalSegmentator masks on the real CTs in ../shared/data (skipped
    when absent): aorta (52) and autochthon (86/87) medians, detected phase, fitted energy."""
    from pathlib import Path

    import SimpleITK as sitk

    from ..image import read_image
    from ..levels import to_verse
    from .contrast import detect_contrast_phase

    root = Path(data_dir) if data_dir else Path(__file__).resolve().parents[3] / "shared" / "data"
    cases = [("ct_abdomen_3mm", root / "ct_abdomen_3mm" / "ct_crop30.nii.gz",
              root / "ct_abdomen_3mm" / "ct_crop30_ts_total.nii.gz"),
             ("ct_dicom_2mm", root / "ct_dicom_2mm" / "dicom", root / "ct_dicom_2mm" / "ts_total.nii.gz")]
    rows: list[dict] = []
    for name, ct_path, ts_path in cases:
        if not (ct_path.exists() and ts_path.exists()):
            continue
        ct = read_image(ct_path)
        ts = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(ts_path)), ct.to_sitk(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
        vert = to_verse(np.where((ts >= 25) & (ts <= 50), ts, 0), "totalsegmentator_total")
        a = ct.array.astype(float)
        for labelled, labels in (("labels", vert), ("no labels", None)):
            t0 = time.perf_counter()
            res = find_reference_tissues(ct, vertebrae=labels)
            secs = time.perf_counter() - t0
            tag = f"{name} ({labelled})"
            for tissue, ids in (("aorta", [52]), ("muscle", [86, 87])):
                if tissue in res.hu:
                    ref = np.isin(ts, ids)
                    rows.append(_row(f"{tag}: {tissue} HU auto minus TotalSegmentator median", res.hu[tissue] - np.median(a[ref]),
                                     "HU", "|.| <= 6"))
                    rows.append(_row(f"{tag}: {tissue} mask fraction inside TotalSegmentator {tissue}",
                                     float(ref[res.masks[tissue]].mean()), "", ">= 0.6"))
            phase = detect_contrast_phase(res)
            rows.append({"section": "calibration", "metric": f"{tag}: detected contrast phase", "value": phase.detected,
                         "unit": "", "target": "native" if name == "ct_abdomen_3mm" else "enhanced (tag: contrast applied)"})
            if "fat" in res.hu:
                cal = calibrate_phantomless(res, phase=phase.detected if phase.detected in ("native", "arterial", "portal-venous") else "native")
                rows.append(_row(f"{tag}: phantomless effective energy", cal.effective_kev, "keV", ""))
                rows.append(_row(f"{tag}: phantomless fit residual", cal.residual_hu, "HU", ""))
            rows.append(_row(f"{tag}: reference-tissue search time", secs, "s", ""))
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    for row in run_bench(quick="--quick" in sys.argv):
        print(f"{row['metric']:<80} {row['value']:>9} {row['unit']:<7} {row['target']}")
