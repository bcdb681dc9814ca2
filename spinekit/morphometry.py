"""Vertebral body morphometry: heights, ratios, Genant grade, volume.

Heights are measured in each vertebra's own frame (spinekit.bmd.roi.vertebra_frame): on the
mid-sagittal plane of the body, along the local superior-inferior axis, at 15 / 50 / 85 % of
the AP depth from the anterior wall (as TotalSegmentator's spine report). The mask is sampled
with linear interpolation, so an axis-aligned height equals voxel count x spacing.

Semi-quantitative grade (Genant) by height loss = 1 - min(Ha/Hp, Hm/Hp, Hp/Hp_neighbours):
grade 0 < 20 %, 1 20-25 %, 2 25-40 %, 3 > 40 %. Kong 2024: a ratio more than 3 SD below the
normal mean (0.91, SD 0.08) is flagged as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from . import levels as lv
from .bmd.roi import (VertebraFrame, _centroids_mm, _neighbour_centres, level_crops, main_body_component,
                      profile_extent_mm, vertebra_frame)

GENANT_LOSS_LIMITS = (0.20, 0.25, 0.40)  # grade 1 from 20 %, 2 from 25 %, 3 above 40 %
KONG_RATIO_MEAN = 0.91
KONG_RATIO_SD = 0.08
KONG_RATIO_LIMIT = KONG_RATIO_MEAN - 3 * KONG_RATIO_SD  # 0.67
FRAGMENT_FRACTION = 0.05  # flag when more than this share of a body mask is detached pieces
HEIGHT_POSITIONS = {"anterior": 0.15, "middle": 0.50, "posterior": 0.85}  # fraction of depth from anterior


@dataclass
class LevelMorphometry:
    level: str
    verse_id: int
    body_volume_cm3: float
    height_anterior_mm: float | None = None
    height_middle_mm: float | None = None
    height_posterior_mm: float | None = None
    depth_mm: float | None = None
    width_mm: float | None = None
    ratio_ha_hp: float | None = None
    ratio_hm_hp: float | None = None
    ratio_hp_neighbours: float | None = None
    height_loss: float | None = None
    genant_grade: int | None = None
    deformity: str | None = None       # 'wedge' | 'biconcave' | 'crush' (the ratio that sets the loss)
    flags: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def genant_grade(height_loss: float | None) -> int | None:
    """Genant semi-quantitative grade from a fractional height loss (0.3 = 30 %)."""
    if height_loss is None or not np.isfinite(height_loss):
        return None
    g = 0
    for k, limit in enumerate(GENANT_LOSS_LIMITS, start=1):
        # Grade 1 starts at 20 %, grade 2 at 25 %; grade 3 is "more than 40 %".
        if (height_loss > limit) if k == 3 else (height_loss >= limit):
            g = k
    return g


def body_heights(body: np.ndarray, spacing_zyx_mm, frame: VertebraFrame,
                 lateral_offsets_mm=(-1.5, 0.0, 1.5), ap_offsets_mm=(-0.75, 0.0, 0.75)) -> dict[str, float]:
    """Anterior / middle / posterior heights, AP depth and LR width (mm) of one body mask."""
    depth, post, ant = profile_extent_mm(body, spacing_zyx_mm, frame, "ap")
    width, lr_lo, lr_hi = profile_extent_mm(body, spacing_zyx_mm, frame, "lr")
    out = {"depth_mm": depth, "width_mm": width}
    if depth <= 0:
        return {**out, **{f"height_{k}_mm": None for k in HEIGHT_POSITIONS}}
    c_lr = 0.5 * (lr_lo + lr_hi)
    for name, frac in HEIGHT_POSITIONS.items():
        v = ant - frac * depth
        offsets = [(c_lr + du, v + dv, 0.0) for du in lateral_offsets_mm for dv in ap_offsets_mm]
        h, _, _ = profile_extent_mm(body, spacing_zyx_mm, frame, "si", offsets_local=offsets)
        out[f"height_{name}_mm"] = h if h > 0 else None
    return out


def measure_morphometry(bodies: np.ndarray, spacing_zyx_mm, *, vertebrae: np.ndarray | None = None,
                        direction: np.ndarray | None = None,
                        levels: list[int] | None = None, crops: dict | None = None,
                        vertebra_crops: dict | None = None, clean: bool = True) -> dict[str, LevelMorphometry]:
    """Morphometry of every body in a VerSe-id label map; keys are level names, cranio-caudal.

    vertebrae (whole-vertebra VerSe ids, optional) sets the anterior direction from the posterior
    elements; direction (3x3) is the image direction (scanner axes as fallback). crops /
    vertebra_crops: ``spinekit.bmd.roi.level_crops`` results when the caller has them.
    clean: drop detached pieces of each body (flag 'body_mask_fragments' when > 5 %); pass
    False for labels already cleaned with ``spinekit.bmd.roi.clean_body_labels``.
    """
    bodies = np.asarray(bodies)
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    crops = level_crops(bodies) if crops is None else crops
    present = list(crops)
    wanted = present if levels is None else [int(i) for i in levels if int(i) in crops]
    wanted.sort(key=lambda i: lv.order_index(lv.level_name(i)))
    sizes: dict[int, int] = {}
    centres = _centroids_mm(bodies, present, spacing, crops, sizes_out=sizes)
    vcentres = _centroids_mm(vertebrae, wanted, spacing, vertebra_crops) if vertebrae is not None else {}
    out: dict[str, LevelMorphometry] = {}
    for vid in wanted:
        name = lv.level_name(vid)
        crop = crops[vid]
        raw = bodies[crop] == vid
        body = main_body_component(raw) if clean else raw
        m = LevelMorphometry(level=name, verse_id=vid, body_volume_cm3=float(body.sum()) * voxel_cm3)
        n_raw = int(raw.sum())
        if n_raw and body.sum() < (1.0 - FRAGMENT_FRACTION) * n_raw:
            # detached pieces / bridges (e.g. a vessel labelled as body) were left out
            m.flags.append("body_mask_fragments")
        offset = np.array([s.start for s in crop]) * np.asarray(spacing)
        frame = vertebra_frame(body, spacing,
                               neighbour_centres_mm=[c - offset for c in _neighbour_centres(vid, centres, sizes)],
                               vertebra_centre_mm=(vcentres[vid] - offset) if vid in vcentres else None,
                               direction=direction)
        h = body_heights(body, spacing, frame)
        m.height_anterior_mm = h["height_anterior_mm"]
        m.height_middle_mm = h["height_middle_mm"]
        m.height_posterior_mm = h["height_posterior_mm"]
        m.depth_mm, m.width_mm = h["depth_mm"], h["width_mm"]
        out[name] = m
    _grade(out)
    return out


def _grade(results: dict[str, LevelMorphometry]) -> None:
    """Ratios against the body itself and its neighbours, then the Genant grade."""
    for name, m in results.items():
        hp = m.height_posterior_mm
        if not hp:
            m.flags.append("heights_unmeasured")
            continue
        if m.height_anterior_mm:
            m.ratio_ha_hp = m.height_anterior_mm / hp
        if m.height_middle_mm:
            m.ratio_hm_hp = m.height_middle_mm / hp
        neigh = [results[n].height_posterior_mm for n in lv.neighbours(name)
                 if n in results and results[n].height_posterior_mm]
        if neigh:
            m.ratio_hp_neighbours = hp / float(np.mean(neigh))
        ratios = {"wedge": m.ratio_ha_hp, "biconcave": m.ratio_hm_hp, "crush": m.ratio_hp_neighbours}
        ratios = {k: v for k, v in ratios.items() if v is not None}
        if not ratios:
            continue
        kind = min(ratios, key=ratios.get)
        m.height_loss = max(0.0, 1.0 - ratios[kind])
        m.genant_grade = genant_grade(m.height_loss)
        if m.genant_grade:
            m.deformity = kind
            m.flags.append(f"fracture_genant_{m.genant_grade}")
        if ratios[kind] < KONG_RATIO_LIMIT:
            m.flags.append("kong_ratio_below_3sd")
