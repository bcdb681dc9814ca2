"""spinekit.mrml and the Qt-free SpineBMD logic on real MRML (slicer-core wheel).

Geometry is checked against independent references: SimpleITK's own index-to-physical mapping
and Slicer's own segment geometry (the oriented image data Slicer keeps per segment), never
against our own conversion run backwards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")  # the slicer-core wheel (pip install slicer-core)

from spinekit import levels as lv  # noqa: E402
from spinekit import mrml  # noqa: E402
from spinekit.errors import InputError  # noqa: E402
from spinekit.image import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SpineBMD"))
from SpineBMDLib import dependencies  # noqa: E402
from SpineBMDLib.logic import SpineBMDLogic, summary_line  # noqa: E402
from SpineBMDLib.worker import BackgroundRun  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared/data absent)")
    return path


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def ctx():
    return mrml.new_scene()


def oblique_image(shape=(12, 16, 20)) -> Image:
    """A non-trivial geometry: anisotropic spacing, permuted and rotated axes, off origin."""
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    perm = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)
    rng = np.random.default_rng(0)
    return Image(rng.integers(-1000, 1500, size=shape).astype(np.int16), spacing_mm=(0.7, 1.3, 2.5),
                 origin_mm=(12.5, -30.0, 101.0), direction=rot @ perm)


def block_labels(image: Image) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Three 'vertebrae' (T12, L1, L2) as boxes; returns labels and each box's centre index."""
    labels = np.zeros(image.shape, np.uint8)
    boxes = {"T12": (slice(8, 11), slice(3, 9), slice(4, 10)),
             "L1": (slice(4, 7), slice(6, 12), slice(8, 15)),
             "L2": (slice(0, 3), slice(2, 6), slice(12, 18))}
    centres = {}
    for name, box in boxes.items():
        labels[box] = lv.level_id(name)
        centres[name] = np.array([(s.start + s.stop - 1) / 2 for s in box])
    return labels, centres


def segment_centroid_ras(segmentation_node, level: str) -> np.ndarray:
    """Centroid (RAS) of a segment from Slicer's own per-segment labelmap geometry."""
    from vtk.util import numpy_support

    seg_id = mrml.segment_ids_by_level(segmentation_node)[level]
    segment = segmentation_node.GetSegmentation().GetSegment(seg_id)
    oriented = segment.GetRepresentation("Binary labelmap")
    x0, x1, y0, y1, z0, z1 = oriented.GetExtent()
    arr = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    zyx = np.argwhere(arr == segment.GetLabelValue()).mean(axis=0)
    ijk = np.array([zyx[2] + x0, zyx[1] + y0, zyx[0] + z0, 1.0])
    import vtk

    m = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(m)
    return (mrml._numpy_matrix(m) @ ijk)[:3]


def segment_contains_ras(segmentation_node, level: str, ras) -> bool:
    """Whether Slicer's own labelmap of a segment is set at a RAS point."""
    import vtk
    from vtk.util import numpy_support

    seg_id = mrml.segment_ids_by_level(segmentation_node)[level]
    segment = segmentation_node.GetSegmentation().GetSegment(seg_id)
    oriented = segment.GetRepresentation("Binary labelmap")
    m = vtk.vtkMatrix4x4()
    oriented.GetWorldToImageMatrix(m)
    i, j, k = np.rint((mrml._numpy_matrix(m) @ np.array([*ras, 1.0]))[:3]).astype(int)
    x0, x1, y0, y1, z0, z1 = oriented.GetExtent()
    if not (x0 <= i <= x1 and y0 <= j <= y1 and z0 <= k <= z1):
        return False
    arr = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    return bool(arr[k - z0, j - y0, i - x0] == segment.GetLabelValue())


# --- geometry --------------------------------------------------------------------------------
def test_volume_round_trip_keeps_geometry_and_maps_lps_to_ras(ctx):
    image = oblique_image()
    node = mrml.volume_node_from_image(image, ctx.scene, "CT")
    # Independent reference: SimpleITK maps an index to LPS; RAS flips x and y.
    sitk_img = image.to_sitk()
    ijk = (3, 7, 5)  # x, y, z index
    lps = np.array(sitk_img.TransformIndexToPhysicalPoint(ijk))
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = mrml._numpy_matrix(m) @ np.array([*ijk, 1.0])
    assert np.allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)
    # Slicer's own spacing/origin getters agree with the image's.
    assert np.allclose(node.GetSpacing(), image.spacing_mm)
    assert np.allclose(node.GetOrigin(), [-image.origin_mm[0], -image.origin_mm[1], image.origin_mm[2]])
    back = mrml.image_from_volume_node(node)
    assert back.same_grid(image, tol_mm=1e-6)
    assert np.array_equal(back.array, image.array) and back.array.dtype == image.array.dtype
    # DICOM facts travel with the node (asynchronous calibration and the report read them).
    image.metadata.update({"Manufacturer": "SIEMENS", "KVP": "120", "phantom": True})
    node2 = mrml.volume_node_from_image(image, ctx.scene, "CT2")
    meta = mrml.image_from_volume_node(node2).metadata
    assert meta["Manufacturer"] == "SIEMENS" and meta["KVP"] == "120" and meta["phantom"] is True


def test_parent_transform_is_honoured(ctx):
    image = oblique_image()
    node = mrml.volume_node_from_image(image, ctx.scene, "CT")
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # 10 mm towards patient Right (RAS +x) = LPS -x
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.image_from_volume_node(node)
    assert np.allclose(np.array(moved.origin_mm) - np.array(image.origin_mm), [-10.0, 0, 0], atol=1e-6)


def test_bad_inputs_are_one_sentence_input_errors(ctx):
    empty = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="empty"):
        mrml.image_from_volume_node(empty)
    image = oblique_image()
    node = mrml.volume_node_from_image(image, ctx.scene, "CT")
    with pytest.raises(InputError, match="shape"):
        mrml.labels_to_segmentation_node(np.zeros((2, 2, 2), np.uint8), node)
    seg = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    seg.GetSegmentation().AddEmptySegment("liver", "liver")
    with pytest.raises(InputError, match="vertebra level"):
        mrml.segmentation_node_to_labels(seg, node)


# --- labels -> segmentation ------------------------------------------------------------------
def test_labels_to_segmentation_names_terminology_colours_geometry(ctx):
    image = oblique_image()
    volume = mrml.volume_node_from_image(image, ctx.scene, "CT")
    sh = ctx.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.SetItemParent(mrml.subject_hierarchy_item(volume), study)

    labels, centres = block_labels(image)
    labels[0, 0, 0] = 99  # not a vertebra id: must not become a segment
    seg = mrml.labels_to_segmentation_node(labels, volume)
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(names, key=lv.order_index) == ["T12", "L1", "L2"]
    assert segmentation.GetSegment("L1").GetName() == "L1"  # segment ID = level name
    assert segmentation.GetNumberOfLayers() == 1  # one shared labelmap, as Slicer stores imports
    for level in ("T12", "L1", "L2"):
        segment = segmentation.GetSegment(mrml.segment_ids_by_level(seg)[level])
        assert np.allclose(segment.GetColor(), lv.colour(level), atol=1e-6)
        term = mrml.parse_terminology(segment.GetTerminology())
        assert term["category"] == ("SCT", "123037004", "Anatomical Structure")
        assert term["type"] == ("SCT", *lv.SNOMED[level])
        # Segment voxels sit where the labels were, in RAS (Slicer's own segment geometry).
        lps = image.index_to_physical(centres[level][None])[0]
        assert np.allclose(segment_centroid_ras(seg, level), mrml.lps_to_ras(lps), atol=1e-3)
    # Reference geometry = the volume's (what DICOM SEG export needs).
    converter = slicer.vtkSegmentationConverter
    geometry = segmentation.GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    expected = converter.SerializeImageGeometry(m, volume.GetImageData().GetExtent())
    assert geometry == expected
    assert sh.GetItemParent(mrml.subject_hierarchy_item(seg)) == study
    # The reverse path gives back exactly the vertebra labels.
    back = mrml.segmentation_node_to_labels(seg, volume)
    assert np.array_equal(back.array, np.where(labels == 99, 0, labels))
    assert back.same_grid(image, tol_mm=1e-6)


def test_labels_on_another_grid_land_on_the_volume_grid(ctx):
    """A label map at half the resolution (as from another tool) is placed by physical position."""
    volume_image = Image(np.zeros((20, 24, 28), np.int16), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(-5.0, 3.0, 40.0))
    volume = mrml.volume_node_from_image(volume_image, ctx.scene, "CT")
    coarse = np.zeros((10, 12, 14), np.uint8)
    coarse[2:5, 3:7, 4:9] = lv.level_id("L2")  # 3 x 4 x 5 voxels of 2 mm
    # voxel centres of the coarse grid sit half a fine voxel off: origin shifted by 0.5 mm
    labels = Image(coarse, spacing_mm=(2.0, 2.0, 2.0), origin_mm=(-4.5, 3.5, 40.5))
    seg = mrml.labels_to_segmentation_node(labels, volume)
    fine = mrml.segmentation_node_to_labels(seg, volume).array
    assert (fine == lv.level_id("L2")).sum() == 8 * coarse.astype(bool).sum()
    expected = np.zeros(volume_image.shape, bool)
    expected[4:10, 6:14, 8:18] = True
    assert np.array_equal(fine == lv.level_id("L2"), expected)


def test_foreign_segment_names_and_terminology_are_recognised(ctx):
    image = oblique_image()
    volume = mrml.volume_node_from_image(image, ctx.scene, "CT")
    labels, _ = block_labels(image)
    seg = mrml.labels_to_segmentation_node(labels, volume)
    segmentation = seg.GetSegmentation()
    ids = mrml.segment_ids_by_level(seg)
    segmentation.GetSegment(ids["T12"]).SetName("vertebrae_T12")  # TotalSegmentator style
    segmentation.GetSegment(ids["L2"]).SetName("Segment_7")        # only the terminology says L2
    assert set(mrml.segment_ids_by_level(seg)) == {"T12", "L1", "L2"}
    assert np.array_equal(mrml.segmentation_node_to_labels(seg, volume).array, labels)


# --- table and chart ---------------------------------------------------------------------------
def test_table_node_units_and_values(ctx):
    import pandas as pd

    df = pd.DataFrame({"level": ["L1", "L2"], "vbmd_mg_cm3": [101.5, np.nan], "roi_voxels": [120, 0],
                       "body_volume_cm3": [30.2, 31.0], "height_anterior_mm": [25.0, 26.0],
                       "trabecular_hu_mean": [160.0, None], "genant_grade": pd.array([0, None], dtype="Int64"),
                       "flags": ["", "roi_small;truncated"]})
    node = mrml.table_node_from_dataframe(df, ctx.scene, "levels")
    assert node.GetNumberOfColumns() == len(df.columns)
    assert node.GetColumnUnitLabel("vbmd_mg_cm3") == "mg/cm3"
    assert node.GetColumnUnitLabel("body_volume_cm3") == "cm3"
    assert node.GetColumnUnitLabel("height_anterior_mm") == "mm"
    assert node.GetColumnUnitLabel("trabecular_hu_mean") == "HU"
    assert node.GetColumnUnitLabel("level") == ""
    assert mrml.table_column(node, "level") == ["L1", "L2"]
    vb = mrml.table_column(node, "vbmd_mg_cm3")
    assert vb[0] == pytest.approx(101.5) and np.isnan(vb[1])
    assert mrml.table_column(node, "roi_voxels") == [120, 0]
    grade = mrml.table_column(node, "genant_grade")
    assert grade[0] == 0 and np.isnan(grade[1])
    assert mrml.table_column(node, "flags") == ["", "roi_small;truncated"]


def test_chart_has_vbmd_and_acr_threshold_series(ctx):
    chart = mrml.vbmd_chart_node(["L2", "T12", "L1"], [90.0, 140.0, 75.0], ctx.scene, name="vBMD")
    series = mrml.chart_series(chart)
    assert list(series) == ["vBMD", "ACR 120 mg/cm3 (osteopenia below)", "ACR 80 mg/cm3 (osteoporosis below)"]
    assert series["vBMD"]["labels"] == ["T12", "L1", "L2"]  # cranio-caudal order
    assert series["vBMD"]["y"] == pytest.approx([140.0, 75.0, 90.0])
    assert series["vBMD"]["x"] == [0, 1, 2]
    assert series["ACR 120 mg/cm3 (osteopenia below)"]["y"] == pytest.approx([120.0] * 3)
    assert series["ACR 80 mg/cm3 (osteoporosis below)"]["y"] == pytest.approx([80.0] * 3)
    assert chart.GetYAxisTitle() == "vBMD (mg/cm3)"
    # Reusing the chart replaces its series (no pile-up on a second run).
    mrml.vbmd_chart_node(["L1"], [100.0], ctx.scene, chart_node=chart)
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    assert ctx.scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 3
    assert mrml.chart_series(chart)["vBMD"]["y"] == pytest.approx([100.0])


# --- small helpers -----------------------------------------------------------------------------
def test_dicom_age_and_sex_parsing():
    assert mrml.age_years_from_dicom("065Y") == 65
    assert mrml.age_years_from_dicom("018M") == pytest.approx(1.5)
    assert mrml.age_years_from_dicom("") is None and mrml.age_years_from_dicom("abc") is None
    assert mrml.sex_from_dicom("F") == "female" and mrml.sex_from_dicom("O") is None


class _FakeDicomDatabase:
    """What Slicer's ctkDICOMDatabase offers the prefill: instance UID -> file."""

    def __init__(self, files):
        import pydicom

        # (the anonymised test series has empty SOPInstanceUIDs: its file names stand in)
        self._files = {str(pydicom.dcmread(f, stop_before_pixels=True).get("SOPInstanceUID") or Path(f).name): str(f)
                       for f in files}

    def fileForInstance(self, uid):
        return self._files.get(uid, "")


def test_dicom_prefill_from_a_real_series(ctx):
    files = sorted(shared_data("ct_dicom_2mm", "dicom").iterdir())
    db = _FakeDicomDatabase(files)
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dicom CT")
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(db._files))
    defaults = SpineBMDLogic.defaultsFromDicom(volume, db)
    meta = defaults["metadata"]  # the data README: Siemens Biograph40 mCT, 120 kVp, Br38f, tags emptied
    assert meta["Manufacturer"] == "SIEMENS" and meta["KVP"] == 120.0 and meta["ConvolutionKernel"] == "Br38f"
    assert meta["Modality"] == "CT"
    assert defaults["age"] is None and defaults["sex"] is None
    # Not from DICOM / no database: nothing to prefill.
    assert SpineBMDLogic.defaultsFromDicom(volume, None) == {"age": None, "sex": None, "metadata": {}}


def test_dicom_prefill_age_and_sex(ctx, tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientAge, ds.PatientSex, ds.KVP = "CT", "067Y", "F", "100"
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    db = _FakeDicomDatabase([tmp_path / "x.dcm"])
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dicom CT")
    volume.SetAttribute("DICOM.instanceUIDs", str(ds.SOPInstanceUID))
    defaults = SpineBMDLogic.defaultsFromDicom(volume, db)
    assert defaults["age"] == 67 and defaults["sex"] == "F" and defaults["metadata"]["KVP"] == 100.0
    assert pydicom.dcmread(tmp_path / "x.dcm").PatientAge == "067Y"


def test_summary_line_states_pair_value_and_category():
    line = summary_line({"vbmd_l1_l2": 96.04, "levels_used": ["L1", "L2"], "category": "osteopenia",
                         "t_score": -2.1, "z_score": -0.4, "bmd_age": 71.2})
    assert line == "L1-L2 vBMD 96.0 mg/cm3 | osteopenia | T -2.1 | Z -0.4 | BMD age 71 y"
    assert "No lumbar pair" in summary_line({"vbmd_l1_l2": None})


def test_dependencies_install_only_after_consent():
    reqs = {"spinekit_surely_missing_pkg": "spinekit-surely-missing-pkg", "numpy": "numpy"}
    asked, installed = [], []
    assert dependencies.missing(reqs) == {"spinekit_surely_missing_pkg": "spinekit-surely-missing-pkg"}
    ok = dependencies.ensure(reqs, confirm=lambda msg: asked.append(msg) or False, installer=installed.append)
    assert ok is False and installed == [] and "spinekit-surely-missing-pkg" in asked[0]
    ok = dependencies.ensure(reqs, confirm=lambda msg: True, installer=installed.append)
    assert installed == [["spinekit-surely-missing-pkg"]] and ok is False  # still missing: fake installer
    assert dependencies.ensure({"numpy": "numpy"}, confirm=lambda m: 1 / 0, installer=lambda r: 1 / 0)


def test_background_run_reports_progress_and_cancel_sticks():
    def work(progress):
        for i in range(200):
            progress(i / 200, f"step {i}")
            time.sleep(0.005)
        return "finished"

    run = BackgroundRun(work).start()
    time.sleep(0.05)
    state = run.state()
    assert 0 < state.fraction < 1 and state.message.startswith("step")
    run.cancel()
    final = run.wait(5)
    assert final.done and final.cancelled and final.result is None
    done = BackgroundRun(lambda p: (p(0.5, "half"), "ok")[1]).start().wait(5)
    assert done.done and not done.cancelled and done.result == "ok"
    failed = BackgroundRun(lambda p: 1 / 0).start().wait(5)
    assert isinstance(failed.error, ZeroDivisionError) and "ZeroDivisionError" in failed.traceback


# --- the Logic on a phantom and on real CT -----------------------------------------------------
PHANTOM_DENSITIES = {"T12": 150.0, "L1": 110.0, "L2": 70.0, "L3": 130.0}
# vBMD through the MRML path must match the phantom truth to 10 mg/cm3 (measured: within 4).


@pytest.fixture(scope="module")
def phantom():
    phantom_mod = pytest.importorskip("spinekit.phantom", reason="CT phantom not available yet")
    if not hasattr(phantom_mod, "generate_ct_phantom"):
        pytest.skip("spinekit.phantom.generate_ct_phantom not available yet")
    cfg = phantom_mod.CTPhantomConfig(first_level="T12", last_level="L3", spacing_mm=(2.0, 2.0, 2.0),
                                      effective_kev=70, noise_hu=10, densities_mg_cm3=PHANTOM_DENSITIES,
                                      contrast_phase="native", seed=0)
    return phantom_mod.generate_ct_phantom(cfg)


def _phantom_run(phantom):
    ctx = mrml.new_scene()
    volume = mrml.volume_node_from_image(phantom.image, ctx.scene, "phantom CT")
    seg = mrml.labels_to_segmentation_node(phantom.vertebrae, volume, bodies=phantom.bodies)
    logic = SpineBMDLogic(ctx.scene)
    results = logic.process(volume, segmentationNode=seg, phase="native", age=65, sex="F")
    return ctx, volume, seg, logic, results


def test_logic_on_phantom_volume_node(phantom):
    ctx, volume, seg, logic, results = _phantom_run(phantom)
    # Segments: one per phantom level, over the right vertebra in RAS: the truth body centroid
    # (LPS, flipped to RAS) lies inside that level's segment and inside no other.
    levels = list(PHANTOM_DENSITIES)
    assert set(mrml.segment_ids_by_level(seg)) == set(levels)
    for level in levels:
        ras = mrml.lps_to_ras(np.asarray(phantom.truth["levels"][level]["centroid_lps_mm"]))
        assert [segment_contains_ras(seg, other, ras) for other in levels] == [other == level for other in levels]
        # ... and the segment's own centroid is closer to this level's truth than to any other's.
        centroid = segment_centroid_ras(seg, level)
        dist = {o: np.linalg.norm(centroid - mrml.lps_to_ras(np.asarray(phantom.truth["levels"][o]["centroid_lps_mm"])))
                for o in levels}
        assert min(dist, key=dist.get) == level
    # Table: levels.csv columns, units, the measured values, vBMD close to the truth.
    table = results.tableNode
    assert mrml.table_column(table, "level") == [r.level for r in results.bmd.levels]
    assert table.GetColumnUnitLabel("vbmd_mg_cm3") == "mg/cm3"
    assert table.GetColumnUnitLabel("body_volume_cm3") == "cm3"
    for level, density in PHANTOM_DENSITIES.items():
        row = mrml.table_column(table, "level").index(level)
        measured = mrml.table_column(table, "vbmd_mg_cm3")[row]
        assert measured == pytest.approx(results.level(level).vbmd_mg_cm3)
        assert measured == pytest.approx(density, abs=10.0), level
    # The measured trabecular ROIs are shown too, each inside its own level's body.
    roi = mrml.segmentation_node_to_labels(results.roiSegmentationNode, volume).array
    assert np.array_equal(roi, results.bmd.roi_labels)
    assert roi.any() and np.all(phantom.bodies.array[roi > 0] == roi[roi > 0])
    assert seg.GetNodeReference(mrml.ROI_REFERENCE_ROLE) is results.roiSegmentationNode
    # Chart: the same numbers, cranio-caudal.
    series = mrml.chart_series(results.chartNode)["vBMD"]
    assert series["labels"] == [r.level for r in sorted(results.bmd.levels, key=lambda r: lv.order_index(r.level))]
    assert results.summary_line.startswith("L1-L2 vBMD")
    assert json.loads(table.GetAttribute("spinekit.summary"))["levels_used"]


def test_logic_with_builtin_segmenter_and_cancel(phantom):
    ctx = mrml.new_scene()
    volume = mrml.volume_node_from_image(phantom.image, ctx.scene, "phantom CT")
    logic = SpineBMDLogic(ctx.scene)
    # Cancel sticks: the compute stops at its next progress call and returns nothing.
    inputs = logic.gather(volume, phase="native")
    run = BackgroundRun(lambda progress: SpineBMDLogic.compute(inputs, progress))
    run.cancel()
    state = run.start().wait(60)
    assert state.done and state.cancelled and state.result is None and state.error is None
    # No segmentation given: the builtin segmenter runs and its levels become the segments.
    results = logic.process(volume, phase="native")
    seg = results.segmentationNode
    found = set(mrml.segment_ids_by_level(seg))
    assert found >= {"L1", "L2"} and found <= set(PHANTOM_DENSITIES) | {"T11", "L4"}
    for level in found & set(PHANTOM_DENSITIES):
        ras = mrml.lps_to_ras(np.asarray(phantom.truth["levels"][level]["centroid_lps_mm"]))
        assert segment_contains_ras(seg, level, ras), level
    assert seg.GetNodeReference(mrml.BODIES_REFERENCE_ROLE) is not None  # bodies kept for recompute


def test_foreign_segmentation_without_bodies_gets_them_derived(phantom):
    """A segmentation made elsewhere (no stored bodies, TotalSegmentator-style names)."""
    ctx = mrml.new_scene()
    volume = mrml.volume_node_from_image(phantom.image, ctx.scene, "phantom CT")
    seg = mrml.labels_to_segmentation_node(phantom.vertebrae, volume)  # no bodies
    for level in PHANTOM_DENSITIES:
        seg.GetSegmentation().GetSegment(level).SetName(f"vertebrae_{level}")
    results = SpineBMDLogic(ctx.scene).process(volume, segmentationNode=seg, phase="native")
    assert any("derived" in w for w in results.warnings)
    for level, density in PHANTOM_DENSITIES.items():
        truth = phantom.truth["levels"][level]
        assert results.level(level).vbmd_mg_cm3 == pytest.approx(density, abs=10.0), level
        assert results.level(level).body_volume_cm3 == pytest.approx(truth["body_volume_cm3"], rel=0.10), level


def test_recompute_after_removing_voxels_from_one_segment(phantom):
    ctx, volume, seg, logic, first = _phantom_run(phantom)
    l1 = mrml.segment_mask(seg, "L1", volume)
    zs = np.nonzero(l1.any(axis=(1, 2)))[0]
    cut = l1.copy()
    cut[zs[len(zs) // 2]:] = False  # erase the cranial half of L1, as in Segment Editor
    mrml.set_segment_mask(seg, "L1", cut, volume)
    second = logic.recompute(volume, seg, phase="native", age=65, sex="F")
    assert second.segmentationNode is seg  # the user's edit is kept, not overwritten
    before, after = first.level("L1"), second.level("L1")
    assert after.body_volume_cm3 < 0.75 * before.body_volume_cm3
    assert after.roi_voxels < before.roi_voxels
    # (was `after.vbmd != before.vbmd`, true of None too): the ~8 mm left of the body holds no
    # trabecular ROI, so L1 gets no vBMD, says why, and the pair moves on to L2-L3
    assert before.vbmd_mg_cm3 == pytest.approx(PHANTOM_DENSITIES["L1"], abs=10.0)
    assert after.vbmd_mg_cm3 is None and {"roi_empty", "roi_small"} & set(after.flags)
    assert second.bmd.summary["levels_used"] == ["L2", "L3"]
    for level in ("T12", "L2", "L3"):  # untouched levels: same bodies, same volume
        assert second.level(level).body_volume_cm3 == pytest.approx(first.level(level).body_volume_cm3)
    # Paint the erased part back: L1's body is derived again from the repaired vertebra and
    # comes back to the phantom's body volume; the other levels keep their bodies.
    mrml.set_segment_mask(seg, "L1", l1, volume)
    third = logic.recompute(volume, seg, phase="native", age=65, sex="F")
    assert any("re-derived" in w and "L1" in w for w in third.warnings)
    truth = phantom.truth["levels"]["L1"]["body_volume_cm3"]
    assert third.level("L1").body_volume_cm3 == pytest.approx(truth, rel=0.10)
    assert third.level("L1").vbmd_mg_cm3 == pytest.approx(PHANTOM_DENSITIES["L1"], abs=10.0)
    for level in ("T12", "L2", "L3"):
        assert third.level(level).body_volume_cm3 == pytest.approx(first.level(level).body_volume_cm3)


def test_logic_on_real_ct_with_totalsegmentator_labels(tmp_path):
    ct_path = shared_data("ct_abdomen_3mm", "ct.nii.gz")
    from spinekit.image import read_image
    from spinekit.segmentation import segment

    image = read_image(ct_path)
    labels = segment(image, backend="labelmap", labels=shared_data("ct_abdomen_3mm", "ts_vertebrae.nii.gz"),
                     bodies=shared_data("ct_abdomen_3mm", "ts_vertebrae_body.nii.gz"))
    ctx = mrml.new_scene()
    volume = mrml.volume_node_from_image(image, ctx.scene, "abdomen")
    seg = mrml.labels_to_segmentation_node(labels.vertebrae, volume, bodies=labels.bodies)
    # Segments cover the TotalSegmentator vertebrae voxel for voxel (via Slicer's export).
    counts = mrml.segment_voxel_counts(seg, volume)
    ts = np.bincount(labels.vertebrae.array.ravel(), minlength=256)
    assert counts == {lv.level_name(v): int(ts[v]) for v in np.nonzero(ts[1:])[0] + 1}
    # L3 in RAS: the centroid of Slicer's segment equals the label map's LPS centroid flipped.
    zyx = np.argwhere(labels.vertebrae.array == lv.level_id("L3")).mean(axis=0)
    lps = image.index_to_physical(zyx[None])[0]
    assert np.allclose(segment_centroid_ras(seg, "L3"), mrml.lps_to_ras(lps), atol=0.01)

    report = json.loads(shared_data("ct_abdomen_3mm", "ts_spine_report.json").read_text())
    meta = report["metadata"]
    results = SpineBMDLogic(ctx.scene).process(volume, segmentationNode=seg, age=float(meta["PatientAge"]),
                                               sex=meta["PatientSex"])
    table_levels = mrml.table_column(results.tableNode, "level")
    volumes = mrml.table_column(results.tableNode, "body_volume_cm3")
    vbmd = mrml.table_column(results.tableNode, "vbmd_mg_cm3")
    core = results.bmd.levels_table().set_index("level")
    for level in ("L1", "L2", "L3", "L4", "L5"):
        row = table_levels.index(level)
        assert vbmd[row] == pytest.approx(core.loc[level, "vbmd_mg_cm3"])  # table = core result
        assert 20.0 < vbmd[row] < 300.0  # adult trabecular bone, any category
        assert volumes[row] == pytest.approx(core.loc[level, "body_volume_cm3"])
    assert results.bmd.summary["levels_used"] and results.bmd.summary["t_score"] is not None
    assert results.chartNode.GetNumberOfPlotSeriesNodes() == 3
    # Export: the written levels.csv holds the numbers the table node shows.
    import pandas as pd

    files = SpineBMDLogic.exportReport(results, tmp_path / "report")
    written = pd.read_csv(files["levels"])
    assert list(written["level"]) == table_levels
    assert np.allclose(written["vbmd_mg_cm3"].to_numpy(float), np.asarray(vbmd, float), equal_nan=True)
    assert files["summary"].is_file() and files["report"].is_file()


# --- the Slicer module file itself, with Qt stubbed out -----------------------------------------
@pytest.fixture
def stubbed_slicer_module(monkeypatch, ctx):
    """Import SpineBMD/SpineBMD.py with minimal stand-ins for the Qt-only parts of Slicer
    (ScriptedLoadableModule, i18n, parameterNodeWrapper, qt), on a real slicer-core scene."""
    import types

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    class _Logic(_Base):
        def getParameterNode(self):
            return ctx.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = slm.ScriptedLoadableModuleTest = _Base
    slm.ScriptedLoadableModuleLogic = _Logic
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *args: None
    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {"setInterval": lambda self, ms: None, "connect": lambda self, *a: None})
    for name, module in (("slicer.ScriptedLoadableModule", slm), ("slicer.i18n", i18n),
                         ("slicer.parameterNodeWrapper", pnw), ("qt", qt)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "mrmlScene", ctx.scene, raising=False)
    monkeypatch.delitem(sys.modules, "SpineBMD", raising=False)
    import importlib

    return importlib.import_module("SpineBMD")


def test_module_logic_runs_the_console_api(stubbed_slicer_module, ctx, phantom):
    SpineBMD = stubbed_slicer_module
    volume = mrml.volume_node_from_image(phantom.image, ctx.scene, "phantom CT")
    seg = mrml.labels_to_segmentation_node(phantom.vertebrae, volume, bodies=phantom.bodies)
    logic = SpineBMD.SpineBMDLogic()
    # waitForCompletion=False: a background run the caller polls, then finish() on the main thread.
    run = logic.process(volume, inputSegmentation=seg, phase="native", waitForCompletion=False)
    state = run.wait(120)
    assert state.done and state.error is None, state.traceback
    context = {"inputVolume": volume, "inputs": logic.core.gather(volume, seg, phase="native"),
               "segmentationNode": seg, "outputSegmentation": None, "outputTable": None, "outputChart": None}
    results = logic.finish(state.result, context)
    assert results.segmentationNode is seg and results.tableNode is not None
    assert mrml.table_column(results.tableNode, "vbmd_mg_cm3")[mrml.table_column(results.tableNode, "level").index("L1")] \
        == pytest.approx(PHANTOM_DENSITIES["L1"], abs=10.0)
    # Blocking call: the same numbers.
    blocking = logic.process(volume, inputSegmentation=seg, phase="native")
    assert blocking.level("L1").vbmd_mg_cm3 == pytest.approx(results.level("L1").vbmd_mg_cm3)


class _FakeWidget:
    """Stands in for a Qt widget: properties are plain attributes, methods do nothing."""

    def __init__(self, **props):
        self.enabled, self.text, self.toolTip, self.value, self.visible = True, "", "", 0, True
        self.__dict__.update(props)

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def __getattr__(self, name):  # connect, setFormat, ...
        return lambda *args, **kwargs: None


def test_widget_apply_cancel_recompute_flow(stubbed_slicer_module, ctx, phantom, monkeypatch):
    """The Widget's Apply -> poll -> results, Apply-as-Cancel and Recompute, Qt stubbed."""
    import contextlib
    import types

    SpineBMD = stubbed_slicer_module

    @contextlib.contextmanager
    def plain(*args, **kwargs):  # errors surface in the test instead of a message box
        yield

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", plain)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append((text, kw)))
    shown = []
    monkeypatch.setattr(SpineBMD.SpineBMDLogic, "showInViews", staticmethod(shown.append))
    sys.modules["qt"].QTimer.start = sys.modules["qt"].QTimer.stop = lambda self, *a: None

    volume = mrml.volume_node_from_image(phantom.image, ctx.scene, "phantom CT")
    seg = mrml.labels_to_segmentation_node(phantom.vertebrae, volume, bodies=phantom.bodies)
    widget = SpineBMD.SpineBMDWidget()
    widget.ui = types.SimpleNamespace(**{n: _FakeWidget() for n in (
        "applyButton", "recomputeButton", "exportButton", "progressBar", "statusLabel")})
    widget.logic = SpineBMD.SpineBMDLogic()
    widget._parameterNode = types.SimpleNamespace(
        inputVolume=volume, inputSegmentation=seg, calibration="phantomless", calibrationTable=".",
        contrastPhase="native",
        roiMode="whole", age=65.0, sex="F", outputSegmentation=None, outputTable=None, outputChart=None)

    def run_to_end():
        for _ in range(600):
            if widget._run is None:
                return
            time.sleep(0.1)
            widget._poll()
        raise AssertionError("the background run did not finish")

    widget._checkCanApply()
    assert widget.ui.applyButton.enabled and widget.ui.applyButton.text == "Apply"
    assert not widget.ui.recomputeButton.enabled or widget._parameterNode.inputSegmentation is not None
    assert not widget.ui.exportButton.enabled  # nothing to export yet

    widget.onApplyButton()
    assert widget.ui.applyButton.text == "Cancel" and widget.ui.progressBar.visible
    run_to_end()
    assert not errors, errors
    assert widget.ui.applyButton.text == "Apply" and not widget.ui.progressBar.visible
    assert widget.ui.statusLabel.text.startswith("L1-L2 vBMD") and "mg/cm3" in widget.ui.statusLabel.text
    assert widget.ui.statusLabel.toolTip == "\n".join(widget._results.warnings)
    assert widget._parameterNode.outputTable is not None and widget._parameterNode.outputChart is not None
    assert widget._parameterNode.outputSegmentation is seg and len(shown) == 1
    assert widget.ui.exportButton.enabled and widget.ui.recomputeButton.enabled
    first_l1 = widget._results.level("L1")

    # Apply again, and press the same button (now Cancel) at once: the run stops, nothing shown.
    widget.onApplyButton()
    widget.onApplyButton()
    run_to_end()
    assert widget.ui.statusLabel.text == "Cancelled." and len(shown) == 1 and not errors

    # Edit L1 and Recompute: the user's node is measured as it is now.
    l1 = mrml.segment_mask(seg, "L1", volume)
    zs = np.nonzero(l1.any(axis=(1, 2)))[0]
    l1[zs[len(zs) // 2]:] = False
    mrml.set_segment_mask(seg, "L1", l1, volume)
    widget.onRecomputeButton()
    run_to_end()
    assert not errors, errors
    assert widget._results.segmentationNode is seg
    assert widget._results.level("L1").body_volume_cm3 < 0.75 * first_l1.body_volume_cm3
    assert np.array_equal(mrml.segment_mask(seg, "L1", volume), l1)  # the edit was not overwritten
    # A volume that is not a CT in HU: the user sees one sentence, no traceback.
    not_ct = mrml.volume_node_from_image(phantom.image.with_array(np.abs(phantom.image.array) + 1), ctx.scene, "MR")
    widget._parameterNode.inputVolume, widget._parameterNode.inputSegmentation = not_ct, None
    widget.onApplyButton()
    run_to_end()
    assert widget.ui.statusLabel.text == "Failed." and len(errors) == 1
    text, extra = errors[0]
    assert "Hounsfield" in text and not extra.get("detailedText") and text.count(".") == 1
    widget._parameterNode.inputVolume, widget._parameterNode.inputSegmentation = volume, seg
    # Re-runs reuse their nodes: the vertebrae + one ROI segmentation, one table, one chart.
    assert ctx.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 2
    assert ctx.scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 1
    assert ctx.scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 3
