"""Label-map import backend: a user's (or another tool's) vertebra labels -> SpineKit result.

Accepts an Image, a file (NIfTI/NRRD/MHA) or a numpy array, in any convention known to
``spinekit.levels`` (guessed when not given, and the guess is stated in the warnings).
Label maps on another grid are resampled (nearest neighbour) onto the CT when they overlap it
physically. Vertebral bodies come from a body map (TotalSegmentator ``vertebrae_body``, or a
per-level map) or, failing that, from the whole vertebrae geometrically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import levels as lv
from ..errors import InputError
from ..image import Image
from ..masks import fill_holes, in_plane
from ..progress import Progress, report
from .base import SegmentationResult, records_from_labels

LabelSource = Union[Image, str, Path, np.ndarray]

# A "canal" of fewer voxels than this, found by hole filling, is noise.
_MIN_CANAL_VOXELS = 2


# --- reading and matching the grid ------------------------------------------------------------
def _describe(source: LabelSource, what: str) -> str:
    if isinstance(source, (str, Path)):
        return f"{what} {Path(source).name}"
    if isinstance(source, np.ndarray):
        return f"{what} (array)"
    return f"{what} image"


def _read_label_file(path: Path, desc: str) -> Image:
    if not path.exists():
        raise InputError(f"{desc}: no such file.")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{desc} cannot be read as an image (expected NIfTI, NRRD or MHA).") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{desc} has {img.GetNumberOfComponentsPerPixel()} values per voxel; a label map has one.")
    if img.GetDimension() != 3:
        raise InputError(f"{desc} is {img.GetDimension()}D; a 3D label map is needed.")
    return Image.from_sitk(img)


def _check_integer_labels(array: np.ndarray, desc: str) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{desc} holds {array.dtype} values; integer labels are needed.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{desc} has non-integer values; a label map must hold integer labels.")
    if array.size and array.min() < 0:
        raise InputError(f"{desc} has negative values; a label map must hold labels >= 0.")
    if array.size and array.max() > 65535:
        raise InputError(f"{desc} has labels above 65535; this is not a vertebra label map.")
    return array.astype(np.int32 if array.size and array.max() > 255 else np.uint8, copy=False)


def label_image_on_grid(labels: LabelSource, image: Image, what: str = "label map") -> Image:
    """The label map as integer labels on ``image``'s grid.

    Files and Images on another grid are resampled with nearest neighbour when they overlap
    the CT physically; arrays must already have the CT's shape. Raises InputError (one
    sentence naming the input) when the map is not 3D, not integer, or does not overlap.
    """
    desc = _describe(labels, what)
    if isinstance(labels, (str, Path)):
        lab = _read_label_file(Path(labels), desc)
    elif isinstance(labels, Image):
        lab = labels
    elif isinstance(labels, np.ndarray):
        if labels.ndim != 3:
            raise InputError(f"{desc} is {labels.ndim}D; a 3D label map is needed.")
        if labels.shape != image.shape:
            raise InputError(f"{desc} has shape {labels.shape} but the CT has shape {image.shape}; "
                             "give a file with its geometry to resample it.")
        return image.with_array(_check_integer_labels(labels, desc), label_source=desc)
    else:
        raise InputError(f"{what} must be an Image, a file path or a numpy array, not {type(labels).__name__}.")

    if lab.ndim != 3:
        raise InputError(f"{desc} is {lab.ndim}D; a 3D label map is needed.")
    arr = _check_integer_labels(lab.array, desc)
    if lab.same_grid(image):
        return image.with_array(arr, label_source=desc)

    # Different grid: resample physically (nearest neighbour keeps the ids intact).
    src = lab.with_array(arr).to_sitk()
    ref = image.to_sitk()
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, src.GetPixelID())
    res = sitk.GetArrayFromImage(out)
    n_in, n_out = int(np.count_nonzero(arr)), int(np.count_nonzero(res))
    if n_in and n_out == 0:
        raise InputError(f"{desc} does not overlap the CT in physical space (check that it belongs to this CT).")
    if not n_in:
        raise InputError(f"{desc} is empty (no non-zero labels).")
    return image.with_array(res.astype(arr.dtype), resampled_from=desc, label_source=desc)


# --- conventions ------------------------------------------------------------------------------
def _label_centroids_mm(labels: Image, ids: list[int]) -> dict[int, np.ndarray]:
    """LPS centroid (mm) of each label."""
    if not ids:
        return {}
    coms = ndimage.center_of_mass(labels.array > 0, labels.array, ids)
    pts = labels.index_to_physical(np.asarray(coms, dtype=float).reshape(-1, 3))
    return {i: p for i, p in zip(ids, pts)}


def _label_z_ranges_mm(labels: Image, ids: list[int]) -> dict[int, tuple[float, float]]:
    """Cranio-caudal (LPS z) range (low, high) of each label's bounding box, in mm."""
    objects = ndimage.find_objects(labels.array.astype(np.int64), max_label=max(ids))
    out = {}
    for i in ids:
        sl = objects[i - 1]
        corners = np.array([[a, b, c] for a in (sl[0].start, sl[0].stop - 1)
                            for b in (sl[1].start, sl[1].stop - 1) for c in (sl[2].start, sl[2].stop - 1)], float)
        z = labels.index_to_physical(corners)[:, 2]
        out[i] = (float(z.min()), float(z.max()))
    return out


def _column_fraction(mapping: dict[int, str], centroids: dict[int, np.ndarray],
                     volumes_ml: dict[int, float], z_ranges: dict[int, tuple[float, float]]) -> float:
    """Share of the labels a convention names as vertebrae that look like one spine column:
    centroid within 30 mm left-right of the named labels' median (kyphosis moves vertebrae
    antero-posteriorly, not sideways), no larger than 400 ml and, except the sacrum, no
    taller than 80 mm (an organ, or several bodies under one id, is not one vertebra)."""
    named = [i for i in centroids if i in mapping]
    if not named:
        return 0.0
    mid_x = float(np.median([centroids[i][0] for i in named]))
    ok = [i for i in named if abs(centroids[i][0] - mid_x) <= 30.0 and volumes_ml[i] <= 400.0
          and (mapping[i] == "sacrum" or z_ranges[i][1] - z_ranges[i][0] <= 80.0)]
    return len(ok) / len(named)


def _order_consistency(mapping: dict[int, str], heights: dict[int, float],
                       z_ranges: Optional[dict[int, tuple[float, float]]] = None) -> float:
    """Fraction of label pairs whose physical cranio-caudal position matches their level
    names under ``mapping``: right order, a distance a spine can have between those levels
    (about 8-50 mm per level; C1 and L1 cannot be 3 cm apart) and, with ``z_ranges``, no
    more cranio-caudal overlap than interlocking neighbours have (85% of the shorter one;
    L5 and the sacrum reach about 70%). 0.5 when fewer than two levels can be compared."""
    named = [(lv.order_index(mapping[i]), heights[i], i) for i in heights if i in mapping]
    good = total = 0
    for a in range(len(named)):
        for b in range(a + 1, len(named)):
            (oa, za, ia), (ob, zb, ib) = named[a], named[b]
            if oa == ob:
                continue
            total += 1
            steps, gap_mm = abs(oa - ob), abs(za - zb)
            # Smaller order index = more cranial = higher LPS z.
            ordered = (oa < ob) == (za > zb)
            plausible = 8.0 * steps - 20.0 <= gap_mm <= 50.0 * steps + 20.0
            if z_ranges is not None and plausible and ia in z_ranges and ib in z_ranges:
                (la, ha), (lb, hb) = z_ranges[ia], z_ranges[ib]
                overlap = min(ha, hb) - max(la, lb)
                plausible = overlap <= 0.85 * max(min(ha - la, hb - lb), 1e-6)
            good += ordered and plausible
    return good / total if total else 0.5


def guess_convention(labels: Image) -> tuple[str, float, str]:
    """(convention, plausibility 0-1, reason) for a label map on its grid.

    Scores every known convention by the share of present ids it names as vertebrae, times
    how well the named levels lie in cranio-caudal order in physical space, times the share
    of them that form one spine column. The order term separates conventions that use the
    same ids (VerSe 1-25 vs TotalSegmentator ``vertebrae_mr`` 1-25 run in opposite
    directions) and, through the distance and overlap limits, maps that are not per-level
    (a ``vertebrae_body`` map read as C1/C2); the column term rejects the organ ids of a
    full TotalSegmentator map.
    """
    ids = [int(i) for i in np.unique(labels.array) if i != 0]
    if not ids:
        raise InputError("label map is empty (no non-zero labels).")
    centroids = _label_centroids_mm(labels, ids)
    heights = {i: float(p[2]) for i, p in centroids.items()}
    counts = np.bincount(labels.array.ravel().astype(np.int64), minlength=max(ids) + 1)
    volumes_ml = {i: counts[i] * labels.voxel_volume_mm3 / 1000.0 for i in ids}
    z_ranges = _label_z_ranges_mm(labels, ids)
    # Levels cut by the field of view overlap their neighbour's range legitimately: their
    # ranges are left out of the overlap test.
    n = np.array(labels.shape, float) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    fov_z = labels.index_to_physical(corners)[:, 2]
    tol = max(labels.spacing_mm)
    whole = {i: r for i, r in z_ranges.items() if r[0] > fov_z.min() + tol and r[1] < fov_z.max() - tol}
    scores, plausibility = {}, {}
    for name, mapping in lv.CONVENTIONS.items():
        coverage = sum(i in mapping for i in ids) / len(ids)
        if not coverage:
            scores[name] = plausibility[name] = 0.0
            continue
        # Named share x cranio-caudal order x spine-column shape: organ ids that happen to
        # be vertebra ids in another convention fail the last two.
        plausibility[name] = (_order_consistency(mapping, heights, whole)
                              * _column_fraction(mapping, centroids, volumes_ml, z_ranges))
        scores[name] = coverage * plausibility[name]
    best = max(scores, key=lambda k: (round(scores[k], 6), k == "verse"))
    runner = max((k for k in scores if k != best), key=lambda k: scores[k])
    reason = (f"label convention not given; guessed '{best}' (score {scores[best]:.2f}, next "
              f"'{runner}' {scores[runner]:.2f}) from the ids present, their cranio-caudal order "
              "and the spine's shape")
    # The naming confidence is how anatomically plausible the chosen reading is (non-vertebra
    # ids of a multi-structure map do not lower it).
    return best, float(plausibility[best]), reason


def to_verse_image(labels: Image, convention: Optional[str] = None) -> tuple[Image, str, float, list[str]]:
    """Convert a label map (on the CT grid) to VerSe ids.

    Returns (VerSe label Image, convention used, naming confidence, warnings).
    """
    warnings: list[str] = []
    confidence = 1.0
    if convention is None:
        convention, confidence, reason = guess_convention(labels)
        if confidence < 0.25:
            ids = sorted(int(i) for i in np.unique(labels.array) if i)
            hint = (" (ids 1 and 2 only: a TotalSegmentator vertebrae_body map belongs in --bodies)"
                    if set(ids) <= {1, 2} else "")
            raise InputError(f"{labels.metadata.get('label_source', 'the label map')} does not read as one spine "
                             f"in any known label convention{hint}; give its convention explicitly.")
        warnings.append(reason + ".")
    verse = lv.to_verse(labels.array, convention).astype(np.uint8)
    dropped = sorted({int(i) for i in np.unique(labels.array[(verse == 0) & (labels.array != 0)])})
    if dropped:
        shown = ", ".join(map(str, dropped[:8])) + (" ..." if len(dropped) > 8 else "")
        warnings.append(f"ids {shown} are not vertebrae in the '{convention}' convention and were ignored.")
    return labels.with_array(verse), convention, confidence, warnings


# --- vertebral bodies -------------------------------------------------------------------------
def _spine_axes(centroids: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Local cranial unit vector (LPS) per level from its neighbours' centroids."""
    ordered = sorted(centroids, key=lambda v: lv.order_index(lv.level_name(v)))
    axes = {}
    for k, vid in enumerate(ordered):
        up = centroids[ordered[max(k - 1, 0)]]
        down = centroids[ordered[min(k + 1, len(ordered) - 1)]]
        d = up - down
        if len(ordered) < 2 or np.linalg.norm(d) < 1e-6:
            d = np.array([0.0, 0.0, 1.0])
        d = d / np.linalg.norm(d)
        if d[2] < 0:  # cranial must point superior
            d = -d
        axes[vid] = d
    return axes


def _in_plane(v: np.ndarray, axis: np.ndarray) -> np.ndarray:
    w = v - np.dot(v, axis) * axis
    n = np.linalg.norm(w)
    return w / n if n > 1e-9 else w


def _largest_component(mask: np.ndarray, tiebreak, geom: Image, offset: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of ``mask``; equal sizes are decided by
    ``tiebreak(physical centroid)`` (larger wins) so the choice does not depend on how the
    array happens to be stored."""
    cc, n = ndimage.label(mask)
    if n <= 1:
        return cc > 0
    sizes = np.bincount(cc.ravel())[1:]
    best = np.nonzero(sizes == sizes.max())[0] + 1
    if len(best) > 1:
        coms = ndimage.center_of_mass(mask, cc, best.tolist())
        keys = [tiebreak(geom.index_to_physical((np.asarray(c) + offset)[None])[0]) for c in coms]
        best = best[int(np.argmax(keys))]
    else:
        best = best[0]
    return cc == best


def bodies_from_vertebrae(vertebrae: Image, image: Optional[Image] = None) -> np.ndarray:
    """Vertebral-body labels (VerSe ids) derived from whole-vertebra labels by geometry.

    Per level, in physical (LPS) space: the spinal canal is found as the hole that the arch
    encloses in slices across the spine axis; the level's own antero-posterior axis runs from
    the canal centre through the vertebra centre (patient anterior when no canal is found),
    and the body is the part of the vertebra anterior of the canal's front wall (pedicles and
    the posterior arch removed), keeping the largest connected piece. Without a canal the
    arch is removed by a morphological opening (the body is the only thick part).
    ``image`` is only used for its geometry when ``vertebrae`` is a bare grid.
    """
    geom = vertebrae if image is None else image
    lab = np.asarray(vertebrae.array)
    out = np.zeros(lab.shape, dtype=np.uint8)
    ids = [int(i) for i in np.unique(lab) if i in lv.VERSE_NAMES and lv.VERSE_NAMES[int(i)] != "sacrum"]
    if not ids:
        return out
    spacing_zyx = np.asarray(geom.spacing_zyx_mm)
    coms = ndimage.center_of_mass(lab > 0, lab, ids)
    centroids = {v: geom.index_to_physical(np.asarray(c)[None])[0] for v, c in zip(ids, coms)}
    axes = _spine_axes(centroids)
    objects = ndimage.find_objects(lab.astype(np.int64))
    anterior_lps = np.array([0.0, -1.0, 0.0])  # LPS: +y is posterior

    for vid in ids:
        sl = objects[vid - 1]
        # One voxel of margin so holes touching the box edge still count as enclosed.
        sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, lab.shape))
        m = lab[sl] == vid
        offset = np.array([s.start for s in sl], dtype=float)
        s_axis = axes[vid]
        # Array axis closest to the spine axis: slice across it to find the enclosed canal.
        cols = np.abs(np.asarray(geom.direction).T @ s_axis)  # per ITK axis x, y, z
        slice_axis = 2 - int(np.argmax(cols))
        holes = fill_holes(m, structure=in_plane(slice_axis)) & ~m
        vox = np.argwhere(m)
        pts = geom.index_to_physical(vox + offset)
        centre = pts.mean(axis=0)
        # Largest hole is the canal (ties: the one nearest the vertebra's centre).
        canal = _largest_component(holes, lambda c: -float(np.linalg.norm(c - centre)), geom, offset)

        body = None
        if canal.sum() >= _MIN_CANAL_VOXELS:
            cpts = geom.index_to_physical(np.argwhere(canal) + offset)
            ap = _in_plane(centre - cpts.mean(axis=0), s_axis)
            # Trust the level's own AP axis unless it points away from the patient's front.
            if np.linalg.norm(ap) < 1e-6 or np.dot(ap, _in_plane(anterior_lps, s_axis)) < 0.5:
                ap = _in_plane(anterior_lps, s_axis)
            front = float(np.max((cpts - centre) @ ap))
            t = (pts - centre) @ ap
            keep = t > front + 0.25 * float(np.min(spacing_zyx))
            body = np.zeros_like(m)
            body[tuple(vox[keep].T)] = True
        if body is None or not body.any():
            # Opening with a ~5 mm ball: the arch (lamina, processes) is thinner than that.
            r_mm = 5.0
            dist_in = ndimage.distance_transform_edt(m, sampling=spacing_zyx)
            core = dist_in > r_mm
            if not core.any():
                core = dist_in >= 0.6 * dist_in.max()
            dist_out = ndimage.distance_transform_edt(~core, sampling=spacing_zyx)
            body = m & (dist_out <= r_mm)
        # Largest piece is the body (ties: the most anterior one).
        front_dir = _in_plane(anterior_lps, s_axis)
        body = _largest_component(body, lambda c: float(np.dot(c, front_dir)), geom, offset)
        region = out[sl]
        region[body & m] = vid
    return out


def bodies_from_body_map(vertebrae: np.ndarray, body_map: np.ndarray) -> np.ndarray:
    """Per-level bodies from a binary body map (TotalSegmentator ``vertebrae_body``: 1 body,
    2 disc): each body voxel takes the level of the whole-vertebra label it lies in."""
    body = np.asarray(body_map) == lv.TS_VERTEBRAE_BODY["body"]
    return np.where(body, vertebrae, 0).astype(np.uint8)


def _is_ts_vertebrae_body(arr: np.ndarray) -> bool:
    ids = set(int(i) for i in np.unique(arr)) - {0}
    return bool(ids) and ids <= set(lv.TS_VERTEBRAE_BODY.values())


# --- the backend ------------------------------------------------------------------------------
def import_labelmap(image: Image, labels: LabelSource, *, convention: Optional[str] = None,
                    bodies: Optional[LabelSource] = None, body_convention: Optional[str] = None,
                    progress: Optional[Progress] = None, backend: str = "labelmap",
                    confidence: Optional[float] = None,
                    warnings: Optional[list[str]] = None) -> SegmentationResult:
    """Import whole-vertebra labels (and optionally bodies) as a SegmentationResult on the CT grid.

    labels: Image, file or array (array: same shape as the CT) in ``convention`` (one of
        ``spinekit.levels.CONVENTIONS``; guessed when None, the guess stated in warnings).
    bodies: optional body map: TotalSegmentator ``vertebrae_body`` (1 body, 2 disc; combined
        with the vertebra labels) or a per-level map in ``body_convention`` (default: the
        vertebrae's). Without it, bodies are derived geometrically (``bodies_from_vertebrae``).
    confidence: naming confidence to record (default 1 when the convention is given, else
        the guess score).
    """
    warns = list(warnings or [])
    if convention is not None and convention not in lv.CONVENTIONS:
        known = ", ".join(sorted(lv.CONVENTIONS))
        raise InputError(f"unknown label convention '{convention}' (known: {known}).")
    report(progress, 0.05, "reading label map")
    lab = label_image_on_grid(labels, image, "label map")
    if "resampled_from" in lab.metadata:
        warns.append(f"{lab.metadata['resampled_from']} was on another grid and was resampled onto the CT (nearest neighbour).")
    if not lab.array.any():
        raise InputError(f"{_describe(labels, 'label map')} is empty on the CT grid (no non-zero labels).")
    verse, used, guess_score, conv_warns = to_verse_image(lab, convention)
    warns += conv_warns
    if not verse.array.any():
        raise InputError(f"{_describe(labels, 'label map')} holds no vertebra ids in the '{used}' convention.")
    if confidence is None:
        confidence = 1.0 if convention is not None else round(guess_score, 3)

    report(progress, 0.4, "vertebral bodies")
    if bodies is not None:
        body_lab = label_image_on_grid(bodies, image, "body map")
        if body_convention is None and _is_ts_vertebrae_body(body_lab.array):
            body_arr = bodies_from_body_map(verse.array, body_lab.array)
        else:
            body_conv = body_convention or used
            body_arr = lv.to_verse(body_lab.array, body_conv).astype(np.uint8)
            # A body belongs inside its own vertebra.
            body_arr = np.where(body_arr == verse.array, body_arr, 0).astype(np.uint8)
        missing = sorted(set(np.unique(verse.array)) - set(np.unique(body_arr)) - {0, lv.VERSE_IDS["sacrum"]})
        if missing:
            warns.append("the body map has no body for " + ", ".join(lv.level_name(int(v)) for v in missing) + ".")
    else:
        body_arr = bodies_from_vertebrae(verse, image)
        warns.append("vertebral bodies derived geometrically from the whole vertebrae (no body map given).")

    report(progress, 0.9, "level records")
    uncertain = confidence < 0.5
    records = records_from_labels(verse.array, body_arr, confidence=confidence, uncertain=uncertain, image=image)
    result = SegmentationResult(
        vertebrae=image.with_array(verse.array.astype(np.uint8), convention=used),
        bodies=image.with_array(body_arr.astype(np.uint8)),
        levels=records,
        backend=backend,
        labels_uncertain=uncertain,
        warnings=warns,
    )
    report(progress, 1.0, f"imported {len(records)} levels")
    return result
