"""The builtin backend's working grid (an axis-aligned isotropic resampling of the CT and the
way back to the input grid), the structuring elements and bone thresholds every step shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import SimpleITK as sitk
import numpy as np
from scipy import ndimage as ndi

from ...errors import InputError
from ...image import Image
from ...masks import IN_SLICE, fill_holes, largest_component


COARSE_MM = 2.5          # scans at least this coarse: their outline is judged against the real 3 mm CT's
#                          reference (TotalSegmentator), finer ones against the phantoms' truth
MIN_WORKING_MM = 1.25     # finest working grid for coarse scans (grids whose voxel centres hold the scan's)
MAX_WORKING_VOXELS = 40e6  # ... and its largest (a 160x160x180 torso at 3 mm on the 1.5 mm grid: 36.9e6, 17 s,
#                            peak 1.2 GB; on the 2 mm grid T9-L5 whole Dice mean 0.892, min 0.860, vs 0.900 / 0.866)
BONE_HU = 180.0          # cortical shell / dense trabecular bone after light smoothing
TRABECULAR_HU = 115.0    # normal trabecular bone; discs (~85 HU) and muscle stay below
TRABECULAR_MIN_DIRS = 5  # ... and it lies inside a cortical ring: bone in most in-plane directions
ENCLOSURE_REACH_MM = 25.0  # ... met within this reach (_enclosed)
HU_FAT_BELOW = -50.0     # a CT in HU holds voxels below this (fat, air); MR and non-HU data do not
ROI_ANTERIOR_MM = 70.0   # column box around the canal centre
ROI_POSTERIOR_MM = 55.0
ROI_LATERAL_MM = 50.0
_SLICE = IN_SLICE
_SLICE8 = np.zeros((3, 3, 3), bool)
_SLICE8[1] = True


@dataclass
class _Grid:
    """The internal working grid: axis-aligned LPS, isotropic spacing."""
    hu: np.ndarray           # float32 [z, y, x], z superior, y posterior, x left
    spacing_mm: float
    reference: sitk.Image    # the working grid geometry (for mapping labels back)


@dataclass
class _Segment:
    s_lo: float
    s_hi: float
    label: int = 0           # working index 1..n (caudal -> cranial)
    name: str = ""
    ribs: int = 0
    broken_ribs: int = 0     # of `ribs`, those found as a neck stub and a shaft apart (_find_ribs)
    rib_stubs: int = 0       # ribs cut short by the scan's end (evidence for a guess, not an anchor)
    flags: list = field(default_factory=list)

    @property
    def rib_bearing(self) -> bool:
        return self.ribs > 0 or self.rib_stubs > 0


def _check_ct(image: Image) -> None:
    modality = str(image.metadata.get("Modality", "") or "").strip().upper()
    if modality and modality != "CT":
        raise InputError(f"the image is {modality}, not CT; the builtin backend segments CT images in HU only.")
    if image.ndim != 3:
        raise InputError(f"the image is {image.ndim}D; the builtin backend needs a 3D CT volume.")
    arr = image.array
    step = max(1, int(round((arr.size / 2e6) ** (1 / 3))))
    sample = np.asarray(arr[::step, ::step, ::step], dtype=np.float32)
    # A CT in HU holds air (about -1000) or fat (about -100) around and inside the patient; MR
    # and non-HU data hold neither. (Fat too: a spine reconstruction cropped inside the body may
    # hold no air at all, and the real 3 mm CT cropped so segments as it does whole.)
    low = float(np.mean(sample < HU_FAT_BELOW))
    if low < 1e-3 or float(sample.min()) < -3100 or float(sample.max()) < 0:
        raise InputError(f"the image intensities are not CT Hounsfield units (no air or fat below "
                         f"{HU_FAT_BELOW:g} HU); the builtin backend segments CT images only.")


def _corners(lo, hi) -> np.ndarray:
    """The 8 corners (rows) of the index box lo..hi (3 values each, any axis order)."""
    return np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)


def _physical_box(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS corner (mm) of the axis-aligned box around the scan's voxel centres."""
    pts = image.index_to_physical(_corners((0, 0, 0), np.asarray(image.shape, float) - 1.0))
    return pts.min(axis=0), pts.max(axis=0)


def _working_spacing(image: Image) -> float:
    """Isotropic working spacing: the scan's finest spacing within 1.5-2 mm. For coarser scans
    native/k, so that the native voxel centres are working voxel centres: at a non-integer ratio
    (3 mm scan, 2 mm grid) every other native voxel lies half-way between two working voxels and
    the labels drawn back by nearest neighbour shift there (3 mm phantom: label centroids 0.55 mm
    off along z, the right pedicles' marrow lost) - unless that grid would exceed
    MAX_WORKING_VOXELS (memory), where 2 mm stays."""
    native_min = float(min(image.spacing_mm))
    sp = float(min(max(native_min, 1.5), 2.0))
    if native_min > 2.0:
        k = int(np.ceil(native_min / 2.0 - 1e-6))
        aligned = native_min / k
        lo, hi = _physical_box(image)
        if aligned >= MIN_WORKING_MM and float(np.prod(_grid_size(lo, hi, aligned))) <= MAX_WORKING_VOXELS:
            sp = aligned
    return sp


def _grid_size(lo: np.ndarray, hi: np.ndarray, spacing_mm: float) -> list[int]:
    """Voxels per axis (x, y, z) of the working grid over the box lo..hi."""
    return [int(np.ceil((hi[d] - lo[d]) / spacing_mm)) + 1 for d in range(3)]


def _working_grid(image: Image, spacing_mm: float) -> _Grid:
    lo, hi = _physical_box(image)
    out_size = _grid_size(lo, hi, spacing_mm)
    src = image.to_sitk()
    # Block averaging before downsampling keeps thin cortex from aliasing away (and is much
    # cheaper than a Gaussian on a full-resolution CT).
    native = np.array(src.GetSpacing())
    shrink = [int(max(1, np.floor(spacing_mm / s + 1e-6))) for s in native]
    if max(shrink) > 1:
        src = sitk.BinShrink(sitk.Cast(src, sitk.sitkFloat32), shrink)
    else:
        src = sitk.Cast(src, sitk.sitkFloat32)
    # The grid's far faces lie up to a working voxel past the scan's last voxel centres (a 20-slice
    # 2 mm slab, 0-38 mm, on a 1.5 mm grid ends at 39 mm). There the scan's edge values carry on:
    # air there would, after smoothing, take the bone out of the last slices (real 2 mm slab: the
    # marrow of T11's top two slices). Farther out (the corners of an oblique scan's box) is air.
    hu = sitk.Resample(src, out_size, sitk.Transform(), sitk.sitkLinear, lo.tolist(), [spacing_mm] * 3,
                       np.eye(3).ravel().tolist(), -1024.0, sitk.sitkFloat32, True)
    hu_arr = sitk.GetArrayFromImage(hu)
    del hu
    if not np.allclose(np.abs(image.direction).max(axis=0), 1.0):
        scan = image.with_array(np.ones(image.shape, np.uint8)).to_sitk()   # the scan's extent
        inside = sitk.Resample(scan, out_size, sitk.Transform(), sitk.sitkNearestNeighbor, lo.tolist(),
                               [spacing_mm] * 3, np.eye(3).ravel().tolist(), 0, sitk.sitkUInt8)
        del scan
        near = ndi.binary_dilation(sitk.GetArrayFromImage(inside).astype(bool), structure=np.ones((3, 3, 3), bool))
        hu_arr[~near] = -1024.0
        del inside, near
    ref = sitk.Image(1, 1, 1, sitk.sitkUInt8)   # geometry holder only
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(lo.tolist())
    return _Grid(hu_arr, spacing_mm, ref)


def _to_native(labels: np.ndarray, grid: _Grid, image: Image) -> np.ndarray:
    lab = sitk.GetImageFromArray(labels.astype(np.uint8))
    lab.SetSpacing(grid.reference.GetSpacing())
    lab.SetOrigin(grid.reference.GetOrigin())
    size = [int(n) for n in reversed(image.shape)]
    out = sitk.Resample(lab, size, sitk.Transform(), sitk.sitkNearestNeighbor, list(image.origin_mm),
                        list(image.spacing_mm), image.direction.ravel().tolist(), 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def _body_mask(hu: np.ndarray) -> np.ndarray:
    body = largest_component(hu > -400)
    return fill_holes(body, structure=_SLICE)


def _enclosed(bone: np.ndarray, reach_vox: int) -> np.ndarray:
    """Number of the 8 in-plane directions in which bone is met within reach (per voxel)."""
    count = np.zeros(bone.shape, np.uint8)
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        hit = np.zeros_like(bone)
        reach = reach_vox if dy == 0 or dx == 0 else max(1, int(round(reach_vox / 1.414)))
        for k in range(1, reach + 1):
            sh = np.zeros_like(bone)
            ys = slice(max(0, -dy * k), bone.shape[1] - max(0, dy * k))
            yd = slice(max(0, dy * k), bone.shape[1] - max(0, -dy * k))
            xs = slice(max(0, -dx * k), bone.shape[2] - max(0, dx * k))
            xd = slice(max(0, dx * k), bone.shape[2] - max(0, -dx * k))
            # sh[z, y, x] = bone[z, y + dy*k, x + dx*k]
            sh[:, ys, xs] = bone[:, yd, xd]
            hit |= sh
        count += hit
    return count


def _flood(elev, markers, mask):
    """Watershed of the working labels `markers` over `elev` within `mask`; bone pieces the
    flood cannot reach (detached processes) go to the nearest labelled voxel."""
    from skimage.segmentation import watershed

    ws = watershed(elev, markers=markers.astype(np.int32), mask=mask)
    miss = mask & (ws == 0)
    if miss.any() and (ws > 0).any():
        _, ind = ndi.distance_transform_edt(ws == 0, return_indices=True)
        ws[miss] = ws[tuple(i[miss] for i in ind)]
    return ws.astype(np.uint8)


def _native_box(working_box, grid: _Grid, image: Image) -> tuple[slice, ...]:
    """Native index box [z, y, x] holding a working-grid box, with room for the outline steps
    (_refine_native grows labels by up to 1.5 working voxels; 2 native voxels more on each side)."""
    lo = np.array([b.start for b in working_box], float) - 1.0
    hi = np.array([b.stop for b in working_box], float)          # (stop - 1) + 1
    corners_zyx = _corners(lo, hi)
    origin = np.asarray(grid.reference.GetOrigin(), float)
    points = origin + corners_zyx[:, ::-1] * grid.spacing_mm  # LPS x, y, z (axis-aligned grid)
    idx = image.physical_to_index(points)                         # continuous [z, y, x]
    native = np.asarray(image.spacing_zyx_mm, float)
    margin = np.ceil(1.5 * grid.spacing_mm / native) + 2
    start = np.maximum(0, np.floor(idx.min(axis=0) - margin)).astype(int)
    stop = np.minimum(image.shape, np.ceil(idx.max(axis=0) + margin) + 1).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _shifted(a: np.ndarray, axis: int, step: int, fill=None) -> np.ndarray:
    """out[i] = a[i + step] along `axis`; past the array's end `fill`, or the edge value itself
    when fill is None (the field of view's end is no surface). (A slice copy: ndi.shift with
    order=0 gives the same, 10-40 times slower.)"""
    out = np.empty_like(a)
    src, dst, edge = [slice(None)] * 3, [slice(None)] * 3, [slice(None)] * 3
    if step > 0:
        src[axis], dst[axis], edge[axis] = slice(step, None), slice(None, -step), slice(-step, None)
    else:
        src[axis], dst[axis], edge[axis] = slice(None, step), slice(-step, None), slice(None, -step)
    out[tuple(dst)] = a[tuple(src)]
    out[tuple(edge)] = a[tuple(edge)] if fill is None else fill
    return out
