"""Bench for spinekit.image: DICOM/NIfTI reading speed and memory (printed, never asserted).

``run_bench(quick)`` writes a synthetic 512 x 512 x N CT series into a temporary folder and
reads it with ``read_image`` and, for comparison, SimpleITK's GDCM series reader; the real
series in ../shared/data is timed too when present.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .image import read_image, write_image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_series(folder: Path, n_slices: int, size: int = 512) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2000, size=(size, size), dtype=np.uint16)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"s{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, uid
        ds.Modality, ds.KVP, ds.Manufacturer = "CT", "120", "BENCH"
        ds.ImagePositionPatient = [-250.0, -250.0, 1.25 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        ds.save_as(str(path), enforce_file_format=True)


def _timed(fn, memory: bool = True):
    """(result, seconds, peak MiB of Python/numpy allocations); memory in a second, traced run
    so the tracing overhead does not inflate the time."""
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = float("nan")
    if memory:
        del out
        tracemalloc.start()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, seconds, peak


def run_bench(quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    n = 60 if quick else 300
    with tempfile.TemporaryDirectory(prefix="spinekit_image_bench_") as tmp:
        folder = Path(tmp) / "series"
        _write_series(folder, n)
        img, sec, peak = _timed(lambda: read_image(folder))
        volume_mb = img.array.nbytes / 2**20
        rows += [
            {"section": "image", "metric": f"read_image DICOM 512x512x{n}", "value": sec, "unit": "s", "target": ""},
            {"section": "image", "metric": "  per slice", "value": 1000 * sec / n, "unit": "ms", "target": ""},
            {"section": "image", "metric": "  peak Python memory / int16 volume", "value": peak / volume_mb,
             "unit": "x", "target": "< 1.5"},
        ]

        def gdcm():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            return reader.Execute()

        ref, sec_ref, _ = _timed(gdcm, memory=False)
        rows.append({"section": "image", "metric": "  SimpleITK/GDCM series reader (reference)", "value": sec_ref,
                     "unit": "s", "target": ""})
        rows.append({"section": "image", "metric": "  voxels equal to GDCM", "value":
                     str(bool(np.array_equal(img.array, sitk.GetArrayFromImage(ref)))), "unit": "", "target": "True"})
        nii = write_image(img, Path(tmp) / "ct.nii.gz")
        _, sec_nii, _ = _timed(lambda: read_image(nii), memory=False)
        rows.append({"section": "image", "metric": f"read_image NIfTI.gz 512x512x{n}", "value": sec_nii,
                     "unit": "s", "target": ""})
    real = SHARED_DATA / "ct_dicom_2mm" / "dicom"
    if real.exists():
        _, sec_real, _ = _timed(lambda: read_image(real), memory=False)
        rows.append({"section": "image", "metric": "read_image real JPEG2000 series 512x512x20", "value": sec_real,
                     "unit": "s", "target": ""})
    return rows


if __name__ == "__main__":  # pragma: no cover
    from .bench import format_table

    print(format_table(run_bench(quick=True)))
