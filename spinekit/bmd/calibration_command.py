"""`spinekit calibration`: manage the asynchronous calibration table.

  spinekit calibration create PHANTOM_CT --rods ROD_MASKS --concentrations 0,50,100,200
        [--water 1012,1045,1020,1035] [--convention mindways|esp] [--table FILE]
  (or --rod-centres "x,y,z;x,y,z;..." --rod-radius MM instead of --rods: circular ROIs)
  spinekit calibration list [--table FILE]

`create` measures each rod (label k of ROD_MASKS = rod k, on the phantom CT's grid), fits the
calibration and stores it under the scan's Manufacturer / ManufacturerModelName / KVP /
ConvolutionKernel (from the DICOM header; --manufacturer/--model/--kvp/--kernel fill or
override them, e.g. for NIfTI input). An entry for the same scanner key is replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in str(text).replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{what} '{text}' must be comma-separated numbers, e.g. 0,50,100,200.") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    c = sub.add_parser("create", help="fit a phantom scan and store its coefficients for the scanner")
    c.add_argument("phantom_ct", help="phantom CT: DICOM folder, NIfTI, NRRD or MHA (HU)")
    rods = c.add_mutually_exclusive_group(required=True)
    rods.add_argument("--rods", metavar="FILE", help="rod label map on the phantom CT (rod k = label k)")
    rods.add_argument("--rod-centres", metavar="X,Y,Z;...",
                      help="rod axis points in LPS mm, one x,y,z per rod separated by ';' (circular ROIs); "
                           "write --rod-centres=... when the first value is negative")
    c.add_argument("--rod-radius", type=float, default=None, metavar="MM", help="rod radius for --rod-centres (mm)")
    c.add_argument("--concentrations", required=True, metavar="MG_CM3",
                   help="mineral per rod, comma-separated (K2HPO4 for mindways, HA for esp)")
    c.add_argument("--water", metavar="MG_CM3", help="water density per rod from the phantom certificate (mindways)")
    c.add_argument("--convention", choices=("mindways", "esp"), default="mindways")
    c.add_argument("--method", choices=("physics", "classic"), default="physics",
                   help="physics: rods fix energy and offset, output HA via the NIST marrow model (default); "
                        "classic: the convention's own line in the rods' mineral")
    c.add_argument("--mineral", choices=("ha", "k2hpo4"), default=None, help="output mineral (default HA for physics)")
    c.add_argument("--table", metavar="FILE", help="calibration table (default $SPINEKIT_HOME or ~/.spinekit)")
    for key in ("manufacturer", "model", "kvp", "kernel"):
        c.add_argument(f"--{key}", help=f"scanner {key} (overrides the DICOM header)")
    c.add_argument("--note", default="", help="free text stored with the entry (phantom serial, date, ...)")
    ls = sub.add_parser("list", help="print the entries of a calibration table")
    ls.add_argument("--table", metavar="FILE", help="calibration table (default $SPINEKIT_HOME or ~/.spinekit)")


def _dicom_tags(path: Path) -> dict:
    """Scanner tags from the first DICOM file of a folder (read_image keeps voxels only)."""
    if not path.is_dir():
        return {}
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        return {}
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file; try the next one
            continue
        return {k: ds.get(k) for k in ("Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel")
                if ds.get(k) not in (None, "")}
    return {}


def _create(args) -> int:
    from ..image import read_image
    from .calibration import (CalibrationTable, calibrate_phantom, default_table_path, describe_scanner,
                              entry_from_calibration, rod_hu_from_labels, rod_labels_from_circles)

    ct_path = Path(args.phantom_ct)
    image = read_image(ct_path)
    conc = _floats(args.concentrations, "--concentrations")
    water = _floats(args.water, "--water") if args.water else None
    if args.rods:
        rods = read_image(Path(args.rods))
        if rods.shape != image.shape:
            raise InputError(f"{args.rods}: the rod mask grid {rods.shape} does not match the phantom CT grid {image.shape}.")
        rod_hu = rod_hu_from_labels(image.array, rods.array)
        source = args.rods
    else:
        if args.rod_radius is None:
            raise InputError("--rod-centres needs --rod-radius (mm).")
        centres = [_floats(c, "--rod-centres") for c in args.rod_centres.split(";") if c.strip()]
        if any(len(c) != 3 for c in centres):
            raise InputError(f"--rod-centres '{args.rod_centres}' must hold x,y,z (mm) per rod, separated by ';'.")
        rod_hu = rod_hu_from_labels(image.array, rod_labels_from_circles(image, centres, args.rod_radius), erode_voxels=0)
        source = "--rod-centres"
    if len(rod_hu) != len(conc):
        raise InputError(f"{source}: holds {len(rod_hu)} rods but {len(conc)} concentrations were given.")
    cal = calibrate_phantom(rod_hu, conc, convention=args.convention, mineral=args.mineral,
                            rod_water_density_mg_cm3=water, method=args.method)
    meta = {**_dicom_tags(ct_path), **{k: v for k, v in dict(image.metadata).items() if v not in (None, "")}}
    overrides = {"Manufacturer": args.manufacturer, "ManufacturerModelName": args.model, "KVP": args.kvp,
                 "ConvolutionKernel": args.kernel}
    meta.update({k: v for k, v in overrides.items() if v not in (None, "")})
    entry = entry_from_calibration(cal, meta, source_note=args.note or f"phantom scan {ct_path.name}")
    table_path = Path(args.table) if args.table else default_table_path()
    table = CalibrationTable.load(table_path, missing_ok=True)
    replaced = table.add(entry)
    table.save(table_path)
    kev = f", effective energy {cal.effective_kev:.1f} keV" if cal.effective_kev else ""
    print(f"{'Replaced' if replaced else 'Added'} calibration for {describe_scanner(entry.key())}: "
          f"slope {entry.slope_hu_per_mg_cm3:.4f} HU per mg/cm3 {entry.mineral.upper()}, intercept "
          f"{entry.intercept_hu:.2f} HU{kev}, rod RMS residual {cal.residual_hu:.2f} HU -> {table_path}")
    return 0


def _list(args) -> int:
    from .calibration import CalibrationTable, default_table_path, describe_scanner

    table_path = Path(args.table) if args.table else default_table_path()
    table = CalibrationTable.load(table_path)
    if not table.entries:
        print(f"{table_path}: no entries.")
        return 0
    for e in table.entries:
        print(f"{describe_scanner(e.key())}: slope {e.slope_hu_per_mg_cm3:.4f}, intercept {e.intercept_hu:.2f} HU, "
              f"{e.mineral.upper()}, {e.convention}, created {e.created or '?'}"
              + (f", {e.source_note}" if e.source_note else ""))
    return 0


def run(args) -> int:
    action = getattr(args, "action", None)
    if action == "create":
        return _create(args)
    if action == "list":
        return _list(args)
    raise InputError("say what to do: 'spinekit calibration create ...' or 'spinekit calibration list'.")
