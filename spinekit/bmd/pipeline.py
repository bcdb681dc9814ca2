"""SpineBMD end to end: segment -> bodies -> ROI -> reference tissues -> phase -> calibrate ->
measure -> phase correction -> morphometry -> interpret -> summary, and the output files.

``run_bmd`` is the one call the CLI, the batch runner and the Slicer Logic make; it never reads
or writes files. ``write_bmd_outputs`` writes levels.csv, summary.json, report.html and the
segmentation (temporary names, then renames: a good earlier result is never half-overwritten).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import levels as lv
from ..errors import InputError
from ..image import Image, parse_age_years
from ..progress import Progress, report, scaled
from . import interpret as interp
from .roi import METAL_HU, ROI_MODES, clean_body_labels, level_crops, roi_statistics, trabecular_rois

CALIBRATION_MODES = ("phantomless", "asynchronous", "phantom")
PHASE_CHOICES = ("auto", "native", "arterial", "portal-venous")
MINERALS = ("ha", "k2hpo4")

LEVELS_COLUMNS = ["level", "vbmd_mg_cm3", "trabecular_hu_mean", "trabecular_hu_median", "roi_voxels",
                  "body_volume_cm3", "height_anterior_mm", "height_middle_mm", "height_posterior_mm",
                  "genant_grade", "flags"]
SUMMARY_KEYS = ["vbmd_l1_l2", "levels_used", "category", "t_score", "z_score", "bmd_age", "calibration",
                "contrast_phase", "warnings"]

# Levels that get a row: thoracic and lumbar (with the transitional T13 / L6).
REPORTED_LEVELS = set(lv.BMD_LEVELS) | {"T13", "L6"}
# |mean - median| above this (HU) in a ROI points at a basivertebral vein or sclerotic island.
MEAN_MEDIAN_GAP_HU = 20.0


@dataclass
class BMDOptions:
    calibration: str = "phantomless"          # phantomless | asynchronous | phantom
    phase: str = "auto"                       # auto | native | arterial | portal-venous
    age: Optional[float] = None               # years; default from metadata PatientAge
    sex: Optional[str] = None                 # F | M; default from metadata PatientSex
    mineral: str = "ha"                       # ha | k2hpo4
    roi_mode: str = "whole"                   # whole | mid
    calibration_table: Optional[str] = None   # asynchronous: JSON table path (default table when None)
    rod_masks: Any = None                     # phantom: label array (rod k = k, 1-based) or list of bool arrays
    rod_concentrations_mg_cm3: Any = None     # phantom: concentration per rod, same order
    rod_convention: str = "mindways"          # phantom: mindways | esp
    rod_water_density_mg_cm3: Any = None      # phantom: certified water density per rod (Mindways)
    statistic: str = "mean"                   # ROI statistic converted to vBMD: mean | median

    def validate(self) -> None:
        if self.calibration not in CALIBRATION_MODES:
            raise InputError(f"calibration '{self.calibration}' is not one of {', '.join(CALIBRATION_MODES)}.")
        if self.phase not in PHASE_CHOICES:
            raise InputError(f"phase '{self.phase}' is not one of {', '.join(PHASE_CHOICES)}.")
        if self.mineral not in MINERALS:
            raise InputError(f"mineral '{self.mineral}' is not one of {', '.join(MINERALS)}.")
        if self.roi_mode not in ROI_MODES:
            raise InputError(f"ROI mode '{self.roi_mode}' is not one of {', '.join(ROI_MODES)}.")
        if self.statistic not in ("mean", "median"):
            raise InputError(f"statistic '{self.statistic}' is not mean or median.")
        if self.calibration == "phantom" and (self.rod_masks is None or self.rod_concentrations_mg_cm3 is None):
            raise InputError("phantom calibration needs the rod masks and the rod concentrations (--rods, --rod-concentrations).")


@dataclass
class LevelResult:
    level: str
    vbmd_mg_cm3: Optional[float]
    trabecular_hu_mean: Optional[float]
    trabecular_hu_median: Optional[float]
    roi_voxels: int
    body_volume_cm3: Optional[float]
    height_anterior_mm: Optional[float]
    height_middle_mm: Optional[float]
    height_posterior_mm: Optional[float]
    genant_grade: Optional[int]
    flags: list[str] = field(default_factory=list)


@dataclass
class BMDResult:
    levels: list[LevelResult]
    summary: dict
    segmentation: Any                 # SegmentationResult
    roi_labels: np.ndarray            # VerSe ids of the trabecular ROIs (CT grid)
    tissues: Any                      # ReferenceTissues | None
    calibration: Any                  # Calibration | None (None when calibration failed)
    phase: Any                        # ContrastPhase | None
    warnings: list[str] = field(default_factory=list)
    morphometry: dict = field(default_factory=dict)   # level -> LevelMorphometry
    interpretation: Any = None        # interpret.Interpretation

    def level(self, name: str) -> Optional[LevelResult]:
        return next((r for r in self.levels if r.level == name), None)

    def levels_table(self):
        import pandas as pd
        rows = []
        for r in self.levels:
            d = asdict(r)
            d["flags"] = ";".join(r.flags)
            rows.append(d)
        df = pd.DataFrame(rows, columns=LEVELS_COLUMNS)
        # Integers stay integers in the CSV even when a level has no value (pandas' nullable Int64).
        df["genant_grade"] = df["genant_grade"].astype("Int64")
        df["roi_voxels"] = df["roi_voxels"].astype("Int64")
        return df


# --- helpers --------------------------------------------------------------------------------
def _finite(v) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _round(v, nd=2):
    v = _finite(v)
    return None if v is None else round(v, nd)


def _check_ct(image: Image) -> None:
    if image.ndim != 3:
        raise InputError(f"the image is {image.ndim}D; SpineBMD needs a 3D CT.")
    modality = str(image.metadata.get("Modality") or "").strip().upper()
    if modality and modality != "CT":
        raise InputError(f"the image's modality is {modality}, not CT; vBMD needs a CT in Hounsfield units.")
    if image.array.size:
        # A CT in HU always holds negative values (air -1000, fat -100); an image without any is
        # not HU-scaled (an MR, or a CT stored without its rescale slope/intercept).
        sample = image.array[:: max(1, image.shape[0] // 16), ::4, ::4]
        if float(sample.min()) >= 0:
            raise InputError("the image has no negative voxel values, so it is not a CT in Hounsfield units.")


def _rod_labels(image: Image, rod_masks, n_rods: int) -> np.ndarray:
    """Rod label map (rod k = label k) on the CT grid from a label array/Image or a list of masks."""
    if isinstance(rod_masks, (list, tuple)):
        labels = np.zeros(image.shape, np.int16)
        for k, m in enumerate(rod_masks, start=1):
            m = np.asarray(m, bool)
            if m.shape != image.shape:
                raise InputError(f"rod mask {k} is not on the CT grid ({m.shape} vs {image.shape}).")
            labels[m] = k
        return labels
    labels = rod_masks.array if isinstance(rod_masks, Image) else np.asarray(rod_masks)
    if labels.shape != image.shape:
        raise InputError(f"the rod label map is not on the CT grid ({labels.shape} vs {image.shape}).")
    if int(labels.max()) != n_rods:
        raise InputError(f"the rod label map holds {int(labels.max())} rods but {n_rods} concentrations were given.")
    return labels


def _calibrate(image: Image, tissues, phase_used: str, options: BMDOptions):
    from . import calibration as cal

    if options.calibration == "phantomless":
        return cal.calibrate_phantomless(tissues, phase=phase_used, mineral=options.mineral)
    if options.calibration == "asynchronous":
        return cal.calibrate_asynchronous(image.metadata, table=options.calibration_table, mineral=options.mineral)
    concentrations = list(np.asarray(options.rod_concentrations_mg_cm3, float).ravel())
    rod_labels = _rod_labels(image, options.rod_masks, len(concentrations))
    rod_hu = cal.rod_hu_from_labels(image.array, rod_labels)  # eroded against rod-edge partial volume
    return cal.calibrate_phantom(rod_hu, concentrations, convention=options.rod_convention,
                                 mineral=options.mineral, rod_water_density_mg_cm3=options.rod_water_density_mg_cm3)


def _segment(image: Image, progress: Optional[Progress]):
    from ..segmentation import segment  # the builtin backend (other helpers' package)

    return segment(image, progress=progress)


# --- the pipeline -----------------------------------------------------------------------------
def run_bmd(image: Image, segmentation=None, options: BMDOptions | None = None,
            progress: Progress | None = None) -> BMDResult:
    """vBMD per level, morphometry and the L1-L2 interpretation for one CT.

    image: CT in HU (Image). segmentation: a SegmentationResult on the CT grid (VerSe ids);
    segmented with the builtin backend when None. options: BMDOptions. progress(fraction, msg).
    Bad input that only spoils part of the answer (no lumbar level, small ROI, metal, a missing
    reference tissue) is recorded in flags / warnings and the rest is still returned.
    """
    options = options or BMDOptions()
    options.validate()
    _check_ct(image)
    warnings: list[str] = []
    spacing = image.spacing_zyx_mm

    # 1. segmentation
    if segmentation is None:
        report(progress, 0.0, "segmenting vertebrae")
        segmentation = _segment(image, scaled(progress, 0.0, 0.6))
        p0 = 0.6
    else:
        p0 = 0.0
        if not segmentation.bodies.same_grid(image):
            raise InputError("the segmentation is not on the CT's grid (shape, spacing, origin or direction differ).")
    warnings += list(segmentation.warnings)
    step = scaled(progress, p0, 1.0)
    bodies = np.asarray(segmentation.bodies.array)
    vertebrae = np.asarray(segmentation.vertebrae.array)
    records = {r.name: r for r in segmentation.levels}

    # 2. trabecular ROIs and their HU
    report(step, 0.05, f"trabecular ROIs ({options.roi_mode})")
    level_ids = [i for i in range(1, 29) if i in lv.VERSE_NAMES and lv.VERSE_NAMES[i] in REPORTED_LEVELS]
    crops = level_crops(bodies)
    vcrops = level_crops(vertebrae)
    # Detached pieces of a body (a vessel or rib fragment given the level) are dropped once here
    # for the ROI and the morphometry alike.
    bodies, fragments = clean_body_labels(bodies, crops)
    roi_labels = trabecular_rois(bodies, spacing, options.roi_mode, levels=level_ids, vertebrae=vertebrae,
                                 direction=image.direction, ct=image.array, crops=crops, vertebra_crops=vcrops,
                                 clean=False)
    present_ids = sorted({lv.VERSE_IDS[r.name] for r in segmentation.levels if r.present and r.name in REPORTED_LEVELS}
                         | {i for i in crops if i in level_ids},
                         key=lambda i: lv.order_index(lv.level_name(i)))
    stats = roi_statistics(image.array, roi_labels, spacing, levels=present_ids, crops=crops)

    # 3. reference tissues
    report(step, 0.25, "reference tissues")
    tissues = None
    try:
        from .tissues import find_reference_tissues
        # Full z range on purpose: cropping to the T12-L4 slab made the aorta search fail on
        # the demo phantom with builtin labels (it follows the vessel over the whole scan).
        # The search subsamples internally (~3 mm); masks come back on the CT grid.
        tissues = find_reference_tissues(image, vertebrae=vertebrae, bodies=bodies)
        warnings += list(getattr(tissues, "warnings", []))
    except InputError as exc:
        warnings.append(str(exc))

    # 4. contrast phase
    report(step, 0.45, "contrast phase")
    from .contrast import PHASES, correct_vbmd_for_phase, detect_contrast_phase
    phase = detect_contrast_phase(tissues, image.metadata) if tissues is not None else None
    detected = phase.detected if phase is not None else "unknown"
    if options.phase == "auto":
        phase_used = detected if detected in PHASES else "native"
        if detected not in PHASES:
            warnings.append("The contrast phase could not be detected (aorta not found); the scan is treated as "
                            "native and no contrast correction is applied (give --phase to override).")
    else:
        phase_used = options.phase

    # 5. calibration
    report(step, 0.55, f"calibration ({options.calibration})")
    calibration = None
    calibration_error = None
    try:
        if options.calibration == "phantomless" and tissues is None:
            raise InputError("the reference tissues could not be measured, so phantomless calibration is impossible.")
        calibration = _calibrate(image, tissues, phase_used, options)
        warnings += [w for w in calibration.details.get("warnings", []) if w and w not in warnings]
    except InputError as exc:
        calibration_error = str(exc)
        warnings.append(f"No vBMD: {calibration_error}")
    corrected = calibration is not None and phase_used != "native"

    # 6. morphometry
    report(step, 0.7, "morphometry")
    from ..morphometry import measure_morphometry
    morph = measure_morphometry(bodies, spacing, vertebrae=vertebrae, direction=image.direction, levels=present_ids,
                                crops=crops, vertebra_crops=vcrops, clean=False)

    # 7. per-level results
    level_rows: list[LevelResult] = []
    excluded: dict[str, str] = {}
    for vid in present_ids:
        name = lv.level_name(vid)
        st = stats.get(vid)
        m = morph.get(name)
        flags = list(st.flags if st else ["roi_empty"])
        rec = records.get(name)
        if rec is not None:
            flags += [f for f in rec.flags if f not in flags]
        if m is not None:
            flags += [f for f in m.flags if f not in flags]
        if fragments.get(vid, 0.0) > 0.05:
            flags.append("body_mask_fragments")
        hu = None
        if st is not None:
            hu = st.hu_mean if options.statistic == "mean" else st.hu_median
            if st.hu_mean is not None and st.hu_median is not None and abs(st.hu_mean - st.hu_median) > MEAN_MEDIAN_GAP_HU:
                flags.append("mean_median_differ")
        vbmd = None
        if calibration is not None and hu is not None:
            vbmd = float(calibration.to_mg_cm3(hu))
            if corrected:
                vbmd = float(correct_vbmd_for_phase(vbmd, phase_used))
        # Reasons a level may not enter the L1-L2 mean.
        if "metal" in flags:
            excluded[name] = "metal in the ROI"
            warnings.append(f"{name} holds metal ({st.metal_voxels} ROI voxels above {METAL_HU:g} HU); its vBMD is not used.")
        elif "roi_empty" in flags and (m is None or not m.body_volume_cm3):
            excluded[name] = "no vertebral body"
            warnings.append(f"{name} has no vertebral body in the segmentation (field of view or body map); no vBMD.")
        elif "roi_empty" in flags or "roi_small" in flags:
            excluded[name] = "trabecular ROI too small"
            warnings.append(f"{name}'s trabecular ROI is too small ({st.voxels if st else 0} voxels) for a reliable mean; "
                            f"its vBMD is not used.")
        elif rec is not None and not rec.complete:
            excluded[name] = "cut by the field of view"
        elif m is not None and m.genant_grade:
            excluded[name] = f"fracture, Genant grade {m.genant_grade}"
        level_rows.append(LevelResult(
            level=name, vbmd_mg_cm3=_round(vbmd, 2),
            trabecular_hu_mean=_round(st.hu_mean if st else None, 2),
            trabecular_hu_median=_round(st.hu_median if st else None, 2),
            roi_voxels=int(st.voxels if st else 0),
            body_volume_cm3=_round(m.body_volume_cm3 if m else None, 3),
            height_anterior_mm=_round(m.height_anterior_mm if m else None, 2),
            height_middle_mm=_round(m.height_middle_mm if m else None, 2),
            height_posterior_mm=_round(m.height_posterior_mm if m else None, 2),
            genant_grade=None if m is None else m.genant_grade,
            flags=flags))

    # 8. interpretation
    report(step, 0.85, "interpretation")
    # the reader already parsed PatientAge tolerantly (None when malformed); a header is not a user argument
    age = options.age if options.age is not None else image.metadata.get("age_years")
    if age is None:
        age = parse_age_years(image.metadata.get("PatientAge"))
    sex = options.sex if options.sex is not None else image.metadata.get("PatientSex")
    if not any(n.startswith("L") for n in (r.level for r in level_rows)):
        warnings.append("No lumbar vertebra (L1-L5) is in view, so no L1-L2 vBMD or category is given.")
    level_vbmd = {r.level: r.vbmd_mg_cm3 for r in level_rows}
    interpretation = interp.interpret(level_vbmd, excluded=excluded, age_years=age, sex=sex)
    if calibration is not None:
        warnings += [w for w in interpretation.warnings if w not in warnings]

    summary = {
        "vbmd_l1_l2": _round(interpretation.vbmd_mg_cm3, 2),
        "levels_used": interpretation.levels_used,
        "category": interpretation.category,
        "t_score": _round(interpretation.t_score, 2),
        "z_score": _round(interpretation.z_score, 2),
        "bmd_age": _round(interpretation.bmd_age, 1),
        "calibration": {
            "mode": options.calibration,
            "mineral": options.mineral,
            "effective_kev": _round(getattr(calibration, "effective_kev", None), 2),
            "tissue_hu": {k: _round(v, 1) for k, v in (getattr(calibration, "tissue_hu", None)
                                                       or (tissues.hu if tissues is not None else {})).items()},
            "residual": _round(getattr(calibration, "residual_hu", None), 3),
            "slope_hu_per_mg_cm3": _round(getattr(calibration, "slope_hu_per_mg_cm3", None), 5),
            "intercept_hu": _round(getattr(calibration, "intercept_hu", None), 3),
            "error": calibration_error,
            "missing_tissues": list(getattr(tissues, "missing", []) or []),
        },
        "contrast_phase": {
            "detected": detected,
            "confidence": _round(getattr(phase, "confidence", None), 3),
            "used": phase_used,
            "corrected": bool(corrected),
        },
        "warnings": warnings,
        "roi_mode": options.roi_mode,
        "statistic": options.statistic,
        "age_years": _round(age, 1),
        "sex": interp.parse_sex(sex),
        "excluded_levels": excluded,
        "normative_reference": interpretation.reference or None,
        "segmentation_backend": segmentation.backend,
        "labels_uncertain": bool(segmentation.labels_uncertain),
        "phantom": bool(image.metadata.get("phantom", False)),
    }
    report(progress, 1.0, "BMD done")
    return BMDResult(levels=level_rows, summary=summary, segmentation=segmentation, roi_labels=roi_labels,
                     tissues=tissues, calibration=calibration, phase=phase, warnings=warnings,
                     morphometry=morph, interpretation=interpretation)


# --- outputs ----------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_bmd_outputs(result: BMDResult, image: Image, out_dir, *, segmentation_files: bool = True) -> dict[str, Path]:
    """levels.csv, summary.json, report.html (+ vertebrae / bodies / ROI label maps).

    Everything is written under temporary names first and renamed at the end, so a failure
    never leaves a good earlier result half-overwritten.
    """
    from ..image import write_image
    from ..outputs import staged
    from ..report.html import render_bmd_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "levels": out_dir / "levels.csv",
        "summary": out_dir / "summary.json",
        "report": out_dir / "report.html",
    }
    if segmentation_files:
        targets.update({
            "vertebrae": out_dir / "vertebrae.nii.gz",
            "bodies": out_dir / "vertebral_bodies.nii.gz",
            "roi": out_dir / "trabecular_roi.nii.gz",
        })
    with staged(targets) as tmp:
        result.levels_table().to_csv(tmp["levels"], index=False)
        tmp["summary"].write_text(json.dumps(result.summary, indent=2, default=_json_default))
        tmp["report"].write_text(render_bmd_report(result, image), encoding="utf-8")
        if segmentation_files:
            seg = result.segmentation
            write_image(image.with_array(np.asarray(seg.vertebrae.array, np.uint8)), tmp["vertebrae"])
            write_image(image.with_array(np.asarray(seg.bodies.array, np.uint8)), tmp["bodies"])
            write_image(image.with_array(result.roi_labels.astype(np.uint8)), tmp["roi"])
    return targets
