"""SpineBMD logic without Qt: MRML nodes in, spinekit core call, MRML nodes out.

Everything here runs inside Slicer and in plain Python with the slicer-core wheel, so the same
calls are the console API and what the tests exercise. The module's Widget only gathers inputs,
runs ``compute`` in a background thread and calls ``show`` on the main thread.

Console example (Slicer Python console)::

    from SpineBMDLib.logic import SpineBMDLogic
    logic = SpineBMDLogic()
    results = logic.process(getNode("CT"), age=67, sex="F")
    print(results.summary_line)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from spinekit import levels as lv
from spinekit import mrml
from spinekit.errors import InputError
from spinekit.image import Image
from spinekit.progress import Progress, report, scaled

CALIBRATION_MODES = ("phantomless", "asynchronous")  # "phantom" needs rod masks: console only
PHASES = ("auto", "native", "arterial", "portal-venous")
ROI_MODES = ("whole", "mid")
SEXES = ("", "F", "M")

# Plain-language column titles for the table node (units come from the column names).
COLUMN_TITLES = {
    "level": "Level",
    "vbmd_mg_cm3": "vBMD",
    "trabecular_hu_mean": "Trabecular HU (mean)",
    "trabecular_hu_median": "Trabecular HU (median)",
    "roi_voxels": "ROI voxels",
    "body_volume_cm3": "Body volume",
    "height_anterior_mm": "Anterior height",
    "height_middle_mm": "Middle height",
    "height_posterior_mm": "Posterior height",
    "genant_grade": "Genant grade",
    "flags": "Flags",
}


@dataclass
class SpineBMDInputs:
    """What the compute step needs, gathered from MRML on the main thread."""

    image: Image
    segmentation: Any = None          # spinekit SegmentationResult or None (builtin segmenter)
    options: Any = None               # spinekit.bmd.pipeline.BMDOptions
    from_existing_segmentation: bool = False


@dataclass
class SpineBMDResults:
    """Everything one run produced: the core result and the MRML nodes showing it."""

    bmd: Any                          # spinekit.bmd.pipeline.BMDResult
    image: Image
    segmentationNode: Any = None
    tableNode: Any = None
    chartNode: Any = None
    roiSegmentationNode: Any = None   # the trabecular ROIs measured (QC)
    summary_line: str = ""
    warnings: list[str] = field(default_factory=list)

    def level(self, name: str):
        for rec in self.bmd.levels:
            if rec.level == name:
                return rec
        return None


def summary_line(summary: dict) -> str:
    """One line for the GUI and the console: L1-L2 vBMD and the ACR category."""
    vbmd = summary.get("vbmd_l1_l2")
    used = summary.get("levels_used") or []
    used_txt = "-".join(used) if isinstance(used, (list, tuple)) else str(used)
    if vbmd is None:
        return "No lumbar pair available: per-level values only (see warnings)."
    parts = [f"{used_txt or 'L1-L2'} vBMD {float(vbmd):.1f} mg/cm3"]
    if summary.get("category"):
        parts.append(str(summary["category"]))
    for key, label in (("t_score", "T"), ("z_score", "Z")):
        if summary.get(key) is not None:
            parts.append(f"{label} {float(summary[key]):+.1f}")
    if summary.get("bmd_age") is not None:
        parts.append(f"BMD age {float(summary['bmd_age']):.0f} y")
    return " | ".join(parts)


class SpineBMDLogic:
    """Qt-free SpineBMD logic (the module's ScriptedLoadableModuleLogic delegates to it)."""

    def __init__(self, scene=None):
        # New nodes always go into the input volume's scene; ``scene`` is where a console
        # user's nodes live (slicer.mrmlScene inside Slicer) and is kept for reference.
        self._scene = scene

    @property
    def scene(self):
        if self._scene is None:
            import slicer

            self._scene = slicer.mrmlScene  # inside Slicer
        return self._scene

    # --- step 1: inputs (main thread) ---------------------------------------------------
    def gather(self, inputVolume, segmentationNode=None, calibration: str = "phantomless",
               phase: str = "auto", age: Optional[float] = None, sex: Optional[str] = None,
               roiMode: str = "whole", mineral: str = "ha", calibrationTable: Optional[str] = None,
               metadata: Optional[dict] = None) -> SpineBMDInputs:
        """Read the CT (and optional segmentation) from MRML into spinekit objects."""
        from spinekit.bmd.pipeline import BMDOptions

        if inputVolume is None:
            raise InputError("no input CT volume is selected.")
        if calibration not in CALIBRATION_MODES + ("phantom",):
            raise InputError(f"calibration '{calibration}' is not one of {', '.join(CALIBRATION_MODES)}.")
        if phase not in PHASES:
            raise InputError(f"contrast phase '{phase}' is not one of {', '.join(PHASES)}.")
        image = mrml.image_from_volume_node(inputVolume, metadata=metadata)
        options = BMDOptions(calibration=calibration, phase=phase, age=age if age else None,
                             sex=(sex or None), mineral=mineral, roi_mode=roiMode,
                             calibration_table=calibrationTable or None)
        segmentation = None
        if segmentationNode is not None:
            segmentation = self.segmentation_from_node(segmentationNode, inputVolume, image)
        return SpineBMDInputs(image=image, segmentation=segmentation, options=options,
                              from_existing_segmentation=segmentationNode is not None)

    def segmentation_from_node(self, segmentationNode, inputVolume, image: Optional[Image] = None):
        """Segmentation node (possibly edited in Segment Editor) -> spinekit SegmentationResult.

        Vertebral bodies: the ones SpineBMD stored with the node, minus every voxel the user
        erased from (or moved to another level of) a vertebra segment; a level that gained
        voxels (painted) gets its body derived again from its edited vertebra. A foreign
        segmentation (nothing stored) has all bodies derived by the label-map backend."""
        from spinekit.segmentation import bodies_from_vertebrae, segment
        from spinekit.segmentation.base import SegmentationResult, records_from_labels

        vertebrae = mrml.segmentation_node_to_labels(segmentationNode, inputVolume)
        stored = mrml.bodies_of(segmentationNode, inputVolume)
        if stored is None:
            image = image if image is not None else mrml.image_from_volume_node(inputVolume)
            return segment(image, backend="labelmap", labels=vertebrae, convention="verse")
        vertebrae_u8 = vertebrae.array.astype(np.uint8)
        bodies = np.where(stored.array == vertebrae_u8, stored.array, 0).astype(np.uint8)
        before = mrml.bodies_of(segmentationNode, inputVolume, role=mrml.VERTEBRAE_REFERENCE_ROLE)
        warnings = []
        if before is not None:
            painted = (vertebrae_u8 != before.array) & (vertebrae_u8 > 0)
            grown = sorted(int(v) for v in np.unique(vertebrae_u8[painted]))
            if grown:
                derived = bodies_from_vertebrae(vertebrae.with_array(vertebrae_u8))
                for vid in grown:
                    level = vertebrae_u8 == vid
                    bodies[level] = np.where(derived[level] == vid, vid, 0)
                warnings.append("vertebral bodies re-derived from the edited vertebrae for "
                                + ", ".join(lv.level_name(v) for v in grown) + " (voxels were added).")
        return SegmentationResult(
            vertebrae=vertebrae.with_array(vertebrae_u8), bodies=vertebrae.with_array(bodies),
            levels=records_from_labels(vertebrae_u8, bodies, image=vertebrae), backend="slicer-segmentation",
            warnings=warnings)

    # --- step 2: compute (any thread, no MRML) ------------------------------------------
    @staticmethod
    def compute(inputs: SpineBMDInputs, progress: Optional[Progress] = None):
        """Run the spinekit BMD pipeline (segmentation when none was given, ROI, calibration,
        contrast correction, morphometry, interpretation). No MRML access: thread-safe."""
        from spinekit.bmd.pipeline import run_bmd

        return run_bmd(inputs.image, segmentation=inputs.segmentation, options=inputs.options,
                       progress=progress)

    # --- step 3: show (main thread) -----------------------------------------------------
    def show(self, bmd, inputVolume, image: Image, segmentationNode=None, tableNode=None,
             chartNode=None, keepSegmentation: bool = False) -> SpineBMDResults:
        """Put a BMDResult into the scene: segments, table (with units), chart, summary.

        keepSegmentation: the user's segmentation node is left as it is (recompute after
        editing); otherwise ``segmentationNode`` is (re)filled from the result's labels."""
        base = inputVolume.GetName()
        seg = bmd.segmentation
        if not keepSegmentation:
            segmentationNode = mrml.labels_to_segmentation_node(
                seg.vertebrae, inputVolume, name=f"{base} vertebrae", node=segmentationNode,
                bodies=seg.bodies)
        elif segmentationNode is not None and mrml.bodies_of(segmentationNode, inputVolume) is not None:
            # keep the stored bodies (and the vertebrae they belong to) in step with the edit
            mrml.set_bodies(segmentationNode, seg.bodies, inputVolume, vertebrae=seg.vertebrae)
        roiNode = self.roi(bmd, inputVolume, segmentationNode)
        tableNode = self.table(bmd, inputVolume, tableNode)
        names = [rec.level for rec in bmd.levels]
        values = [rec.vbmd_mg_cm3 for rec in bmd.levels]
        chartNode = mrml.vbmd_chart_node(names, values, inputVolume.GetScene(),
                                         name=f"{base} vBMD", chart_node=chartNode, reference_node=inputVolume)
        line = summary_line(bmd.summary)
        tableNode.SetAttribute("spinekit.summary", json.dumps(bmd.summary, default=str))
        return SpineBMDResults(bmd=bmd, image=image, segmentationNode=segmentationNode, tableNode=tableNode,
                               chartNode=chartNode, roiSegmentationNode=roiNode, summary_line=line,
                               warnings=list(bmd.warnings))

    @staticmethod
    def roi(bmd, inputVolume, segmentationNode=None):
        """The trabecular ROIs that were measured, as a second segmentation (QC in the views:
        what was averaged), referenced from the vertebra segmentation so re-runs reuse it."""
        existing = segmentationNode.GetNodeReference(mrml.ROI_REFERENCE_ROLE) if segmentationNode else None
        roiNode = mrml.labels_to_segmentation_node(np.asarray(bmd.roi_labels, dtype=np.uint8), inputVolume,
                                                   name=f"{inputVolume.GetName()} trabecular ROI", node=existing)
        display = roiNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility3D(False)  # inside the vertebrae: only useful in the slice views
        if segmentationNode is not None:
            segmentationNode.SetNodeReferenceID(mrml.ROI_REFERENCE_ROLE, roiNode.GetID())
        return roiNode

    def table(self, bmd, inputVolume, tableNode=None):
        """Per-level table node: the levels.csv columns, unit labels, readable titles."""
        scene = inputVolume.GetScene()
        df = bmd.levels_table()
        node = mrml.table_node_from_dataframe(df, scene, name=f"{inputVolume.GetName()} vBMD levels",
                                              node=tableNode, descriptions=COLUMN_TITLES)
        mrml.set_column_titles(node, COLUMN_TITLES)
        mrml.place_beside(node, inputVolume)
        return node

    # --- the console API ----------------------------------------------------------------
    def process(self, inputVolume, segmentationNode=None, calibration: str = "phantomless",
                phase: str = "auto", age: Optional[float] = None, sex: Optional[str] = None,
                roiMode: str = "whole", mineral: str = "ha", calibrationTable: Optional[str] = None,
                outputSegmentation=None, outputTable=None, outputChart=None,
                progress: Optional[Callable[[float, str], None]] = None,
                metadata: Optional[dict] = None) -> SpineBMDResults:
        """Measure trabecular vBMD per vertebra in a CT volume node and show the results.

        :param inputVolume: CT scalar volume node (HU).
        :param segmentationNode: optional existing segmentation (segments named by level, e.g.
            from a previous run, Segment Editor or TotalSegmentator); None runs the builtin
            segmenter.
        :param calibration: "phantomless" (internal, physics-based) or "asynchronous"
            (scanner table, needs ``calibrationTable`` or the packaged one).
        :param phase: contrast phase "auto" (detected), "native", "arterial", "portal-venous".
        :param age: patient age in years (T/Z-score, BMD age); None skips them.
        :param sex: "F" or "M" (None skips T/Z-score).
        :param roiMode: "whole" trabecular body or "mid" (QCT-style elliptical mid-vertebral).
        :param mineral: "ha" (calcium hydroxyapatite) or "k2hpo4".
        :param outputSegmentation, outputTable, outputChart: nodes to reuse (None creates).
        :param progress: callback(fraction, message); may raise spinekit.progress.Cancelled.
        :return: SpineBMDResults (core result, nodes, summary line, warnings).
        """
        inputs = self.gather(inputVolume, segmentationNode, calibration, phase, age, sex, roiMode,
                             mineral, calibrationTable, metadata)
        report(progress, 0.0, "Measuring")
        bmd = self.compute(inputs, scaled(progress, 0.0, 0.95))
        report(progress, 0.95, "Showing results")
        keep = segmentationNode is not None and outputSegmentation is None
        results = self.show(bmd, inputVolume, inputs.image,
                            segmentationNode=segmentationNode if keep else outputSegmentation,
                            tableNode=outputTable, chartNode=outputChart, keepSegmentation=keep)
        report(progress, 1.0, results.summary_line)
        return results

    def recompute(self, inputVolume, segmentationNode, tableNode=None, chartNode=None,
                  **options) -> SpineBMDResults:
        """Measure again from a (possibly edited) segmentation node; the node is not touched
        except for its stored body labels, which follow the edit."""
        if segmentationNode is None:
            raise InputError("no segmentation is selected to recompute from.")
        return self.process(inputVolume, segmentationNode=segmentationNode, outputTable=tableNode,
                            outputChart=chartNode, **options)

    @staticmethod
    def exportReport(results: SpineBMDResults, outputDirectory) -> dict:
        """Write levels.csv, summary.json, report.html and the label maps to a folder."""
        from spinekit.bmd.pipeline import write_bmd_outputs

        return write_bmd_outputs(results.bmd, results.image, Path(outputDirectory))

    @staticmethod
    def defaultsFromDicom(inputVolume, database=None) -> dict:
        """{'age': years or None, 'sex': 'F'/'M' or None} from the volume's DICOM header."""
        meta = mrml.dicom_metadata_of(inputVolume, database)
        sex = (meta.get("PatientSex") or "").strip().upper()[:1]
        return {"age": meta.get("age_years") or mrml.age_years_from_dicom(meta.get("PatientAge")),
                "sex": sex if sex in ("F", "M") else None, "metadata": meta}
