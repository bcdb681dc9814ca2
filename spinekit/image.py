"""Image = voxel array + geometry + the metadata later steps use; reading and writing.

Conventions (fixed for the whole package):
- ``array`` is indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order).
- ``spacing_mm``, ``origin_mm`` and ``direction`` follow ITK: (x, y, z) order, LPS physical
  space, ``direction`` a 3x3 matrix whose columns are the x/y/z axis directions.
- The RAS conversion for Slicer happens in ``spinekit.mrml`` only.

Reading (``read_image``) accepts a DICOM folder (searched recursively), a single DICOM file,
NIfTI, NRRD, MHA/MHD and other formats SimpleITK reads. Every image that comes out has passed
``validate_image``: finite values, a sane size and spacing, 3D when 3D is required. Bad input
raises ``InputError`` with one sentence naming the file and the problem.

Limits: a 3D image larger than 2048 voxels in-plane or 5000 slices, a 2D image larger than
8192 pixels, or a spacing <= 0 or > 50 mm is refused from its header, before voxels are read.
NIfTI files are checked for truncation and NaN/inf in the file itself (ITK silently pads a
truncated NIfTI with zeros and turns NaN into 0). Non-DICOM files carry no modality:
``metadata["Modality"]`` is None unless the caller passes ``modality=``.

DICOM choices (stated here once):
- Series: files are grouped by SeriesInstanceUID; a CT series is preferred over any other
  modality, then the series with the most slices. The choice is recorded in
  ``metadata["series_choice"]``; when another series has the same priority a warning is added.
- Slices are sorted by ImagePositionPatient projected on the slice normal (row x column
  cosine), never by InstanceNumber. Origin = first slice's position, direction columns = row
  cosine, column cosine, normal; spacing = (PixelSpacing[1], PixelSpacing[0], median step).
- Non-uniform slice spacing: when the steps differ from their median by more than 1 % (or a
  slice is missing), the stack is resampled onto the median step by linear interpolation
  between the two neighbouring slices, with a warning in ``metadata["warnings"]`` and the log.
  A gap of more than twice the median step is refused (too much would be invented), as are
  two slices at the same position (two acquisitions mixed in one series).
- Files of one series that disagree in Rows/Columns/orientation/pixel spacing: refused as a
  mixed series.
- Values: RescaleSlope/RescaleIntercept applied; int16 when the values are integers in range,
  float32 otherwise (no float64 copy of the volume is ever held).
- Metadata: every key of ``METADATA_KEYWORDS`` is present (``None`` when unknown) with Python
  types (KVP / SliceThickness float, PatientAge e.g. '065Y' plus ``age_years``, PatientSex
  'F'/'M'/'O'). Patient names and ids are never read into metadata nor logged.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .progress import Progress, report

log = logging.getLogger(__name__)

# DICOM keywords kept in Image.metadata (the ones calibration / interpretation read).
METADATA_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "KVP",
    "ConvolutionKernel",
    "SliceThickness",
    "PatientAge",
    "PatientSex",
    "StudyDate",
    "ContrastBolusAgent",
)
# Further non-identifying series facts kept when present (reports and QC show them).
EXTRA_KEYWORDS = (
    "SeriesDescription",
    "SeriesNumber",
    "BodyPartExamined",
    "ContrastBolusRoute",
    "PhotometricInterpretation",
    "AcquisitionDate",
)
_FLOAT_KEYWORDS = {"KVP", "SliceThickness"}

# Sanity limits: anything outside is a broken header or the wrong file, not a CT.
MAX_INPLANE_3D = 2048        # voxels along x or y of a 3D image
MAX_SLICES = 5000
MAX_SIDE_2D = 8192           # radiographs are larger than CT slices (often 3000 x 3000)
MAX_SPACING_MM = 50.0
SPACING_TOLERANCE = 0.01     # relative step deviation still accepted as uniform
MAX_GAP_RATIO = 2.0          # largest step / median step that is resampled instead of refused

_EXTENSIONS = {
    ".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha",
    ".mhd": "mha", ".dcm": "dicom", ".ima": "dicom", ".img": "analyze", ".hdr": "analyze",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
    ".vtk": "vtk", ".gipl": "gipl", ".gipl.gz": "gipl",
}
_NOT_IMAGES = {".txt", ".csv", ".json", ".xml", ".html", ".pdf", ".py", ".md", ".zip", ".tar"}


@dataclass
class Image:
    """A 3D (or 2D) image in LPS physical space.

    array: voxel values indexed [z, y, x] (2D: [y, x]).
    spacing_mm / origin_mm: ITK order (x, y, z).
    direction: 3x3 (2D: 2x2) matrix, columns are the index axes in LPS.
    metadata: DICOM-derived facts (see METADATA_KEYWORDS) plus free keys.
    """

    array: np.ndarray
    spacing_mm: tuple[float, ...] = (1.0, 1.0, 1.0)
    origin_mm: tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.origin_mm = tuple(float(o) for o in self.origin_mm)
        self.direction = np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def size_xyz(self) -> tuple[int, ...]:
        """Number of voxels in ITK (x, y, z) order."""
        return tuple(reversed(self.array.shape))

    @property
    def spacing_zyx_mm(self) -> tuple[float, ...]:
        """Spacing in array-axis order, for scipy.ndimage / numpy work."""
        return tuple(reversed(self.spacing_mm))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def with_array(self, array: np.ndarray, **metadata: Any) -> "Image":
        """Same geometry, new voxels (e.g. a label map on this grid)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match image shape {self.array.shape}")
        return replace(self, array=array, metadata={**self.metadata, **metadata})

    def crop(self, box_zyx: tuple[slice, ...]) -> "Image":
        """The voxels in `box_zyx` (one slice per array axis, step 1) as an image of their own,
        placed where they lay in this one (a shorter field of view, an in-plane crop)."""
        if len(box_zyx) != self.ndim or any(b.step not in (None, 1) for b in box_zyx):
            raise ValueError(f"crop box {box_zyx} must hold one step-1 slice per axis of a {self.ndim}-D image")
        box = tuple(slice(*b.indices(n)[:2]) for b, n in zip(box_zyx, self.shape))
        origin = self.index_to_physical(np.array([[b.start for b in box]], float))[0]
        return Image(self.array[box], self.spacing_mm, tuple(float(v) for v in origin), self.direction,
                     metadata=dict(self.metadata))

    def index_to_physical(self, index_zyx: np.ndarray) -> np.ndarray:
        """Continuous [z, y, x] indices (N x 3) -> LPS points (N x 3, x/y/z)."""
        idx_xyz = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return np.asarray(self.origin_mm) + (idx_xyz * np.asarray(self.spacing_mm)) @ self.direction.T

    def physical_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS points (N x 3) -> continuous [z, y, x] indices (N x 3)."""
        rel = np.asarray(points_lps, dtype=float) - np.asarray(self.origin_mm)
        idx_xyz = (rel @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing_mm)
        return idx_xyz[..., ::-1]

    def same_grid(self, other: "Image", tol_mm: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )

    # --- SimpleITK bridges -------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        arr = self.array
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(self.spacing_mm)
        img.SetOrigin(self.origin_mm)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, metadata: dict[str, Any] | None = None) -> "Image":
        dim = img.GetDimension()
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing_mm=img.GetSpacing(),
            origin_mm=img.GetOrigin(),
            direction=np.asarray(img.GetDirection()).reshape(dim, dim),
            metadata=dict(metadata or {}),
        )


# --- geometry helpers --------------------------------------------------------------------------
def orientation_code(image: Image) -> str:
    """Letters of the LPS directions the index axes x, y, z point to ('LPS' for identity,
    'RAS' for a NIfTI stored the radiological way) -- nibabel's ``aff2axcodes`` convention."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    code = ""
    for col in image.direction.T:
        axis = int(np.argmax(np.abs(col)))
        code += letters[axis][int(col[axis] > 0)]
    return code


_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "label_gaussian": sitk.sitkLabelGaussian,
}


def _resample(image: Image, size_xyz: Sequence[int], spacing_mm: Sequence[float], origin_mm: Sequence[float],
              direction: np.ndarray, interpolator: str, default_value: Optional[float]) -> Image:
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, not {interpolator!r}")
    if default_value is None:
        # Outside the image: background label 0, or the darkest value (air in CT) for intensities.
        default_value = 0.0 if interpolator in ("nearest", "label_gaussian") else float(image.array.min())
    src = image.array
    continuous = interpolator in ("linear", "bspline")
    if continuous and src.dtype != np.float32:
        src = src.astype(np.float32)  # interpolate in float, round back below
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size_xyz])
    f.SetOutputSpacing(tuple(float(s) for s in spacing_mm))
    f.SetOutputOrigin(tuple(float(o) for o in origin_mm))
    f.SetOutputDirection(tuple(np.asarray(direction, float).ravel()))
    f.SetInterpolator(_INTERPOLATORS[interpolator])
    f.SetDefaultPixelValue(float(default_value))
    out = sitk.GetArrayFromImage(f.Execute(image.with_array(src).to_sitk()))
    if image.array.dtype == bool:
        out = out.astype(bool)
    elif continuous and np.issubdtype(image.array.dtype, np.integer):
        info = np.iinfo(image.array.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(image.array.dtype)
    return Image(out, spacing_mm, origin_mm, direction, dict(image.metadata))


def resample_to(image: Image, reference: Image, interpolator: str = "nearest",
                default_value: Optional[float] = None) -> Image:
    """``image`` resampled onto ``reference``'s grid (physical space, identity transform).

    interpolator: "nearest" (labels), "linear", "bspline" or "label_gaussian" (smooth labels).
    default_value: value outside ``image``; None -> 0 for nearest/label_gaussian, the image
    minimum (air in CT) otherwise. Integer images keep their dtype (continuous interpolation
    is rounded); the metadata is ``image``'s.
    """
    return _resample(image, reference.size_xyz, reference.spacing_mm, reference.origin_mm,
                     reference.direction, interpolator, default_value)


def resample_spacing(image: Image, spacing_mm: float | Sequence[float], interpolator: str = "linear",
                     default_value: Optional[float] = None) -> Image:
    """``image`` resampled to a new voxel spacing (x, y, z mm; a number means isotropic).

    The first voxel centre (origin) and the direction stay; the size is round(old extent /
    new spacing), so the physical extent is kept to within one new voxel.
    """
    if np.isscalar(spacing_mm):
        spacing_mm = (float(spacing_mm),) * image.ndim
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != image.ndim or min(spacing) <= 0:
        raise InputError(f"target spacing {spacing_mm} is not {image.ndim} positive numbers in mm.")
    size_xyz = [max(1, int(round(n * s / t))) for n, s, t in zip(image.size_xyz, image.spacing_mm, spacing)]
    return _resample(image, size_xyz, spacing, image.origin_mm, image.direction, interpolator, default_value)


# --- validation ---------------------------------------------------------------------------------
def _check_geometry(name: str, size_xyz: Sequence[int], spacing_mm: Sequence[float],
                    direction: np.ndarray, require_3d: bool) -> None:
    """Refuse absurd sizes/spacings before any voxel is loaded (headers are enough)."""
    size = [int(s) for s in size_xyz]
    if any(s < 1 for s in size):
        raise InputError(f"{name}: the image is empty (size {' x '.join(map(str, size))}).")
    is_3d = len(size) == 3 and size[2] > 1
    if require_3d and not is_3d:
        raise InputError(f"{name}: a 3D image is needed but the input holds a single 2D slice.")
    if is_3d:
        if max(size[0], size[1]) > MAX_INPLANE_3D or size[2] > MAX_SLICES:
            raise InputError(
                f"{name}: absurd image size {' x '.join(map(str, size))} voxels "
                f"(limits {MAX_INPLANE_3D} in-plane, {MAX_SLICES} slices)."
            )
    elif max(size) > MAX_SIDE_2D:
        raise InputError(f"{name}: absurd image size {' x '.join(map(str, size))} pixels (limit {MAX_SIDE_2D}).")
    sp = [float(s) for s in spacing_mm]
    if not all(math.isfinite(s) and 0 < s <= MAX_SPACING_MM for s in sp):
        raise InputError(
            f"{name}: absurd voxel spacing {', '.join(f'{s:g}' for s in sp)} mm "
            f"(each must be > 0 and <= {MAX_SPACING_MM:g} mm)."
        )
    d = np.asarray(direction, dtype=float)
    if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
        raise InputError(f"{name}: the orientation (direction cosines) is not a valid rotation.")


def validate_image(image: Image, name: str = "image", require_3d: bool = True) -> Image:
    """Check an Image is usable (finite values, sane size/spacing/orientation, 3D if required).

    Returns the image unchanged; raises InputError naming ``name`` otherwise.
    """
    if image.ndim not in (2, 3):
        raise InputError(f"{name}: expected a 2D or 3D image but got {image.ndim} dimensions.")
    _check_geometry(name, image.size_xyz, image.spacing_mm, image.direction, require_3d)
    arr = image.array
    if arr.dtype.kind == "f":
        # Chunked so a 512x512x400 float volume never needs a full boolean copy at once.
        step = max(1, 2**22 // max(1, arr[0].size)) if arr.ndim == 3 else arr.shape[0]
        for k in range(0, arr.shape[0], step):
            if not np.isfinite(arr[k:k + step]).all():
                raise InputError(f"{name}: the image contains NaN or infinite values.")
    elif arr.dtype.kind not in "iub":
        raise InputError(f"{name}: unsupported voxel type {arr.dtype} (expected numbers).")
    return image


def _compact(arr: np.ndarray) -> np.ndarray:
    """int16 for integer volumes in range, float32 for floats; small integer labels stay."""
    if arr.dtype in (np.uint8, np.int8, np.int16, bool):
        return arr
    if arr.dtype.kind in "iu":
        if arr.size == 0:
            return arr.astype(np.int16)
        lo, hi = int(arr.min()), int(arr.max())
        if -32768 <= lo and hi <= 32767:
            return arr.astype(np.int16)
        return arr if arr.dtype.itemsize <= 4 else arr.astype(np.float32)
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        return arr.astype(np.float32)
    return arr


# --- metadata -----------------------------------------------------------------------------------
def _empty_metadata(source: str, modality: Optional[str]) -> dict[str, Any]:
    md: dict[str, Any] = {k: None for k in METADATA_KEYWORDS}
    md["Modality"] = modality
    md["source"] = source
    md["warnings"] = []
    md["age_years"] = None
    return md


def parse_age_years(age: Optional[str]) -> Optional[float]:
    """DICOM AgeString ('065Y', '006M', '010W', '003D') -> years; None when not parsable."""
    if not age:
        return None
    m = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD]?)\s*", str(age).upper())
    if not m:
        return None
    n = float(m.group(1))
    return {"Y": n, "": n, "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}[m.group(2)]


def _clean_value(keyword: str, value: Any) -> Any:
    """DICOM element value -> plain Python (float / str / None)."""
    if value is None:
        return None
    if keyword == "ConvolutionKernel" and not isinstance(value, str) and hasattr(value, "__iter__"):
        # Siemens writes ['Br38f', '3'] (kernel, strength): the kernel is the first value.
        value = next(iter(value), None)
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    if keyword in _FLOAT_KEYWORDS:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if keyword == "SeriesNumber":
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    text = str(value).strip()
    if keyword == "PatientSex":
        text = text.upper()[:1]
        return text if text in ("F", "M", "O") else None
    return text or None


def _metadata_from_values(values: dict[str, Any], md: dict[str, Any]) -> dict[str, Any]:
    for kw in METADATA_KEYWORDS + EXTRA_KEYWORDS:
        if kw in values:
            v = _clean_value(kw, values[kw])
            if v is not None or kw not in md:
                md[kw] = v
    md["age_years"] = parse_age_years(md.get("PatientAge"))
    return md


# --- reading ------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz", ".gipl.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def read_image(path: str | Path, require_3d: bool = True, modality: Optional[str] = None,
               progress: Optional[Progress] = None) -> Image:
    """Read a DICOM folder or file, NIfTI, NRRD or MHA into a validated Image (LPS).

    require_3d: refuse single slices / 2D files (radiograph readers pass False).
    modality: the modality of a non-DICOM file ('CT', 'MR', ...); DICOM says its own.
    Raises InputError (one sentence naming the file) on any unusable input; see the module
    docstring for the DICOM series choice and the non-uniform spacing policy.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder.")
    if path.is_dir():
        return read_dicom_series(path, require_3d=require_3d, progress=progress)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty.")
    suffix = _suffix(path)
    if suffix in _NOT_IMAGES:
        raise InputError(f"{path}: not an image file ({suffix} is not an image format).")
    if _looks_like_dicom(path):
        return read_dicom_series([path], require_3d=require_3d, progress=progress, name=str(path))
    if suffix in (".dcm", ".ima"):
        raise InputError(f"{path}: not a readable DICOM file.")
    return _read_itk_file(path, suffix, require_3d, modality)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_itk_file(path: Path, suffix: str, require_3d: bool, modality: Optional[str]) -> Image:
    _check_file_integrity(path, suffix)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: not an image SimpleITK can read ({_itk_reason(exc)}).") from None
    size = list(reader.GetSize())
    dim = reader.GetDimension()
    if dim == 4 and size[3] == 1:
        size = size[:3]
    elif dim not in (2, 3):
        raise InputError(f"{path}: a {dim}D image ({' x '.join(map(str, size))}); only 2D or 3D images are supported.")
    spacing = list(reader.GetSpacing())[: len(size)]
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[: len(size), : len(size)]
    _check_geometry(str(path), size, spacing, direction, require_3d)
    try:
        img = reader.Execute()
    except RuntimeError:
        raise InputError(f"{path}: corrupt image file (the voxel data cannot be read).") from None
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    warnings: list[str] = []
    if img.GetNumberOfComponentsPerPixel() > 1:
        if img.GetDimension() == 3 and img.GetSize()[2] > 1:
            raise InputError(f"{path}: a colour (multi-component) volume; a grey-value image is needed.")
        img = _to_grey(img)
        warnings.append("colour image converted to grey values (mean of the channels)")
    if img.GetDimension() == 3 and img.GetSize()[2] == 1 and not require_3d:
        img = img[:, :, 0]  # a single-slice volume is a 2D image
    source = {"nifti": "nifti", "nrrd": "nrrd", "mha": "mha"}.get(_EXTENSIONS.get(suffix, ""), "image")
    md = _empty_metadata(source, modality)
    md["warnings"].extend(warnings)
    header = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()
              if k in METADATA_KEYWORDS + EXTRA_KEYWORDS}
    # Our own NRRD/MHA files carry the DICOM facts in their header (see write_image).
    _metadata_from_values(header, md)
    if modality is not None:
        md["Modality"] = modality
    out = Image.from_sitk(img, md)
    out.array = _compact(out.array)
    return validate_image(out, str(path), require_3d)


def _gzip_stream_length(path: Path) -> int:
    """Decompressed length of a .gz file; InputError when the stream is not gzip or is broken."""
    n_bytes = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                n_bytes += len(chunk)
    except gzip.BadGzipFile:
        raise InputError(f"{path}: not an image (named {_suffix(path)} but not gzip-compressed).") from None
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{path}: corrupt file (the gzip stream is truncated or damaged).") from None
    return n_bytes


def _check_file_integrity(path: Path, suffix: str) -> None:
    """Checks ITK skips: it reads a truncated NIfTI (plain or gzip) padded with zeros and turns
    NaN into 0, so lengths and float values are checked here."""
    if suffix.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(540)
        except gzip.BadGzipFile:
            raise InputError(f"{path}: not an image (named {suffix} but not gzip-compressed).") from None
        except (OSError, EOFError, zlib.error):
            raise InputError(f"{path}: corrupt file (the gzip stream is truncated or damaged).") from None
    else:
        with open(path, "rb") as fh:
            head = fh.read(540)
    layout = _nifti_layout(head) if suffix in (".nii", ".nii.gz") else None
    if suffix.endswith(".gz"):
        if layout is not None:
            # Cheap first: the gzip trailer's ISIZE (length mod 2**32) matches the header's
            # promise in an intact file; only a mismatch pays for a full decompression.
            with open(path, "rb") as fh:
                fh.seek(-4, 2)
                isize = int.from_bytes(fh.read(4), "little")
            n_bytes = layout[0] if isize == layout[0] % 2**32 else _gzip_stream_length(path)
        else:
            n_bytes = _gzip_stream_length(path)
    else:
        n_bytes = path.stat().st_size
    if layout is not None and n_bytes < layout[0]:
        raise InputError(f"{path}: corrupt file (truncated: {n_bytes} of {layout[0]} bytes).")
    if layout is not None and layout[2] is not None and _nifti_has_nonfinite(path, layout[1], layout[2]):
        raise InputError(f"{path}: the image contains NaN or infinite values.")


def _itk_reason(exc: Exception) -> str:
    """The human part of an ITK exception ('ITK ERROR: ...'), on one line, without a final dot."""
    text = str(exc)
    m = re.search(r"ITK ERROR:\s*(?:\w+\(0x[0-9a-f]+\):\s*)?(.*)", text, flags=re.S)
    reason = " ".join((m.group(1) if m else "").split())
    if not reason or "Unable to determine ImageIO reader" in reason or "Could not create IO object" in reason:
        return "unknown or corrupt format"
    return reason.rstrip(".! ").replace(". ", "; ")[:150]


def _nifti_layout(head: bytes) -> Optional[tuple[int, int, Optional[np.dtype]]]:
    """(header+voxel bytes needed, voxel offset, float dtype or None) of a single-file
    NIfTI-1/-2 header; None when the bytes are not a NIfTI header."""
    import struct

    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
        else:
            continue
        ndim = int(dims[0])
        if not 1 <= ndim <= 7 or bitpix <= 0:
            return None
        n_vox = int(np.prod([max(1, int(d)) for d in dims[1:ndim + 1]], dtype=np.int64))
        floating = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(int(datatype))
        return offset + n_vox * bitpix // 8, offset, floating
    return None


def _nifti_has_nonfinite(path: Path, offset: int, dtype: np.dtype) -> bool:
    """ITK's NIfTI reader turns NaN into 0 silently, so float voxels are checked in the file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    chunk = (1 << 22) * dtype.itemsize
    with opener(path, "rb") as fh:
        fh.read(offset)
        while data := fh.read(chunk):
            usable = len(data) - len(data) % dtype.itemsize
            if not np.isfinite(np.frombuffer(data[:usable], dtype=dtype)).all():
                return True
    return False


def _to_grey(img: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img).astype(np.float32).mean(axis=-1)
    grey = sitk.GetImageFromArray(arr)
    grey.CopyInformation(img)
    return grey


# --- DICOM --------------------------------------------------------------------------------------
@dataclass
class _Frame:
    """One 2D slice of a DICOM series: where it is and how to get its voxels."""

    path: Path
    frame: Optional[int]                 # index in a multi-frame file, None for single-frame
    position: Optional[np.ndarray]       # ImagePositionPatient (LPS mm)
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    spacing_xy: tuple[float, float]      # (column spacing = x, row spacing = y)
    rows: int
    cols: int
    slope: float
    intercept: float


@dataclass
class DicomSeries:
    """Header summary of one series in a folder (no voxels)."""

    uid: str
    modality: Optional[str]
    number: Optional[int]
    description: Optional[str]
    files: list[Path]
    headers: list[Any] = field(repr=False, default_factory=list)
    n_frames: int = 0

    def summary(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        num = f"series {self.number}" if self.number is not None else "series"
        return f"{num}{desc} ({self.modality or 'unknown modality'}, {self.n_frames} slices)"


def _dicom_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and p.name.upper() != "DICOMDIR"]
    return files


def list_dicom_series(folder: str | Path, progress: Optional[Progress] = None) -> list[DicomSeries]:
    """Read the headers of every file under ``folder`` and group the images by series."""
    import pydicom
    folder = Path(folder)
    files = _dicom_files(folder)
    if not files:
        raise InputError(f"{folder}: the folder is empty.")
    groups: dict[str, DicomSeries] = {}
    seen_sop: dict[str, set[str]] = {}
    duplicates = 0
    for i, f in enumerate(files):
        if i % 50 == 0:
            report(progress, 0.3 * i / len(files), f"reading DICOM headers ({i}/{len(files)})")
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom raises many types on damaged input
            if _looks_like_dicom(f):
                raise InputError(f"{f}: corrupt DICOM file (the header cannot be read).") from None
            continue  # not DICOM: other files in the folder may be fine
        if "Rows" not in ds or "Columns" not in ds:
            if _is_image_sop(ds):
                # pydicom stops quietly at the end of a truncated file: an image without Rows is broken.
                raise InputError(f"{f}: corrupt DICOM file (the header is truncated).")
            continue  # reports, presentation states, DICOMDIR: no pixels
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            # Anonymisers sometimes empty the UID: keep apart what is visibly different.
            uid = "no-uid:" + ":".join(str(ds.get(k, "")) for k in ("SeriesNumber", "SeriesDescription", "Modality"))
        sop = str(ds.get("SOPInstanceUID", "") or "")
        seen = seen_sop.setdefault(uid, set())
        if sop and sop in seen:
            duplicates += 1
            continue  # the same image stored twice (copied file): read it once
        seen.add(sop)
        s = groups.get(uid)
        if s is None:
            s = groups[uid] = DicomSeries(
                uid=uid,
                modality=_clean_value("Modality", ds.get("Modality")),
                number=_clean_value("SeriesNumber", ds.get("SeriesNumber")),
                description=_clean_value("SeriesDescription", ds.get("SeriesDescription")),
                files=[],
            )
        s.files.append(f)
        s.headers.append(ds)
        s.n_frames += int(ds.get("NumberOfFrames", 1) or 1)
    if not groups:
        raise InputError(f"{folder}: the folder holds no DICOM images.")
    if duplicates:
        log.warning("%s: %d duplicate DICOM file(s) (same SOPInstanceUID) ignored", folder, duplicates)
    return list(groups.values())


def _is_image_sop(ds) -> bool:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    try:
        return uid is not None and "Image Storage" in _uid_name(uid)
    except Exception:  # noqa: BLE001 - an unparsable UID says nothing
        return False


def _uid_name(uid) -> str:
    from pydicom.uid import UID

    return UID(str(uid)).name


def _choose_series(series: list[DicomSeries], name: str) -> tuple[DicomSeries, str, list[str]]:
    def priority(s: DicomSeries):
        return (s.modality == "CT", s.n_frames)

    ranked = sorted(series, key=lambda s: (priority(s), -(s.number or 0), s.uid), reverse=True)
    chosen = ranked[0]
    warnings = []
    if len(series) == 1:
        choice = f"the only series in the folder: {chosen.summary()}"
    else:
        others = "; ".join(s.summary() for s in ranked[1:])
        choice = f"{chosen.summary()} chosen from {len(series)} series (CT first, then most slices); others: {others}"
        ties = [s for s in ranked[1:] if priority(s) == priority(chosen)]
        if ties:
            warnings.append(
                f"{len(ties) + 1} series have the same priority ({chosen.n_frames} "
                f"{chosen.modality or 'unknown'} slices); {chosen.summary()} was used"
            )
    return chosen, choice, warnings


def _drop_localizers(series: DicomSeries, warnings: list[str]) -> None:
    """Scout images stored in the axial series would make it 'mixed': set them aside."""
    keep = [i for i, h in enumerate(series.headers)
            if "LOCALIZER" not in [str(t).upper() for t in (h.get("ImageType") or [])]]
    if keep and len(keep) < len(series.headers):
        warnings.append(f"{len(series.headers) - len(keep)} localizer image(s) in the series ignored")
        series.files = [series.files[i] for i in keep]
        series.headers = [series.headers[i] for i in keep]
        series.n_frames = sum(int(h.get("NumberOfFrames", 1) or 1) for h in series.headers)


def _frames_of(series: DicomSeries, name: str) -> list[_Frame]:
    frames: list[_Frame] = []
    multi = [h for h in series.headers if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multi and len(series.headers) > 1:
        raise InputError(f"{name}: a series mixing several multi-frame files is not supported; give one file.")
    for path, ds in zip(series.files, series.headers):
        if multi:
            frames.extend(_multiframe_frames(path, ds, name))
            continue
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        row_c, col_c = (np.asarray(iop[:3], float), np.asarray(iop[3:], float)) if iop else (
            np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
        frames.append(_Frame(
            path=path, frame=None,
            position=np.asarray(ipp, float) if ipp is not None else None,
            row_cosine=row_c, col_cosine=col_c,
            spacing_xy=(float(ps[1]), float(ps[0])) if ps else (1.0, 1.0),
            rows=int(ds.Rows), cols=int(ds.Columns),
            slope=float(ds.get("RescaleSlope", 1) or 1), intercept=float(ds.get("RescaleIntercept", 0) or 0),
        ))
    return frames


def _multiframe_frames(path: Path, ds, name: str) -> list[_Frame]:
    """Enhanced CT/MR multi-frame: geometry from the functional groups (minimal support)."""
    n = int(ds.NumberOfFrames)
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or len(per) != n:
        raise InputError(f"{path}: a multi-frame DICOM file without per-frame positions is not supported.")

    def lookup(item, seq_kw, kw):
        for group in (item, shared):
            if group is not None and seq_kw in group and len(group[seq_kw].value) and kw in group[seq_kw][0]:
                return group[seq_kw][0][kw].value
        return ds.get(kw)

    frames = []
    for i, item in enumerate(per):
        ipp = lookup(item, "PlanePositionSequence", "ImagePositionPatient")
        iop = lookup(item, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = lookup(item, "PixelMeasuresSequence", "PixelSpacing")
        if ipp is None or iop is None or ps is None:
            raise InputError(f"{path}: a multi-frame DICOM file whose frames lack position, orientation or spacing.")
        slope = lookup(item, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = lookup(item, "PixelValueTransformationSequence", "RescaleIntercept")
        frames.append(_Frame(
            path=path, frame=i, position=np.asarray(ipp, float),
            row_cosine=np.asarray(iop[:3], float), col_cosine=np.asarray(iop[3:], float),
            spacing_xy=(float(ps[1]), float(ps[0])), rows=int(ds.Rows), cols=int(ds.Columns),
            slope=float(slope if slope is not None else 1), intercept=float(icpt if icpt is not None else 0),
        ))
    return frames


def _check_consistent(frames: list[_Frame], name: str) -> None:
    for f in frames:
        # Headers round cosines to a few digits: renormalise so the direction is a rotation.
        norms = np.linalg.norm(f.row_cosine), np.linalg.norm(f.col_cosine)
        if min(norms) < 0.9 or max(norms) > 1.1 or abs(float(np.dot(f.row_cosine, f.col_cosine))) > 1e-3:
            raise InputError(f"{f.path}: invalid ImageOrientationPatient (cosines not unit length and orthogonal).")
        f.row_cosine = f.row_cosine / norms[0]
        f.col_cosine = f.col_cosine / norms[1]
    f0 = frames[0]
    for f in frames[1:]:
        if (f.rows, f.cols) != (f0.rows, f0.cols):
            raise InputError(
                f"{name}: mixed series: slices of {f0.rows}x{f0.cols} and {f.rows}x{f.cols} pixels share one series."
            )
        if not (np.allclose(f.row_cosine, f0.row_cosine, atol=1e-4) and np.allclose(f.col_cosine, f0.col_cosine, atol=1e-4)):
            raise InputError(f"{name}: mixed series: slices with different orientations share one series.")
        if not np.allclose(f.spacing_xy, f0.spacing_xy, rtol=1e-4, atol=1e-5):
            raise InputError(f"{name}: mixed series: slices with different pixel spacings share one series.")


def _pixels(ds, frame: Optional[int]) -> np.ndarray:
    arr = ds.pixel_array
    if frame is not None:
        arr = arr[frame]
    return arr


def _load_voxels(frames: list[_Frame], name: str, progress: Optional[Progress]) -> np.ndarray:
    """Stack the slices (already sorted) with the modality rescale; int16 when possible."""
    import pydicom

    integer = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    out = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.int16 if integer else np.float32)
    cache: dict[Path, Any] = {}
    for k, f in enumerate(frames):
        if k % 10 == 0:
            report(progress, 0.3 + 0.6 * k / len(frames), f"reading DICOM slices ({k}/{len(frames)})")
        rescaled = False
        try:
            ds = cache[f.path] if f.path in cache else pydicom.dcmread(f.path)
            if f.frame is not None:
                cache = {f.path: ds}  # keep the multi-frame file open across its frames
            raw = _pixels(ds, f.frame)
        except Exception:  # noqa: BLE001 - pydicom lacks a decoder: GDCM (in SimpleITK) may have one
            try:
                raw = sitk.GetArrayFromImage(sitk.ReadImage(str(f.path)))
                raw = raw[f.frame] if f.frame is not None else raw.reshape(raw.shape[-2:])
                rescaled = True  # GDCM applies the rescale itself
            except RuntimeError:
                raise InputError(f"{f.path}: corrupt DICOM file (the pixel data cannot be decoded).") from None
        if raw.shape != (f.rows, f.cols):
            raise InputError(f"{f.path}: corrupt DICOM file (pixel data shape {raw.shape} does not match its header).")
        if rescaled:
            vals = raw
        elif integer:
            vals = raw.astype(np.int32) * int(f.slope) + int(f.intercept)
        else:
            vals = raw.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
        if out.dtype == np.int16 and (vals.dtype.kind == "f" or vals.min() < -32768 or vals.max() > 32767):
            out = out.astype(np.float32)  # values leave int16: switch once, keep going
        out[k] = vals
    return out


def _interpolate_slices(volume: np.ndarray, positions_mm: np.ndarray, step_mm: float) -> np.ndarray:
    """Linear interpolation along the slice axis onto a uniform grid starting at positions_mm[0]."""
    n_out = int(round((positions_mm[-1] - positions_mm[0]) / step_mm)) + 1
    targets = positions_mm[0] + step_mm * np.arange(n_out)
    out = np.empty((n_out,) + volume.shape[1:], dtype=volume.dtype)
    for j, t in enumerate(targets):
        i = int(np.clip(np.searchsorted(positions_mm, t, side="right") - 1, 0, len(positions_mm) - 2))
        w = float(np.clip((t - positions_mm[i]) / (positions_mm[i + 1] - positions_mm[i]), 0.0, 1.0))
        val = (1.0 - w) * volume[i].astype(np.float32) + w * volume[i + 1].astype(np.float32)
        out[j] = np.rint(val) if volume.dtype.kind in "iu" else val
    return out


def read_dicom_series(source: str | Path | Iterable[Path], require_3d: bool = True,
                      progress: Optional[Progress] = None, name: Optional[str] = None) -> Image:
    """Read one DICOM series (from a folder, choosing the series, or from a list of files).

    See the module docstring for the series choice, slice order, spacing and value policies.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        name = name or str(folder)
        series = list_dicom_series(folder, progress)
    else:
        import pydicom

        files = [Path(p) for p in source]
        name = name or (str(files[0]) if len(files) == 1 else str(files[0].parent))
        headers = []
        for f in files:
            try:
                headers.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - any parse failure means the file is not usable DICOM
                raise InputError(f"{f}: not a readable DICOM file.") from None
        if not all("Rows" in h for h in headers):
            raise InputError(f"{name}: the DICOM file holds no image.")
        h0 = headers[0]
        series = [DicomSeries(str(h0.get("SeriesInstanceUID", "") or ""), _clean_value("Modality", h0.get("Modality")),
                              _clean_value("SeriesNumber", h0.get("SeriesNumber")),
                              _clean_value("SeriesDescription", h0.get("SeriesDescription")),
                              files, headers, sum(int(h.get("NumberOfFrames", 1) or 1) for h in headers))]
    chosen, choice, warnings = _choose_series(series, name)
    _drop_localizers(chosen, warnings)
    if any(int(h.get("SamplesPerPixel", 1) or 1) > 1 for h in chosen.headers):
        raise InputError(f"{name}: a colour DICOM image; a grey-value image is needed.")
    frames = _frames_of(chosen, name)
    _check_consistent(frames, name)
    f0 = frames[0]
    normal = np.cross(f0.row_cosine, f0.col_cosine)
    h0 = chosen.headers[0]
    if not any(k in h0 for k in ("PixelSpacing", "ImagerPixelSpacing", "SharedFunctionalGroupsSequence")):
        warnings.append("no PixelSpacing in the header: 1 mm pixels assumed")
    two_d = len(frames) == 1

    # Size/spacing checks on headers only, before any voxel is decoded.
    if two_d:
        _check_geometry(name, (f0.cols, f0.rows), f0.spacing_xy, np.eye(2), require_3d)
    else:
        if max(f0.rows, f0.cols) > MAX_INPLANE_3D or len(frames) > MAX_SLICES:
            raise InputError(
                f"{name}: absurd image size {f0.cols} x {f0.rows} x {len(frames)} voxels "
                f"(limits {MAX_INPLANE_3D} in-plane, {MAX_SLICES} slices)."
            )
        if any(f.position is None for f in frames):
            raise InputError(f"{name}: the slices carry no ImagePositionPatient, so their order and spacing are unknown.")

    step_mm = 1.0
    resample_positions = None
    if not two_d:
        proj = np.array([float(np.dot(f.position, normal)) for f in frames])
        order = np.argsort(proj, kind="stable")
        frames = [frames[i] for i in order]
        proj = proj[order]
        steps = np.diff(proj)
        step_mm = float(np.median(steps))
        if step_mm <= 1e-3 or steps.min() <= 1e-3 * step_mm:
            raise InputError(
                f"{name}: mixed series: several slices lie at the same position (two acquisitions in one series?)."
            )
        if steps.max() > MAX_GAP_RATIO * step_mm * (1 + SPACING_TOLERANCE):
            raise InputError(
                f"{name}: slice gap of {steps.max():.2f} mm is more than {MAX_GAP_RATIO:g}x the usual "
                f"{step_mm:.2f} mm spacing (slices missing)."
            )
        if np.abs(steps - step_mm).max() > SPACING_TOLERANCE * step_mm:
            resample_positions = proj
            warnings.append(
                f"non-uniform slice spacing ({steps.min():.3f}-{steps.max():.3f} mm, median {step_mm:.3f} mm): "
                f"resampled to {step_mm:.3f} mm by linear interpolation"
            )
        span = frames[-1].position - frames[0].position
        shear = span - np.dot(span, normal) * normal
        if np.linalg.norm(shear) > max(0.1, 0.01 * abs(proj[-1] - proj[0])):
            warnings.append("slices are sheared (gantry tilt?): geometry approximated as orthogonal")
        _check_geometry(name, (f0.cols, f0.rows, len(frames)), (*f0.spacing_xy, step_mm),
                        np.column_stack([f0.row_cosine, f0.col_cosine, normal]), require_3d)

    volume = _load_voxels(frames, name, progress)
    if resample_positions is not None:
        report(progress, 0.92, "resampling to uniform slice spacing")
        volume = _interpolate_slices(volume, resample_positions, step_mm)

    md = _empty_metadata("dicom", None)
    _metadata_from_values({kw: chosen.headers[0].get(kw) for kw in METADATA_KEYWORDS + EXTRA_KEYWORDS
                           if kw in chosen.headers[0]}, md)
    md["series_choice"] = choice
    md["warnings"] = warnings
    md["n_series_in_folder"] = len(series)
    if len(series) > 1:
        log.info("%s: %s", name, choice)
    else:
        log.debug("%s: %s", name, choice)
    for w in warnings:
        log.warning("%s: %s", name, w)

    if two_d:
        origin = tuple(f0.position[:2]) if f0.position is not None else (0.0, 0.0)
        img = Image(volume[0], f0.spacing_xy, origin, np.eye(2), md)
    else:
        direction = np.column_stack([f0.row_cosine, f0.col_cosine, normal])
        img = Image(volume, (*f0.spacing_xy, step_mm), tuple(frames[0].position), direction, md)
    report(progress, 1.0, "image read")
    return validate_image(img, name, require_3d)


# --- writing ------------------------------------------------------------------------------------
def write_image(image: Image, path: str | Path) -> Path:
    """Write NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MHA (.mha); compressed.

    NRRD and MHA headers also carry the DICOM facts of ``METADATA_KEYWORDS`` so a round trip
    keeps them (NIfTI has no place for them).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"):
        raise InputError(f"{path}: cannot write this format (use .nii.gz, .nrrd or .mha).")
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image.to_sitk()
    if suffix in (".nrrd", ".mha", ".mhd"):
        for kw in METADATA_KEYWORDS + EXTRA_KEYWORDS:
            value = image.metadata.get(kw)
            if value is not None:
                img.SetMetaData(kw, str(value))
    sitk.WriteImage(img, str(path), useCompression=True)
    return path
