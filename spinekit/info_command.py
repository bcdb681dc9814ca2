"""`spinekit info IMAGE`: what an image is (size, spacing, orientation, modality, scanner).

Reads with the same ``read_image`` as every other command, so it is also the quickest way to
see why an input is refused. Patient names and ids are never read; age, sex and dates are
listed by key only.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .image import Image, orientation_code, read_image

# Metadata printed with its value: scanner facts, nothing about the patient.
_SHOWN = ("Modality", "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel",
          "SliceThickness", "ContrastBolusAgent", "SeriesDescription", "BodyPartExamined")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="DICOM folder or file, NIfTI, NRRD or MHA")
    parser.add_argument("--allow-2d", action="store_true", help="accept 2D images (radiographs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(image: Image) -> dict:
    """The facts `spinekit info` prints, as a plain dict (no patient identifiers)."""
    arr = image.array
    md = image.metadata
    return {
        "size_xyz": list(image.size_xyz),
        "spacing_mm": [round(s, 4) for s in image.spacing_mm],
        "origin_mm": [round(o, 3) for o in image.origin_mm],
        "orientation": orientation_code(image) if image.ndim == 3 else "2D",
        "dtype": str(arr.dtype),
        "value_range": [float(arr.min()), float(arr.max())] if arr.size else None,
        "source": md.get("source"),
        **{k: md.get(k) for k in _SHOWN},
        "series_choice": md.get("series_choice"),
        "warnings": list(md.get("warnings") or []),
        "metadata_keys": sorted(k for k, v in md.items() if v not in (None, [], "")),
    }


def run(args: argparse.Namespace) -> int:
    image = read_image(args.image, require_3d=not args.allow_2d)
    facts = describe(image)
    if args.json:
        print(json.dumps(facts, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
        return 0
    print(f"size (x, y, z):        {' x '.join(map(str, facts['size_xyz']))} voxels")
    print(f"spacing (x, y, z):     {' x '.join(f'{s:g}' for s in facts['spacing_mm'])} mm")
    print(f"origin (LPS):          {', '.join(f'{o:g}' for o in facts['origin_mm'])} mm")
    print(f"orientation:           {facts['orientation']}")
    lo, hi = facts["value_range"] or (float("nan"), float("nan"))
    print(f"voxels:                {facts['dtype']}, {lo:g} .. {hi:g}")
    print(f"source:                {facts['source']}")
    for key in _SHOWN:
        value = facts[key]
        print(f"{key + ':':<23}{value if value is not None else 'unknown'}")
    if facts["series_choice"]:
        print(f"series:                {facts['series_choice']}")
    for w in facts["warnings"]:
        print(f"warning:               {w}")
    print(f"metadata keys:         {', '.join(facts['metadata_keys'])}")
    return 0
