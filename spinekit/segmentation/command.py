"""`spinekit segment CT --out DIR`: segment and label vertebrae, write the label maps and levels.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import levels as lv
from ..errors import InputError
from ..image import read_image
from ..progress import terminal
from . import BACKENDS, segment
from .base import write_segmentation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", help="CT image: DICOM folder, NIfTI, NRRD or MHA (HU)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: vertebrae.nii.gz, vertebral_bodies.nii.gz, levels.json")
    parser.add_argument("--backend", default="builtin", choices=BACKENDS, help="segmentation backend (default: builtin)")
    parser.add_argument("--labels", metavar="FILE", help="labelmap backend: whole-vertebra label map to import")
    parser.add_argument("--bodies", metavar="FILE",
                        help="vertebral-body map (TotalSegmentator vertebrae_body, or per-level); "
                             "default: derived from the vertebrae")
    parser.add_argument("--convention", choices=sorted(lv.CONVENTIONS),
                        help="label convention of --labels (default: guessed, and the guess is reported)")
    parser.add_argument("--model", metavar="DIR", help="bundle backend: MONAI bundle or TorchScript model folder")
    parser.add_argument("--sha256", help="bundle backend: expected SHA-256 of the model weights")
    parser.add_argument("--fast", action="store_true", help="totalsegmentator backend: its fast 3 mm model")
    parser.add_argument("--device", help="totalsegmentator/bundle backends: cpu, cuda/gpu (default: automatic)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _read_ct(path: str):
    try:
        return read_image(path)
    except RuntimeError:
        raise InputError(f"{Path(path).name} cannot be read as an image (expected DICOM folder, NIfTI, NRRD or MHA).") from None


def run(args: argparse.Namespace) -> int:
    image = _read_ct(args.ct)
    progress = None if args.quiet else terminal("spinekit segment")
    options = {}
    if args.backend == "bundle":
        if args.sha256:
            options["sha256"] = args.sha256
        if args.device:
            options["device"] = args.device
    elif args.sha256:
        raise InputError("--sha256 is only used by the bundle backend.")
    if args.backend == "totalsegmentator":
        options["fast"] = args.fast
        if args.device:
            options["device"] = args.device
    if args.backend not in ("labelmap", "bundle") and (args.bodies or args.convention):
        raise InputError(f"--bodies/--convention are not used by the {args.backend} backend.")
    if args.model and args.backend != "bundle":
        raise InputError("--model is only used by the bundle backend.")

    result = segment(image, args.backend, labels=args.labels, convention=args.convention,
                     bodies=args.bodies, model_dir=args.model, progress=progress, **options)
    paths = write_segmentation(result, args.out)

    for warning in result.warnings:
        print(f"spinekit segment: note: {warning}", file=sys.stderr)
    for rec in result.levels:
        state = "complete" if rec.complete else f"cut ({rec.truncated})"
        flags = f"  [{', '.join(rec.flags)}]" if rec.flags else ""
        print(f"{rec.name:>6}  {state:<15} confidence {rec.confidence:.2f}  "
              f"vertebra {rec.voxels} vox  body {rec.body_voxels} vox{flags}")
    print(f"wrote {paths['vertebrae']}, {paths['bodies'].name}, {paths['levels'].name} "
          f"({len(result.levels)} levels, backend {result.backend})")
    return 0
