"""Image / labels / results <-> MRML nodes: the only place where LPS meets RAS.

Works inside Slicer (``slicer.mrmlScene``) and in plain Python with the ``slicer-core`` wheel
(``new_scene()`` builds a scene with the module logics a bare scene lacks). ``slicer`` and
``vtk`` are imported lazily, inside the functions, so ``import spinekit.mrml`` never needs them.

Conventions:
- ``spinekit`` works in LPS; a volume node's IJK-to-RAS matrix is ``diag(-1,-1,1) @ [D*S | o]``
  of the Image's LPS geometry. Both keep the voxel array in [k, j, i] = [z, y, x] order, so the
  array itself is shared as is.
- Segmentations: one segment per level, segment ID and name = level name ("L1"), the level's
  colour from ``spinekit.levels.colour`` and a DICOM terminology entry with its SNOMED code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from . import levels as lv
from .errors import InputError
from .image import Image

# LPS <-> RAS: flip the first two axes (the matrix is its own inverse).
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])

# Terminology contexts Slicer ships (DICOM master lists); the codes themselves are what matters.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

# ACR / ISCD QCT thresholds drawn on the vBMD chart (mg/cm3).
ACR_THRESHOLDS_MG_CM3 = {"osteopenia below": 120.0, "osteoporosis below": 80.0}

# Attribute / reference names that tie result nodes together (so "recompute" needs no state).
BODIES_REFERENCE_ROLE = "spinekit.bodies"
ROI_REFERENCE_ROLE = "spinekit.roi"
VERTEBRAE_REFERENCE_ROLE = "spinekit.vertebrae"
SOURCE_ATTRIBUTE = "spinekit.source"
METADATA_ATTRIBUTE = "spinekit.metadata"


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """LPS points (N x 3) -> RAS points."""
    return np.asarray(points, dtype=float) @ RAS_FROM_LPS.T


ras_to_lps = lps_to_ras  # the flip is an involution


# --- scene ---------------------------------------------------------------------------------
@dataclass
class MRMLContext:
    """A scene plus the module logics registered on it (kept alive together)."""

    scene: Any
    application_logic: Any = None
    segmentations_logic: Any = None
    subject_hierarchy_logic: Any = None
    colour_logic: Any = None


def new_scene() -> MRMLContext:
    """A fresh MRML scene with the segmentations and subject-hierarchy logics registered.

    Plain Python only (slicer-core wheel); inside Slicer use ``slicer.mrmlScene``.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    sh_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    sh_logic.SetMRMLApplicationLogic(app)
    sh_logic.SetMRMLScene(scene)
    app.SetModuleLogic("SubjectHierarchy", sh_logic)
    # Colour logic: default colour tables (label-map display nodes look one up).
    colour_logic = slicer.vtkMRMLColorLogic()
    colour_logic.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colour_logic)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLApplicationLogic(app)
    seg_logic.SetMRMLScene(scene)
    app.SetModuleLogic("Segmentations", seg_logic)
    return MRMLContext(scene, app, seg_logic, sh_logic, colour_logic)


# --- geometry ------------------------------------------------------------------------------
def ijk_to_ras_matrix(image: Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an Image (IJK = x, y, z index order)."""
    if image.ndim != 3:
        raise InputError(f"a 3D image is needed for a volume node, got {image.ndim}D.")
    m = np.eye(4)
    m[:3, :3] = RAS_FROM_LPS @ image.direction @ np.diag(image.spacing_mm)
    m[:3, 3] = RAS_FROM_LPS @ np.asarray(image.origin_mm)
    return m


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """(spacing_mm, origin_mm (LPS), direction (LPS)) from a 4x4 IJK-to-RAS matrix."""
    matrix = np.asarray(matrix, dtype=float)
    lps = RAS_FROM_LPS @ matrix[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = RAS_FROM_LPS @ matrix[:3, 3]
    return tuple(spacing), tuple(origin), direction


def _vtk_matrix(m: np.ndarray):
    import vtk

    vm = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            vm.SetElement(i, j, float(m[i, j]))
    return vm


def _numpy_matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(i, j) for j in range(4)] for i in range(4)])


def _volume_ijk_to_ras(node) -> np.ndarray:
    import vtk

    vm = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vm)
    m = _numpy_matrix(vm)
    # A parent transform moves the volume in the views; only a linear one can be honoured.
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"volume '{node.GetName()}' is under a non-linear transform; harden it first.")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        m = _numpy_matrix(to_world) @ m
    return m


def image_from_volume_node(node, metadata: Optional[dict] = None) -> Image:
    """A volume node (scalar or label map) -> Image in LPS. The array is copied."""
    if node is None or node.GetImageData() is None:
        name = node.GetName() if node is not None else "None"
        raise InputError(f"volume '{name}' has no voxel data.")
    image_data = node.GetImageData()
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume '{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} "
                         "components; a single-component (grey or label) volume is needed.")
    array = array_from_volume_node(node)
    spacing, origin, direction = geometry_from_ijk_to_ras(_volume_ijk_to_ras(node))
    meta = {"name": node.GetName()}
    stored = node.GetAttribute(METADATA_ATTRIBUTE)
    if stored:
        meta.update(json.loads(stored))
    meta.update(metadata or {})
    return Image(array=array, spacing_mm=spacing, origin_mm=origin, direction=direction, metadata=meta)


def volume_node_from_image(image: Image, scene, name: str = "Volume", node=None, labelmap: bool = False):
    """Image -> new (or updated) scalar / label-map volume node; the array is copied."""
    import vtk
    from vtk.util import numpy_support

    if node is None:
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(cls, name)
    array = np.ascontiguousarray(image.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image_data = vtk.vtkImageData()
    nz, ny, nx = array.shape
    image_data.SetDimensions(nx, ny, nz)
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node.SetAndObserveImageData(image_data)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(image)))
    # Keep the DICOM facts (scanner, age, sex, phantom flag) with the node, so a round trip
    # through MRML loses nothing the calibration or the report reads.
    meta = {k: v for k, v in image.metadata.items() if k != "name" and _json_safe(v)}
    if meta:
        node.SetAttribute(METADATA_ATTRIBUTE, json.dumps(meta))
    return node


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def array_from_volume_node(node) -> np.ndarray:
    """The voxel array ([z, y, x]) of a volume node, copied."""
    from vtk.util import numpy_support

    image_data = node.GetImageData()
    nx, ny, nz = image_data.GetDimensions()
    return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()


# --- subject hierarchy ---------------------------------------------------------------------
def subject_hierarchy_item(node) -> int:
    """The node's subject-hierarchy item, created under the scene when missing.

    (Inside Slicer items are created automatically; a plain slicer-core scene does not.)"""
    sh = node.GetScene().GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def place_beside(node, reference_node) -> int:
    """Put ``node`` under the same subject-hierarchy parent (study/patient) as the reference."""
    sh = node.GetScene().GetSubjectHierarchyNode()
    parent = sh.GetItemParent(subject_hierarchy_item(reference_node))
    item = subject_hierarchy_item(node)
    if parent and sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)
    return item


# --- terminology ---------------------------------------------------------------------------
def terminology_entry(level: str) -> str:
    """Slicer's serialized terminology entry of a level (SNOMED CT vertebra code)."""
    import slicer

    t = lv.terminology(level)
    cat_scheme, cat_code, cat_meaning = t.category
    type_scheme, type_code, type_meaning = t.type
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, cat_code, cat_scheme, cat_meaning, type_code, type_scheme, type_meaning,
        "", "", "", ANATOMIC_CONTEXT, "", "", "", "", "", "")


def parse_terminology(entry: str) -> dict[str, tuple[str, str, str]]:
    """{'category': (scheme, code, meaning), 'type': ...} from a serialized terminology entry."""
    parts = (entry or "").split("~")
    out = {}
    for key, i in (("category", 1), ("type", 2)):
        if len(parts) > i:
            fields = (parts[i].split("^") + ["", "", ""])[:3]
            out[key] = tuple(fields)
    return out


_SNOMED_TO_LEVEL = {code: name for name, (code, _m) in lv.SNOMED.items() if name not in ("T13", "L6")}
_LEVEL_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(C[1-7]|T1[0-3]|T[1-9]|L[1-6]|sacrum|S1?)(?![0-9A-Za-z])", re.IGNORECASE)


def level_of_segment(segment) -> Optional[str]:
    """Level name of a segment: from its name ("L1", "vertebrae_L1", "L1 vertebra") first,
    then from the SNOMED code in its terminology (TotalSegmentator names segments otherwise)."""
    match = _LEVEL_IN_NAME.search(segment.GetName() or "")
    if match:
        try:
            return lv.level_name(lv.level_id(match.group(1)))
        except InputError:
            pass
    code = parse_terminology(segment.GetTerminology()).get("type", ("", "", ""))[1]
    return _SNOMED_TO_LEVEL.get(code)


def style_segment(segment, level: str) -> None:
    """Name, colour and terminology of a level's segment."""
    segment.SetName(level)
    segment.SetColor(*lv.colour(level))
    segment.SetTerminology(terminology_entry(level))


# --- labels <-> segmentation ---------------------------------------------------------------
def on_volume_grid(array: np.ndarray, volume_node, what: str = "label array") -> Image:
    """An array ([z, y, x]) on a volume node's grid as an Image, without copying the volume."""
    array = np.asarray(array)
    nx, ny, nz = volume_node.GetImageData().GetDimensions()
    if array.shape != (nz, ny, nx):
        raise InputError(f"{what} shape {array.shape} does not match volume "
                         f"'{volume_node.GetName()}' shape {(nz, ny, nx)}.")
    spacing, origin, direction = geometry_from_ijk_to_ras(_volume_ijk_to_ras(volume_node))
    return Image(array=array, spacing_mm=spacing, origin_mm=origin, direction=direction)


def _as_labels(labels, volume_node) -> Image:
    if isinstance(labels, Image):
        return labels
    return on_volume_grid(labels, volume_node)


def _keep_only(labels: np.ndarray, ids: list[int]) -> np.ndarray:
    """uint8 labels with every value outside ``ids`` set to 0 (a lookup table: one pass)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        return np.where(np.isin(labels, ids), labels, 0).astype(np.uint8)
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.uint8)
    lut[[i for i in ids if i < lut.size]] = [i for i in ids if i < lut.size]
    return lut[labels]


def labels_to_segmentation_node(labels, volume_node, name: Optional[str] = None, node=None,
                                bodies=None):
    """VerSe label map (Image on any grid, or an array on the volume's grid) -> segmentation node.

    One segment per level present (ID and name "L1", standard colour, SNOMED terminology),
    reference geometry from ``volume_node`` and the node placed beside it in the subject
    hierarchy. An existing ``node`` is cleared and refilled. ``bodies`` (vertebral-body labels,
    VerSe ids) are kept as a hidden label-map node referenced by the segmentation, so a later
    recompute measures the same bodies minus whatever the user erased.
    """
    import slicer

    scene = volume_node.GetScene()
    labels = _as_labels(labels, volume_node)
    ids = sorted((int(v) for v in np.unique(labels.array) if int(v) in lv.VERSE_NAMES),
                 key=lambda v: lv.order_index(lv.level_name(v)))
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} vertebrae")
        node.CreateDefaultDisplayNodes()
    elif name:
        node.SetName(name)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    # One shared labelmap (Slicer's layer model): every segment references the same oriented
    # image and is told its label value; segment ID = name = level.
    clean = _keep_only(labels.array, ids)
    temp = volume_node_from_image(labels.with_array(clean), scene, "__spinekit_labels__", labelmap=True)
    try:
        oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(temp)
    finally:
        display = temp.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(temp)
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    was_modifying = node.StartModify()
    for vid in ids:
        level = lv.level_name(vid)
        segment = slicer.vtkSegment()
        segment.SetLabelValue(vid)
        segment.AddRepresentation(representation, oriented)
        style_segment(segment, level)
        segmentation.AddSegment(segment, level)
    node.EndModify(was_modifying)
    node.SetAttribute(SOURCE_ATTRIBUTE, "spinekit")
    if bodies is not None:
        set_bodies(node, bodies, volume_node, vertebrae=labels)
    place_beside(node, volume_node)
    return node


def _hidden_labels(segmentation_node, role: str, labels: Image, suffix: str):
    scene = segmentation_node.GetScene()
    node = segmentation_node.GetNodeReference(role)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segmentation_node.GetName()} {suffix}")
        node.SetHideFromEditors(True)
        segmentation_node.SetNodeReferenceID(role, node.GetID())
    volume_node_from_image(labels.with_array(np.asarray(labels.array).astype(np.uint8)), scene, node=node)
    return node


def set_bodies(segmentation_node, bodies, volume_node, vertebrae=None):
    """Store vertebral-body labels (VerSe ids) as a hidden label map referenced by the node,
    with the vertebra labels they belong to (so a later edit can be told apart: erased voxels
    leave the body, painted ones get a body derived for that level)."""
    bodies_node = _hidden_labels(segmentation_node, BODIES_REFERENCE_ROLE, _as_labels(bodies, volume_node),
                                 "bodies")
    if vertebrae is None:
        vertebrae = segmentation_node_to_labels(segmentation_node, volume_node)
    _hidden_labels(segmentation_node, VERTEBRAE_REFERENCE_ROLE, _as_labels(vertebrae, volume_node),
                   "vertebrae at measurement")
    return bodies_node


def segment_ids_by_level(segmentation_node) -> dict[str, str]:
    """{level: segment ID} for the segments that name a level (others are ignored)."""
    segmentation = segmentation_node.GetSegmentation()
    out: dict[str, str] = {}
    for i in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(i)
        level = level_of_segment(segmentation.GetSegment(seg_id))
        if level is not None and level not in out:
            out[level] = seg_id
    return out


def segment_mask(segmentation_node, level: str, volume_node) -> np.ndarray:
    """Boolean mask ([z, y, x], volume grid) of one level's segment."""
    labels = segmentation_node_to_labels(segmentation_node, volume_node)
    return labels.array == lv.level_id(level)


def set_segment_mask(segmentation_node, level: str, mask: np.ndarray, volume_node) -> None:
    """Replace one level's segment by a mask on the volume grid (what a Segment Editor edit
    does; also the console way to edit a segment)."""
    import slicer

    seg_id = segment_ids_by_level(segmentation_node).get(level)
    if seg_id is None:
        raise InputError(f"segmentation '{segmentation_node.GetName()}' has no segment for {level}.")
    scene = volume_node.GetScene()
    mask = on_volume_grid(np.asarray(mask, dtype=bool).astype(np.uint8), volume_node, "mask")
    temp = volume_node_from_image(mask, scene, "__spinekit_mask__", labelmap=True)
    try:
        oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(temp)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(oriented, segmentation_node, seg_id, logic.MODE_REPLACE,
                                                oriented.GetExtent()):
            raise RuntimeError(f"Slicer could not update segment {level}.")
    finally:
        scene.RemoveNode(temp)


def segmentation_node_to_labels(segmentation_node, volume_node) -> Image:
    """Segmentation node -> VerSe label Image on the volume's grid (the reverse path).

    Segments are matched to levels by name or terminology; segments naming no level are left
    out. Raises InputError when no segment names a vertebra level.
    """
    import slicer
    import vtk

    by_level = segment_ids_by_level(segmentation_node)
    if not by_level:
        raise InputError(f"segmentation '{segmentation_node.GetName()}' has no segment named after "
                         "a vertebra level (e.g. L1) or tagged with a vertebra terminology code.")
    order = sorted(by_level, key=lv.order_index)
    seg_ids = vtk.vtkStringArray()
    for level in order:
        seg_ids.InsertNextValue(by_level[level])
    scene = volume_node.GetScene()
    temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__spinekit_export__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, seg_ids, temp, volume_node)
        if not ok:
            raise RuntimeError("Slicer could not export the segmentation to a label map.")
        exported = image_from_volume_node(temp)
    finally:
        display = temp.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(temp)
    # Exported values are 1..N in the order given: map them to VerSe ids.
    lut = np.zeros(len(order) + 1, dtype=np.uint8)
    for i, level in enumerate(order):
        lut[i + 1] = lv.level_id(level)
    values = exported.array if exported.array.dtype.kind in "iu" else exported.array.astype(np.int64)
    out = on_volume_grid(lut[values], volume_node)  # small ints index the table directly
    out.metadata["name"] = segmentation_node.GetName()
    return out


def bodies_of(segmentation_node, volume_node, role: str = BODIES_REFERENCE_ROLE) -> Optional[Image]:
    """The stored vertebral-body labels of a SpineKit segmentation node (None if absent or not
    on the volume's grid); ``role=VERTEBRAE_REFERENCE_ROLE`` gives the vertebrae they came from."""
    bodies_node = segmentation_node.GetNodeReference(role)
    if bodies_node is None or bodies_node.GetImageData() is None:
        return None
    bodies = image_from_volume_node(bodies_node)
    nx, ny, nz = volume_node.GetImageData().GetDimensions()
    # Same grid as the volume (shape first: on_volume_grid refuses other shapes).
    if bodies.shape != (nz, ny, nx) or not bodies.same_grid(on_volume_grid(bodies.array, volume_node)):
        return None
    return bodies


def segment_voxel_counts(segmentation_node, volume_node) -> dict[str, int]:
    """{level: voxels} on the volume grid (for checks and the summary)."""
    labels = segmentation_node_to_labels(segmentation_node, volume_node)
    counts = np.bincount(labels.array.ravel().astype(np.int64), minlength=256)
    return {lv.level_name(v): int(counts[v]) for v in np.nonzero(counts[1:])[0] + 1 if v in lv.VERSE_NAMES}


# --- tables and charts ---------------------------------------------------------------------
_UNIT_SUFFIXES = (("_mg_cm3", "mg/cm3"), ("_cm3", "cm3"), ("_mm", "mm"), ("_hu", "HU"), ("_kev", "keV"),
                  ("_years", "years"), ("_voxels", "voxels"))


def unit_of(column: str) -> str:
    """Unit of a column from the name's suffix (house rule: names carry units)."""
    low = column.lower()
    for suffix, unit in _UNIT_SUFFIXES:
        if low.endswith(suffix):
            return unit
    if "_hu_" in low:  # trabecular_hu_mean, trabecular_hu_median
        return "HU"
    return ""


def table_node_from_records(columns: dict[str, Iterable], scene, name: str = "Table", node=None,
                            units: Optional[dict[str, str]] = None, descriptions: Optional[dict[str, str]] = None):
    """{column: values} -> vtkMRMLTableNode with typed columns and unit labels."""
    import vtk

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = vtk.vtkTable()
    for col, values in columns.items():
        values = list(values)
        kinds = {type(v) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))}
        numeric = values and all(issubclass(k, (int, float, np.integer, np.floating)) and not issubclass(k, bool)
                                 for k in kinds) and kinds
        integer = numeric and all(issubclass(k, (int, np.integer)) for k in kinds) and None not in values
        if integer:
            arr = vtk.vtkIntArray()
        elif numeric:
            arr = vtk.vtkDoubleArray()
        else:
            arr = vtk.vtkStringArray()
        arr.SetName(str(col))
        for v in values:
            if integer:
                arr.InsertNextValue(int(v))
            elif numeric:
                arr.InsertNextValue(float("nan") if v is None else float(v))
            else:
                arr.InsertNextValue("" if v is None else (";".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)))
        table.AddColumn(arr)
    node.SetAndObserveTable(table)
    for col in columns:
        unit = (units or {}).get(col, unit_of(str(col)))
        if unit:
            node.SetColumnUnitLabel(str(col), unit)
        if descriptions and col in descriptions:
            node.SetColumnDescription(str(col), descriptions[col])
    return node


def table_node_from_dataframe(df, scene, name: str = "Table", node=None, units=None, descriptions=None):
    """pandas DataFrame -> vtkMRMLTableNode (units from the column-name suffixes)."""
    columns = {c: [None if _missing(v) else (v.item() if hasattr(v, "item") else v) for v in df[c].tolist()]
               for c in df.columns}
    return table_node_from_records(columns, scene, name, node, units, descriptions)


def _missing(v) -> bool:
    # None, float NaN and pandas' NA (nullable integer columns such as the Genant grade)
    return v is None or (isinstance(v, float) and np.isnan(v)) or type(v).__name__ == "NAType"


def set_column_titles(table_node, titles: dict[str, str]) -> None:
    """Readable column headers (the column names stay machine-readable)."""
    for column, title in titles.items():
        if table_node.GetTable().GetColumnByName(column) is None:
            continue
        if hasattr(table_node, "SetColumnTitle"):  # Slicer >= 5.8
            table_node.SetColumnTitle(column, title)
        else:
            table_node.SetColumnLongName(column, title)
    if hasattr(table_node, "SetUseColumnTitleAsColumnHeader"):
        table_node.SetUseColumnTitleAsColumnHeader(True)


def table_column(table_node, column: str) -> list:
    """Values of one column of a table node (numbers as float/int, else str)."""
    table = table_node.GetTable()
    arr = table.GetColumnByName(column)
    if arr is None:
        raise KeyError(column)
    if arr.IsA("vtkStringArray"):
        return [arr.GetValue(i) for i in range(arr.GetNumberOfValues())]
    return [arr.GetValue(i) for i in range(arr.GetNumberOfTuples())]


def vbmd_chart_node(level_names: list[str], vbmd_mg_cm3: list[float], scene, name: str = "vBMD",
                    chart_node=None, reference_node=None):
    """Plot chart of vBMD per level with the ACR thresholds (120 and 80 mg/cm3) as lines.

    Returns the chart node; its data live in a table node "<name> chart data" and three plot
    series: "vBMD", "ACR 120 mg/cm3", "ACR 80 mg/cm3"."""
    order = sorted(range(len(level_names)), key=lambda i: lv.order_index(level_names[i]))
    names = [level_names[i] for i in order]
    values = [float(vbmd_mg_cm3[i]) if vbmd_mg_cm3[i] is not None else float("nan") for i in order]
    columns = {
        "level_index": list(range(len(names))),
        "level": names,
        "vbmd_mg_cm3": values,
        "acr_osteopenia_mg_cm3": [ACR_THRESHOLDS_MG_CM3["osteopenia below"]] * len(names),
        "acr_osteoporosis_mg_cm3": [ACR_THRESHOLDS_MG_CM3["osteoporosis below"]] * len(names),
    }
    data = None
    if chart_node is not None and chart_node.GetNthPlotSeriesNode(0) is not None:
        data = chart_node.GetNthPlotSeriesNode(0).GetTableNode()
    data = table_node_from_records(columns, scene, f"{name} chart data", node=data)
    if chart_node is None:
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    # A re-run replaces the series (the old series nodes leave the scene, no pile-up).
    old = [chart_node.GetNthPlotSeriesNode(i) for i in range(chart_node.GetNumberOfPlotSeriesNodes())]
    chart_node.RemoveAllPlotSeriesNodeIDs()
    for series in old:
        if series is not None:
            scene.RemoveNode(series)
    specs = (("vBMD", "vbmd_mg_cm3", (0.85, 0.33, 0.10), True),
             ("ACR 120 mg/cm3 (osteopenia below)", "acr_osteopenia_mg_cm3", (0.95, 0.65, 0.1), False),
             ("ACR 80 mg/cm3 (osteoporosis below)", "acr_osteoporosis_mg_cm3", (0.8, 0.1, 0.1), False))
    for title, column, rgb, markers in specs:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
        series.SetAndObserveTableNodeID(data.GetID())
        series.SetXColumnName("level_index")
        series.SetYColumnName(column)
        series.SetLabelColumnName("level")
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle if markers else series.MarkerStyleNone)
        series.SetLineStyle(series.LineStyleSolid if markers else series.LineStyleDash)
        series.SetColor(*rgb)
        chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
    chart_node.SetTitle("Trabecular vBMD per level")
    chart_node.SetXAxisTitle("level")
    chart_node.SetYAxisTitle("vBMD (mg/cm3)")
    if reference_node is not None:
        place_beside(data, reference_node)
        place_beside(chart_node, reference_node)
    return chart_node


def chart_series(chart_node) -> dict[str, dict[str, list]]:
    """{series name: {'x': [...], 'y': [...], 'labels': [...]}} of a chart (for checks)."""
    out = {}
    for i in range(chart_node.GetNumberOfPlotSeriesNodes()):
        series = chart_node.GetNthPlotSeriesNode(i)
        table = series.GetTableNode()
        out[series.GetName()] = {
            "x": table_column(table, series.GetXColumnName()),
            "y": table_column(table, series.GetYColumnName()),
            "labels": table_column(table, series.GetLabelColumnName()) if series.GetLabelColumnName() else [],
        }
    return out


# --- DICOM facts for prefilling --------------------------------------------------------------
def dicom_metadata_of(volume_node, database=None) -> dict[str, Any]:
    """DICOM facts of a volume loaded from DICOM (age, sex, scanner) for prefilling the inputs
    and for the asynchronous calibration, with the same keys and types as
    ``spinekit.image.read_image`` gives (KVP float, PatientSex 'F'/'M'/'O', age_years).

    ``database`` is Slicer's DICOM database (``slicer.dicomDatabase``) or anything with
    ``fileForInstance(uid)``; without it (or for a non-DICOM volume) an empty dict comes back.
    """
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or database is None:
        return {}
    path = database.fileForInstance(uids[0])
    if not path:
        return {}
    import pydicom

    from .image import EXTRA_KEYWORDS, METADATA_KEYWORDS, _empty_metadata, _metadata_from_values

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = {k: ds.get(k) for k in METADATA_KEYWORDS + EXTRA_KEYWORDS if ds.get(k) not in (None, "")}
    return _metadata_from_values(values, _empty_metadata("dicom", None))


def age_years_from_dicom(value: Optional[str]) -> Optional[float]:
    """DICOM PatientAge ('065Y', '018M', '030W', '200D') -> years."""
    from .image import parse_age_years

    return parse_age_years(value)


def sex_from_dicom(value: Optional[str]) -> Optional[str]:
    """DICOM PatientSex ('F'/'M'/'O') -> 'female' / 'male' / None."""
    v = (value or "").strip().upper()
    return {"F": "female", "M": "male"}.get(v)
