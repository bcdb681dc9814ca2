"""`spinekit bmd CT --out DIR`: vBMD per level, morphometry, interpretation and the HTML report.

Writes DIR/levels.csv, DIR/summary.json, DIR/report.html and the label maps it used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from ..progress import terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ct", help="CT image: DICOM folder, NIfTI, NRRD or MHA (HU)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--segmentation", metavar="FILE",
                   help="vertebra label map on the CT (VerSe ids, or a known convention: TotalSegmentator, "
                        "TotalSpineSeg, SPINEPS); default: segment with --segmenter")
    p.add_argument("--bodies", metavar="FILE",
                   help="optional vertebral-body map for --segmentation (e.g. TotalSegmentator vertebrae_body)")
    p.add_argument("--label-convention", default=None,
                   help="convention of --segmentation (verse, totalsegmentator_total, ...); guessed when omitted")
    p.add_argument("--segmenter", choices=("builtin", "totalsegmentator"), default="builtin",
                   help="segmentation backend when no --segmentation is given (default builtin)")
    p.add_argument("--roi", choices=("whole", "mid"), default="whole",
                   help="trabecular ROI: whole body minus cortex (default) or QCT-style mid-vertebral ellipse")
    p.add_argument("--calibration", choices=("phantomless", "asynchronous", "phantom"), default="phantomless")
    p.add_argument("--calibration-table", metavar="FILE", help="asynchronous calibration table (JSON)")
    p.add_argument("--rods", metavar="FILE", help="phantom calibration: rod label map on the CT (rod k = label k)")
    p.add_argument("--rod-concentrations", metavar="MG_CM3", type=float, nargs="+",
                   help="phantom calibration: mineral concentration of rod 1, 2, ... (mg/cm3)")
    p.add_argument("--rod-convention", choices=("mindways", "esp"), default="mindways")
    p.add_argument("--rod-water", metavar="MG_CM3", type=float, nargs="+",
                   help="phantom calibration: certified water density of rod 1, 2, ... (Mindways; default 1000)")
    p.add_argument("--phase", choices=("auto", "native", "arterial", "portal-venous"), default="auto",
                   help="contrast phase (default: detected from the aorta / IVC)")
    p.add_argument("--age", type=float, help="age in years (default: DICOM PatientAge)")
    p.add_argument("--sex", choices=("F", "M", "f", "m"), help="sex (default: DICOM PatientSex)")
    p.add_argument("--mineral", choices=("ha", "k2hpo4"), default="ha", help="density unit mineral (default HA)")
    p.add_argument("--statistic", choices=("mean", "median"), default="mean",
                   help="ROI statistic converted to vBMD (default mean, as QCT)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _segmentation(args, image, progress):
    if args.segmentation:
        path = Path(args.segmentation)
        if not path.exists():
            raise InputError(f"{path}: no such segmentation file.")
        try:
            from ..segmentation import segment
        except ImportError:  # package entry point not there yet: import the label map directly
            segment = None
        if segment is not None:
            kw = {"labels": str(path)}
            if args.bodies:
                kw["bodies"] = str(args.bodies)
            if args.label_convention:
                kw["convention"] = args.label_convention
            return segment(image, backend="labelmap", progress=progress, **kw)
        from ..segmentation.labelmap import import_labelmap
        return import_labelmap(image, str(path), convention=args.label_convention, bodies=args.bodies,
                               progress=progress)
    from ..segmentation import segment
    return segment(image, backend=args.segmenter, progress=progress)


def run(args) -> int:
    from ..image import read_image
    from ..progress import scaled
    from .pipeline import BMDOptions, run_bmd, write_bmd_outputs

    ct_path = Path(args.ct)
    if not ct_path.exists():
        raise InputError(f"{ct_path}: no such file or folder.")
    progress = None if args.quiet else terminal("spinekit bmd")
    image = read_image(ct_path)
    rod_masks = None
    if args.calibration == "phantom":
        if not args.rods or not args.rod_concentrations:
            raise InputError("--calibration phantom needs --rods FILE and --rod-concentrations.")
        rods = read_image(args.rods)
        if not rods.same_grid(image):
            raise InputError(f"{args.rods}: the rod label map is not on the CT's grid.")
        rod_masks = rods.array
    options = BMDOptions(calibration=args.calibration, phase=args.phase, age=args.age,
                         sex=args.sex.upper() if args.sex else None, mineral=args.mineral, roi_mode=args.roi,
                         calibration_table=args.calibration_table, rod_masks=rod_masks,
                         rod_concentrations_mg_cm3=args.rod_concentrations, rod_convention=args.rod_convention,
                         rod_water_density_mg_cm3=args.rod_water, statistic=args.statistic)
    options.validate()
    seg = _segmentation(args, image, scaled(progress, 0.0, 0.5))
    result = run_bmd(image, seg, options, progress=scaled(progress, 0.5, 0.95))
    files = write_bmd_outputs(result, image, args.out)
    s = result.summary
    for w in s["warnings"]:
        print(f"spinekit bmd: warning: {w}", file=sys.stderr)
    if s["vbmd_l1_l2"] is not None:
        pair = "-".join(s["levels_used"])
        line = (f"{pair} vBMD {s['vbmd_l1_l2']:.1f} mg/cm3 ({args.mineral.upper()}, {args.calibration}): "
                f"{s['category']}")
        if s.get("t_score") is not None:
            line += f", T-score {s['t_score']:.1f}"
    else:
        line = "no L1-L2 vBMD (see warnings)"
    print(f"{line}; {len(result.levels)} levels -> {files['levels'].parent}")
    return 0
