"""The default CT vertebra segmentation + level naming backend ("builtin": classic image
processing, no weights, works offline).

Pipeline (all on an internal axis-aligned LPS grid of 1.5-2 mm, labels mapped back at the end):
1. check the input is a CT in HU; reduce metal streaks (spinekit.segmentation.metal, for the
   segmentation only); block-average + resample to the working grid (z up, y posterior,
   x left), whatever the input's direction cosines;
2. bone = smoothed HU above a cortical threshold; per-slice hole filling (after a small closing
   in the body zone) turns cortical rings into solid bone, so low-density bodies are found by
   their shell; trabecular-density voxels count as bone too;
3. spinal canal = soft tissue (CSF-like HU) enclosed by bone in the 8 (or 7) in-plane
   directions, near the midline; the best chain of such pockets through the slices (a dynamic
   programme: off-canal pockets and gaps neither end nor bend it), its centre median-smoothed
   over 40 mm of slices, extrapolated along the sacral curve;
4. column = solid bone in a box around the canal, minus the canal; contrast blood pools too
   thick for any vertebral body (heart chambers) are removed; a long, homogeneous,
   off-midline tube in front of the bodies (contrast aorta; also searched in narrower HU bands,
   where at coarse spacing its lumen stands apart from blurred marrow) is removed with its rim,
   and so are pieces of its lumen HU hanging on the column by thin contacts (its branches);
   body = the column part anterior to the canal's anterior wall;
5. discs = deep minima of the density-weighted body profile along the body centreline, over
   slabs tilted -30..30 degrees (the L5/S1 disc), each measured within its own vertebra (an
   osteoporotic body's mid-body dip is not a disc), gaps filled where the disc spacing expects
   one (a dark band between two endplates before a mid-body dip);
   where no disc is sure (a short slab), thin dark bands between two bright endplates in a
   low-percentile HU profile (a thin disc as bright as marrow); every disc's dark band is
   carved out of the column (thin thoracic discs are filled in as bone otherwise);
6. bodies split by the disc planes; posterior elements joined to their body by a marker
   watershed over the inverted distance map (pedicles are thick, facet contacts thin);
7. names from anchors: sacrum (solid alae lateral to the lowest segment) -> L5, lowest
   rib-bearing vertebra with a rib-free one below -> T12 (only where the scan reaches 30 mm
   below that one's rib heads: ribs descend out of a view that ends sooner; a rib belongs to
   the vertebra between whose disc planes, tilted with the bodies, its medial end lies); both -> lumbar from the sacrum,
   thoracic from the ribs, conflicts flagged uncertain; no anchor -> a guess marked uncertain (ribs cut
   short by the scan's caudal end count for the guess, never as an anchor);
8. rib heads/necks are given back to the ribs (followed medially from the ribs outside the box;
   what is left sticks out of the body's rounded outline; the width cut reaches further out
   for the narrower upper thoracic bodies, whose transverse processes are longer), and on
   fine native grids the outlines are redrawn from native HU; metal outside the bone (rods,
   screw heads) is no vertebra, and in slices holding metal the streaks' rays are opened off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.signal import fftconvolve, find_peaks

from .. import levels as lv
from ..errors import InputError
from ..image import Image
from ..masks import largest_component
from ..progress import Progress, report, scaled
from .base import LevelRecord, SegmentationResult, superior_axis
from .metal import METAL_MIN_HU, reduce_metal_streaks

MIN_WORKING_MM = 1.25     # finest working grid for coarse scans (grids whose voxel centres hold the scan's)
MAX_WORKING_VOXELS = 40e6  # ... and its largest (a 160x160x180 torso at 3 mm on the 1.5 mm grid: 36.9e6, 17 s,
#                            peak 1.2 GB; on the 2 mm grid T9-L5 whole Dice mean 0.892, min 0.860, vs 0.900 / 0.866)
BONE_HU = 180.0          # cortical shell / dense trabecular bone after light smoothing
NATIVE_EDGE_HU = 250.0   # outline on a fine native grid (half-way soft tissue to cortex)
EDGE_FRACTION = 0.5      # final outline: an outer voxel stays if brighter than this fraction of the way
EDGE_BASE_HU = 0.0       # from soft tissue to the bone peak just inside (half maximum)
EDGE_FRACTION_COARSE = 0.4  # ... on >= 2.5 mm scans, where blur spreads the cortex outwards (real 3 mm
#                             CT vs TotalSegmentator: 0.3-0.5 within 0.01, 0.4 best for whole
#                             vertebrae; 0.5 fits the 3 mm phantom, T12 0.900 -> 0.905, but costs every
#                             real level 0.006-0.009)
LUMEN_EDGE_STEPS = 2      # ... and beside contrast blood, voxels this many in-plane steps deep are tested
#                            against the lumen's HU instead of soft tissue's (_lumen_side)
EDGE_PROFILE_FRACTION = 0.7  # ... and, along an axis sampled at >= EDGE_PROFILE_MIN_MM, darker than this
EDGE_PROFILE_MIN_MM = 1.5    # share of its inward neighbour: past the cortex's peak on the profile (0.8
#                              fits the 3 mm phantom better, 0.900 -> 0.902, but costs the real 3 mm
#                              CT up to 0.007 per level, L5 0.858 -> 0.851)
FRAGMENT_GAP_MM = 6.0    # a piece of a label this far from its main part is not that vertebra ...
FRAGMENT_MAX_SHARE = 0.1  # ... when under this share of its size
METAL_OPENING_MM = 1.0    # in-plane opening of the labels in slices holding metal (streak rays)
METAL_PIECE_REACH_MM = 10.0  # half the slices of a tilted screw pair (19 mm in a lordotic L5)
CANAL_FILL_MIN_MM2 = 20.0  # a streak-filled canal in a metal slice (a lumbar canal is ~250 mm2)
HARDWARE_MIN_HU = 2000.0  # metal's partial-volume rim (cortex stays under it)
HARDWARE_REACH_MM = 6.0   # metal is hardware, not vertebra, when within this radius around it
HARDWARE_BONE_SHARE = 0.3  # under this share of the non-metal voxels is labelled bone
EDGE_HU = 200.0          # outline voxels darker than this are partial-volume soft tissue
TRABECULAR_HU = 115.0    # normal trabecular bone; discs (~85 HU) and muscle stay below
TRABECULAR_MIN_DIRS = 5  # ... and it lies inside a cortical ring: bone in most in-plane directions
SOFT_LOW_HU = -250.0     # canal content (CSF, cord, epidural fat) lies above this
CANAL_HIGH_HU = 60.0     # ... and below this (osteoporotic trabecular bone is ~85 HU)
CANAL_MEAN_HU = 50.0     # mean of a canal blob after extra smoothing (noise pockets in bone fail)
CANAL_CORE_MEAN_HU = 35.0  # ... or of its core, up to CANAL_CORE_STEPS voxels in from the rim (narrow
CANAL_CORE_STEPS = 2       #     canals: their rim takes up the blur of the bone around them)
CANAL_AREA_MM2 = (25.0, 700.0)  # cross-section of a canal candidate
CANAL_GAP_MM = 40.0      # the canal track bridges slices without an enclosed pocket up to this far
MIDLINE_BAND_MM = 45.0   # canal centre within this distance of the torso centre (scoliosis)
SACRUM_BELOW_CANAL_MM = 80.0  # the column box reaches this far below the lowest tracked canal (110 mm
#                              takes in the phantom's sacral tip, sacrum 0.85 -> 0.90, but shifts the
#                              L5/S1 split on real CT: L5 0.853 -> 0.848)
ROI_ANTERIOR_MM = 70.0   # column box around the canal centre
ROI_POSTERIOR_MM = 55.0
ROI_LATERAL_MM = 50.0
MAX_SLICE_MM = 3.0       # thicker slices: level names flagged uncertain (0.8 mm pixels: T11-L5 phantoms at 4-5 mm
#                          split and named right, Dice >= 0.887; thin thoracic discs at 4-5 mm are missed, 6 mm fails)
MIN_VERTEBRA_MM = 12.0   # shortest vertebra + disc pitch kept (crush fractures included)
DISC_DEPTH = 0.45        # a disc slab holds under half the bone of the bodies next to it
CLOSE_DISC_FRACTION = 0.6  # endplate-only bands closer than this share of the disc spacing: the weaker goes
CLOSE_DISC_PERCENTILE = 75.0  # ... the spacing's centile over the gaps (a false band makes two short gaps)
CLOSE_DISC_MERGED = 1.25   # ... and only where its two gaps merged are at most this share of the spacing
WEAK_DISC_DEPTH = 0.85   # a tilted / narrow disc, accepted where the disc spacing expects one
ALA_FRACTION = 0.15      # share of a segment's bone lateral-anterior (sacral alae)
ENDPLATE_PERCENTILE = 25.0  # low percentile of body HU per slab: the disc content, not the bright rim
ENDPLATE_REACH_MM = 6.0  # endplates lie this close above and below a disc's centre (thin thoracic discs)
ENDPLATE_CONTRAST_HU = 40.0  # a disc band is this much darker than the endplates on both sides
ENDPLATE_BODY_SHARE = 0.4    # ... with the body profile this high (share of its 75th centile) within 20 mm on both
END_DISC_MARGIN_HU = 10.0    # ... and a disc cut by the view's end this much darker than the marrow
END_BAND_SHARE = 0.5  # a band before the view's end with only fading profile beyond: no disc under this share
#                        of the view's other bands' median contrast
OFF_DIP_WEIGHT = 0.5  # bands where the body profile does not dip rank at this share of their contrast
DEFAULT_PITCH_MM = 30.0  # vertebra + disc height when too few discs are seen to measure it
TILTS_DEG = (-30.0, -15.0, 0.0, 15.0, 30.0)  # sagittal tilts of the disc-finding slabs
CORONAL_TILTS_DEG = tuple(float(d) for d in range(-30, 31, 5))  # sideways tilts tried on each disc found
CORONAL_GAIN = 0.85      # ... taken when its slab holds under this share of the untilted slab's bone
VESSEL_HU = (160.0, 520.0)  # contrast-filled aorta (arterial phase up to ~350-450 HU)
VESSEL_BAND_HU = 120.0   # ... also searched in narrower bands this wide (a 3 mm lumen apart from blurred marrow)
VESSEL_BAND_STEP_HU = 40.0
VESSEL_BAND_LOW_HU = 100.0  # ... from here, so portal-venous blood (150-180 HU) has its bands too (from
#                             160 HU a 160 HU aorta fell apart in noise: T6-T11 phantom T11 0.82)
VESSEL_MIN_LENGTH_MM = 70.0  # the aorta runs past several levels; a body ends at its discs
VESSEL_ERODE = 1         # in-plane erosion that cuts a vessel's contact with the bodies
VESSEL_MIDLINE_MM = 8.0     # the aorta runs beside the midline: under VESSEL_MIDLINE_SHARE of a tube
VESSEL_MIDLINE_SHARE = 0.35  # lies this close to it (bodies straddle it) ...
VESSEL_MIDLINE_DEPTH_MM = 30.0  # ... within this distance in front of the canal (the bodies' depth)
VESSEL_MAX_AREA_MM2 = 700.0  # larger cross-sections are vessel merged with a body: kept
TUBE_AXIS_SLICES = 7      # a vessel's axis in a tube: its lumen's deepest point, median over this many slices
TUBE_AXIS_ON_VOX = 2.0    # ... the in-plane pieces of lumen within this many voxels of it are the vessel's
TUBE_AXIS_MARGIN_VOX = 2.0  # ... and pieces of the lumen's HU within its radius and this far of it
TUBE_AXIS_SUPPORT = 0.5   # a second vessel in the tube: pieces on its axis in this share of the slices
TUBE_CARRY_SHARE = 0.7    # a tube is carried on past its end while this share of its disc is lumen
TUBE_MAX_AXES = 3         # vessels looked for in one tube (the aorta and the IVC where they touch, and one more)
VESSEL_LUMEN_MARGIN_HU = 20.0  # a lumen voxel is at most this much brighter than the tube's 99th centile
VESSEL_MAX_IQR_HU = 60.0  # a contrast lumen is homogeneous (interquartile range ~10-30 HU with noise)
BRANCH_MIN_LENGTH_MM = 15.0  # a contrast tube's branch (common iliac artery) runs at least this far ...
BRANCH_GAP_MM = 15.0        # ... starting this close to the tube
BRANCH_MAX_AREA_MM2 = 300.0  # ... with a cross-section no larger (a body's is ~1000 mm2)
BRANCH_BLUR_HU = 80.0       # ... and, blurred at coarse spacing, down to this much below the lumen's HU
VESSEL_RIM_MM = 6.0      # the lumen's rim against a body, missed by the cortex clearance (real 2 mm slab:
#                          aorta voxels left in the labels 2650 -> 1080 at 6 mm; 4.5 mm: 1650)
VESSEL_ENCLOSED_DIRS = 6  # ... grown only over voxels with bone in fewer in-plane directions (marrow
#                           inside a body's ring has it in 6-8; the aorta beside a body in 2-5)
BLOOD_POOL_RADIUS_MM = 20.0  # a ball this size fits in heart chambers, not in a vertebral body
POOL_HOLE_MM2 = 300.0    # noise pockets inside a blood pool (in-plane), filled before the balls are fitted,
POOL_HOLE_BELOW_HU = 40.0  # ... where they are at most this much darker than the blood threshold
BLOOD_POOL_RIM_VOX = 1   # the opening misses a pool's rim where it meets a body: grown back this far
BLOOD_CORTEX_CLEARANCE_MM = 4.5  # trabecular-HU voxels this close to the cortex are outline, not blood
PEDICLE_BAND_MM = 25.0   # pedicles / laminae: beside and just behind the canal
PEDICLE_CLEARANCE_MM = 3.0  # ... seeded only this far from a disc plane (5 mm left the L5/S1 facets to the
#                             flood: real 3 mm CT L5 0.848 -> 0.864, 3 mm phantom T12 0.894 -> 0.900)
PEDICLE_CUT_BAND_MM = 5.0   # ... or, where under PEDICLE_CUT_FRACTION of a vertebra's ring lies this far
PEDICLE_CUT_FRACTION = 0.2  # from its disc plane (cut by the view), up to the plane
THORACIC_ARCH_SLOPE = 0.6   # above a rib-bearing vertebra their plane drops this much (mm per mm behind the
#                             canal, ~30 deg): shingled thoracic laminae (TotalSegmentator's T11/T12 arch border on
#                             the real 2 mm slab drops 0.55-0.75 mm/mm; phantom T10 / T11 spinous processes 35 / 25 deg).
#                             It drops from the canal's posterior wall: dropped from the canal's centre it gave the
#                             upper vertebra the pedicle tops and superior articular processes of the one below
#                             (random T4-T7 at 0.8x0.8x3 mm: T5 / T6 whole 0.880 / 0.900 -> 0.901 / 0.918)
PEDICLE_ROOT_MM = 4.0    # body / pedicle border lateral to the canal, in front of the tracked canal front
#                          (phantoms 2-4 mm within 0.01 of each other; real 3 mm CT vs TotalSegmentator
#                          bodies L4 0.919 -> 0.956, L5 0.887 -> 0.906 at 4 mm; 6 mm cuts into L1/L2)
BODY_CLOSING_MM = 4.0    # gaps in a body's cortical ring bridged before filling
THORACIC_HALF_WIDTH_MM = 30.0       # transverse process tips of T10-T12 (bodies >= 38 mm wide)
TP_TIP_T1_MM = 38.0                 # ... of T1 (body ~28 mm wide): upper thoracic processes reach further
BODY_WIDTH_T1_MM = 28.0
BODY_WIDTH_T10_MM = 38.0
THORACIC_BODY_HALF_WIDTH_MM = 22.0  # thoracic bodies; rib heads sit just lateral
RIB_HEAD_MIN_MM = 15.0              # rib heads articulate this far from the midline
RIB_NECK_MM = 6.0                   # a rib head / neck (7-10 mm thick) left on a body is thinner than a
#                                     disc of this radius; thoracic bodies hold it (8 mm: phantom T4-T10
#                                     whole +0.004; 10 mm eats the T6 body)
RIB_HEAD_MAX_MM3 = 1000.0  # a rib head beside a body (~10 mm across)
RIB_VIEW_BELOW_HEAD_MM = 30.0  # scan reach below a rib head that shows its rib leaving the column
RIB_MAX_MM3 = 60000.0    # bigger bone pieces beside the column are pelvis / shoulder girdle
RIB_STUB_MIN_MM = 25.0   # rib necks run lateral of the pedicles and articular processes
RIB_STUB_END_MM = 35.0   # ... and lie this far out where the scan's caudal end cuts them
RIB_STUB_RISE_MM = 8.0   # ... rising at least this much from there to the rib head
RIB_GAP_MM = 12.0        # a rib's bone may resume this far outside the column box (the joints and
#                          the thin rib neck fall below the bone threshold, more so on noisy scans)
RIB_PAIR_LEVELS = 0.75   # a left and a right rib root this close along the column (vertebra units) are a pair


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
    rib_stubs: int = 0       # ribs cut short by the scan's end (evidence for a guess, not an anchor)
    flags: list = field(default_factory=list)

    @property
    def rib_bearing(self) -> bool:
        return self.ribs > 0 or self.rib_stubs > 0


# --- input checks and the working grid ---------------------------------------------------------
def _check_ct(image: Image) -> None:
    modality = str(image.metadata.get("Modality", "") or "").strip().upper()
    if modality and modality != "CT":
        raise InputError(f"the image is {modality}, not CT; the builtin backend segments CT images in HU only.")
    if image.ndim != 3:
        raise InputError(f"the image is {image.ndim}D; the builtin backend needs a 3D CT volume.")
    arr = image.array
    step = max(1, int(round((arr.size / 2e6) ** (1 / 3))))
    sample = np.asarray(arr[::step, ::step, ::step], dtype=np.float32)
    low = float(np.mean(sample < -500))
    # A CT in HU holds air (about -1000) around or inside the patient; MR and non-HU data do not.
    if low < 1e-4 or float(sample.min()) < -3100 or float(sample.max()) < 0:
        raise InputError("the image intensities are not CT Hounsfield units (no air below -500 HU); "
                         "the builtin backend segments CT images only.")


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


# --- masks -------------------------------------------------------------------------------------
_SLICE = np.zeros((3, 3, 3), bool)
_SLICE[1] = ndi.generate_binary_structure(2, 1)
_SLICE8 = np.zeros((3, 3, 3), bool)
_SLICE8[1] = True


def _body_mask(hu: np.ndarray) -> np.ndarray:
    body = largest_component(hu > -400)
    return ndi.binary_fill_holes(body, structure=_SLICE)


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


def _smooth_track(z_idx: np.ndarray, values: np.ndarray, nz: int, window: int, in_slices: bool = False) -> np.ndarray:
    """Median-filter a sparse per-slice track and interpolate it over all slices. The window
    counts samples, or with in_slices the samples within window // 2 slices either side."""
    order = np.argsort(z_idx)
    z_idx, values = np.asarray(z_idx, float)[order], np.asarray(values, float)[order]
    if in_slices:
        lo = np.searchsorted(z_idx, z_idx - window // 2, side="left")
        hi = np.searchsorted(z_idx, z_idx + window // 2, side="right")
        med = np.array([np.median(values[i:j]) for i, j in zip(lo, hi)])
    elif len(values) >= 3:
        med = ndi.median_filter(values, size=min(window, len(values) | 1), mode="nearest")
    else:
        med = values
    return np.interp(np.arange(nz), z_idx, med)


def _track_canal(hu, bone, body, sp):
    """Per-slice canal centre (y, x), radius and anterior wall, or None when not found."""
    nz, ny, nx = hu.shape
    # Torso centre per slice (left-right) and its anterior-posterior extent (from per-slice
    # projections: the torso's voxel indices would take ~170 MB on a large CT).
    cols = body.sum(axis=1, dtype=np.int64)                     # (nz, nx)
    cnt = cols.sum(axis=1).astype(float)
    has = cnt > 0
    if not has.any():
        return None
    xc = (cols @ np.arange(nx, dtype=float)) / np.maximum(cnt, 1)
    del cols
    rows = body.any(axis=2)                                     # (nz, ny)
    y_front = np.where(has, rows.argmax(axis=1), np.inf)
    y_back = np.where(has, ny - 1 - rows[:, ::-1].argmax(axis=1), -np.inf)
    del rows

    enc = _enclosed(bone, int(round(25.0 / sp)))
    # Canal content by a more smoothed HU: noise pockets inside a low-density body (~85 HU)
    # must not pass for CSF (~10 HU).
    hu_c = ndi.gaussian_filter(hu, 1.5 / sp)

    def candidates(min_dirs):
        cand = (enc >= min_dirs) & (hu > SOFT_LOW_HU) & (hu < CANAL_HIGH_HU) & body
        lab, n = ndi.label(cand, structure=_SLICE)
        if n == 0:
            return np.zeros((0, 5))
        objs = ndi.find_objects(lab)
        zz_, yy_, xx_ = np.nonzero(lab)
        ll = lab[zz_, yy_, xx_]
        cnt = np.bincount(ll, minlength=n + 1)[1:].astype(float)
        area = cnt * sp * sp
        com = np.stack([np.bincount(ll, weights=w, minlength=n + 1)[1:] / np.maximum(cnt, 1)
                        for w in (zz_, yy_, xx_)], axis=1)
        mean_c = np.bincount(ll, weights=hu_c[zz_, yy_, xx_], minlength=n + 1)[1:] / np.maximum(cnt, 1)
        del zz_, yy_, xx_, ll
        rows = []
        for k, (a, c, o, mc) in enumerate(zip(area, com, objs, mean_c), start=1):
            if not (CANAL_AREA_MM2[0] <= a <= CANAL_AREA_MM2[1]):
                continue
            by_core = mc > CANAL_MEAN_HU
            if by_core and _core_mean_hu(lab[o] == k, hu_c[o], CANAL_CORE_STEPS) > CANAL_CORE_MEAN_HU:
                continue
            z = int(round(c[0]))
            if not has[z] or abs(c[2] - xc[z]) * sp > MIDLINE_BAND_MM:
                continue
            # Posterior half of the torso: the spine lies behind the abdominal / thoracic centre.
            if c[1] < 0.5 * (y_front[z] + y_back[z]):
                continue
            rows.append((z, c[1], c[2], a, o[1].start, by_core))
        return np.array(rows, float) if rows else np.zeros((0, 6))

    rows8 = candidates(8)
    if len(rows8) == 0:
        return None
    rows7 = candidates(7)
    # Pockets found only by their core do not take the track below the lowest pocket that the
    # pockets found whole chain to: there the sacral canal leaves the column's curve, which the
    # caudal extrapolation and the sacrum's column box were fitted to (taking them: sacrum
    # 0.87 -> 0.93 on most lumbar phantoms, but 0.71-0.84 on 40-80 mg/cm3 ones, whose straight
    # track missed the sacrum's back).
    whole8, whole7 = rows8[rows8[:, 5] == 0], rows7[rows7[:, 5] == 0]
    if len(whole8) and len(whole8) + len(whole7) < len(rows8) + len(rows7):   # (any found by core)
        z_low = min(_canal_chain(whole8, whole7, sp))
        rows8, rows7 = (r[(r[:, 5] == 0) | (r[:, 0] >= z_low)] for r in (rows8, rows7))
    win = max(3, int(round(40.0 / sp)) | 1)
    # The canal: the best chain of pockets through the slices (sacral foramina and other
    # enclosed pockets lie off it).
    picked = _canal_chain(rows8, rows7, sp)
    sel = np.array([picked[z] for z in sorted(picked)])
    z_sel = sel[:, 0]
    if (z_sel.max() - z_sel.min()) * sp < 20.0 or len(sel) < max(3, int(10.0 / sp)):
        return None
    # The centre over 40 mm of slices: where the canal is enclosed in few slices (the thoracic
    # arch opens between pedicles), 27 samples spanned the whole track and flattened a scoliotic
    # curve 7 mm off the canal (random T4-T8 phantom: the canal filled as bone, T6 0.87). The
    # radius and anterior wall keep their wider window: the body / arch border follows the
    # anterior wall, and the real 3 mm CT's T12 body lost its top (0.962 -> 0.905) on a 40 mm one.
    cy = _smooth_track(z_sel, sel[:, 1], nz, win, in_slices=True)
    cx = _smooth_track(z_sel, sel[:, 2], nz, win, in_slices=True)
    rad = np.sqrt(_smooth_track(z_sel, sel[:, 3], nz, win) / np.pi) / sp
    front = _smooth_track(z_sel, sel[:, 4], nz, win)
    # Beyond the tracked range (the thin sacral canal, the field-of-view ends) continue the
    # track along its end direction rather than straight down / up.
    z0, z1 = int(z_sel.min()), int(z_sel.max())
    n_fit = max(3, int(round(20.0 / sp)))
    for lo_end in (True,):   # caudally the thin sacral canal is lost; cranially the FOV ends
        zz = np.arange(z0, min(z1, z0 + n_fit) + 1) if lo_end else np.arange(max(z0, z1 - n_fit), z1 + 1)
        if zz.size < 3:
            continue
        out = np.arange(0, z0) if lo_end else np.arange(z1 + 1, nz)
        ref_z = z0 if lo_end else z1
        for arr in (cy, cx, front):
            slope = float(np.clip(np.polyfit(zz, arr[zz], 1)[0], -1.0, 1.0))
            arr[out] = arr[ref_z] + slope * (out - ref_z)
    return dict(cy=cy, cx=cx, rad=rad, front=front, z_lo=z0, z_hi=z1, enc=enc)


def _core_mean_hu(pocket: np.ndarray, hu: np.ndarray, steps: int) -> float:
    """Mean HU of a pocket's deepest core: the pocket eroded in-plane by up to `steps` voxels
    (inf when not even one voxel in from the rim is left). A narrow canal's rim takes up the blur
    of the bone around it (upper thoracic canal at 1.5 mm: 60-75 HU in all, 12-16 two voxels in;
    one voxel in 21-30, up to 44 with 22 HU noise), the marrow pockets of a 40 mg/cm3 body stay at
    45-51 however deep."""
    mean = np.inf
    for _ in range(steps):
        pocket = ndi.binary_erosion(pocket, structure=_SLICE)
        if not pocket.any():
            break
        mean = float(hu[pocket].mean())
    return mean


def _canal_chain(rows8, rows7, sp) -> dict:
    """The canal as the best chain of candidate pockets, one per slice at most, caudal to
    cranial: each pocket adds to the chain (a fully enclosed one more), each step between two
    costs by its slice gap and its in-plane jump, and a step is allowed only within
    CANAL_GAP_MM in height and (7 mm + half the gap) in-plane. A dynamic programme over the
    slices finds the chain of highest total, so one off-centre pocket or a run of slices where
    the arch does not close (a vertebra tilted against the slices) neither ends the track nor
    bends it off the canal. Returns {slice: candidate row}."""
    nodes = [(r, 1.0) for r in rows8] + [(r, 0.7) for r in rows7]
    nodes.sort(key=lambda t: t[0][0])
    z = np.array([t[0][0] for t in nodes])
    yx = np.array([t[0][1:3] for t in nodes])
    score = np.array([t[1] for t in nodes])
    prev = np.full(len(nodes), -1)
    max_dz = CANAL_GAP_MM / sp
    start = 0
    for i in range(len(nodes)):
        while z[start] < z[i] - max_dz:
            start += 1
        j = np.arange(start, i)
        j = j[z[j] < z[i]]
        if not j.size:
            continue
        dz = z[i] - z[j]
        limit = (7.0 + 0.5 * dz * sp) / sp
        dist = np.hypot(*(yx[j] - yx[i]).T)
        ok = dist < limit
        if not ok.any():
            continue
        gain = score[j] - 0.1 * (dz - 1) - 0.5 * (dist / limit) ** 2
        gain[~ok] = -np.inf
        k = int(np.argmax(gain))
        if gain[k] > 0:
            score[i] += gain[k]
            prev[i] = j[k]
    chain = {}
    i = int(np.argmax(score))
    while i >= 0:
        chain[int(z[i])] = nodes[i][0]
        i = int(prev[i])
    # Where the chain passes a 7-direction pocket, a fully enclosed one in the same slice within
    # a step of it is the canal proper (the 7-direction pocket takes in a lateral recess or
    # foramen and shifts the centre, the radius and the anterior wall).
    by_z8: dict[int, list] = {}
    for r in rows8:
        by_z8.setdefault(int(r[0]), []).append(r)
    for zi, r in chain.items():
        near = [q for q in by_z8.get(zi, []) if np.hypot(q[1] - r[1], q[2] - r[2]) < 7.0 / sp]
        if near:
            chain[zi] = min(near, key=lambda q: np.hypot(q[1] - r[1], q[2] - r[2]))
    return chain


def _curve_coordinates(cz, cy, cx, sp):
    """Arc length and unit tangent (z, y, x) of a per-slice centre curve, in mm."""
    pts = np.stack([cz, cy, cx], axis=1) * sp
    d = np.gradient(pts, axis=0)
    t = d / np.linalg.norm(d, axis=1, keepdims=True)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    return s, t


def _binned_percentile(values: np.ndarray, bins: np.ndarray, nb: int, q: float,
                       min_count: Optional[int] = None) -> np.ndarray:
    """q-th percentile of values per bin (the lower of the two values it falls between), NaN where
    a bin holds under `min_count` values; by default under a quarter of the typical count (the
    slab only grazes the bodies there)."""
    cnt = np.bincount(bins, minlength=nb)
    out = np.full(nb, np.nan)
    if values.size == 0:
        return out
    order = np.lexsort((values, bins))
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    ok = cnt >= (max(1.0, 0.25 * np.median(cnt[cnt > 0])) if min_count is None else max(1, min_count))
    out[ok] = values[order][start[ok] + np.floor(q / 100.0 * (cnt[ok] - 1)).astype(int)]
    return out


def _endplate_valleys(low: np.ndarray, sp: float):
    """Per profile bin: how much darker it is than the brightest bins within ENDPLATE_REACH_MM on
    both sides (the weaker side counts), best over the slab tilts, and that tilt's index. A disc
    is a thin dark band between two sclerotic endplates; the marrow in mid-body is darker than
    the endplates too, but they lie much further away than a disc's half-thickness."""
    k = max(2, int(round(ENDPLATE_REACH_MM / sp)))
    nt, nb = low.shape
    pad = np.full((nt, k), np.nan)
    padded = np.concatenate([pad, low, pad], axis=1)
    win = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1, axis=1)   # (nt, nb, 2k+1)
    lo_fill = np.where(np.isnan(win), -np.inf, win)     # missing bins: no endplate, no floor
    left = lo_fill[..., :k].max(axis=-1)
    right = lo_fill[..., k + 1:].max(axis=-1)
    near = np.where(np.isnan(win), np.inf, win)[..., k - 1:k + 2].min(axis=-1)
    with np.errstate(invalid="ignore"):
        score = np.minimum(left, right) - low
        # only at the valley floor (the darkest of its immediate neighbours)
        score[~(low <= near)] = -np.inf
    score = np.where(np.isfinite(score), score, -np.inf)
    best = np.argmax(score, axis=0)
    return score[best, np.arange(nb)], best


def _downhill(prof: np.ndarray, p: int, max_steps: int) -> int:
    """The bin reached from `p` stepping to the darker neighbour while there is one (at most
    `max_steps` bins): the bottom of the dip that `p` lies on."""
    for _ in range(max_steps):
        lo = max(p - 1, 0)
        q = lo + int(np.argmin(prof[lo:p + 2]))
        if prof[q] >= prof[p]:
            break
        p = q
    return p


def _find_discs(prof: np.ndarray, sp: float, valley: Optional[np.ndarray] = None):
    """Disc positions (profile bins) = minima of the body-bone profile along the centreline, and
    the subset seen only as a dark band between endplates (`valley`, see _endplate_valleys)."""
    bw = sp
    nb = len(prof)
    ref = np.percentile(prof[prof > 0], 75) if np.any(prof > 0) else 1.0
    # A disc empties the body slab almost completely; a mid-body dip (bright endplates on both
    # sides) does not. Minima well below the maxima on both sides are sure discs; weaker minima
    # are accepted only where the spacing of the sure discs says a disc is missing.
    peaks, _ = find_peaks(-prof, distance=max(1, int(round(6.0 / bw))))
    reach = max(2, int(round(20.0 / bw)))
    ratio = {}

    def flanks(p):
        """The profile within 20 mm below and above bin p, each ordered outwards from p."""
        return prof[max(0, p - reach):p][::-1], prof[p + 1:p + 1 + reach]

    def rate(p):
        """ratio[p] = the profile at p over the lower of the maxima within 20 mm on either side,
        each taken only up to the nearest deeper minimum (left unset where those maxima are near
        empty: the profile's ends). A dip in a low-density body is not measured against the
        next vertebra's marrow, across the disc between them."""
        def reach_max(side):
            """Max of `side` (ordered outwards from p) up to its first bin deeper than p."""
            deeper = np.nonzero(side < prof[p])[0]
            return side[:deeper[0]].max(initial=0.0) if deeper.size else side.max(initial=0.0)

        left, right = (reach_max(side) for side in flanks(p))
        if min(left, right) > 0.15 * ref:
            ratio[int(p)] = prof[p] / min(left, right)

    for p in peaks:
        if 2 <= p <= nb - 3:
            rate(p)
    sure = sorted(p for p, r in ratio.items() if r < DISC_DEPTH)
    chosen: list[int] = []
    for p in sorted(sure, key=lambda p: ratio[p]):
        if all(abs(p - q) * bw >= MIN_VERTEBRA_MM for q in chosen):
            chosen.append(p)
    chosen.sort()
    # A thin disc between sclerotic endplates (common in the thoracic spine and with age) may hold
    # as much bone-bright signal as the marrow around it, so the density profile shows no minimum.
    # Such bands are taken outright only where no density minimum is sure (a short slab); with
    # sure discs in view they are weak candidates, taken where the disc spacing expects a disc.
    def flank_max(p):
        """The lower of the profile's maxima within 20 mm on either side of bin p."""
        return min(side.max() for side in flanks(p))

    endplate: list[int] = []
    if valley is not None:
        cand, _ = find_peaks(np.where(np.isfinite(valley), valley, -1e9), height=ENDPLATE_CONTRAST_HU,
                             distance=max(1, int(round(6.0 / bw))))
        # (two endplates need two bodies: a body's end against the processes rising above the
        # view's top vertebra is no disc; random arterial T4-T7: T4 split in two, whole 0.69)
        endplate = [int(p) for p in cand if 2 <= p <= nb - 3 and flank_max(p) >= ENDPLATE_BODY_SHARE * ref]
    endplate_only: list[int] = []
    if not chosen:
        # Strongest bands first, a band where the density does not dip (the profile there not
        # below flank_max) counting at OFF_DIP_WEIGHT of its contrast: of two too close to both be
        # discs, one on the marrow's plateau goes after one in a dip unless much stronger (random
        # T4-T7 at 3 mm: a band on T6's brightest stretch, 1 HU stronger, pushed out the T6/T5
        # disc 7 bins below it).
        for p in sorted(endplate, key=lambda p: -valley[p] * (1.0 if prof[p] < flank_max(p) else OFF_DIP_WEIGHT)):
            if all(abs(p - q) * bw >= MIN_VERTEBRA_MM for q in chosen):
                chosen.append(p)
                endplate_only.append(p)
        chosen.sort()
        # A band with the view's end within 20 mm and the profile only falling from it to there
        # may be a disc before a vertebra cut by the view (real 2 mm slab: the T11/T12 band, 70
        # HU, the only one), or the top body fading out of the view: so where the view's other
        # bands are far clearer, it is no disc (random arterial T7-L1 at 3 mm, noise 25 HU: a
        # 54 HU band in T7's fading top, 0.68 of a pitch above the last disc, its discs 238-247
        # HU, split T7 and made a "T6", whole Dice 0.755).
        for p in list(chosen):
            others = [valley[q] for q in chosen if q != p]
            fading = [side for side, at_end in zip(flanks(p), (p - reach <= 0, p + reach >= nb - 1)) if at_end]
            if (fading and all(side.max() <= prof[p] for side in fading) and others
                    and valley[p] < END_BAND_SHARE * np.median(others)):
                chosen.remove(p)
                endplate_only.remove(p)
        # Bands much closer together than the column's spacing: the weaker is no disc (5 mm
        # slices: an endplate cut by the view's end, 15 mm above the T11/T12 disc). A band
        # mid-body cuts one gap into two short ones, so the spacing is the gaps' upper centile
        # (random T4-T8 at 3 mm: a faint band in an osteoporotic T6, two of four gaps half a pitch)
        # without the band judged (two false bands made three of four gaps short in a noisy T4-T7
        # view); and the two gaps it cuts, merged, must make a gap of that spacing (a crushed
        # vertebra's short gap merged with its neighbour's makes a gap much longer).
        while len(chosen) >= 3:
            gaps = np.diff(chosen)
            k = int(np.argmin(gaps))
            weaker = min(chosen[k], chosen[k + 1], key=lambda p: valley[p])
            rest = [p for p in chosen if p != weaker]
            spacing = np.percentile(np.diff(rest) if len(rest) >= 3 else gaps, CLOSE_DISC_PERCENTILE)
            i = chosen.index(weaker)
            merged = chosen[i + 1] - chosen[i - 1] if 0 < i < len(chosen) - 1 else 0
            if gaps[k] >= CLOSE_DISC_FRACTION * spacing or merged > CLOSE_DISC_MERGED * spacing:
                break
            chosen.remove(weaker)
            endplate_only.remove(weaker)

    def pitch_near(a, b):
        """Typical disc spacing near the interval (a, b), from the other intervals, and how far
        from it a disc may lie: 0.3 of it from two intervals, 0.5 from one (one vertebra may be
        a crushed one: random T5-T8, T7 crushed to 13 bins, the T6/T5 band 18 bins above the
        T7/T6 disc was missed and T5 and T6 merged)."""
        gaps = np.diff(chosen).astype(float)
        mids = (np.array(chosen[:-1]) + np.array(chosen[1:])) / 2.0
        other = [(abs(m - (a + b) / 2), g) for m, g, lo_, hi_ in zip(mids, gaps, chosen[:-1], chosen[1:])
                 if not (lo_ == a and hi_ == b)]
        if not other:
            return DEFAULT_PITCH_MM / bw, 0.3
        other.sort()
        return float(np.median([g for _, g in other[:2]])), (0.3 if len(other) >= 2 else 0.5)

    weak = [p for p, r in ratio.items() if r < WEAK_DISC_DEPTH and p not in chosen]
    # A dark band between endplates is a candidate there too: on thick slices a disc is never
    # sampled alone and its density dip can stay shallow (4 mm slices: T12/L1 12 % deep).
    floor_bins: dict[int, float] = {}   # candidates standing in for a band beside them (below): its contrast
    for p in endplate:
        if p not in chosen and p not in weak:
            rate(p)
            band_hu = float(valley[p])
            if p not in ratio:
                # On a shallow density floor the next bin may be a hair darker, and the band
                # counted as no dip at all (random T6-T11 at 3 mm: the T6/T7 disc was lost and
                # the two merged): the candidate is then the floor's bottom beside it, downhill
                # from the band (random T8-L2 at 3 mm: the floor fell for two bins past the T8/T9
                # band, which was lost, and T8 and T9 merged).
                p = _downhill(prof, p, max(2, int(round(ENDPLATE_REACH_MM / bw))))
                rate(p)
                floor_bins[p] = max(band_hu, floor_bins.get(p, band_hu))
            if p in ratio and p not in chosen and p not in weak:
                weak.append(p)

    def band_hu(p):
        """The endplate-band contrast (HU) at bin p, or that of the band a floor bin stands in for."""
        return max(floor_bins.get(p, -np.inf), -np.inf if valley is None else float(valley[p]))

    def rank(p):
        """Of several weak candidates, a dark band between two endplates first: the mid-body dip
        of an osteoporotic body can be as deep as its discs, but has no endplate within reach
        (random T9-L2 phantom, T10 at 53 mg/cm3: its dip was taken for both discs). And a clear
        band (twice ENDPLATE_CONTRAST_HU) before a faint one: marrow darker than the discs
        shows faint bands and deep dips of its own (random T6-T11, T6 at 41 mg/cm3: a 55 HU band
        in its marrow beat the 220 HU T6/T7 band on the dip's depth)."""
        band = band_hu(p)
        banded = 0 if band >= 2 * ENDPLATE_CONTRAST_HU else 1 if band >= ENDPLATE_CONTRAST_HU else 2
        return (banded, ratio[p])

    changed = True
    while changed and weak:
        changed = False
        ends = [0] + chosen + [nb - 1]
        for a, b in zip(ends[:-1], ends[1:]):
            pitch, tolerance = pitch_near(a, b)
            if (b - a) < 1.5 * pitch:
                continue
            # Expected disc one pitch away from a sure disc (or the profile end).
            targets = ([a + pitch] if a in chosen else []) + ([b - pitch] if b in chosen else [])
            best = None
            for p in weak:
                if not (a < p < b) or min(p - a, b - p) * bw < MIN_VERTEBRA_MM:
                    continue
                dist = min((abs(p - t) for t in targets), default=0.0)
                if dist <= tolerance * pitch and (best is None or rank(p) < rank(best)):
                    best = p
            if best is not None:
                chosen.append(best)
                chosen.sort()
                weak.remove(best)
                changed = True
                break
    # The marrow of an osteoporotic body can dip nearly as deep as a disc (random T9-L1 at 2x2x3
    # mm, T11 at 52 mg/cm3 with a basivertebral vein: 0.58 of its flanks, taken where the spacing
    # expected a disc, ahead of the real one 8 bins above on the depth of its dip; T11 split in
    # two and every level above misnamed). Such a dip cuts the disc spacing into two short gaps
    # and, unlike a disc, has no endplate band: it is no disc. (A crushed vertebra's discs are
    # banded, and make one short gap.)
    while valley is not None and len(chosen) >= 4:
        marrow = []
        all_gaps = np.diff(chosen)
        for i in range(1, len(chosen) - 1):
            # (the spacing of the other vertebrae: the gaps beside the dip left out)
            spacing = np.percentile(np.delete(all_gaps, [i - 1, i]), CLOSE_DISC_PERCENTILE)
            gaps = (all_gaps[i - 1], all_gaps[i])
            band = band_hu(chosen[i])
            if (max(gaps) < CLOSE_DISC_FRACTION * spacing and sum(gaps) <= CLOSE_DISC_MERGED * spacing
                    and not band >= ENDPLATE_CONTRAST_HU):
                marrow.append((band, chosen[i]))
        if not marrow:
            break
        chosen.remove(min(marrow)[1])
    return chosen, endplate_only


def _disc_planes(column, anterior, hu_s, dx, canal_cx, sp):
    """The intervertebral disc planes along the body centreline, caudal -> cranial: for the
    bodies [(point zyx in voxels, unit normal zyx)] tilted to each disc, and for the arches the
    same points with the untilted normal. Each disc's dark band (and that of a disc cut by the
    view's end) is carved out of `column` (in place)."""
    nz = column.shape[0]
    body_core = column & anterior & (np.abs(dx) < 18.0)
    zb, yb, xb = np.nonzero(body_core)
    if zb.size == 0:
        raise InputError("no vertebral column found in the CT (no vertebral bodies in front of the canal).")
    cntb = np.bincount(zb, minlength=nz).astype(float)
    okz = np.nonzero(cntb > 0)[0]
    bcy = np.bincount(zb, weights=yb, minlength=nz)[okz] / cntb[okz]
    win = max(3, int(round(30.0 / sp)) | 1)
    by = _smooth_track(okz.astype(float), bcy, nz, win)
    # Left-right, the body sits in front of the canal (the canal track is the steadier one).
    bx = canal_cx.copy()
    by = ndi.gaussian_filter1d(by, 10.0 / sp)
    bx = ndi.gaussian_filter1d(bx, 10.0 / sp)
    s_z, t_z = _curve_coordinates(np.arange(nz, dtype=float), by, bx, sp)

    # Discs are tilted against the centreline normal at the lordotic/kyphotic bends (L5/S1
    # most): profiles over slabs tilted in the sagittal plane, the deepest one per position.
    def tilted(t, deg):
        c, si = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        return np.stack([t[..., 0] * c - t[..., 1] * si, t[..., 0] * si + t[..., 1] * c, t[..., 2]], axis=-1)

    off = np.stack([np.zeros(zb.size), (yb - by[zb]) * sp, (xb - bx[zb]) * sp], axis=1)
    s_lo = s_z[zb].min() - 40.0
    s_hi = s_z[zb].max() + 40.0
    nb = int(np.ceil((s_hi - s_lo) / sp)) + 1
    # Weight by density: a tilted disc cut axially looks like a bone ring and gets filled, but
    # its content (~85 HU) is darker than the bodies' trabecular bone.
    hu_body = hu_s[zb, yb, xb]
    w_body = np.clip(hu_body - 50.0, 10.0, 150.0)
    profiles = []
    low_profiles = []
    for deg in TILTS_DEG:
        n_t = tilted(t_z[zb], deg)
        sv = s_z[zb] + np.sum(off * n_t, axis=1) / np.maximum(np.sum(t_z[zb] * n_t, axis=1), 0.5)
        bins = np.clip(((sv - s_lo) / sp).astype(int), 0, nb - 1)
        profiles.append(ndi.gaussian_filter1d(np.bincount(bins, weights=w_body, minlength=nb), 0.75))
        low = _binned_percentile(hu_body, bins, nb, ENDPLATE_PERCENTILE)
        # A tilted slab cut by an end of the field of view samples only part of the body: its
        # percentile is not comparable with the others (a false endplate at the scan's end). A
        # slab counts as cut when over half of it lies beyond the body's range (the median
        # reach; the 95th centile also dropped the last endplate below a slightly oblique
        # centreline, where the slab is nearly whole).
        spread = float(np.percentile(np.abs(sv - s_z[zb]), 50)) if zb.size else 0.0
        centre = s_lo + (np.arange(nb) + 0.5) * sp
        low[(centre - spread < s_z[zb].min()) | (centre + spread > s_z[zb].max())] = np.nan
        low_profiles.append(low)
    profiles = np.array(profiles)
    prof = profiles.min(axis=0)
    # Trim the empty margins so end effects do not create discs.
    nzb = np.nonzero(prof > 0.02 * prof.max())[0]
    b0, b1 = nzb.min(), nzb.max() + 1
    low_profiles = np.array(low_profiles)
    valley, valley_tilt = _endplate_valleys(low_profiles[:, b0:b1], sp)
    disc_bins, endplate_only = _find_discs(prof[b0:b1], sp, valley)
    disc_bins = [d + b0 for d in disc_bins]
    endplate_only = {d + b0 for d in endplate_only}
    def level_plane(b):
        """Slice index at profile bin b, and the untilted plane there (centreline point, tangent)."""
        zf = float(np.interp(s_lo + (b + 0.5) * sp, s_z, np.arange(nz)))
        zi = int(round(min(max(zf, 0), nz - 1)))
        return zi, (np.array([zf, by[zi], bx[zi]]), t_z[zi] / np.linalg.norm(t_z[zi]))

    planes = []   # (point zyx in voxels, unit normal zyx)
    arch_planes = []
    for d in disc_bins:
        zi, flat_plane = level_plane(d)
        # (a disc seen only as a dark band between endplates: the tilt that shows it best)
        deg = TILTS_DEG[int(valley_tilt[d - b0]) if d in endplate_only else int(np.argmin(profiles[:, d]))]
        n_d = tilted(t_z[zi], deg)
        n_d = n_d / np.linalg.norm(n_d)
        # (and leaning sideways as the disc does: 15 mm scoliotic T4-T8 at 0.8x0.8x2 mm, T4 / T5
        # whole 0.900 / 0.903 -> 0.926 / 0.926)
        phi = _coronal_tilt(flat_plane[0], n_d, zb, yb, xb, w_body, sp)
        n_d = _rotate_coronal(n_d, phi)
        planes.append((flat_plane[0], n_d))
        # Behind the body the sagittally untilted normal: a tilted disc plane (L5/S1) extended
        # backwards would rise through the arch of the vertebra above. The sideways lean holds
        # for the arch too (the same T4 / T5: 0.903 / 0.901 without it).
        arch_planes.append((flat_plane[0], _rotate_coronal(flat_plane[1], phi)))
        # Every disc's content is taken out, not only that of discs seen between endplates: a
        # thin disc in the kyphotic thorax is cut obliquely by the axial slices, its rim looks like
        # a cortical ring and gets filled as bone (T4-T10 phantom: the discs held 10-25% of the
        # bodies' false positives).
        # (the band's extent from the tilt that shows it darkest between its endplates; the
        # plane's own tilt: real 3 mm CT L1-L4 0.001-0.003 lower)
        _carve_disc(column, anterior, hu_s, low_profiles[int(valley_tilt[d - b0])], d, planes[-1], sp)
    # A disc cut by an end of the view has an endplate on one side only, so neither profile
    # shows it; its rim closes a ring and its content is filled as bone (real 2 mm slab: the
    # T12/L1 disc in the two caudal slices). Judged on the untilted slabs, which the view's end
    # does not cut.
    flat = low_profiles[TILTS_DEG.index(0.0)]
    for caudal in (True, False):
        if not (zb.min() == 0 if caudal else zb.max() == nz - 1):
            continue
        band = _end_disc_band(flat, disc_bins, caudal, sp)
        if band is not None:
            edge, endplate_hu = band
            _carve_end_disc(column, anterior, hu_s, level_plane(edge)[1], endplate_hu, caudal, sp)
    return planes, arch_planes


def _rotate_coronal(normal: np.ndarray, deg: float) -> np.ndarray:
    """A zyx unit vector rotated by `deg` in the coronal (z-x) plane."""
    c, si = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    out = np.array([normal[0] * c - normal[2] * si, normal[1], normal[0] * si + normal[2] * c])
    return out / np.linalg.norm(out)


def _coronal_tilt(point, normal, zb, yb, xb, w_body, sp) -> float:
    """The coronal tilt (deg) of a disc plane through `point`: of the normal rotated over
    CORONAL_TILTS_DEG, the one whose thin slab (one voxel, shifted up to a voxel along it) holds
    the least body weight `w_body` of the body-core voxels (zb, yb, xb), when that is under
    CORONAL_GAIN of the untilted slab's; else 0. The profile slabs tilt only sagittally and
    follow the centreline's lateral slope, so a scoliotic level's own lean is missed."""
    rel = np.stack([zb - point[0], yb - point[1], xb - point[2]], axis=1).astype(np.float32)
    near = np.abs(rel @ normal.astype(np.float32)) * sp < 40.0   # (the bodies next to the disc)
    rel, w = rel[near], w_body[near]
    scores = []
    for deg in CORONAL_TILTS_DEG:
        dist = rel @ _rotate_coronal(normal, deg).astype(np.float32) * sp
        scores.append(min(float(w[np.abs(dist - off) < 0.5 * sp].sum()) for off in (-sp, 0.0, sp)))
    best = int(np.argmin(scores))
    return float(CORONAL_TILTS_DEG[best]) if scores[best] < CORONAL_GAIN * scores[CORONAL_TILTS_DEG.index(0.0)] else 0.0


def _end_disc_band(low: np.ndarray, disc_bins, caudal: bool, sp: float):
    """A disc cut by the view's caudal (or cranial) end on the profile `low`: from the profile's
    end inwards a band darker than the endplate within ENDPLATE_REACH_MM of it by
    ENDPLATE_CONTRAST_HU and darker than the marrow (median of the profile) by END_DISC_MARGIN_HU
    (a view ending in the marrow just past an endplate is that dark against the endplate too).
    Returns (the band's inner bin, the endplate's HU), or None."""
    finite = np.nonzero(np.isfinite(low))[0]
    if finite.size < 3:
        return None
    step = 1 if caudal else -1
    end = int(finite[0] if caudal else finite[-1])
    k = max(2, int(round(ENDPLATE_REACH_MM / sp)))
    reach = [end + step * i for i in range(0, k + 1) if 0 <= end + step * i < len(low)]
    vals = np.where(np.isfinite(low[reach]), low[reach], -np.inf)
    top = int(np.argmax(vals))
    if top == 0:
        return None
    endplate_hu = float(vals[top])
    before = vals[:top]
    floor = float(np.min(before[np.isfinite(before)]))   # (bins too sparse for a percentile are nan)
    marrow_hu = float(np.median(low[finite]))
    if endplate_hu - floor < ENDPLATE_CONTRAST_HU or floor > marrow_hu - END_DISC_MARGIN_HU:
        return None
    if any(abs(d - end) * sp < MIN_VERTEBRA_MM for d in disc_bins):
        return None
    half = 0.5 * (floor + endplate_hu)
    inner = [b for b, v in zip(reach[:top], before) if np.isfinite(v) and v < half]
    return inner[-1], endplate_hu


def _carve_end_disc(column, anterior, hu_s, plane, endplate_hu, caudal, sp):
    """Take the body voxels beyond `plane` (the inner edge of a disc cut by the view's end) and
    darker than its endplate out of the column (in place), as _carve_disc does between two."""
    nz = column.shape[0]
    zi = int(round(plane[0][0]))
    margin = int(np.ceil(40.0 / sp))  # the plane's tilt across a body, in slices
    if caudal:
        _clear_band(column, anterior, hu_s, plane, slice(0, min(nz, zi + 1 + margin)), -np.inf, 0.5 * sp,
                    endplate_hu, sp)
    else:
        _clear_band(column, anterior, hu_s, plane, slice(max(0, zi - margin), nz), -0.5 * sp, np.inf,
                    endplate_hu, sp)


def _clear_band(column, anterior, hu_s, plane, zs, lo_mm, hi_mm, below_hu, sp):
    """Body voxels (`column & anterior`) in the slices `zs`, lo_mm..hi_mm along the normal of
    `plane` from its point and darker than below_hu, leave the column (in place)."""
    pnt, nrm = plane
    z, y, x = np.nonzero(column[zs] & anterior[zs])
    z = z + zs.start
    dist = (np.stack([z, y, x], axis=1) - pnt) @ nrm * sp
    cut = (dist >= lo_mm) & (dist <= hi_mm) & (hu_s[z, y, x] < below_hu)
    column[z[cut], y[cut], x[cut]] = False


def _carve_disc(column, anterior, hu_s, low, d, plane, sp):
    """Take a disc seen only between its endplates out of the column (in place): its content is
    as bright as marrow, so it was filled in as bone. The disc = the profile bins around `d`
    darker than half-way from the valley floor to the endplates; there, body voxels darker
    than the dimmer endplate go (the bright rim of the ring apophysis stays)."""
    k = max(2, int(round(ENDPLATE_REACH_MM / sp)))
    left = np.nanmax(low[max(0, d - k):d]) if np.isfinite(low[max(0, d - k):d]).any() else np.nan
    right = np.nanmax(low[d + 1:d + 1 + k]) if np.isfinite(low[d + 1:d + 1 + k]).any() else np.nan
    endplate_hu = min(left, right)
    if not np.isfinite(endplate_hu) or not np.isfinite(low[d]):
        return
    half = 0.5 * (low[d] + endplate_hu)
    lo_b = d
    while lo_b - 1 >= max(0, d - k) and np.isfinite(low[lo_b - 1]) and low[lo_b - 1] < half:
        lo_b -= 1
    hi_b = d
    while hi_b + 1 <= min(len(low) - 1, d + k) and np.isfinite(low[hi_b + 1]) and low[hi_b + 1] < half:
        hi_b += 1
    z_mid = plane[0][0]
    reach = (max(d - lo_b, hi_b - d) + 1) * sp
    zs = slice(max(0, int(np.floor(z_mid - reach / sp)) - 2), int(np.ceil(z_mid + reach / sp)) + 3)
    _clear_band(column, anterior, hu_s, plane, zs, (lo_b - d - 0.5) * sp, (hi_b - d + 0.5) * sp, endplate_hu, sp)


# --- naming ------------------------------------------------------------------------------------
def _names_from(anchor_index: int, anchor_name: str, n: int) -> list[str]:
    """Names for segments 0..n-1 (caudal -> cranial) given one anchored segment."""
    seq = lv.CERVICAL + lv.THORACIC + lv.LUMBAR + ("sacrum",)
    a = seq.index(anchor_name)
    out = []
    for i in range(n):
        j = a - (i - anchor_index)   # cranial segments go up the list
        out.append(seq[j] if 0 <= j < len(seq) else "")
    return out


def segment_builtin(image: Image, progress: Optional[Progress] = None, *, min_levels: int = 1) -> SegmentationResult:
    """Segment and name the vertebrae of a CT (HU) with classic image processing.

    Returns whole-vertebra and vertebral-body label maps (VerSe ids) on the input grid and one
    LevelRecord per level. Raises InputError for non-CT input, or when no vertebral column (or
    fewer than ``min_levels`` vertebrae) is found.
    """
    _check_ct(image)
    # Screws' streaks lift soft tissue above the bone threshold; every step below sees them reduced.
    report(progress, 0.0, "builtin: metal streaks")
    image = reduce_metal_streaks(image, scaled(progress, 0.0, 0.05))
    report(progress, 0.05, "builtin: resampling")
    native_min = float(min(image.spacing_mm))
    sp = _working_spacing(image)
    grid = _working_grid(image, sp)
    hu = grid.hu
    warnings: list[str] = []

    report(progress, 0.15, "builtin: bone and canal")
    body = _body_mask(hu)
    # Light smoothing first: noise must neither punch holes in bone nor make bone of soft tissue.
    hu_s = ndi.gaussian_filter(hu, 1.0 / sp)
    bone = (hu_s > BONE_HU) & body
    if bone.sum() * sp ** 3 < 20000.0:
        raise InputError("no vertebral column found in the CT (too little bone in view).")
    canal = _track_canal(hu_s, bone, body, sp)
    if canal is None:
        raise InputError("no vertebral column found in the CT (no bone-enclosed spinal canal in view).")
    nz, ny, nx = hu.shape
    z_lo = max(0, canal["z_lo"] - int(round(SACRUM_BELOW_CANAL_MM / sp)))
    z_hi = min(nz - 1, canal["z_hi"] + int(round(40.0 / sp)))

    # --- column mask in a box around the canal -----------------------------------------------
    report(progress, 0.35, "builtin: vertebral column")
    bone_c = ndi.binary_closing(bone, structure=_SLICE, iterations=1) | bone
    # Blood-like voxels, candidates for the vessel tests below: contrast-phase HU, or (portal-venous
    # blood, ~150 HU, as bright as trabecular bone) trabecular HU outside the cortex, where bone
    # meets it from one side only (trabecular bone in an open cortical ring has bone in most
    # in-plane directions). Voxels next to the cortex are left out: partial volume at the outline.
    # (only in front of the canal, where the vessel tests look)
    fc = _front_crop(canal, z_lo, z_hi, hu.shape, sp)
    blood = np.zeros(hu.shape, bool)
    h = hu_s[fc]
    blood[fc] = ((h > VESSEL_HU[0]) & (h < VESSEL_HU[1])) | (
        (h > TRABECULAR_HU) & (canal["enc"][fc] < TRABECULAR_MIN_DIRS)
        & ~ndi.binary_dilation(bone_c[fc], structure=_SLICE,
                               iterations=max(1, int(round(BLOOD_CORTEX_CLEARANCE_MM / sp)))))
    # (the enclosure count is kept in the front crop: the aorta's growth below stops at it)
    enc_fc = canal.pop("enc")[fc]
    del h
    # Solid bone = filled cortical rings (low-density bodies) or trabecular-density voxels.
    raw = bone_c | (hu_s > TRABECULAR_HU)
    del bone_c
    column = ndi.binary_fill_holes(raw, structure=_SLICE)
    yy = np.arange(ny)[None, :, None]
    xx = np.arange(nx)[None, None, :]
    dy = (yy - canal["cy"][:, None, None]) * sp
    dx = (xx - canal["cx"][:, None, None]) * sp
    box = (dy > -ROI_ANTERIOR_MM) & (dy < ROI_POSTERIOR_MM) & (np.abs(dx) < ROI_LATERAL_MM)
    box[:z_lo] = False
    box[z_hi + 1:] = False
    front_mm = (canal["front"][:, None, None] - canal["cy"][:, None, None]) * sp  # negative
    # The canal inside a closed bony ring is a filled hole: take such holes out again.
    canal_disc = (dy ** 2 + dx ** 2) < (np.maximum(canal["rad"], 3.0 / sp)[:, None, None] * sp) ** 2
    # The lumbar canal is wider than deep: a circle of its area reaches past its anterior wall
    # into the back of the body, which stays.
    canal_disc &= dy >= front_mm
    holes = column & ~raw
    hl, _ = ndi.label(holes, structure=_SLICE)
    # (only holes reaching the canal's central part: a low-density body's interior is a hole
    # too, and it touches the canal's outline through a thin posterior wall)
    core = (dy ** 2 + dx ** 2) < (np.maximum(0.5 * canal["rad"], 1.0)[:, None, None] * sp) ** 2
    canal_holes = np.unique(hl[core & holes])
    del core
    canal_holes = canal_holes[canal_holes > 0]
    if canal_holes.size:
        column &= ~np.isin(hl, canal_holes)
    del hl, holes, raw
    column &= box & ~canal_disc
    # Smoothing and the low trabecular threshold widen the outline by about a voxel: drop
    # outline voxels that are not themselves bone-bright (interior low-density bone stays).
    # (At native spacing coarser than the working grid the outline blur is the scan's own and
    # stays, as in reference segmentations of such scans.)
    if native_min < 2.5:
        shell = column & ~ndi.binary_erosion(column, border_value=1)   # (the view's end is no outline)
        column &= ~(shell & (hu < EDGE_HU))
        del shell
    anterior = dy < front_mm
    # Contrast-filled heart chambers (and aneurysms) touching the thoracic bodies: blood pools
    # too thick to be bone (a ball no vertebral body can hold, discs cut bodies in height).
    pool = _blood_pools(blood, hu_s, body, canal, front_mm, fc, enc_fc, sp)
    if pool is not None:
        column &= ~pool
    # A contrast-filled aorta touching the bodies: smooth, homogeneous (no bright cortex) and
    # continuous over many levels, where bodies are interrupted by discs.
    vessel = np.zeros_like(column)
    zone = anterior & box & (dy < front_mm - 4.0)
    cand = blood & zone
    del blood
    pool_edge = np.zeros_like(cand)
    if pool is not None:
        cand &= ~pool
        # (a vessel running into a pool keeps only part of its cross-section there)
        pool_edge = ndi.binary_dilation(pool, structure=_SLICE, iterations=2) & ~pool
    # (blood found, pools and vessels: the native outline below must not grow back over it)
    blood_found = pool if pool is not None else np.zeros_like(column)
    del pool
    found, lumen_min_hu, lumen_max_hu = _find_vessels(cand[fc], zone[fc], pool_edge[fc], hu_s[fc],
                                                      np.broadcast_to(dx, hu.shape)[fc],
                                                      np.broadcast_to(front_mm - dy, hu.shape)[fc],
                                                      enc_fc, nz, fc[0].start, sp)
    vessel[fc] = found
    column &= ~vessel
    blood_found |= vessel
    del cand, pool_edge, enc_fc, found
    # Low-density bodies whose cortical ring is not closed in a slice (thin cortex, partial
    # volume): close small gaps in-plane and fill, within the body zone only.
    r = max(1, int(round(BODY_CLOSING_MM / sp)))
    disk = np.zeros((1, 2 * r + 1, 2 * r + 1), bool)
    disk[0] = (np.add.outer(np.arange(-r, r + 1) ** 2, np.arange(-r, r + 1) ** 2) <= r * r)
    zone = anterior & box
    if not zone.any():
        raise InputError("no vertebral column found in the CT (no bone in front of the spinal canal).")
    zs_, ys_, xs_ = ndi.find_objects(zone.astype(np.uint8))[0]
    crop = (zs_, slice(max(0, ys_.start - r), ys_.stop + r), slice(max(0, xs_.start - r), xs_.stop + r))
    closed = ndi.binary_closing(column[crop] & zone[crop], structure=disk)
    column[crop] |= ndi.binary_fill_holes(closed, structure=_SLICE) & zone[crop] & ~vessel[crop]
    del closed, zone, vessel

    # Keep the column: components that reach near the canal.
    lab, n = ndi.label(column)
    if n == 0:
        raise InputError("no vertebral column found in the CT (no bone around the spinal canal).")
    near = ndi.binary_dilation(canal_disc & box, iterations=max(1, int(round(6.0 / sp))))
    if lumen_min_hu < lumen_max_hu:
        # Branches of the contrast-filled tube found above (common iliac arteries: thinner than
        # the aorta, so not found as tubes, and partly hidden by the iliac veins) may hang on a
        # body by a thin contact of blurred voxels. Pieces in front of the canal that stand free
        # of the column after a one-voxel in-plane erosion, away from the canal, and mostly hold
        # the tube's own lumen HU are taken out with their rim: marrow is darker than the lumen,
        # cortex brighter, and a body's core is joined to its pedicles.
        cb = tuple(slice(max(0, o.start - 1), o.stop + 1) for o in ndi.find_objects(column.astype(np.uint8))[0])
        core = ndi.binary_erosion(column[cb], structure=_SLICE)
        clab, cn = ndi.label(core)
        if cn:
            cidx = np.arange(1, cn + 1)
            h = hu_s[cb]
            size = ndi.sum_labels(core, clab, cidx)
            lumen_share = ndi.sum_labels((h >= lumen_min_hu) & (h < lumen_max_hu), clab, cidx) / np.maximum(size, 1)
            front_share = ndi.sum_labels(np.broadcast_to(anterior, column.shape)[cb], clab, cidx) / np.maximum(size, 1)
            reach = ndi.maximum(near[cb], clab, cidx).astype(bool)
            drop = cidx[(lumen_share > 0.5) & (front_share == 1.0) & ~reach]
            if drop.size:
                column[cb] &= ~ndi.binary_dilation(np.isin(clab, drop), structure=_SLICE)
                lab, n = ndi.label(column)
            del h
        del core, clab
    keep = np.unique(lab[near & column])
    keep = keep[keep > 0]
    column = np.isin(lab, keep)
    del lab, near

    # --- bodies and discs --------------------------------------------------------------------
    report(progress, 0.5, "builtin: discs and bodies")
    planes, arch_planes = _disc_planes(column, anterior, hu_s, dx, canal["cx"], sp)

    def segment_index(z, y, x):
        idx = np.zeros(z.size, np.int32)
        pts = np.stack([z, y, x], axis=1).astype(float)
        for pnt, nrm in planes:
            idx += ((pts - pnt) @ nrm > 0)
        return idx

    # Every anterior column voxel (bodies with their full width) gets a segment.
    za, ya, xa = np.nonzero(column & anterior)
    seg_a = segment_index(za, ya, xa)
    counts = np.bincount(seg_a, minlength=len(planes) + 1)
    # Drop end segments too small to be a vertebra (a cut-off sliver at the field-of-view edge).
    typical = np.median(counts[counts > 0]) if np.any(counts > 0) else 0
    keep_seg = [i for i in range(len(counts)) if counts[i] >= 0.15 * typical and counts[i] > 0]
    if len(keep_seg) < max(1, min_levels):
        raise InputError(f"no vertebral column found in the CT (found {len(keep_seg)} vertebrae, "
                         f"need at least {min_levels}).")
    segs = []
    lut_seg = np.zeros(len(counts), np.uint8)
    for j, i in enumerate(keep_seg):
        segs.append(_Segment(float(i), float(i + 1), label=j + 1))
        lut_seg[i] = j + 1
    body_markers = np.zeros(hu.shape, np.uint8)
    body_markers[za, ya, xa] = lut_seg[seg_a]
    del za, ya, xa, seg_a
    # Pedicles and laminae beside the canal lie level with their own body: seed them from the
    # disc planes too (away from the planes), so the flood only decides the processes that
    # overhang the next level (spinous and articular processes).
    ring = column & ~anterior & (np.abs(dx) < PEDICLE_BAND_MM) & (dy < canal["rad"][:, None, None] * sp + 8.0)
    zp, yp, xp = np.nonzero(ring)
    del ring
    # (distance behind the canal's posterior wall, for the caudal slope of thoracic laminae below;
    # the pedicles beside the canal stay level with their body)
    behind_mm = np.maximum((yp - canal["cy"][zp] - canal["rad"][zp]) * sp, 0.0)
    pts = np.stack([zp, yp, xp], axis=1).astype(float)

    def ring_sides(slopes):
        """Per ring voxel: its segment from the arch planes, each lowered by slopes[k] mm per mm
        behind the canal's posterior wall, and its distance (mm) to the nearest of them."""
        idx = np.zeros(zp.size, np.int32)
        gap_mm = np.full(zp.size, np.inf)
        for (pnt, nrm), slope in zip(arch_planes, slopes):
            d = (pts - pnt) @ nrm * sp + slope * behind_mm
            idx += d > 0
            np.minimum(gap_mm, np.abs(d), out=gap_mm)
        return idx, gap_mm

    # A vertebra cut by the field of view just beyond its disc keeps its arch in view but
    # not its pedicles (they leave the body's upper part): nearly all of its ring lies in
    # a band PEDICLE_CUT_BAND_MM about the plane and the neighbour's seeds would flood the arch.
    # Its side is seeded up to the plane. (Real 2 mm slab: T11 has 6 of 352 ring voxels clear;
    # whole vertebrae on phantoms and the 3 mm abdomen keep >= 39%.) Judged on the level planes:
    # the cut is the view's, whatever the slope.
    level_sides = ring_sides(np.zeros(len(arch_planes)))
    idx, gap_mm = level_sides
    clear = gap_mm > PEDICLE_CUT_BAND_MM
    n_clear = np.bincount(idx[clear], minlength=len(lut_seg))
    n_ring = np.bincount(idx, minlength=len(lut_seg))
    cut = (lut_seg > 0) & (n_clear < PEDICLE_CUT_FRACTION * n_ring)
    del idx, gap_mm, clear

    def arch_seeds(sides):
        """Markers: the bodies, and the ring seeded from `sides` (ring_sides' answer): voxels
        PEDICLE_CLEARANCE_MM clear of the planes, or anywhere on a vertebra cut by the view."""
        seeds = body_markers.copy()
        if zp.size and planes:
            idx, gap_mm = sides
            clear = (gap_mm > PEDICLE_CLEARANCE_MM) | cut[idx]
            seeds[zp[clear], yp[clear], xp[clear]] = lut_seg[idx[clear]]
        return seeds

    # --- whole vertebrae: watershed from the bodies over the column ----------------------------
    report(progress, 0.65, "builtin: posterior elements")

    if not column.any():
        raise InputError("no vertebral column found in the CT (no bone around the spinal canal).")
    zs, ys, xs = ndi.find_objects(column.astype(np.uint8))[0]
    zs = slice(max(0, zs.start - 1), min(nz, zs.stop + 1))
    crop = (zs, ys, xs)
    # Flood over the inverted distance map: posterior arches join their own body through the
    # pedicles (thick necks) before a neighbour can reach them through a facet joint (thin).
    elev = -ndi.distance_transform_edt(column[crop])

    vert = np.zeros(hu.shape, np.uint8)
    vert[crop] = _flood(elev, arch_seeds(level_sides)[crop], column[crop])
    bodies = np.where(anterior & column, body_markers, 0).astype(np.uint8)
    # Bodies are solid: low-density marrow whose axial ring was open in a slice (thin or
    # partial-volume cortex) is left as a hole; fill it in all three orientations.
    _fill_body_holes(vert, bodies)
    # Lateral to the canal the pedicle roots continue the body's posterior cortex: there the body
    # ends PEDICLE_ROOT_MM in front of the tracked canal front (the first soft-tissue row, which
    # lies about a voxel behind the bright wall after smoothing); behind the body's middle, the
    # canal's own width, its posterior wall stays.
    dyf = (np.arange(ny)[None, :, None] - canal["front"][:, None, None]) * sp
    root = (dyf >= -PEDICLE_ROOT_MM) & (np.abs(dx) > canal["rad"][:, None, None] * sp)
    bodies[np.broadcast_to(root, bodies.shape)] = 0
    del dyf, root

    # --- anchors -----------------------------------------------------------------------------
    report(progress, 0.8, "builtin: naming levels")
    frames = _body_frames(segs, bodies, planes)   # (one pass over the bodies for both rib counts)
    ribs = _find_ribs(segs, vert, frames, bone, box, dx, sp)
    _find_rib_stubs(segs, vert, frames, dx, dy, sp)
    # Thoracic laminae and spinous processes slope caudally and overlap the vertebra below like
    # roof shingles: above a rib-bearing vertebra (both thoracic; the upper one's ribs may be out
    # of view) the arch split is flooded again with the arch plane sloping down behind the canal.
    # (T12's inferior articular and spinous processes are lumbar-like: T12/L1 and the lumbar
    # discs keep the level plane.)
    slopes = np.zeros(len(arch_planes))
    for k in range(len(arch_planes)):
        lo, hi = lut_seg[k], lut_seg[k + 1]
        if lo and hi and segs[lo - 1].rib_bearing:
            slopes[k] = THORACIC_ARCH_SLOPE
    if slopes.any():
        ws = _flood(elev, arch_seeds(ring_sides(slopes))[crop], column[crop])
        # (voxels the first flood did not label are body holes filled since: they stay)
        vert[crop] = np.where(ws > 0, ws, vert[crop])
        del ws
    del elev
    rib_bone = _give_rib_heads_back(segs, vert, bodies, ribs, box, dx, dy, frames, sp)
    del dy, ribs
    sacrum_seg = _find_sacrum(segs, vert, dx, anterior)
    # (how far above the scan's caudal end each body's top, where rib heads articulate, lies)
    body_top_mm = {i + 1: (o[0].stop - 1) * sp for i, o in enumerate(ndi.find_objects(bodies)) if o is not None}
    names, confidence, uncertain, t12 = _name_levels(segs, sacrum_seg, body_top_mm, warnings)
    thickest_mm = float(max(image.spacing_mm))
    if thickest_mm > MAX_SLICE_MM + 1e-6:
        warnings.append(f"slices {thickest_mm:.1f} mm thick (validated up to {MAX_SLICE_MM:g} mm): a disc may be "
                        "missed or one found inside a body, so level names are not reliable")
        uncertain = True
        confidence = min(confidence, 0.3)

    # --- labels in VerSe ids on the native grid ------------------------------------------------
    report(progress, 0.9, "builtin: writing labels")
    vert_native, bodies_native = _native_labels(segs, names, sacrum_seg, vert, bodies, grid, image, blood_found,
                                                rib_bone, progress)
    del vert, bodies

    levels = _records(segs, vert_native, bodies_native, image, grid, confidence, uncertain)
    n_vertebrae = len([r for r in levels if r.name != "sacrum"])
    if n_vertebrae < max(1, min_levels):
        raise InputError(f"no vertebral column found in the CT (found {n_vertebrae} vertebrae besides the sacrum, "
                         f"need at least {max(1, min_levels)}).")
    report(progress, 1.0, "builtin: done")
    return SegmentationResult(
        vertebrae=image.with_array(vert_native.astype(np.uint8)),
        bodies=image.with_array(bodies_native.astype(np.uint8)),
        levels=levels,
        backend="builtin",
        labels_uncertain=uncertain,
        warnings=warnings,
        provenance={
            "method": "builtin: canal tracking, disc profile, marker watershed (no trained weights)",
            "working_spacing_mm": sp,
            "anchors": {"sacrum": sacrum_seg is not None, "last_rib_T12": t12 is not None,
                        "rib_bearing_levels": [sg.name for sg in segs if sg.rib_bearing and sg.name]},
        },
    )


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


def _find_vessels(cand_full, zone_fc, edge_fc, h_fc, dx_fc, ahead_fc, enc_fc, nz, z_off, sp):
    """A contrast-filled aorta (and its rim) among the blood-like candidates in front of the
    canal, all arrays cropped to the front crop: `zone_fc` where vessels are looked for, `edge_fc`
    the rim of blood pools, `h_fc` smoothed HU, `dx_fc` mm from the canal's centre line,
    `ahead_fc` mm in front of the canal's anterior wall,
    `enc_fc` in-plane directions with bone, `nz` slices in the scan. Returns the vessel mask and
    the lumen's HU range (-inf/inf when no homogeneous tube was seen)."""
    # One in-plane erosion cuts the thin contacts between the vessel and the bodies. At coarse
    # spacing the bodies' blurred marrow falls in the wide blood band too and stays joined to the
    # lumen after the erosion: narrower bands then hold the lumen apart from the marrow (and from
    # the cortex), each put through the same tube tests. (All within the front crop: no candidate
    # lies outside it.)
    # Noise leaves holes in the blood-like mask: portal-venous blood (~150 HU) is a candidate
    # only by the trabecular rule, so at 28 HU noise a third of an aorta's voxels dropped out and
    # the erosion below broke it into 22-26 mm pieces, too short for a tube (the aorta stayed on
    # T11 and L1: 520 and 1,588 voxels, L1 body Dice 0.79). Voxels whose in-plane 3x3
    # neighbourhood is mostly candidates join them (a majority vote: edges stay where they are).
    cand_full = cand_full | (ndi.uniform_filter(cand_full.astype(np.float32), size=(1, 3, 3)) > 0.5)
    vessel_fc = np.zeros_like(cand_full)
    tubes = []      # (box, good slices, main axis, lumen HU range) of each tube found
    lumen_max_hu = -np.inf
    lumen_min_hu = np.inf
    for lo_hu, hi_hu in _vessel_bands():
        cand = ndi.binary_erosion(cand_full & (h_fc > lo_hu) & (h_fc < hi_hu), structure=_SLICE,
                                  iterations=VESSEL_ERODE)
        lab, n = ndi.label(cand)
        if not n:
            continue
        objs = ndi.find_objects(lab)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for i, o in enumerate(objs):
            if o is None:
                continue
            z_ext = (o[0].stop - o[0].start) * sp
            area = sizes[i + 1] * sp ** 3 / max(z_ext, sp)
            if not 60.0 <= area <= 800.0:
                continue
            comp = lab[o] == i + 1
            # A short scan (a few vertebrae) holds less aorta: a tube through nearly all of it.
            # A vessel that runs into a blood pool (the IVC into the right atrium) or out of the
            # view is seen only up to there: half the length. (T6-T11 portal-venous phantom: a
            # 51 mm IVC from the view's end, 1568 voxels in the T11 label, Dice 0.81 -> 0.94)
            min_len_mm = min(VESSEL_MIN_LENGTH_MM, 0.8 * nz * sp)
            cut = o[0].start + z_off == 0 or o[0].stop + z_off >= nz
            if cut or (comp & edge_fc[o]).any():
                min_len_mm *= 0.5
            if z_ext < min_len_mm:
                continue
            # The aorta runs beside the midline; bodies (and a column merged with them) straddle it.
            # (the midline level with the bodies: an aorta in front of them crosses it; lumbar
            # aorta in front of a scoliotic column, 41 % of its voxels within 8 mm of the canal's
            # line, 35-58 mm in front of its wall, was kept: arterial L1-L5 phantom, Dice 0.83)
            # (per slice, below, every voxel near the midline counts: a slice where the tube has
            # merged with a body holds the body's front too)
            mid_vox = comp & (np.abs(dx_fc[o]) < VESSEL_MIDLINE_MM)
            if (mid_vox & (ahead_fc[o] < VESSEL_MIDLINE_DEPTH_MM)).sum() < VESSEL_MIDLINE_SHARE * comp.sum():
                per_slice = comp.sum(axis=(1, 2)) * sp * sp
                # Clean slices: a vessel-sized cross-section away from the midline (a slice
                # holding body bone straddles the midline).
                good = ((per_slice >= 60.0) & (per_slice <= VESSEL_MAX_AREA_MM2)
                        & (mid_vox.sum(axis=(1, 2)) * sp * sp < VESSEL_MIDLINE_SHARE * np.maximum(per_slice, 1.0)))
                # ... of the tube's own size (a partly merged slice is bigger; a smaller one is the
                # tube partly hidden in a blood pool).
                if good.any():
                    ref_area = float(np.median(per_slice[good]))
                    in_pool = (comp & edge_fc[o]).any(axis=(1, 2))
                    good &= (np.abs(per_slice - ref_area) < 0.3 * ref_area) | (
                        in_pool & (per_slice < 1.3 * ref_area))
                if not good.any():
                    continue
                # The lumen's own HU (contrast is uniform along the tube): brighter voxels next to
                # it are cortex or a calcified wall, and stay.
                lumen_hu = h_fc[o][comp & good[:, None, None]]
                q1, q3 = np.percentile(lumen_hu, [25, 75])
                # Only a homogeneous tube is a vessel. Runs of bone pass the shape tests above:
                # on a short scan a tube of dense marrow and disc (real 2 mm slab, IQR 126 HU; the
                # aorta 10 HU), on a native CT the L5/S1 bodies with the sacral alae in the
                # trabecular band (real 3 mm CT: IQR 68 and 137 HU, 4146 working voxels of bone
                # taken out with L5's posterior wall while they were taken as vessels).
                if q3 - q1 > VESSEL_MAX_IQR_HU:
                    continue
                tube_min_hu, tube_max_hu = _lumen_hu_range(lumen_hu)
                lumen_max_hu = max(lumen_max_hu, tube_max_hu)
                lumen_min_hu = min(lumen_min_hu, tube_min_hu)
                del lumen_hu
                # (not the voxels brighter than the lumen: where the cortex of a body next to the
                # tube is dim (low-density bone at high keV) its flanks join the band and the tube,
                # and the rim growth below ran from them into the marrow. Arterial T10-L3 phantom at
                # 79 keV: 5,400 marrow voxels of T10 taken, body Dice 0.82 -> 0.95)
                # Nor a thin crescent of a body's cortex, blurred to the lumen's HU, that joins the
                # tube in a clean slice: the tube is opened in-plane (its lumen is several voxels
                # across, the crescent one), then regrown two voxels within itself, which restores
                # the lumen's thin wedge against a body but not the crescent running on along the
                # body's ring. (Random arterial T10-L1 at 2x2x1.25 mm, T10 at 82 mg/cm3: the rim
                # growth ran from the crescent into the marrow, T10 / L1 bodies 0.828 / 0.906 ->
                # 0.964 / 0.946; opened only, the wedges stayed as bone: arterial T4-T8 bodies
                # -0.002 to -0.006.) A piece the opening cut off stays where the opened tube of the
                # slice above or below holds it: noise splits a lumen in one slice, not a crescent
                # from the body's ring in the next (random noisy arterial T9-T12 at 0.7x0.7x1 mm:
                # a lumen island left in T12, body 0.902 -> 0.899 without this).
                opened = ndi.binary_opening(comp, structure=_SLICE)
                lumen = ndi.binary_dilation(opened, structure=_SLICE, iterations=2, mask=comp)
                lumen[1:] |= comp[1:] & opened[:-1]
                lumen[:-1] |= comp[:-1] & opened[1:]
                del opened
                lumen &= good[:, None, None]
                # A tube is round and moves little from slice to slice: in-plane pieces away from
                # its axis (a body's marrow or blurred endplate of the lumen's HU, joined to the
                # tube in another slice) are not this vessel, nor pieces beside it that are not of
                # the lumen's HU (a body's blurred cortex or marrow). (One component can hold two
                # vessels side by side, the aorta and the IVC where they touch: each has its axis.)
                axes, pieces, on_axis, beside_axis = _tube_axes(lumen)
                lumen_like = _lumen_like_pieces(pieces, h_fc[o], *_core_hu_range(h_fc[o], comp & good[:, None, None]))
                lumen = (on_axis | (beside_axis & lumen_like))[pieces]
                del pieces
                vessel_fc[o] |= lumen & (h_fc[o] <= tube_max_hu)
                # Slices where the vessel has merged with a body (too big a cross-section): the
                # vessels' cross-sections carried over from the clean slices around (a disc of
                # each one's radius on its axis), so the body's own bone stays.
                bad = np.nonzero(~good & (per_slice > 0))[0]
                if good.sum() >= 2 and bad.size:
                    yy_o = np.arange(o[1].stop - o[1].start)[:, None]
                    xx_o = np.arange(o[2].stop - o[2].start)[None, :]
                    for k in bad:
                        k_o = (o[0].start + k, o[1], o[2])
                        for axis_y, axis_x, r_vox in axes:
                            tube = (yy_o - axis_y[k]) ** 2 + (xx_o - axis_x[k]) ** 2 <= (r_vox + 0.5) ** 2
                            vessel_fc[k_o] |= tube & cand[k_o] & (h_fc[k_o] < lumen_max_hu)
                if good.sum() >= 2:
                    tubes.append((o, good, axes[0], tube_min_hu, tube_max_hu))
                del lumen
    found = vessel_fc.copy()
    for tube in tubes:
        _carry_tube(vessel_fc, found, h_fc, enc_fc, *tube)
    del found
    if vessel_fc.any():
        vessel_fc |= _vessel_branches(cand_full, vessel_fc, h_fc, dx_fc, lumen_min_hu, lumen_max_hu, sp)
        vessel_fc |= (ndi.binary_dilation(vessel_fc, structure=_SLICE, iterations=VESSEL_ERODE) & cand_full
                      & (h_fc < lumen_max_hu))
        # The lumen's rim next to a body lies within the cortex clearance, so it was never a
        # blood candidate (a calcified wall is cortex-bright too): grown there over lumen-HU
        # voxels in front of the canal that no cortical ring encloses in-plane (portal-venous
        # marrow has the lumen's HU, but it lies inside the body's ring; the ring is brighter).
        vessel_fc = _grow_rim(vessel_fc, zone_fc, h_fc, lumen_min_hu, lumen_max_hu, enc_fc, sp)
        if lumen_min_hu < lumen_max_hu:
            # The lumen's partial-volume rim, darker than the lumen (a voxel or two thick at
            # coarse spacing, and trabecular-bright): grown downhill only, each voxel no
            # brighter than its grown neighbour, so it stops in the soft-tissue valley before a
            # body, and never over a voxel of lumen HU or brighter, so never across a cortex.
            # (The lumen counts as bone in the enclosure count: that count cannot guard it.)
            # Nor into marrow darker than bone that a bright ring encloses in-plane: a thin
            # cortex blurred to the lumen's HU is no brighter than the lumen, so the growth
            # crossed it into an osteoporotic body (arterial T5 at 43 mg/cm3, 0.7x0.7x3 mm:
            # body 0.852 -> 0.920).
            ring = h_fc > BONE_HU
            lower = zone_fc & (h_fc < lumen_min_hu) & ~(ndi.binary_fill_holes(ring, structure=_SLICE) & ~ring)
            del ring
            for _ in range(max(1, int(round(VESSEL_RIM_MM / sp)))):
                vessel_fc |= lower & (h_fc <= ndi.maximum_filter(np.where(vessel_fc, h_fc, -np.inf), footprint=_SLICE))
    return vessel_fc, lumen_min_hu, lumen_max_hu


def _carry_tube(vessel_fc, found, h_fc, enc_fc, o, good, axis, min_hu, max_hu) -> None:
    """Carry a vessel found as a tube on past its tube's ends towards the view's ends, slice by
    slice, while a disc of its radius about its axis is still mostly lumen (in place). Where the
    aorta runs beside a blood pool (the heart at a thoracic view's top) the pool's edge takes
    part of its candidates, the tube ends there, and the lumen left beyond joins the column
    (portal-venous T7-L1 at 2x2x3 mm: 85 aorta voxels in T7, its top 54 mm of aorta unfound).
    Only where no tube is `found` further on along it (between two tubes of one vessel it has
    merged with a body, and a disc carried there took the body's rim: portal-venous T4-T10 at
    1x1x3 mm, T5 body 0.914 -> 0.873), and only voxels of the lumen's HU that no bone ring
    encloses in-plane (a body's marrow has the lumen's HU there)."""
    axis_y, axis_x, r_vox = axis
    ks = np.nonzero(good)[0]
    ny, nx = vessel_fc.shape[1:]
    yy = np.arange(ny)[:, None]
    xx = np.arange(nx)[None, :]
    r = max(r_vox, 1.5)
    for k_end, step, stop in ((ks[-1], 1, vessel_fc.shape[0]), (ks[0], -1, -1)):
        cy, cx = axis_y[k_end] + o[1].start, axis_x[k_end] + o[2].start
        k = k_end + o[0].start + step
        ahead = found[o[0].stop:] if step > 0 else found[:o[0].start]   # (beyond its own tube's box)
        if (ahead.any(axis=0) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2.0) ** 2)).any():
            continue
        while k != stop:
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            like = (h_fc[k] >= min_hu) & (h_fc[k] <= max_hu) & (enc_fc[k] < VESSEL_ENCLOSED_DIRS)
            disc = d2 <= r * r
            if (like & disc).sum() < TUBE_CARRY_SHARE * disc.sum():
                break
            lumen = like & (d2 <= (r + 1.0) ** 2)     # (and its rim)
            vessel_fc[k] |= lumen
            ly, lx = np.nonzero(lumen)
            cy, cx = ly.mean(), lx.mean()          # (it follows the vessel's bends)
            k += step


def _tube_axes(lumen):
    """The vessels in a tube's lumen mask (slices first), and which of its in-plane pieces are
    theirs. Returns [(axis_y, axis_x, radius)] in voxels (axes per slice), the in-plane pieces
    (labels, 0 outside), and per label whether it lies on an axis (within TUBE_AXIS_ON_VOX) and
    whether it reaches within radius + TUBE_AXIS_MARGIN_VOX of one. An axis is the deepest point of the lumen not yet given to an axis (farthest in-plane
    from its outline), median-filtered over TUBE_AXIS_SLICES slices that hold some (one slice's
    deepest point may lie in a piece that is not the vessel), interpolated over the slices
    without; its radius, from the median in-plane area of the pieces on it. The first axis
    always counts; a further one where pieces lie on it in at least TUBE_AXIS_SUPPORT of the
    slices with lumen (a second vessel along the first, not marrow pieces here and there)."""
    nz, ny, nx = lumen.shape
    pieces, _ = ndi.label(lumen, structure=_SLICE)
    area = np.bincount(pieces.ravel())
    piece_z = np.array([sl[0].start for sl in ndi.find_objects(pieces)], int)
    yy = np.arange(ny)[None, :, None]
    xx = np.arange(nx)[None, None, :]
    k_all = np.arange(nz)
    with_lumen = lumen.any(axis=(1, 2)).sum()
    axes = []
    on_axis = np.zeros(area.size, bool)
    beside = np.zeros(area.size, bool)
    left = lumen.copy()
    while left.any() and len(axes) < TUBE_MAX_AXES:
        ks = np.nonzero(left.any(axis=(1, 2)))[0]
        depth = ndi.distance_transform_edt(left, sampling=(1e3, 1.0, 1.0))   # in-plane only
        ys, xs = np.unravel_index(depth[ks].reshape(ks.size, -1).argmax(axis=1), (ny, nx))
        del depth
        w = min(TUBE_AXIS_SLICES, ks.size if ks.size % 2 else ks.size - 1)
        if w > 1:
            ys = ndi.median_filter(ys.astype(float), size=w, mode="nearest")
            xs = ndi.median_filter(xs.astype(float), size=w, mode="nearest")
        axis_y, axis_x = np.interp(k_all, ks, ys), np.interp(k_all, ks, xs)
        d2 = (yy - axis_y[:, None, None]) ** 2 + (xx - axis_x[:, None, None]) ** 2
        on = np.unique(pieces[left & (d2 <= TUBE_AXIS_ON_VOX ** 2)])
        on = on[on > 0]
        per_slice = np.bincount(piece_z[on - 1], weights=area[on], minlength=nz)
        if axes and (per_slice > 0).sum() < TUBE_AXIS_SUPPORT * with_lumen:
            break
        r_vox = float(np.sqrt(np.median(per_slice[per_slice > 0]) / np.pi)) if on.size else 1.0
        axes.append((axis_y, axis_x, r_vox))
        near = np.unique(pieces[left & (d2 <= (r_vox + TUBE_AXIS_MARGIN_VOX) ** 2)])
        on_axis[on] = True
        beside[near] = True
        left &= ~beside[pieces]
    on_axis[0] = beside[0] = False
    return axes, pieces, on_axis, beside


def _lumen_hu_range(hu):
    """HU range of a lumen from its voxels' HU: Tukey-fenced (the few marrow / cortex voxels a
    tube takes in drop out), from the 1st to the 99th centile widened by VESSEL_LUMEN_MARGIN_HU."""
    q1, q3 = np.percentile(hu, [25, 75])
    fence = 1.5 * (q3 - q1)
    hu = hu[(hu >= q1 - fence) & (hu <= q3 + fence)]
    return (float(np.percentile(hu, 1)) - VESSEL_LUMEN_MARGIN_HU,
            float(np.percentile(hu, 99)) + VESSEL_LUMEN_MARGIN_HU)


def _core_hu_range(h, tube):
    """HU range of a tube's lumen from its core: two in-plane steps in from its outline, so
    neither the lumen's partial-volume rim nor a thin piece of a body's cortex or marrow joined
    to it (the whole tube where the core is under 20 voxels)."""
    core = ndi.binary_erosion(tube, structure=_SLICE, iterations=2)
    return _lumen_hu_range(h[core] if core.sum() >= 20 else h[tube])


def _lumen_like_pieces(pieces, h, min_hu, max_hu):
    """Per label of a tube's in-plane lumen pieces (`pieces`, 0 outside): whether its HU is the
    lumen's, median between min_hu and max_hu and homogeneous (interquartile range under
    VESSEL_MAX_IQR_HU). A slice of a tube can hold, beside the vessel's cross-section, pieces of a
    body's blurred cortex or low-density marrow joined to it in the slices above or below:
    brighter than the lumen, or darker, or mixed (the rim growth ran from them into the marrow)."""
    n = int(pieces.max())
    keep = np.zeros(n + 1, bool)
    if n:
        idx = np.arange(1, n + 1)
        stats = ndi.labeled_comprehension(h, pieces, idx, lambda v: np.percentile(v, [25, 50, 75]), object, None)
        for i, (q1, med, q3) in zip(idx, stats):
            keep[i] = min_hu <= med <= max_hu and q3 - q1 <= VESSEL_MAX_IQR_HU
    return keep


def _grow_rim(blood, zone, h, lumen_min_hu, lumen_max_hu, enc, sp):
    """`blood` grown in-plane by VESSEL_RIM_MM over `zone` voxels of the lumen's HU (between
    lumen_min_hu and lumen_max_hu) that no cortical ring encloses (`enc`, in-plane directions with
    bone, under VESSEL_ENCLOSED_DIRS): the rim of a vessel or blood pool against a body, which the
    cortex clearance kept out of the blood candidates. All arrays on one crop."""
    room = zone & (h > lumen_min_hu) & (h < lumen_max_hu) & (enc < VESSEL_ENCLOSED_DIRS)
    return ndi.binary_dilation(blood, structure=_SLICE, mask=room | blood,
                               iterations=max(1, int(round(VESSEL_RIM_MM / sp))))


def _vessel_branches(cand_full, vessel_fc, h_fc, dx_fc, lumen_min_hu, lumen_max_hu, sp):
    """Branches of the contrast tubes found (common iliac arteries): too short and too thin to be
    found as tubes themselves, and at coarse spacing blurred below the lumen's HU range. Pieces
    of the blood candidates (one in-plane erosion, as for the tubes) no brighter than the lumen,
    homogeneous, of a vessel's cross-section, off the midline, at least BRANCH_MIN_LENGTH_MM
    long, whose median HU is the lumen's, within BRANCH_GAP_MM of a tube found."""
    lo_hu = lumen_min_hu - BRANCH_BLUR_HU
    cand = ndi.binary_erosion(cand_full & (h_fc > lo_hu) & (h_fc < lumen_max_hu) & ~vessel_fc,
                              structure=_SLICE, iterations=VESSEL_ERODE)
    lab, n = ndi.label(cand)
    out = np.zeros_like(vessel_fc)
    if not n:
        return out
    near = ndi.distance_transform_edt(~vessel_fc, sampling=sp) <= BRANCH_GAP_MM
    for i, o in enumerate(ndi.find_objects(lab)):
        comp = lab[o] == i + 1
        if (o[0].stop - o[0].start) * sp < BRANCH_MIN_LENGTH_MM or not (comp & near[o]).any():
            continue
        per_slice = comp.sum(axis=(1, 2)) * sp * sp
        if per_slice.max() > BRANCH_MAX_AREA_MM2:
            continue
        if (comp & (np.abs(dx_fc[o]) < VESSEL_MIDLINE_MM)).sum() >= VESSEL_MIDLINE_SHARE * comp.sum():
            continue
        h = h_fc[o][comp]
        q1, med, q3 = np.percentile(h, [25, 50, 75])
        if q3 - q1 <= VESSEL_MAX_IQR_HU and lumen_min_hu <= med <= lumen_max_hu:
            out[o] |= comp
    return out


def _vessel_bands():
    """HU bands the vessel tubes are searched in: all blood candidates first (the contrast band
    and portal-venous blood), then narrower bands stepped over VESSEL_HU."""
    lo = np.arange(VESSEL_BAND_LOW_HU, VESSEL_HU[1] - VESSEL_BAND_HU + 1.0, VESSEL_BAND_STEP_HU)
    return [(-np.inf, np.inf)] + [(float(a), float(a + VESSEL_BAND_HU)) for a in lo]


def _front_crop(canal, z_lo, z_hi, shape, sp):
    """The region in front of the canal that the vessel tests search: the column box widened
    by a blood pool ball's diameter anteriorly and its radius laterally, so a pool the box cuts
    is still seen whole."""
    r_mm = BLOOD_POOL_RADIUS_MM
    cy, cx = canal["cy"][z_lo:z_hi + 1], canal["cx"][z_lo:z_hi + 1]
    ny, nx = shape[1:]
    y0 = max(0, int(np.floor(cy.min() - (ROI_ANTERIOR_MM + 2 * r_mm) / sp)))
    y1 = min(ny, int(np.ceil(cy.max())) + 1)
    x0 = max(0, int(np.floor(cx.min() - (ROI_LATERAL_MM + r_mm) / sp)))
    x1 = min(nx, int(np.ceil(cx.max() + (ROI_LATERAL_MM + r_mm) / sp)) + 1)
    return slice(z_lo, z_hi + 1), slice(y0, y1), slice(x0, x1)


def _blood_pools(blood, hu_s, body, canal, front_mm, crop, enc_fc, sp):
    """Contrast-enhanced blood pools in front of the column (heart chambers, aneurysms): the
    union of balls of radius BLOOD_POOL_RADIUS_MM inside blood-like tissue (a morphological
    opening by distance maps) in the front crop. No vertebral body holds such a ball: bodies are
    under 40 mm tall between their discs. Returns the mask (full grid), or None when there is none."""
    r_mm = BLOOD_POOL_RADIUS_MM
    zs, ys, _ = crop
    cy = canal["cy"][zs]
    dy = (np.arange(ys.start, ys.stop)[None, :, None] - cy[:, None, None]) * sp
    zone = body[crop] & (dy < front_mm[zs] - 4.0)
    cand = blood[crop] & zone
    if not cand.any():
        return None
    # Noise leaves single voxels of a pool below the blood threshold (portal-venous blood,
    # 150 HU, 28 HU noise at 2 mm: ~4 %, in clusters), and no ball fits between them: pockets up
    # to POOL_HOLE_MM2 that a slice of blood encloses are blood too. (Noisy T8-L1 phantom: largest
    # ball 12 mm, 12,208 heart voxels stayed in the labels and merged T8 with T9; pockets up to
    # 16 / 120 / 320 mm2 filled: merged / T9 0.877 / 0.896.) Larger pockets, and any pocket of
    # soft tissue or bone, stay out: filling them took tissue between the heart, the aorta and
    # the bodies (arterial T8-T12 phantom, T8 body 0.896 -> 0.859; arterial T8-L2, 0.924 ->
    # 0.906); the same fill in the vessel bands took the real 2 mm slab's T12 0.710 -> 0.668.
    h = hu_s[crop]
    holes = ndi.binary_fill_holes(cand, structure=_SLICE) & ~cand
    lab, n = ndi.label(holes, structure=_SLICE)
    if n:
        small = np.bincount(lab.ravel(), minlength=n + 1) * sp * sp <= POOL_HOLE_MM2
        small[0] = False
        # (only voxels just darker than blood: soft tissue and bone in a pocket stay out)
        cand |= small[lab] & (h > TRABECULAR_HU - POOL_HOLE_BELOW_HU) & (h < VESSEL_HU[0])
    del holes, lab
    seeds = ndi.distance_transform_edt(cand, sampling=sp) > r_mm
    if not seeds.any():
        return None
    core = (ndi.distance_transform_edt(~seeds, sampling=sp) <= r_mm) & cand
    # The opening leaves the pool's rim where it meets a body: grown back a voxel over voxels
    # no brighter than the pool itself (the cortex is brighter and stays).
    lumen_max_hu = float(np.percentile(h[core], 99)) + VESSEL_LUMEN_MARGIN_HU
    core = ndi.binary_dilation(core, structure=_SLICE, iterations=BLOOD_POOL_RIM_VOX, mask=cand & (h < lumen_max_hu))
    # Portal-venous blood (~150 HU) is a candidate only BLOOD_CORTEX_CLEARANCE_MM clear of the
    # cortex, so a pool lying on a body keeps a rim that thick there: grown over it as the
    # aorta's rim is, over voxels of the pool's HU that no cortical ring encloses (marrow has
    # that HU too, but lies inside its ring). (T6-T11 portal-venous phantom: 617-778 heart
    # voxels in the T7/T8 labels, whole Dice 0.90/0.88; now 38-43, 0.937/0.94)
    lumen_min_hu = float(np.percentile(h[core], 1)) - VESSEL_LUMEN_MARGIN_HU
    core = _grow_rim(core, zone, h, lumen_min_hu, lumen_max_hu, enc_fc, sp)
    pool = np.zeros(blood.shape, bool)
    pool[crop] = core
    return pool


def _native_labels(segs, names, sacrum_seg, vert, bodies, grid, image, blood_found=None, rib_bone=None,
                   progress=None):
    """Working labels -> VerSe ids on the input grid (whole vertebrae, bodies), the outlines
    redrawn on the native HU. The anchoring sacrum segment's body label is the sacrum's. Only
    the native box around the labels is worked on (a torso CT's spine is a few % of it).
    `blood_found`, `rib_bone` (working grid, optional): contrast blood and rib bone taken from the
    column, which the redrawn outline does not grow back over."""
    lut = np.zeros(256, np.uint8)
    for sg, name in zip(segs, names):
        sg.name = name
        if name:
            lut[sg.label] = lv.level_id(name)
    body_lut = lut.copy()
    if sacrum_seg is not None:
        body_lut[segs[sacrum_seg].label] = lv.level_id("sacrum")
    vert_full = np.zeros(image.shape, np.uint8)
    bodies_full = np.zeros(image.shape, np.uint8)
    vert_ids = lut[vert]
    named_box = ndi.find_objects((vert_ids > 0).astype(np.uint8))
    if not named_box:
        return vert_full, bodies_full
    box = _native_box(named_box[0], grid, image)
    sub = _crop_image(image, box)
    vert_native = _to_native(vert_ids, grid, sub)
    del vert_ids
    bodies_native = _to_native(body_lut[bodies], grid, sub)
    native_min = float(min(image.spacing_mm))
    if grid.spacing_mm / native_min >= 1.4:
        report(progress, 0.95, "builtin: refining outlines")
        def native(mask):
            return None if mask is None else _to_native(mask.astype(np.uint8), grid, sub) > 0
        # A rib head taken from a body is rib bone touching it: the bodies do not grow back over
        # it (arterial T4-T11 phantom at 1x1x3 mm: rib in the bodies 2.6 % -> 1.2 %, bodies
        # 0.867-0.919 -> 0.875-0.928), the whole vertebrae only over its rim: where the working
        # grid's rib path ran into a pedicle's side, regrowing the rim mends it (blocked whole:
        # pedicle notches, whole -0.003 / -0.004 on two levels).
        blood = native(blood_found)
        blocked = blood
        if rib_bone is not None:
            rib_core = native(ndi.binary_erosion(rib_bone, structure=_SLICE))   # (its rim left free)
            blocked = rib_core if blocked is None else blocked | rib_core
        vert_native, bodies_native = _refine_native(vert_native, bodies_native, sub, grid.spacing_mm, blocked,
                                                    body_blocked=native(rib_bone), blood=blood)
    # The outline on the native HU, drawn only now so that disc finding saw the full column: one
    # voxel layer at most (a low-density body keeps its interior).
    vert_native, bodies_native = _trim_outline(vert_native, bodies_native, sub,
                                               EDGE_FRACTION_COARSE if native_min >= 2.5 else EDGE_FRACTION)
    _open_metal_slices(vert_native, bodies_native, sub)
    vert_full[box], bodies_full[box] = _drop_detached_fragments(vert_native, bodies_native, image.spacing_zyx_mm)
    return vert_full, bodies_full


def _open_metal_slices(vert: np.ndarray, bodies: np.ndarray, sub: Image) -> None:
    """A screw's beam-hardening streaks lie in the axial slices that hold metal and lift thin
    rays of soft tissue and canal above the bone threshold, joined to the vertebra or beside it.
    In those slices the labels are opened in-plane (a disc of METAL_OPENING_MM), and an in-plane
    piece apart from the metal is kept only where vertebra goes on in the nearest slice without
    metal above or below, if one lies within METAL_PIECE_REACH_MM (the streaks end there; a
    process or lamina goes on; rods spanning many slices leave none near). The metal in the
    bone stays; the metal outside it (rods, screw heads: _hardware) goes first.
    In place. (Keeping each label near its outline in the metal-free slices as well helped the
    phantoms more but cut transverse processes that lie within a screw's slices at 3 mm.)"""
    # (metal inside the labels only: excreted contrast in the bladder can pass the HU too)
    metal = (sub.array >= METAL_MIN_HU) & (vert > 0)
    if not metal.any():
        return
    hardware = _hardware(metal, vert, sub)
    if hardware.any():
        vert[hardware] = 0
        bodies[hardware] = 0
        metal &= ~hardware
        if not metal.any():
            return
    axis = superior_axis(sub)[0]
    spacing_ax = sub.spacing_zyx_mm[axis]
    in_plane = [s for a, s in enumerate(sub.spacing_zyx_mm) if a != axis]
    r = [max(1, int(round(METAL_OPENING_MM / s))) for s in in_plane]
    yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1]
    disc = np.expand_dims((yy / r[0]) ** 2 + (xx / r[1]) ** 2 <= 1.0, axis)
    in_plane8 = np.moveaxis(_SLICE8, 0, axis)
    in_plane4 = np.moveaxis(_SLICE, 0, axis)
    has_metal = np.moveaxis(metal, axis, 0).reshape(metal.shape[axis], -1).any(axis=1)
    clean = np.flatnonzero(~has_metal)

    def plane(k):
        idx = [slice(None)] * 3
        idx[axis] = slice(k, k + 1)
        return tuple(idx)

    for k in np.flatnonzero(has_metal):
        idx = plane(k)
        v = vert[idx]
        kept = ndi.binary_opening(v > 0, structure=disc)
        pieces, n = ndi.label(kept, structure=in_plane8)
        near = [c for c in clean[clean < k][-1:].tolist() + clean[clean > k][:1].tolist()
                if abs(c - k) * spacing_ax <= METAL_PIECE_REACH_MM]
        if near:
            beyond = np.zeros_like(kept)
            for c in near:
                beyond |= vert[plane(c)] > 0
            if n > 1:
                good = np.unique(pieces[(metal[idx] | beyond) & kept])
                kept &= np.isin(pieces, good[good > 0])
            # The streaks can lift a whole canal above the bone threshold between converging
            # screws (L3-L4 construct at 0.8x0.8x2.5 mm: +550 HU, 330 of its 413 voxels taken):
            # labelled here, left out in the metal-free slices beside, and enclosed by this
            # slice's own ring, it is no bone.
            fill = kept & ~beyond & ~metal[idx]
            rest = kept & ~fill
            fill &= ndi.binary_fill_holes(rest, structure=in_plane4)
            fl, fn = ndi.label(fill, structure=in_plane4)
            if fn:
                area_mm2 = np.bincount(fl.ravel())[1:] * float(np.prod(in_plane))
                kept &= ~np.isin(fl, 1 + np.flatnonzero(area_mm2 >= CANAL_FILL_MIN_MM2))
        kept |= metal[idx]
        v[~kept] = 0
        bodies[idx][~kept] = 0


def _hardware(metal: np.ndarray, vert: np.ndarray, sub: Image) -> np.ndarray:
    """The labelled metal that lies outside the bone: rods and screw heads (tulips) behind the
    arches. A screw in a pedicle or body is wrapped in bone; a rod runs through the muscles
    behind the laminae and touches bone at most on one side. Metal here is every voxel over
    HARDWARE_MIN_HU joined to `metal` (a 5.5 mm rod's voxels are mostly partial volume:
    half of the phantom's metal voxels lie under METAL_MIN_HU, cortex stays under 2000). A
    metal voxel is hardware when, within HARDWARE_REACH_MM, under HARDWARE_BONE_SHARE of the
    non-metal voxels are labelled (L3-L4 screw-and-rod phantom at 0.8x0.8x2.5 mm: 98 % of the
    rods' and heads' labelled voxels fall under it, 4 % of the screws', their tails at the entry
    point)."""
    dense = sub.array >= HARDWARE_MIN_HU
    sp = np.asarray(sub.spacing_zyx_mm, float)
    n = np.ceil(HARDWARE_REACH_MM / sp).astype(int)
    box = tuple(slice(max(0, o.start - k), o.stop + k)
                for o, k in zip(ndi.find_objects(metal.astype(np.uint8))[0], n))
    pieces, _ = ndi.label(dense[box])
    joined = np.isin(pieces, np.unique(pieces[metal[box]]))   # (metal is dense: no label 0)
    offsets = np.ogrid[tuple(slice(-k, k + 1) for k in n)]
    ball = (sum((o * s) ** 2 for o, s in zip(offsets, sp)) <= HARDWARE_REACH_MM ** 2).astype(np.float32)
    soft = ~dense[box]
    bone = ((vert[box] > 0) & soft).astype(np.float32)
    share = (fftconvolve(bone, ball, mode="same")
             / np.maximum(fftconvolve(soft.astype(np.float32), ball, mode="same"), 1.0))
    out = np.zeros_like(metal)
    out[box] = joined & (vert[box] > 0) & (share < HARDWARE_BONE_SHARE)
    return out


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


def _crop_image(image: Image, box: tuple[slice, ...]) -> Image:
    """The image's voxels in `box` (a view) with the geometry that places them."""
    origin = image.index_to_physical(np.array([[b.start for b in box]], float))[0]
    return Image(image.array[box], image.spacing_mm, tuple(float(v) for v in origin), image.direction,
                 metadata=image.metadata)


def _drop_detached_fragments(vert: np.ndarray, bodies: np.ndarray, spacing_zyx_mm):
    """A vertebra is one bone: pieces of a label farther than FRAGMENT_GAP_MM from its largest
    part and under FRAGMENT_MAX_SHARE of its size are neighbouring bone that the disc planes cut
    into this level (iliac crests beside L5 on a 3 mm CT), not the vertebra. A process split off
    by the outline trim lies close and stays. Edits both label maps in place and returns them."""
    full = ndi.generate_binary_structure(3, 3)
    sp = np.asarray(spacing_zyx_mm, float)
    for i, o in enumerate(ndi.find_objects(vert)):
        if o is None:
            continue
        m = vert[o] == i + 1
        lab, n = ndi.label(m, structure=full)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        main = int(np.argmax(sizes))
        near = ndi.distance_transform_edt(lab != main, sampling=sp) <= FRAGMENT_GAP_MM
        detached = np.setdiff1d(np.arange(1, n + 1), lab[near & m])
        detached = detached[sizes[detached] < FRAGMENT_MAX_SHARE * sizes[main]]
        if detached.size:
            drop = np.isin(lab, detached)
            vert[o][drop] = 0
            bodies[o][drop & (bodies[o] == i + 1)] = 0
    return vert, bodies


def _fill_body_holes(vert: np.ndarray, bodies: np.ndarray) -> None:
    """Fill holes of each body label in axial, coronal and sagittal planes (in place); the
    filled voxels join the whole vertebra of the same label where it has none."""
    objs = ndi.find_objects(bodies)
    for i, o in enumerate(objs):
        if o is None:
            continue
        o = tuple(slice(max(0, sl.start - 1), sl.stop + 1) for sl in o)
        m = bodies[o] == i + 1
        filled = m.copy()
        for axis in range(3):
            st = np.zeros((3, 3, 3), bool)
            idx = [slice(None)] * 3
            idx[axis] = 1
            st[tuple(idx)] = ndi.generate_binary_structure(2, 1)
            filled |= ndi.binary_fill_holes(filled, structure=st)
        new = filled & ~m & (bodies[o] == 0)
        bodies[o][new] = i + 1
        v = vert[o]
        v[new & (v == 0)] = i + 1


def _trim_outline(vert: np.ndarray, bodies: np.ndarray, image: Image, fraction: float):
    """Drop the outer voxel layer of each vertebra (its surface and its faces towards the
    neighbouring vertebrae) where the native HU is below `fraction` of the way from soft
    tissue to the brightest bone just inside: a partial-volume voxel mostly outside the bone,
    or disc rather than endplate. Relative to the local peak, so it holds for a blurred 3 mm
    cortex (peak ~400 HU) and for a sharp thin one (peak > 1000 HU) alike."""
    fg = vert > 0
    if not fg.any():
        return vert, bodies
    box = ndi.find_objects(fg.astype(np.uint8))[0]
    crop = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, vert.shape))
    f = fg[crop]
    v = vert[crop]
    cross = ndi.generate_binary_structure(3, 1)
    other = (ndi.grey_dilation(v, footprint=cross) != v) | (ndi.grey_erosion(np.where(f, v, 255), footprint=cross) != v)
    # (the walls of inner pockets - veins, canal - are not an outline)
    # (the crop reaches a voxel past the labels: only the field of view's end, no surface, meets its border)
    outer = f & (~ndi.binary_erosion(ndi.binary_fill_holes(f), border_value=1) | other)
    del other
    hu = np.asarray(image.array[crop], np.float32)
    peak = ndi.maximum_filter(np.where(f & ~outer, hu, np.float32(-2000.0)), size=3)
    # Thin processes with no interior voxel (peak -2000) keep their outline.
    drop = outer & (peak > -1000.0) & (hu < EDGE_BASE_HU + fraction * (peak - EDGE_BASE_HU))
    del peak
    drop |= outer & _past_profile_peak(v, bodies[crop] > 0, hu, image.spacing_zyx_mm)
    del hu, outer
    vert = vert.copy()
    bodies = bodies.copy()
    vert[crop][drop] = 0
    bodies[crop][drop] = 0
    return vert, bodies


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


def _past_profile_peak(labels: np.ndarray, in_body: np.ndarray, hu: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    """Surface voxels past the cortex's peak on the HU profile across the surface.

    Where a voxel is wider than the ~1 mm cortex, a voxel centred inside the bone holds the whole
    cortex and is the brightest on the profile along an axis; its outer neighbour, centred outside,
    holds only part of it and still reads far above soft tissue, so no single HU threshold tells
    the two apart (bench.single_threshold_dice). A voxel whose outward neighbour along an axis
    sampled at >= EDGE_PROFILE_MIN_MM is not its vertebra, whose inward one is, and which is
    darker than EDGE_PROFILE_FRACTION of that inward one lies mostly outside. On the posterior
    elements only along the slice axis: in-plane, laminae and processes are a few voxels across
    and the rule thins them below the real CT's reference (3 mm CT vs TotalSegmentator, whole L1
    0.910 -> 0.906 and L5 0.854 -> 0.850 with in-plane faces included even at 0.6; phantoms gain)."""
    fg = labels > 0
    past = np.zeros(labels.shape, bool)
    for axis, spacing_mm in enumerate(spacing_zyx_mm):
        if spacing_mm < EDGE_PROFILE_MIN_MM:  # a resolved cortex: the half-maximum rule alone
            continue
        where = fg if axis == 0 else fg & in_body
        # Neighbour labels and HU on both sides, each the other's inward / outward side.
        same = {step: _shifted(labels, axis, step) == labels for step in (1, -1)}
        nb_hu = {step: _shifted(hu, axis, step, np.float32(-2000.0)) for step in (1, -1)}
        for step in (1, -1):
            face = where & ~same[step] & same[-step]
            past |= face & (hu - EDGE_BASE_HU < EDGE_PROFILE_FRACTION * (nb_hu[-step] - EDGE_BASE_HU))
    return past


def _refine_native(vert: np.ndarray, bodies: np.ndarray, image: Image, sp: float,
                   blocked: Optional[np.ndarray] = None, body_blocked: Optional[np.ndarray] = None,
                   blood: Optional[np.ndarray] = None):
    """Redraw the outlines on a finer native grid: nearest-neighbour labels from the working
    grid are blocky by up to one working voxel. Within that shell a voxel is bone when its own
    (lightly smoothed) HU says so; its label comes from the neighbouring labelled voxels.
    `blocked` (native grid, optional): voxels never grown over (contrast blood found, the core of
    the rib bone taken from the column);
    `body_blocked`: voxels the bodies do not grow over (rib heads taken from them); `blood`: the
    contrast blood found, whose side of the outline is drawn against the lumen (_lumen_side)."""
    fg = vert > 0
    if not fg.any():
        return vert, bodies
    native = np.asarray(image.spacing_zyx_mm, float)
    k = np.maximum(1, np.round(1.5 * sp / native).astype(int))
    box = ndi.find_objects(fg.astype(np.uint8))[0]
    crop = tuple(slice(max(0, b.start - kk - 1), min(n, b.stop + kk + 1)) for b, kk, n in zip(box, k, vert.shape))
    v = vert[crop]
    b = bodies[crop]
    hu = ndi.gaussian_filter(np.asarray(image.array[crop], np.float32), np.maximum(0.5, 0.4 / native))
    fg = v > 0
    struct = np.ones([2 * kk + 1 for kk in k], bool)
    inner = ndi.binary_erosion(fg, structure=struct, border_value=1)   # (the view's end is no outline)
    grown_v = ndi.grey_dilation(v, footprint=struct)
    grown_b = ndi.grey_dilation(b, footprint=struct)
    shell = ndi.binary_dilation(fg, structure=struct) & ~inner & (hu > NATIVE_EDGE_HU)
    if blocked is not None:
        # Contrast blood found on the working grid (arterial lumen ~300 HU) is brighter than
        # the edge threshold: not grown over (labelled voxels there stay for the outline trim).
        # Arterial T10-L1 phantom, 1x1x3 mm: a 2-3 voxel crescent of the aorta on T10/T11,
        # body Dice 0.894 -> 0.927.
        shell &= fg | ~blocked[crop]
    keep = inner | shell
    del shell
    if blood is not None and blood[crop].any():
        keep &= ~_lumen_side(fg & keep, blood[crop], hu)
    # Trabecular bone just under the cortex is darker than the outline threshold: where a kept
    # cortical ring encloses it in-plane, the labelled voxels inside stay (no pockets in a body).
    keep |= fg & ndi.binary_fill_holes(keep, structure=_SLICE)
    new_v = np.where(keep, np.where(fg, v, grown_v), 0).astype(np.uint8)
    # Bodies: the same outline, but only where the whole-vertebra label agrees.
    new_b = np.where(keep & (np.where(b > 0, b, grown_b) == new_v), np.where(b > 0, b, grown_b), 0)
    grown = keep & ~fg
    if body_blocked is not None:
        grown &= ~body_blocked[crop]
    new_b = np.where((b > 0) | grown, new_b, 0).astype(np.uint8)
    vert = vert.copy()
    bodies = bodies.copy()
    vert[crop] = new_v
    bodies[crop] = new_b
    return vert, bodies


def _lumen_side(kept, blood, hu):
    """Labelled voxels on a contrast lumen's side of a body's outline: within LUMEN_EDGE_STEPS
    in-plane steps of the blood found, and below EDGE_FRACTION of the way from the lumen's HU
    (median of the blood voxels) to the brightest labelled bone within two voxels. The working
    grid's voxel on the cortex-lumen border maps to two native voxels, lumen HU in the outer one,
    which the one-layer outline trim and the soft-tissue edge threshold (under the arterial
    lumen's ~300 HU) both keep (arterial T4-T11 phantom at 1x1x3 mm: 1,129 aorta voxels in the
    bodies, median 328 HU, lumen 298)."""
    lumen_hu = float(np.median(hu[blood]))
    side = np.zeros_like(kept)
    if lumen_hu <= NATIVE_EDGE_HU:   # no contrast: the edge threshold already tells blood from bone
        return side
    peak = ndi.maximum_filter(np.where(kept, hu, np.float32(-2000.0)), footprint=np.ones((1, 5, 5), bool))
    weak = kept & (hu < lumen_hu + EDGE_FRACTION * (peak - lumen_hu))
    for _ in range(LUMEN_EDGE_STEPS):
        front = ndi.binary_dilation(blood | side, structure=_SLICE8) & weak & ~side
        if not front.any():
            break
        side |= front
    return side


def _lateral_mm(vert, frames, dx, sp) -> np.ndarray:
    """Per working voxel, how far (mm) it lies sideways: |dx| from the canal, or for a voxel of a
    labelled vertebra with a body, the nearer of that and the left-right part of its offset from
    the line through the body's centroid along its superior axis (_body_frames). In a slice
    through a disc that leans sideways (scoliosis) the vertebra below shows only its body's
    raised side, 8-25 mm off the canal, which the rib path took as rib neck (random native T4-T7
    at 0.9x0.9x2.5 mm, 19 mm scoliosis: T7 whole / body 0.909 / 0.899 -> 0.960 / 0.928). The
    body's own axis alone costs the 3 mm phantoms' T11 / T12 0.004-0.006 (measured with the
    principal axis and again with the disc planes' axis), so a voxel counts as lateral only
    when it is by both measures."""
    out = np.array(np.broadcast_to(np.abs(dx), vert.shape), np.float32)
    objs = ndi.find_objects(vert)
    for label, (centre, up, _) in frames.items():
        o = objs[label - 1] if label - 1 < len(objs) else None
        if o is None:
            continue
        z, y, x = np.nonzero(vert[o] == label)
        rel = np.stack([z + o[0].start, y + o[1].start, x + o[2].start], axis=1) - centre
        side = rel[:, 2] - (rel @ up) * up[2]
        out[o][z, y, x] = np.minimum(out[o][z, y, x], np.abs(side) * sp)
    return out


def _give_rib_heads_back(segs, vert, bodies, ribs, box, dx, dy, frames, sp) -> np.ndarray:
    """Rib heads and necks inside the column box belong to the ribs (in place): thoracic
    vertebrae (the rib-bearing ones and all above them, rib stubs included) are narrower than the
    box, their transverse processes end about 30 mm from the midline (sideways as _lateral_mm
    measures it). Returns the rib bone: the ribs found outside the box and what was taken from
    the column."""
    any_rib_idx = [i for i, sg in enumerate(segs) if sg.rib_bearing]
    if not any_rib_idx:
        return ribs
    adx = _lateral_mm(vert, frames, dx, sp)
    in_body = bodies > 0
    is_thoracic = np.zeros(256, bool)
    for sg in segs[any_rib_idx[0]:]:
        is_thoracic[sg.label] = True
    # Follow each rib medially through the labelled bone beside the body and in front of
    # the transverse processes (rib neck and head), and give that bone back to the rib.
    # (The path is taken before the width cut below, which would break it between the box
    # wall and the rib neck.)
    rib_zone = (adx > RIB_HEAD_MIN_MM) & (dy < 2.0)
    path = is_thoracic[vert] & rib_zone
    beyond = is_thoracic[vert] & (adx > _tp_reach_mm(segs, bodies, is_thoracic, adx)[vert])
    # A thoracic vertebra whose rib was not found outside the box (3 mm: thin sloping mid-thoracic
    # ribs fall below the bone threshold between the box wall and ~70 mm out) still has its rib
    # neck inside: its bone beyond the transverse processes' reach, in front of the canal and off
    # the body (a wide body's own rim reaches that far: real 2 mm slab, T12 with only rib stubs).
    # That seeds the path too, grown only to about the body's width (further it would run on
    # through the pedicles).
    ribless = np.zeros(256, bool)
    for sg in segs:
        ribless[sg.label] = is_thoracic[sg.label] and sg.ribs == 0
    neck = beyond & rib_zone & ribless[vert] & (bodies == 0)
    vert[beyond] = 0
    del beyond
    bodies[is_thoracic[bodies] & (adx > THORACIC_BODY_HALF_WIDTH_MM)] = 0
    grown = ribs & ~box
    steps = int(np.ceil((ROI_LATERAL_MM - RIB_HEAD_MIN_MM) / sp)) + 2
    grown = ndi.binary_dilation(grown, iterations=steps, mask=grown | path)
    if neck.any():
        steps = int(np.ceil((THORACIC_HALF_WIDTH_MM - THORACIC_BODY_HALF_WIDTH_MM) / sp)) + 1
        grown |= ndi.binary_dilation(neck, iterations=steps, mask=path)
    del neck
    vert[grown & path] = 0
    bodies[grown & path] = 0
    # The path stops a few voxels short of the head where the neck runs obliquely; what is
    # left sticks out of the body's rounded outline as a spur attached to the removed rib.
    # An axial opening wider than the neck tells that spur from the body (extra path steps
    # ran on into the bodies instead).
    _drop_rib_spurs(vert, bodies, is_thoracic, grown & path, rib_zone,
                    (adx > THORACIC_BODY_HALF_WIDTH_MM) & (dy < 0.0), sp)
    return ribs | _rib_heads_taken(in_body & (vert == 0), bodies > 0, sp)


def _rib_heads_taken(taken, body, sp):
    """The pieces of bone `taken` from the bodies as rib whose part beside a body (within two
    voxels) is a rib head's size (RIB_HEAD_MAX_MM3); a bigger one is the body's own side, taken
    where a scoliotic apex shifts it lateral of the canal (T11-L2 phantom, T12 leaning 17 deg:
    1.76 cm3 beside the body; rib heads 0.27-0.56 cm3 on the phantoms)."""
    heads = np.zeros_like(taken)
    box = ndi.find_objects(taken.astype(np.uint8))
    if not box:
        return heads
    crop = tuple(slice(max(0, b.start - 2), b.stop + 2) for b in box[0])
    lab, n = ndi.label(taken[crop], structure=np.ones((3, 3, 3), bool))
    beside = ndi.binary_dilation(body[crop], iterations=2) & (lab > 0)
    small = np.bincount(lab[beside], minlength=n + 1) * sp ** 3 <= RIB_HEAD_MAX_MM3
    small[0] = False
    heads[crop] = small[lab]
    return heads


def _tp_reach_mm(segs, bodies, is_thoracic, adx):
    """Per working label: how far from the midline a thoracic vertebra's transverse processes
    reach. The upper thoracic bodies are narrower but their processes longer (tips ~38 mm out at
    T1, ~30 mm at T10-T12): interpolated on the body's width, measured over its anterior half
    (the rib heads articulate posterolaterally)."""
    reach = np.full(256, THORACIC_HALF_WIDTH_MM)
    objs = ndi.find_objects(bodies)
    for sg in segs:
        o = objs[sg.label - 1] if sg.label - 1 < len(objs) else None
        if o is None or not is_thoracic[sg.label]:
            continue
        z, y, x = np.nonzero(bodies[o] == sg.label)
        ant = y < np.median(y)
        if ant.sum() < 10:
            continue
        a = np.broadcast_to(adx, bodies.shape)[o][z[ant], y[ant], x[ant]]
        # (each slice's width, and their median: rib heads left on the body's top or bottom
        # slices widen those only; random arterial T4-T7, T4 measured 37.6 mm wide over all its
        # voxels against 33.4 mm slice by slice: reach 30.4 -> 33.7 mm, its process tips at
        # 35.2 mm; whole 0.891 -> 0.903)
        per_slice = _binned_percentile(a, z[ant], int(z[ant].max()) + 1, 98.0, min_count=10)
        per_slice = per_slice[np.isfinite(per_slice)]
        width_mm = 2.0 * float(np.median(per_slice) if per_slice.size else np.percentile(a, 98))
        t = (width_mm - BODY_WIDTH_T1_MM) / (BODY_WIDTH_T10_MM - BODY_WIDTH_T1_MM)
        reach[sg.label] = float(np.clip(TP_TIP_T1_MM + t * (THORACIC_HALF_WIDTH_MM - TP_TIP_T1_MM),
                                        THORACIC_HALF_WIDTH_MM, TP_TIP_T1_MM))
    return reach


def _drop_rib_spurs(vert, bodies, is_thoracic, rib_taken, zone, beside, sp):
    """Give rib heads and necks left on thoracic vertebrae back to the rib (in place): body
    voxels in the costovertebral `zone` that an axial opening with a disc of RIB_NECK_MM radius
    removes (a spur on the body's rounded outline), and vertebra voxels `beside` the body, in
    pieces that touch the rib bone already taken from the column."""
    fg = is_thoracic[vert]
    if not fg.any() or not rib_taken.any():
        return
    r = max(1, int(round(RIB_NECK_MM / sp)))
    zs, ys, xs = ndi.find_objects(fg.astype(np.uint8))[0]
    crop = (zs, slice(max(0, ys.start - r - 1), ys.stop + r + 1), slice(max(0, xs.start - r - 1), xs.stop + r + 1))
    cube = np.ones((3, 3, 3), bool)
    rib = ndi.binary_dilation(rib_taken[crop], structure=cube)

    def touching(mask):
        lab, _ = ndi.label(mask, structure=cube)
        hit = np.unique(lab[rib & mask])
        return np.isin(lab, hit[hit > 0])

    body = is_thoracic[bodies[crop]]
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (yy ** 2 + xx ** 2 <= r * r + r)[None]
    spur = touching(body & ~ndi.binary_opening(body, structure=disc) & np.broadcast_to(zone, vert.shape)[crop])
    vert[crop][spur] = 0
    bodies[crop][spur] = 0
    # Beside the body and in front of the canal (lateral of the body width cut) a thoracic
    # vertebra has no bone of its own (pedicles lie nearer the canal, transverse processes
    # behind it): bone there that touches the rib (or the spur just taken) is rib head.
    rib |= ndi.binary_dilation(spur, structure=cube)
    near = is_thoracic[vert[crop]] & (bodies[crop] == 0) & np.broadcast_to(beside, vert.shape)[crop]
    vert[crop][touching(near)] = 0


def _body_frames(segs, bodies, planes) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
    """Per working label with a body: its centroid (z, y, x, working voxels), its superior axis
    and its half-height along that axis (voxels; a uniform slab's, from the variance). The axis
    is the mean normal of the disc planes that bound the body (`planes`, _disc_planes: tilted
    with the discs, sagittally and sideways), not the body's principal axis: a thoracic body is
    about as tall as it is deep, so its moments hardly tell the axes apart (phantom sweep, 530
    bodies against the truth: principal axis median 7.9 deg off, 104 over 15 deg, up to 55 deg
    at 2x2x3 mm; disc normals median 1.6 deg, all within 14 deg). A body cut by the view's end
    has the disc on its other side (its moments say little: a real caudal L1 cut by the view
    leaned 21 deg by them and took T12's rib). A lone body with no disc in view keeps its
    principal axis nearest the slice axis. One pass of moment sums over the body voxels."""
    idx = np.nonzero(bodies)
    lab = bodies[idx]
    pts = [c.astype(float) for c in idx]
    counts = np.bincount(lab, minlength=256).astype(float)
    sums = [np.bincount(lab, weights=c, minlength=256) for c in pts]
    second = {(a, b): np.bincount(lab, weights=pts[a] * pts[b], minlength=256)
              for a in range(3) for b in range(a, 3)}
    del idx, lab, pts
    out = {}
    for sg in segs:
        n = counts[sg.label]
        if n < 10:
            continue
        mean = np.array([s_[sg.label] / n for s_ in sums])
        cov = np.empty((3, 3))
        for (a, b), m in second.items():
            cov[a, b] = cov[b, a] = m[sg.label] / n - mean[a] * mean[b]
        # (segment i lies between disc planes i - 1 and i)
        i = int(sg.s_lo)
        normals = [planes[j][1] * np.sign(planes[j][1][0]) for j in (i - 1, i) if 0 <= j < len(planes)]
        if normals:
            up = np.sum(normals, axis=0)
            up = up / np.linalg.norm(up)
        else:
            axes = np.linalg.eigh(cov)[1]
            up = axes[:, int(np.argmax(np.abs(axes[0])))]
            up = up if up[0] > 0 else -up
        # (var = h^2 / 12 for a uniform slab of height h)
        out[sg.label] = (mean, up, 0.5 * float(np.sqrt(max(12.0 * (up @ cov @ up), 0.0))))
    return out


def _rib_rooms(frames):
    """The room of each vertebra with a body: labels caudal -> cranial and the disc planes
    between them [(point, unit normal)], zyx working voxels. A disc's plane lies half-way between
    the two bodies' facing ends and is tilted as the mean of their axes."""
    order = sorted(frames, key=lambda k: frames[k][0][0])      # caudal -> cranial
    planes = []
    for a, b in zip(order[:-1], order[1:]):
        (ca, ua, ha), (cb, ub, hb) = frames[a], frames[b]
        planes.append((0.5 * ((ca + ha * ua) + (cb - hb * ub)), (ua + ub) / np.linalg.norm(ua + ub)))
    return order, planes


def _level_coordinate(frames, p) -> float:
    """Where point p lies along the column in vertebra units: k + 0.5 at the middle of the k-th
    room from the caudal end (between its disc planes; an end vertebra's outer side is its body's
    end), k at the disc plane below it."""
    order, planes = _rib_rooms(frames)
    p = np.asarray(p, float)
    signed = [float((p - pnt) @ nrm) for pnt, nrm in planes]
    level = sum(d > 0 for d in signed)
    c, u, h = frames[order[level]]
    along = float((p - c) @ u)
    below = signed[level - 1] if level > 0 else along + h     # above the room's lower side
    above = -signed[level] if level < len(planes) else h - along
    return level + float(np.clip(below / max(below + above, 1e-6), 0.0, 1.0))


def _rib_level(segs, frames, root_zyx, sp):
    """The vertebra a rib belongs to, from its medial end (ribs slope down, so the label of the
    bone they touch is less reliable), or None when that lies over 25 mm from the vertebra's
    mid-plane (through its centroid, across its superior axis). Each vertebra holds the room
    between the planes of the discs above and below it (_rib_rooms). The tilt counts: a root
    50 mm lateral sits 7 mm higher or lower on an 8 degree scoliotic tilt. (Each body's own
    mid-plane does not do: at a scoliotic apex two neighbours lean opposite ways, their
    mid-planes cross beside the column, and a root there is as near to both.)"""
    p = np.asarray(root_zyx, float)
    order, planes = _rib_rooms(frames)
    label = order[sum(int((p - pnt) @ nrm > 0) for pnt, nrm in planes)]
    c, u, _ = frames[label]
    if abs(float((p - c) @ u)) * sp > 25.0:
        return None
    return next((sg for sg in segs if sg.label == label), None)


def _paired_roots(roots, sides, frames):
    """Where each rib is judged: the middle of its pair where the rib opposite lies within
    RIB_PAIR_LEVELS of it along the column (_level_coordinate) and each is the other's nearest
    there, else its own root. A pair's middle lies near the column's axis, where an error in the
    vertebrae's sideways lean does not move it between rooms; a root 55 mm lateral does (tight
    scoliotic T12-L3: T12's two roots lay 0.9 of a half-height apart along its estimated axis,
    and the left one went to L1)."""
    coord = np.array([_level_coordinate(frames, r) for r in roots])
    out = [np.asarray(r, float) for r in roots]
    for i in range(len(roots)):
        opp = [j for j in range(len(roots)) if sides[j] != sides[i]]
        if not opp:
            continue
        j = min(opp, key=lambda k: abs(coord[k] - coord[i]))
        back = min((k for k in range(len(roots)) if sides[k] == sides[i]), key=lambda k: abs(coord[k] - coord[j]))
        if back == i and abs(coord[j] - coord[i]) < RIB_PAIR_LEVELS:
            out[i] = 0.5 * (np.asarray(roots[i], float) + np.asarray(roots[j], float))
    return out


def _find_ribs(segs, vert, frames, bone, box, dx, sp):
    """Count ribs per vertebra: elongated bone pieces outside the column box whose medial end
    meets the box's lateral wall next to the column. A rib is given to the vertebra whose room
    between its disc planes holds that medial end, or its pair's middle (_paired_roots,
    _rib_level; ribs slope down, so labels of the bone they touch are less reliable than the
    body level)."""
    outside = bone & ~box
    ribs = np.zeros(vert.shape, bool)
    lab, n = ndi.label(outside)
    if n == 0:
        return ribs
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * sp ** 3
    objs = ndi.find_objects(lab)
    if not frames:
        return ribs
    # Rib roots: just outside the lateral walls of the box, beside labelled column bone.
    wall = np.broadcast_to((np.abs(dx) >= ROI_LATERAL_MM) & (np.abs(dx) < ROI_LATERAL_MM + RIB_GAP_MM), vert.shape)
    near_col = ndi.binary_dilation(vert > 0, iterations=max(1, int(round(RIB_GAP_MM / sp))), mask=wall | (vert > 0))
    found = []   # (component index, root zyx, side)
    for i, o in enumerate(objs):
        v = sizes[i + 1]
        if o is None or v < 300.0 or v > RIB_MAX_MM3:
            continue
        ext = np.array([(sl.stop - sl.start) * sp for sl in o])
        if max(ext[1], ext[2]) < 30.0:      # ribs run laterally / antero-posteriorly
            continue
        touch = near_col[o] & wall[o] & (lab[o] == i + 1)
        if touch.sum() < 2:
            continue
        root = np.array([c.mean() + sl.start for c, sl in zip(np.nonzero(touch), o)])
        side = np.sign(np.broadcast_to(dx, vert.shape)[tuple(np.round(root).astype(int))])
        found.append((i, root, side))
    if not found:
        return ribs
    judged = _paired_roots([r for _, r, _ in found], [sd for _, _, sd in found], frames)
    for (i, _, _), point in zip(found, judged):
        sg = _rib_level(segs, frames, point, sp)
        if sg is None:
            continue
        sg.ribs += 1
        o = objs[i]
        ribs[o] |= lab[o] == i + 1
    return ribs


def _find_rib_stubs(segs, vert, frames, dx, dy, sp):
    """Count ribs cut short by the caudal end of the scan (a thin slab at the thoracolumbar
    junction): a rib descends laterally from its head beside the pedicle, so in view it is a bar
    of the vertebra's bone that leaves the scan's caudal end well lateral of the arch, as a
    separate cross-section there, and rises medially towards its head. The outside-the-box
    test of _find_ribs cannot see it (the piece in view stays inside the column box). Lumbar
    transverse processes run level and join their arch in the same slice; articular processes
    stay medial. Counted in segs[].rib_stubs, for the vertebra _rib_level gives the head to."""
    ke = max(1, int(round(4.0 / sp)))           # the end slab: the last few mm of the scan
    # Only the caudal part of the scan can hold such a rib with its head (about one vertebra).
    zc = min(vert.shape[0], ke + int(round(60.0 / sp)))
    if vert.shape[0] <= 2 * ke or not (vert[:ke] > 0).any():
        return
    if not frames:
        return
    v = vert[:zc] > 0
    adx = np.abs(dx[:zc])                        # (z, 1, x): broadcast, not materialised
    lateral = v & (adx >= RIB_STUB_MIN_MM) & (dy[:zc] > -10.0)
    lab, n = ndi.label(lateral)
    if n == 0:
        return
    # In-plane pieces of vertebra bone in the end slab that reach medial of the rib zone: the
    # arch, or a transverse process joined to it.
    end_lab, _ = ndi.label(v[:ke], structure=_SLICE8)
    joined = np.unique(end_lab[(end_lab > 0) & (adx[:ke] < RIB_STUB_MIN_MM)])
    for i, o in enumerate(ndi.find_objects(lab)):
        if o is None or o[0].start >= ke:
            continue
        m = lab[o] == i + 1
        a = np.broadcast_to(adx[o[0], :, o[2]], m.shape)
        zz = np.nonzero(m)[0] + o[0].start
        am = a[m]
        # its cross-section at the scan's end: well lateral, and not joined to the arch there
        tip = m & (a >= RIB_STUB_END_MM)
        tip[max(0, ke - o[0].start):] = False
        if not tip.any():
            continue
        ez = slice(o[0].start, min(ke, o[0].stop))
        if np.isin(end_lab[ez, o[1], o[2]][tip[:ez.stop - ez.start]], joined).any():
            continue
        medial = am < RIB_STUB_MIN_MM + 5.0
        at_end = zz < ke
        if not medial.any() or (zz[medial].mean() - zz[at_end].mean()) * sp < RIB_STUB_RISE_MM:
            continue
        root = np.array([c[medial].mean() + sl.start for c, sl in zip(np.nonzero(m), o)])
        sg = _rib_level(segs, frames, root, sp)
        if sg is not None:
            sg.rib_stubs += 1


def _find_sacrum(segs, vert, dx, anterior):
    """Index of the lowest segment if it is the sacrum (wide alae lateral to the body)."""
    if len(segs) < 2:
        return None
    scores = []
    for sg in segs[:4]:
        m = vert == sg.label
        # Alae: solid bone lateral to the body (25-50 mm from the canal axis) in front of the
        # canal wall; lumbar transverse processes are thin and sit behind that wall.
        lat = m & (np.abs(dx) > 25.0) & anterior
        scores.append(lat.sum() / max(1.0, m.sum()))
    # The sacrum has much more lateral-anterior bone than any lumbar vertebra. Sacral
    # segments (fused, with rudimentary discs) may be split: the highest sacral one counts.
    sac = [i for i, sc in enumerate(scores) if sc > ALA_FRACTION]
    if not sac:
        return None
    k = max(sac)
    if k + 1 < len(scores) and scores[k + 1] > 0.5 * scores[k]:
        return None
    return k


def _name_levels(segs, sacrum_seg, body_top_mm, warnings):
    """Level names (caudal -> cranial) from the anchors in view: the sacrum for L5 and the
    lowest rib-bearing vertebra for T12, both when both are seen (a transitional spine with 4 or
    6 lumbar vertebrae is named from both and flagged uncertain), a flagged guess when neither is.
    `body_top_mm`: per working label, how far above the scan's caudal end its body's top lies.
    Returns (names, confidence, uncertain, index of T12 or None); warnings are appended."""
    n = len(segs)
    rib_idx = [i for i, sg in enumerate(segs) if sg.ribs > 0]
    # Ribs cut short by the scan's end: a rib-bearing vertebra for a guess, not an anchor.
    any_rib_idx = [i for i, sg in enumerate(segs) if sg.rib_bearing]
    # The lowest rib-bearing vertebra is T12 only when a rib-free vertebra is seen below it.
    # ... and only when the scan reaches far enough below that one's rib heads (at the top of its
    # body) to show a rib leaving the column: ribs descend laterally from their heads, so a
    # vertebra cut short by the scan's caudal end may hide its ribs, and a thoracic slab would
    # be named T12/L1 with confidence.
    t12 = None
    if rib_idx and rib_idx[0] > (0 if sacrum_seg is None else 1) and any_rib_idx[0] == rib_idx[0]:
        if body_top_mm.get(segs[rib_idx[0] - 1].label, 0.0) >= RIB_VIEW_BELOW_HEAD_MM:
            t12 = rib_idx[0]
        else:
            warnings.append("the vertebra below the lowest rib-bearing one is cut by the field of view; "
                            "its ribs may be out of view, so the last rib is not confirmed")
    uncertain = False
    confidence = 0.95
    if sacrum_seg is not None and t12 is not None:
        names = _names_from(sacrum_seg, "sacrum", n)
        n_lumbar = t12 - sacrum_seg - 1
        if n_lumbar != 5:
            warnings.append(f"{n_lumbar} rib-free vertebrae between the sacrum and the last rib-bearing "
                            "vertebra; lumbar levels named from the sacrum")
            if n_lumbar in (4, 6):
                # A transitional spine: lumbar from the sacrum (L6 when six), thoracic from the ribs.
                # caudal -> cranial; VerSe calls the sixth lumbar vertebra (the lowest) L6.
                lumb = ["L6", "L5", "L4", "L3", "L2", "L1"] if n_lumbar == 6 else ["L5", "L4", "L3", "L2"]
                thor = _names_from(t12, "T12", n)
                for i in range(t12, n):
                    names[i] = thor[i]
                for k, i in enumerate(range(sacrum_seg + 1, t12)):
                    names[i] = lumb[k]
            for i in range(sacrum_seg + 1, min(n, t12 + 1)):
                segs[i].flags.append("anchor_conflict")
            # Anchors that disagree leave the names open: a transitional spine, a hypoplastic
            # twelfth rib missed, or a disc missed or found inside a body all look alike here.
            warnings.append("the sacrum and the last rib disagree on the level names; they are uncertain")
            uncertain = True
            confidence = 0.6
    elif sacrum_seg is not None:
        names = _names_from(sacrum_seg, "sacrum", n)
        confidence = 0.9
    elif t12 is not None:
        names = _names_from(t12, "T12", n)
        confidence = 0.85
    else:
        uncertain = True
        confidence = 0.2
        names = _guess_names(segs, any_rib_idx, n)
        warnings.append("no anatomical anchor (sacrum or last rib) in view; level names are a guess")
    if sacrum_seg is not None:
        # Segments below the one taken as the sacrum (its highest) are the rest of it, split at a
        # rudimentary sacral disc: they were left unlabelled (a straight canal track through a
        # 40-80 mg/cm3 lumbar phantom's sacrum split it: sacrum Dice 0.87 -> 0.33-0.76, and
        # 0.71-0.84 with the pieces below named).
        for i in range(sacrum_seg):
            names[i] = "sacrum"
    return names, confidence, uncertain, t12


def _guess_names(segs, rib_idx, n):
    """Best guess without anchors (always flagged uncertain): rib-bearing vertebrae in view ->
    the lowest one is taken as T12 (the most caudal a rib-bearing vertebra can be); none ->
    the lowest is taken as L5 (a lumbar view usually reaches down towards the sacrum)."""
    if rib_idx:
        return _names_from(rib_idx[0], "T12", n)
    return _names_from(0, "L5", n)


def _label_counts(labels: np.ndarray, boxes) -> np.ndarray:
    """Voxels of each uint8 label (index = label value), given its boxes (ndi.find_objects)."""
    counts = np.zeros(256, np.int64)
    for i, box in enumerate(boxes):
        if box is not None:
            counts[i + 1] = np.count_nonzero(labels[box] == i + 1)
    return counts


def _records(segs, vert, bodies, image, grid, confidence, uncertain):
    # Voxels per label counted inside its own box (a bincount over the whole CT converts it to
    # 8-byte integers first: 0.8 GB and ~1.5 s on 512x512x400).
    boxes = ndi.find_objects(vert)
    counts, bcounts = _label_counts(vert, boxes), _label_counts(bodies, ndi.find_objects(bodies))
    # Which native array axis/direction is superior: the truncation side follows from it.
    axis_arr, sign = superior_axis(image)
    up = sign > 0
    n_ax = vert.shape[axis_arr]
    out = []
    seen = set()
    for sg in segs:
        if not sg.name or sg.name in seen:
            continue
        seen.add(sg.name)
        vid = lv.level_id(sg.name)
        if counts[vid] == 0:
            continue
        ext = boxes[vid - 1][axis_arr]
        truncated = None
        if ext.stop >= n_ax:
            truncated = "cranial" if up else "caudal"
        elif ext.start <= 0:
            truncated = "caudal" if up else "cranial"
        flags = list(sg.flags)
        if truncated:
            flags.append("truncated")
        if uncertain:
            flags.append("label_uncertain")
        if sg.rib_bearing:
            flags.append("rib_bearing")
        out.append(LevelRecord(name=sg.name, verse_id=vid, present=True, complete=truncated is None,
                               truncated=truncated, confidence=confidence, voxels=int(counts[vid]),
                               body_voxels=int(bcounts[vid]), flags=flags))
    out.sort(key=lambda r: lv.order_index(r.name))
    return out
