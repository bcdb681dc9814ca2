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
    labels_uncertain: bool = False  # True when no anatomical anchor fixed the level names
    warnings: list[str] = field(default_factory=list)

    def level(self, name: str) -> Optional[LevelRecord]:
        for rec in self.levels:
            if rec.name == name:
                return rec
        return None

    def present_levels(self) -> list[str]:
        return [r.name for r in sorted(self.levels, key=lambda r: lv.order_index(r.name)) if r.present]

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "labels_uncertain": self.labels_uncertain,
            "warnings": list(self.warnings),
            "levels": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in self.levels},
        }


class Backend(Protocol):
    name: str

    def __call__(self, image: Image, progress: Optional[Progress] = None, **options) -> SegmentationResult:
        ...


def records_from_labels(vertebrae: np.ndarray, bodies: np.ndarray, confidence: float = 1.0,
                        uncertain: bool = False) -> list[LevelRecord]:
    """Per-level records from label arrays; a level touching the first/last slice is truncated."""
    out: list[LevelRecord] = []
    counts = np.bincount(vertebrae.ravel(), minlength=256)
    body_counts = np.bincount(bodies.ravel(), minlength=256)
    nz = vertebrae.shape[0]
    for vid in np.nonzero(counts[1:])[0] + 1:
        if int(vid) not in lv.VERSE_NAMES:
            continue
        name = lv.level_name(int(vid))
        zs = np.nonzero((vertebrae == vid).any(axis=(1, 2)))[0]
        truncated = None
        # z index increases towards the head (LPS, identity direction): slice 0 is caudal.
        if zs.max() >= nz - 1:
            truncated = "cranial"
        elif zs.min() <= 0:
            truncated = "caudal"
        flags = ["truncated"] if truncated else []
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
    tmp = {k: p.with_name(".tmp-" + p.name) for k, p in targets.items()}
    write_image(result.vertebrae.with_array(result.vertebrae.array.astype(np.uint8)), tmp["vertebrae"])
    write_image(result.bodies.with_array(result.bodies.array.astype(np.uint8)), tmp["bodies"])
    tmp["levels"].write_text(json.dumps(result.to_json(), indent=2))
    for k in targets:
        tmp[k].replace(targets[k])
    return targets
