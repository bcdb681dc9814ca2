"""Image = voxel array + geometry + the metadata later steps use; reading and writing.

Conventions (fixed for the whole package):
- ``array`` is indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order).
- ``spacing_mm``, ``origin_mm`` and ``direction`` follow ITK: (x, y, z) order, LPS physical
  space, ``direction`` a 3x3 matrix whose columns are the x/y/z axis directions.
- The RAS conversion for Slicer happens in ``spinekit.mrml`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import InputError

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


# --- reading / writing -----------------------------------------------------------------------
# Minimal first version; hardened (series choice, validation, clear errors) in this module.
def read_image(path: str | Path, require_3d: bool = True) -> Image:
    """Read a DICOM folder, NIfTI, NRRD or MHA file into an Image (LPS)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder.")
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise InputError(f"{path}: the folder holds no DICOM series.")
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileNames(files)
        img = reader.Execute()
        return Image.from_sitk(img)
    img = sitk.ReadImage(str(path))
    out = Image.from_sitk(img)
    if require_3d and out.ndim != 3:
        raise InputError(f"{path}: a 3D image is needed but the file holds a {out.ndim}D image.")
    return out


def write_image(image: Image, path: str | Path) -> Path:
    """Write NIfTI (.nii/.nii.gz), NRRD or MHA; compressed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image.to_sitk(), str(path), useCompression=True)
    return path
