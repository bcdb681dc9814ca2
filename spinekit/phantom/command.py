"""`spinekit phantom`: write a digital spine CT phantom (ct, labels, truth) to a folder."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ..errors import InputError
from ..progress import terminal
from .ct import FRACTURE_TYPES, PHASES, SCOLIOSIS_MIN_SPAN_MM, CTPhantomConfig, generate_ct_phantom, level_range

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (ct.nii.gz, vertebrae.nii.gz, bodies.nii.gz, "
                                                     "tissues.nii.gz, truth.json)")
    parser.add_argument("--levels", default="T11-L5", help="level range within T1-L5, e.g. T11-L5 (default)")
    parser.add_argument("--spacing", default="0.8,0.8,1", help="voxel size x,y,z in mm (default 0.8,0.8,1)")
    parser.add_argument("--size", default=None, help="volume size XxYxZ in voxels, e.g. 512x512x400 "
                                                     "(default: just enough for the levels)")
    parser.add_argument("--slice-thickness", type=float, default=None, help="slice thickness in mm (z blur)")
    parser.add_argument("--noise", type=float, default=10.0, help="noise SD in HU (default 10)")
    parser.add_argument("--blur", type=float, default=1.0, help="in-plane blur FWHM in mm (default 1)")
    parser.add_argument("--kev", type=float, default=70.0, help="effective energy in keV (default 70)")
    parser.add_argument("--phase", default="native", help=f"contrast phase: {', '.join(PHASES)}")
    parser.add_argument("--fracture", action="append", default=[], metavar="LEVEL:TYPE:GRADE",
                        help=f"add a fracture, e.g. L1:wedge:2 (types {', '.join(FRACTURE_TYPES)}; "
                             "grade 1-3); repeatable")
    parser.add_argument("--density", action="append", default=[], metavar="LEVEL:MG_CM3",
                        help="trabecular HA density of a level, e.g. L1:85; repeatable")
    parser.add_argument("--marrow-fat", type=float, default=0.0, help="marrow fat fraction 0-1 (default 0)")
    parser.add_argument("--scoliosis", type=float, default=0.0, help="lateral deviation in mm (default 0)")
    parser.add_argument("--scoliosis-span", type=float, default=SCOLIOSIS_MIN_SPAN_MM, metavar="MM",
                        help=f"the scoliotic curve spans at least this much of the column (default "
                             f"{SCOLIOSIS_MIN_SPAN_MM:g}; 0 = the rendered levels only, a tighter bend than anatomy)")
    parser.add_argument("--lordosis", type=float, default=30.0, help="lumbar lordosis in degrees (default 30)")
    parser.add_argument("--kyphosis", type=float, default=20.0, help="thoracic kyphosis in degrees (default 20)")
    parser.add_argument("--rods", action="store_true", help="add a K2HPO4 calibration phantom under the patient")
    parser.add_argument("--metal", default=None, metavar="LEVEL",
                        help="pedicle screws in this level, or in a range (L3-L4) joined by rods")
    parser.add_argument("--metal-artifacts", type=float, default=0.0, metavar="STRENGTH",
                        help="beam-hardening streaks of the screws: 0 none (default), 1 a two-energy beam "
                             "without metal-artifact reduction")
    parser.add_argument("--basivertebral-vein", action="store_true", help="add a basivertebral vein to every body")
    parser.add_argument("--no-ribs", action="store_true", help="leave out the ribs")
    parser.add_argument("--no-sacrum", action="store_true", help="leave out sacrum and pelvis")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    parser.add_argument("--previews", action="store_true", help="also write sagittal/axial PNG previews")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise InputError(f"--{what} '{text}' must be {n} numbers separated by commas.")
    return vals


def config_from_args(args: argparse.Namespace) -> CTPhantomConfig:
    """Translate command-line arguments into a CTPhantomConfig (InputError on bad values)."""
    parts = args.levels.replace(":", "-").split("-")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise InputError(f"--levels '{args.levels}' must be a range such as T11-L5.")
    level_range(parts[0], parts[1])
    spacing = _floats(args.spacing, 3, "spacing")
    shape = None
    if args.size:
        try:
            xyz = [int(t) for t in args.size.lower().replace(",", "x").split("x")]
        except ValueError:
            xyz = []
        if len(xyz) != 3:
            raise InputError(f"--size '{args.size}' must be three whole numbers such as 512x512x400.")
        shape = (xyz[2], xyz[1], xyz[0])
    fractures = {}
    for spec in args.fracture:
        bits = spec.split(":")
        if len(bits) != 3 or not bits[2].strip().isdigit():
            raise InputError(f"--fracture '{spec}' must look like LEVEL:TYPE:GRADE, e.g. L1:wedge:2.")
        fractures[bits[0].strip().upper()] = (bits[1].strip().lower(), int(bits[2]))
    densities = {}
    for spec in args.density:
        bits = spec.split(":")
        try:
            densities[bits[0].strip().upper()] = float(bits[1])
        except (IndexError, ValueError):
            raise InputError(f"--density '{spec}' must look like LEVEL:MG_CM3, e.g. L1:85.") from None
    return CTPhantomConfig(
        first_level=parts[0], last_level=parts[1], include_sacrum=not args.no_sacrum,
        include_ribs=not args.no_ribs, shape_zyx=shape, spacing_mm=spacing,
        slice_thickness_mm=args.slice_thickness, densities_mg_cm3=densities or None,
        marrow_fat_fraction=args.marrow_fat, effective_kev=args.kev, noise_hu=args.noise,
        blur_fwhm_mm=args.blur, lordosis_deg=args.lordosis, kyphosis_deg=args.kyphosis,
        scoliosis_mm=args.scoliosis, scoliosis_span_mm=args.scoliosis_span, contrast_phase=args.phase.lower(),
        fractures=fractures,
        metal_level=args.metal, metal_artifacts=args.metal_artifacts, calibration_rods=args.rods, seed=args.seed,
        basivertebral_vein=args.basivertebral_vein,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    progress = terminal("spinekit phantom") if getattr(args, "verbose", False) else None
    phantom = generate_ct_phantom(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    paths = phantom.write(args.out)
    if args.previews:
        from .preview import render_previews

        paths.update({p.stem: p for p in render_previews(phantom, phantom.vertebrae, args.out)})
    summary = {
        "shape_zyx": list(phantom.image.shape),
        "levels": {n: {"density_mg_cm3": round(t["density_mg_cm3"], 1), "genant_grade": t["genant_grade"],
                       "complete": t["complete"]} for n, t in phantom.truth["levels"].items()},
        "seconds": round(seconds, 2),
        "files": {k: str(v) for k, v in paths.items()},
    }
    print(json.dumps(summary, indent=2))
    log.debug("phantom written to %s", Path(args.out))
    return 0
