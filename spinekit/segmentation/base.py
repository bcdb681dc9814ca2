"""The segmentation protocol every backend follows.

A backend takes an Image (CT, HU) and returns whole-vertebra labels and vertebral-body labels,
both in VerSe ids on the CT grid, plus one record per level that says whether the level is
present, whether the field of view cuts it, and how sure the naming is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from .. import levels as lv
from ..image import Image, write_image
from ..outputs import staged
from ..progress import Progress


@dataclass
class LevelRecord:
    name: str                      # "L1"
    verse_id: int                  # 20
    present: bool = True
    complete: bool = True          # False when the field of view cuts the vertebra
    truncated: Optional[str] = None  # "cranial" | "caudal" | None
    confidence: float = 1.0        # of the level *name* (0-1)
    voxels: int = 0                # whole-vertebra voxels
    body_voxels: int = 0
    flags: list[str] = field(default_factory=list)


@dataclass
class SegmentationResult:
    vertebrae: Image               # uint8 VerSe ids, whole vertebrae
    bodies: Image                  # uint8 VerSe ids, vertebral bodies only
    levels: list[LevelRecord]
    backend: str
    labels_uncertain: bool = False  # True when no anchor fixed the names, anchors disagree, or slices are too thick
    warnings: list[str] = field(default_factory=list)
    # Which tool/model produced the labels (model name, weights SHA-256, ...); empty for
    # label maps the user supplied directly.
    provenance: dict = field(default_factory=dict)

    def level(self, name: str) -> Optional[LevelRecord]:
        for rec in self.levels:
            if rec.name == name:
                return rec
        return None

    def present_levels(self) -> list[str]:
        return [r.name for r in sorted(self.levels, key=lambda r: lv.order_index(r.name)) if r.present]

    def to_json(self) -> dict:
        out = {
            "backend": self.backend,
            "labels_uncertain": self.labels_uncertain,
            "warnings": list(self.warnings),
            "levels": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in self.levels},
        }
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out


class Backend(Protocol):
    name: str

    def __call__(self, image: Image, progress: Optional[Progress] = None, **options) -> SegmentationResult:
        ...


def superior_axis(image: Optional[Image]) -> tuple[int, int]:
    """(array axis, sign) of the patient's head direction: moving +1 along that array axis
    goes cranially when sign is +1, caudally when -1.

    Uses the Image direction (columns = x/y/z index axes in LPS, +z = superior), so flipped or
    permuted grids (e.g. sagittal acquisitions) are handled; without an Image, z-up is assumed.
    """
    if image is None or image.ndim != 3:
        return 0, 1
    sup = np.asarray(image.direction, dtype=float)[2, :]  # S component of each index axis
    j = int(np.argmax(np.abs(sup)))                        # ITK axis (x=0, y=1, z=2)
    return 2 - j, (1 if sup[j] > 0 else -1)                # numpy axis order is [z, y, x]


def records_from_labels(vertebrae: np.ndarray, bodies: np.ndarray, confidence: float = 1.0,
                        uncertain: bool = False, *, image: Optional[Image] = None) -> list[LevelRecord]:
    """Per-level records from label arrays; a level touching the cranial/caudal end of the
    field of view is truncated (flag "truncated"; plus "body_in_view" when its body does not
    touch that end). ``image`` (the grid of the arrays) gives the orientation; without it
    slice 0 is taken as caudal (identity direction)."""
    out: list[LevelRecord] = []
    vertebrae = np.asarray(vertebrae)
    bodies = np.asarray(bodies)
    counts = np.bincount(vertebrae.ravel().astype(np.int64), minlength=256)
    body_counts = np.bincount(bodies.ravel().astype(np.int64), minlength=256)
    axis, sign = superior_axis(image)
    n = vertebrae.shape[axis]
    other = tuple(a for a in range(vertebrae.ndim) if a != axis)
    for vid in np.nonzero(counts[1:])[0] + 1:
        if int(vid) not in lv.VERSE_NAMES:
            continue
        name = lv.level_name(int(vid))
        idx = np.nonzero((vertebrae == vid).any(axis=other))[0]
        at_high, at_low = idx.max() >= n - 1, idx.min() <= 0
        truncated = None
        if at_high or at_low:
            # Which end of the array is cranial depends on the direction's sign.
            high_side, low_side = ("cranial", "caudal") if sign > 0 else ("caudal", "cranial")
            truncated = high_side if at_high else low_side
        flags = ["truncated"] if truncated else []
        if truncated and body_counts[vid]:
            # The arch often reaches the edge while the body (what BMD measures) is whole.
            bidx = np.nonzero((bodies == vid).any(axis=other))[0]
            if bidx.max() < n - 1 and bidx.min() > 0:
                flags.append("body_in_view")
        if uncertain:
            flags.append("label_uncertain")
        out.append(LevelRecord(name=name, verse_id=int(vid), present=True, complete=truncated is None,
                               truncated=truncated, confidence=confidence, voxels=int(counts[vid]),
                               body_voxels=int(body_counts[vid]), flags=flags))
    out.sort(key=lambda r: lv.order_index(r.name))
    return out


def write_segmentation(result: SegmentationResult, out_dir: str | Path) -> dict[str, Path]:
    """Write vertebrae.nii.gz, vertebral_bodies.nii.gz and levels.json (temp names, then rename,
    so a crash never leaves a good earlier result half-overwritten)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "vertebrae": out_dir / "vertebrae.nii.gz",
        "bodies": out_dir / "vertebral_bodies.nii.gz",
        "levels": out_dir / "levels.json",
    }
    with staged(targets) as tmp:
        write_image(result.vertebrae.with_array(result.vertebrae.array.astype(np.uint8)), tmp["vertebrae"])
        write_image(result.bodies.with_array(result.bodies.array.astype(np.uint8)), tmp["bodies"])
        tmp["levels"].write_text(json.dumps(result.to_json(), indent=2))
    return targets
