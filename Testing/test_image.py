"""spinekit.image: DICOM/NIfTI/NRRD/MHA reading, writing, resampling and every bad input.

Synthetic DICOM series are written with pydicom into tmp_path (no binary fixtures in the
repository); their truth (positions, values) is known by construction, and SimpleITK's own
GDCM series reader serves as an independent reference for geometry and values.
"""

from __future__ import annotations

import gzip
import json
import logging
import random

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from spinekit.cli import main
from spinekit.errors import InputError
from spinekit.image import (
    Image,
    METADATA_KEYWORDS,
    orientation_code,
    parse_age_years,
    read_image,
    resample_spacing,
    resample_to,
    validate_image,
    write_image,
)

ROWS, COLS = 16, 12
PIXEL_SPACING = (0.8, 0.6)  # DICOM order: row spacing (y), column spacing (x)
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "SECRET-4711"


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _truth_hu(z_mm: float) -> np.ndarray:
    """HU pattern of a slice at distance z_mm along the normal: linear in z, r and c."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    return (10.0 * z_mm + 3 * r + c).astype(np.float64)


def _write_series(folder, z_mm, rotation=np.eye(3), origin=(-10.0, 20.0, 30.0), uid=None, modality="CT",
                  slope=1.0, intercept=-1024.0, rows=ROWS, cols=COLS, series_number=3, description="Body 2.5",
                  per_slice_rotation=None, kernel=("B30f", "3")):
    """Write one series: slice k sits at origin + z_mm[k] * normal; files in shuffled order,
    InstanceNumber reversed (so sorting must use positions)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    names = [f"img{random.Random(len(z_mm) + i).randint(0, 10**9):010d}_{i}" for i in range(len(z_mm))]
    for k, z in enumerate(z_mm):
        rot = per_slice_rotation(k) if per_slice_rotation else rotation
        row_c, col_c, normal = rot[:, 0], rot[:, 1], rot[:, 2]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / names[k]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = uid
        ds.StudyInstanceUID = "1.2.3.4"
        ds.Modality = modality
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientAge = "065Y"
        ds.PatientSex = "F"
        ds.StudyDate = "20240131"
        ds.Manufacturer = "ACME"
        ds.ManufacturerModelName = "Scanner 9000"
        ds.KVP = "120"
        ds.ConvolutionKernel = list(kernel)
        ds.SliceThickness = "2.5"
        ds.InstanceNumber = len(z_mm) - k
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + z * normal]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_c, col_c])]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        hu = _truth_hu(z)[:rows, :cols] if rows <= ROWS and cols <= COLS else np.zeros((rows, cols))
        stored = np.rint((hu - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(folder / names[k]), enforce_file_format=True)
    return uid


Z_UNIFORM = [0.0, 2.5, 5.0, 7.5, 10.0, 12.5]


@pytest.fixture
def oblique_series(tmp_path):
    rot = _rotation(30.0, 10.0)
    folder = tmp_path / "series"
    _write_series(folder, Z_UNIFORM, rotation=rot)
    return folder, rot


def _gdcm_reference(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    return reader.Execute()


# --- DICOM: geometry, values, metadata -------------------------------------------------------
def test_dicom_series_geometry_values_and_metadata(oblique_series):
    folder, rot = oblique_series
    img = read_image(folder)
    assert img.shape == (len(Z_UNIFORM), ROWS, COLS)
    assert img.array.dtype == np.int16
    # Truth by construction: PixelSpacing is (row, column) -> spacing_mm (x, y) = (0.6, 0.8).
    assert img.spacing_mm == pytest.approx((PIXEL_SPACING[1], PIXEL_SPACING[0], 2.5))
    np.testing.assert_allclose(img.direction, rot, atol=1e-6)
    np.testing.assert_allclose(img.origin_mm, (-10.0, 20.0, 30.0), atol=1e-6)
    for k, z in enumerate(Z_UNIFORM):
        np.testing.assert_array_equal(img.array[k], _truth_hu(z))
    # Voxel (k, r, c) lies at IPP_k + c * colspacing * row_cosine + r * rowspacing * col_cosine.
    k, r, c = 4, 7, 5
    expected = np.array([-10.0, 20.0, 30.0]) + Z_UNIFORM[k] * rot[:, 2] + c * 0.6 * rot[:, 0] + r * 0.8 * rot[:, 1]
    np.testing.assert_allclose(img.index_to_physical(np.array([[k, r, c]]))[0], expected, atol=1e-6)

    # Independent reference: SimpleITK/GDCM's series reader.
    ref = _gdcm_reference(folder)
    np.testing.assert_array_equal(img.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(img.spacing_mm, ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(img.origin_mm, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.direction.ravel(), ref.GetDirection(), atol=1e-6)

    md = img.metadata
    assert set(METADATA_KEYWORDS) <= set(md)
    assert md["source"] == "dicom"
    assert md["Modality"] == "CT" and md["Manufacturer"] == "ACME"
    assert md["KVP"] == 120.0 and isinstance(md["KVP"], float)
    assert md["SliceThickness"] == 2.5
    assert md["ConvolutionKernel"] == "B30f"
    assert md["PatientAge"] == "065Y" and md["age_years"] == 65.0
    assert md["PatientSex"] == "F"
    assert md["StudyDate"] == "20240131"
    assert md["warnings"] == []
    assert "series_choice" in md
    assert PATIENT_NAME.split("^")[0] not in repr(md) and PATIENT_ID not in repr(md)


def test_dicom_float_rescale_gives_float32(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder, Z_UNIFORM[:4], slope=0.5, intercept=-1000.25)
    img = read_image(folder)
    assert img.array.dtype == np.float32
    for k, z in enumerate(Z_UNIFORM[:4]):
        stored = np.rint((_truth_hu(z) + 1000.25) / 0.5)
        np.testing.assert_allclose(img.array[k], stored * 0.5 - 1000.25, atol=1e-3)


def test_series_choice_prefers_ct_then_most_slices(tmp_path, caplog):
    folder = tmp_path / "study"
    _write_series(folder / "a", Z_UNIFORM, description="long CT")
    _write_series(folder / "b", Z_UNIFORM[:3], description="short CT", series_number=4)
    _write_series(folder / "c", [2.0 * i for i in range(10)], modality="MR", description="MR", series_number=5)
    with caplog.at_level(logging.INFO, logger="spinekit.image"):
        img = read_image(folder)
    assert img.shape[0] == len(Z_UNIFORM)
    assert "long CT" in img.metadata["series_choice"] and "3 series" in img.metadata["series_choice"]
    assert img.metadata["n_series_in_folder"] == 3
    assert img.metadata["warnings"] == []
    assert any("long CT" in r.getMessage() for r in caplog.records)
    assert all(PATIENT_ID not in r.getMessage() and "Doe" not in r.getMessage() for r in caplog.records)

    # A second CT series of the same length: still read, with a warning about the tie.
    _write_series(folder / "d", Z_UNIFORM, description="twin CT", series_number=6)
    img = read_image(folder)
    assert img.shape[0] == len(Z_UNIFORM)
    assert any("same priority" in w for w in img.metadata["warnings"])


def test_missing_slice_is_resampled_with_warning(tmp_path, caplog):
    folder = tmp_path / "gap"
    z = [0.0, 2.5, 5.0, 10.0, 12.5]  # 7.5 missing
    _write_series(folder, z)
    with caplog.at_level(logging.WARNING, logger="spinekit.image"):
        img = read_image(folder)
    assert img.shape[0] == 6 and img.spacing_mm[2] == pytest.approx(2.5)
    assert any("non-uniform" in w for w in img.metadata["warnings"])
    assert any("non-uniform" in r.getMessage() for r in caplog.records)
    # The pattern is linear along z, so linear interpolation recovers the missing slice exactly.
    for k, zk in enumerate(Z_UNIFORM):
        np.testing.assert_array_equal(img.array[k], _truth_hu(zk))


def test_small_jitter_is_not_resampled(tmp_path):
    folder = tmp_path / "jitter"
    z = [0.0, 2.5, 5.01, 7.5, 10.0, 12.49]  # <1 % deviations
    _write_series(folder, z)
    img = read_image(folder)
    assert img.shape[0] == 6 and img.metadata["warnings"] == []
    assert img.spacing_mm[2] == pytest.approx(2.5, abs=0.01)


def test_huge_gap_is_refused(tmp_path):
    folder = tmp_path / "biggap"
    _write_series(folder, [0.0, 2.5, 5.0, 12.5, 15.0])  # 7.5 and 10 missing: 3x the step
    with pytest.raises(InputError, match=r"gap .*missing"):
        read_image(folder)


def test_copied_file_read_once(tmp_path):
    folder = tmp_path / "copies"
    _write_series(folder, Z_UNIFORM)
    first = sorted(folder.iterdir())[0]
    (folder / "copy_of_first").write_bytes(first.read_bytes())
    img = read_image(folder)
    assert img.shape[0] == len(Z_UNIFORM)


def test_duplicate_positions_refused(tmp_path):
    folder = tmp_path / "dup"
    _write_series(folder, [0.0, 2.5, 2.5, 5.0])
    with pytest.raises(InputError, match="mixed series"):
        read_image(folder)


def test_mixed_orientation_in_one_series_refused(tmp_path):
    folder = tmp_path / "mixed"
    rot_b = _rotation(45.0, 0.0)
    _write_series(folder, Z_UNIFORM, uid="1.2.826.0.1.1",
                  per_slice_rotation=lambda k: rot_b if k == 3 else np.eye(3))
    with pytest.raises(InputError, match="mixed series") as exc:
        read_image(folder)
    assert str(folder) in str(exc.value)


def test_localizer_in_series_is_ignored(tmp_path):
    folder = tmp_path / "with_scout"
    _write_series(folder, Z_UNIFORM, uid="1.2.826.0.1.3")
    _write_series(folder / "scout", [0.0], uid="1.2.826.0.1.3", rotation=_rotation(0.0, 90.0))
    scout = next((folder / "scout").iterdir())
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout)
    img = read_image(folder)
    assert img.shape[0] == len(Z_UNIFORM)
    assert any("localizer" in w for w in img.metadata["warnings"])
    np.testing.assert_array_equal(img.array[2], _truth_hu(Z_UNIFORM[2]))


def test_colour_dicom_refused(tmp_path):
    folder = tmp_path / "rgb"
    _write_series(folder, [0.0, 2.5])
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((ROWS, COLS, 3), np.uint8).tobytes()
        ds.save_as(f)
    _raises(folder, "colour")


def test_mixed_matrix_size_in_one_series_refused(tmp_path):
    folder = tmp_path / "mixed_size"
    _write_series(folder, Z_UNIFORM[:3], uid="1.2.826.0.1.2")
    _write_series(folder / "more", Z_UNIFORM[3:], uid="1.2.826.0.1.2", rows=ROWS - 4)
    with pytest.raises(InputError, match="mixed series"):
        read_image(folder)


def test_single_slice_is_2d(tmp_path):
    folder = tmp_path / "one"
    _write_series(folder, [5.0])
    with pytest.raises(InputError, match="3D image is needed"):
        read_image(folder)
    img = read_image(folder, require_3d=False)
    assert img.ndim == 2 and img.shape == (ROWS, COLS)
    assert img.spacing_mm == pytest.approx((0.6, 0.8))
    np.testing.assert_array_equal(img.array, _truth_hu(5.0))
    # A single file given directly is read the same way.
    file = next(folder.iterdir())
    np.testing.assert_array_equal(read_image(file, require_3d=False).array, img.array)


def test_radiograph_dicom(tmp_path):
    """DX: no position/orientation, ImagerPixelSpacing instead of PixelSpacing, MONOCHROME1."""
    folder = tmp_path / "dx"
    _write_series(folder, [0.0], modality="DX", slope=1.0, intercept=0.0)
    path = next(folder.iterdir())
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.15, 0.14]
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    img = read_image(path, require_3d=False)
    assert img.ndim == 2 and img.shape == (ROWS, COLS)
    assert img.spacing_mm == pytest.approx((0.14, 0.15))
    assert img.metadata["Modality"] == "DX" and img.metadata["PhotometricInterpretation"] == "MONOCHROME1"
    np.testing.assert_array_equal(img.array, _truth_hu(0.0))
    with pytest.raises(InputError, match="3D image is needed"):
        read_image(folder)


def test_multiframe_file(tmp_path):
    """Enhanced CT style: one file, geometry in the functional groups, frames out of order."""
    rot = _rotation(0.0, 20.0)
    z = [5.0, 0.0, 2.5, 7.5]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "enhanced.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.KVP = "100"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLS, len(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orient, measures, transform = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [float(v) for v in np.concatenate([rot[:, 0], rot[:, 1]])]
    measures.PixelSpacing = list(PIXEL_SPACING)
    measures.SliceThickness = "2.5"
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "1", "-1024", "HU"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for zk in z:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in zk * rot[:, 2]]
        item.PlanePositionSequence = Sequence([pos])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.stack([(_truth_hu(zk) + 1024).astype(np.uint16) for zk in z]).tobytes()
    ds.save_as(str(path), enforce_file_format=True)

    img = read_image(path)
    assert img.shape == (4, ROWS, COLS)
    assert img.spacing_mm == pytest.approx((0.6, 0.8, 2.5))
    np.testing.assert_allclose(img.direction, rot, atol=1e-6)
    for k, zk in enumerate(sorted(z)):
        np.testing.assert_array_equal(img.array[k], _truth_hu(zk))
    assert img.metadata["KVP"] == 100.0


def test_absurd_dicom_size_refused_from_headers(tmp_path):
    folder = tmp_path / "huge"
    # Header says 4096 rows; refused before any voxel is decoded.
    _write_series(folder, Z_UNIFORM[:3], rows=4096, cols=8)
    with pytest.raises(InputError, match="absurd image size"):
        read_image(folder)


# --- other formats: round trips ----------------------------------------------------------------
def _phantom(dtype=np.int16) -> Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 2000, size=(7, 9, 11)).astype(dtype)
    return Image(arr, (0.7, 0.9, 2.5), (-12.5, 40.0, 100.0), _rotation(25.0, -15.0),
                 {"Modality": "CT", "Manufacturer": "ACME", "KVP": 100.0, "ConvolutionKernel": "B30f"})


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_round_trip(tmp_path, suffix, dtype):
    src = _phantom(np.int16)
    src = src.with_array(np.abs(src.array).clip(0, 255).astype(dtype) if dtype == np.uint8 else src.array.astype(dtype))
    path = write_image(src, tmp_path / f"img{suffix}")
    back = read_image(path, modality="CT")
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, src.array)
    assert back.same_grid(src, tol_mm=1e-4)
    np.testing.assert_allclose(back.direction, src.direction, atol=1e-5)
    assert back.metadata["Modality"] == "CT"
    if suffix in (".nrrd", ".mha"):  # headers carry the scanner facts
        assert back.metadata["KVP"] == 100.0 and back.metadata["ConvolutionKernel"] == "B30f"
    assert back.metadata["source"] == {".nrrd": "nrrd", ".mha": "mha"}.get(suffix, "nifti")


def test_nifti_modality_unknown_unless_given(tmp_path):
    path = write_image(_phantom(), tmp_path / "ct.nii.gz")
    assert read_image(path).metadata["Modality"] is None
    assert read_image(path, modality="MR").metadata["Modality"] == "MR"


def test_nifti_geometry_matches_nibabel(tmp_path):
    """Independent reference: nibabel's affine (RAS) of the file we wrote."""
    nib = pytest.importorskip("nibabel")
    img = _phantom()
    path = write_image(img, tmp_path / "ct.nii.gz")
    nii = nib.load(str(path))
    ijk = np.array([[0, 0, 0], [10, 0, 0], [0, 8, 0], [0, 0, 6], [10, 8, 6]], float)  # x, y, z
    ras = nib.affines.apply_affine(nii.affine, ijk)
    lps = img.index_to_physical(ijk[:, ::-1])
    np.testing.assert_allclose(ras * np.array([-1, -1, 1]), lps, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), img.array)
    assert "".join(nib.aff2axcodes(nii.affine)) == orientation_code(img)


def test_read_nibabel_written_nifti(tmp_path):
    """A NIfTI written by nibabel (RAS affine, oblique, int32): same physical voxels in LPS."""
    nib = pytest.importorskip("nibabel")
    rot = _rotation(-20.0, 35.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 1.1, 3.0])
    affine[:3, 3] = (12.0, -40.0, 7.5)
    data = np.arange(5 * 6 * 7, dtype=np.int32).reshape(5, 6, 7) - 100  # nibabel order x, y, z
    path = tmp_path / "nib.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    img = read_image(path)
    assert img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, data.transpose(2, 1, 0))
    ijk = np.array([[0, 0, 0], [4, 0, 0], [0, 5, 0], [0, 0, 6], [4, 5, 6]], float)
    ras = nib.affines.apply_affine(affine, ijk)
    np.testing.assert_allclose(img.index_to_physical(ijk[:, ::-1]), ras * np.array([-1, -1, 1]), atol=1e-3)
    assert img.spacing_mm == pytest.approx((0.7, 1.1, 3.0), abs=1e-5)


def test_orientation_code():
    base = Image(np.zeros((2, 2, 2)))
    assert orientation_code(base) == "LPS"
    assert orientation_code(Image(np.zeros((2, 2, 2)), direction=np.diag([-1.0, -1.0, 1.0]))) == "RAS"
    assert orientation_code(Image(np.zeros((2, 2, 2)), direction=np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0.0]]))) == "PIL"


def test_2d_file(tmp_path):
    img2d = Image(np.arange(20 * 30, dtype=np.int16).reshape(20, 30), (0.15, 0.15), (0.0, 0.0), np.eye(2))
    path = write_image(img2d, tmp_path / "xray.nrrd")
    with pytest.raises(InputError, match="3D image is needed"):
        read_image(path)
    back = read_image(path, require_3d=False)
    np.testing.assert_array_equal(back.array, img2d.array)
    assert back.spacing_mm == pytest.approx((0.15, 0.15))


def test_integer_ct_becomes_int16(tmp_path):
    img = _phantom().with_array(_phantom().array.astype(np.int32))
    path = tmp_path / "ct32.nii.gz"
    sitk.WriteImage(img.to_sitk(), str(path))
    back = read_image(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, img.array)


# --- resampling --------------------------------------------------------------------------------
def _ramp_image() -> Image:
    z, y, x = np.mgrid[0:10, 0:12, 0:14].astype(np.float32)
    # value = 2*x_mm + 0.5*y_mm + 1*z_mm in index space units of mm (spacing 1, 1.5, 2)
    return Image(2.0 * x * 1.0 + 0.5 * y * 1.5 + 1.0 * z * 2.0, (1.0, 1.5, 2.0), (5.0, -3.0, 7.0), _rotation(10, 0))


def test_resample_spacing_linear_recovers_ramp():
    img = _ramp_image()
    out = resample_spacing(img, (2.0, 3.0, 1.0), "linear")
    assert out.size_xyz == (7, 6, 20)
    assert out.origin_mm == img.origin_mm and np.allclose(out.direction, img.direction)
    z, y, x = np.mgrid[0:20, 0:6, 0:7]
    truth = 2.0 * (x * 2.0) + 0.5 * (y * 3.0) + 1.0 * (z * 1.0)
    inside = (z * 1.0 <= 18.0)  # beyond the last input slice the value is the default
    np.testing.assert_allclose(out.array[inside], truth[inside], atol=1e-3)


def test_resample_to_flipped_grid_and_labels():
    labels = np.zeros((6, 8, 10), np.uint8)
    labels[1:4, 2:5, 3:8] = 20
    labels[4:6, 0:2, 0:3] = 21
    img = Image(labels, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0))
    # Same voxels described with y and z flipped (origin at the other corner).
    flipped = Image(np.zeros_like(labels), img.spacing_mm, (0.0, 7 * 0.8, 5 * 2.0), np.diag([1.0, -1.0, -1.0]))
    out = resample_to(img, flipped, "nearest")
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, labels[::-1, ::-1, :])
    back = resample_to(out, img)
    np.testing.assert_array_equal(back.array, labels)
    with pytest.raises(ValueError):
        resample_to(img, flipped, "cubic")


def test_resample_integer_ct_keeps_dtype_and_rounds():
    ct = Image(np.array([[[0, 103]] * 2] * 2, np.int16), (1.0, 1.0, 1.0))
    out = resample_spacing(ct, (0.5, 1.0, 1.0), "linear")
    assert out.array.dtype == np.int16 and out.size_xyz == (4, 2, 2)
    # 51.5 rounds to 52 (truncation would give 51).
    np.testing.assert_array_equal(out.array[0, 0, :3], [0, 52, 103])


# --- bad inputs --------------------------------------------------------------------------------
def _one_sentence(msg: str, name) -> None:
    assert str(name) in msg
    assert "\n" not in msg and msg.endswith(".")


def _raises(path, match, **kw):
    with pytest.raises(InputError, match=match) as exc:
        read_image(path, **kw)
    _one_sentence(str(exc.value), path)


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope.nii.gz", "no such file")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "empty")


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not DICOM")
    (folder / "x.dcm").write_bytes(b"\0" * 300)
    _raises(folder, "no DICOM images")


def test_text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _raises(tmp_path / "notes.txt", "not an image")


def test_text_named_nifti(tmp_path):
    (tmp_path / "fake.nii.gz").write_text("hello, I am not an image")
    _raises(tmp_path / "fake.nii.gz", "not an image")
    (tmp_path / "fake.nii").write_text("hello, I am not an image either " * 20)
    _raises(tmp_path / "fake.nii", "not an image")
    (tmp_path / "fake.dcm").write_text("x" * 500)
    _raises(tmp_path / "fake.dcm", "not a readable DICOM")


def test_truncated_nifti(tmp_path):
    path = write_image(_phantom(), tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "corrupt")
    # Truncated but uncompressed: header fine, voxels missing.
    raw = tmp_path / "ct.nii"
    raw.write_bytes(gzip.decompress(data)[:600])
    _raises(raw, "corrupt")
    # Intact gzip stream around a short NIfTI (ITK would pad it with zeros).
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(data)[:-100]))
    _raises(short, "truncated")
    nrrd = write_image(_phantom(), tmp_path / "ct.nrrd")
    nrrd.write_bytes(nrrd.read_bytes()[:-200])
    _raises(nrrd, "corrupt")


@pytest.mark.parametrize("keep_bytes", [400, -100])
def test_corrupt_dicom_file_named(tmp_path, keep_bytes):
    folder = tmp_path / "series"
    _write_series(folder, Z_UNIFORM)
    victim = sorted(folder.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:keep_bytes])  # truncated header / truncated pixels
    _raises(folder, "corrupt DICOM")
    with pytest.raises(InputError) as exc:
        read_image(folder)
    assert str(victim) in str(exc.value)


def test_progress_reported(oblique_series):
    folder, _ = oblique_series
    calls = []
    read_image(folder, progress=lambda f, msg: calls.append((f, msg)))
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(calls) >= 3


def test_sheared_nifti_refused_with_reason(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nii = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    nii.set_qform(None, code=0)
    nii.set_sform(affine, code=1)
    path = tmp_path / "sheared.nii.gz"
    nib.save(nii, str(path))
    _raises(path, "orthonormal")


def test_empty_file(tmp_path):
    (tmp_path / "zero.nrrd").write_bytes(b"")
    _raises(tmp_path / "zero.nrrd", "empty")


def test_nan_values(tmp_path):
    img = _phantom(np.float32)
    img.array[3, 4, 5] = np.nan
    path = write_image(img, tmp_path / "nan.nii.gz")
    _raises(path, "NaN")
    img.array[3, 4, 5] = np.inf
    path = write_image(img, tmp_path / "inf.nrrd")
    _raises(path, "NaN or infinite")


def test_absurd_size_from_header_only(tmp_path):
    """A header claiming 4000 x 4000 x 10 voxels is refused before any data is read."""
    mhd = tmp_path / "huge.mhd"
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 10\nElementSpacing = 1 1 1\n"
        "ElementType = MET_SHORT\nElementDataFile = huge.raw\n"
    )
    _raises(mhd, "absurd image size")
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 10 10 6000\nElementSpacing = 1 1 1\n"
        "ElementType = MET_SHORT\nElementDataFile = huge.raw\n"
    )
    _raises(mhd, "absurd image size")


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 60.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0)])
def test_absurd_spacing(tmp_path, spacing):
    mhd = tmp_path / "sp.mhd"
    (tmp_path / "sp.raw").write_bytes(np.zeros((4, 4, 4), np.int16).tobytes())
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\n"
        f"ElementSpacing = {' '.join(map(str, spacing))}\nElementType = MET_SHORT\nElementDataFile = sp.raw\n"
    )
    _raises(mhd, "spacing")


def test_4d_refused(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.int16), isVector=False)
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(img, str(path))
    _raises(path, "4D")


def test_validate_image_in_memory():
    with pytest.raises(InputError, match="phantom: .*NaN"):
        validate_image(Image(np.full((3, 4, 5), np.nan, np.float32)), "phantom")
    with pytest.raises(InputError, match="spacing"):
        validate_image(Image(np.zeros((3, 4, 5)), spacing_mm=(1, 1, 0)), "phantom")
    ok = Image(np.zeros((3, 4, 5), np.float32))
    assert validate_image(ok, "phantom") is ok


def test_parse_age_years():
    assert parse_age_years("065Y") == 65.0
    assert parse_age_years("006M") == pytest.approx(0.5)
    assert parse_age_years("014D") == pytest.approx(14 / 365.25)
    assert parse_age_years("") is None and parse_age_years("old") is None


def test_write_unknown_format(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        write_image(_phantom(), tmp_path / "x.jpg2")


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_info_bad_path(tmp_path, capsys):
    bad = tmp_path / "missing_scan"
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]


def test_cli_info_corrupt_file(tmp_path, capsys):
    path = write_image(_phantom(), tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[:100])
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]


def test_cli_info_2d_needs_flag(tmp_path, capsys):
    path = write_image(Image(np.zeros((20, 30), np.int16), (0.15, 0.15), (0.0, 0.0), np.eye(2)), tmp_path / "xray.nrrd")
    assert main(["info", str(path)]) == 2
    assert "3D image is needed" in capsys.readouterr().err
    assert main(["info", "--allow-2d", "--json", str(path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["size_xyz"] == [30, 20] and facts["orientation"] == "2D"


def test_cli_info_describes_series(oblique_series, capsys):
    folder, _ = oblique_series
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{COLS} x {ROWS} x {len(Z_UNIFORM)} voxels" in out
    assert "0.6 x 0.8 x 2.5 mm" in out
    assert "CT" in out and "ACME" in out and "B30f" in out
    assert "Doe" not in out and PATIENT_ID not in out and "065Y" not in out


# --- real data (../shared/data) ------------------------------------------------------------------
def _corners(img: Image) -> np.ndarray:
    nz, ny, nx = img.shape
    idx = np.array([[z, y, x] for z in (0, nz - 1) for y in (0, ny - 1) for x in (0, nx - 1)], float)
    pts = img.index_to_physical(idx)
    return pts[np.lexsort(pts.T)]


def test_real_dicom_series_matches_totalsegmentator_grid(shared_data):
    folder = shared_data / "ct_dicom_2mm" / "dicom"
    ct = read_image(folder)
    assert ct.shape == (20, 512, 512)
    assert ct.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert ct.metadata["Manufacturer"] == "SIEMENS"
    assert ct.metadata["KVP"] == 120.0
    assert ct.metadata["ConvolutionKernel"] == "Br38f"
    assert ct.metadata["Modality"] == "CT"
    assert ct.array.dtype == np.int16

    # TotalSegmentator's labels, read independently with SimpleITK: same physical voxels.
    labels_sitk = sitk.ReadImage(str(shared_data / "ct_dicom_2mm" / "ts_total.nii.gz"))
    labels = Image.from_sitk(labels_sitk)
    np.testing.assert_allclose(_corners(ct), _corners(labels), atol=1e-2)
    # The axes may be flipped but not permuted: |direction| agrees.
    np.testing.assert_allclose(np.abs(ct.direction), np.abs(labels.direction), atol=1e-4)
    on_ct = resample_to(labels, ct, "nearest")
    np.testing.assert_array_equal(np.bincount(on_ct.array.ravel(), minlength=256),
                                  np.bincount(labels.array.ravel(), minlength=256))
    # The labels sit on the anatomy: vertebrae (T11/T12) and the contrast-filled aorta are
    # dense, the background mostly air.
    hu = ct.array
    assert np.median(hu[on_ct.array == 32]) > 150
    assert np.median(hu[on_ct.array == 52]) > 100
    assert np.median(hu[on_ct.array == 0]) < -500

    # Voxel values equal SimpleITK/GDCM's reading of the same series.
    ref = _gdcm_reference(folder)
    np.testing.assert_array_equal(hu, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(ct.origin_mm, ref.GetOrigin(), atol=1e-3)


def test_real_nifti_ct(shared_data):
    nib = pytest.importorskip("nibabel")
    path = shared_data / "ct_abdomen_3mm" / "ct.nii.gz"
    ct = read_image(path)
    assert ct.shape == (112, 101, 122)  # README: 122 x 101 x 112 (x, y, z)
    assert ct.array.dtype == np.int16  # stored int32, values in range
    nii = nib.load(str(path))
    assert orientation_code(ct) == "".join(nib.aff2axcodes(nii.affine)) == "RAS"
    ijk = np.array([[0, 0, 0], [121, 100, 111], [60, 0, 50]], float)
    ras = nib.affines.apply_affine(nii.affine, ijk)
    np.testing.assert_allclose(ct.index_to_physical(ijk[:, ::-1]), ras * np.array([-1, -1, 1]), atol=1e-3)
    np.testing.assert_array_equal(ct.array, np.asarray(nii.dataobj).transpose(2, 1, 0))


def test_crop_keeps_each_voxel_where_it_lay():
    # An oblique grid: a cropped voxel's physical point must be the one it had in the whole image.
    rot = sitk.Euler3DTransform()
    rot.SetRotation(0.2, -0.1, 0.3)
    direction = np.array(rot.GetMatrix()).reshape(3, 3)
    arr = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    img = Image(arr, (0.8, 0.9, 2.5), (-10.0, 20.0, 35.0), direction, metadata={"Modality": "CT"})
    part = img.crop((slice(2, 5), slice(None), slice(3, -1)))
    assert part.shape == (3, 7, 4) and part.spacing_mm == img.spacing_mm
    assert part.metadata == img.metadata and part.metadata is not img.metadata
    idx = np.array([[0, 0, 0], [2, 6, 3], [1, 3, 2]])
    np.testing.assert_array_equal(part.array[tuple(idx.T)], arr[tuple((idx + [2, 0, 3]).T)])
    np.testing.assert_allclose(part.index_to_physical(idx), img.index_to_physical(idx + [2, 0, 3]), atol=1e-9)
    with pytest.raises(ValueError, match="one step-1 slice per axis"):
        img.crop((slice(0, 6, 2), slice(None), slice(None)))
