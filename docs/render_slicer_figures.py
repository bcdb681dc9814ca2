"""Render the SpineBMD figures of docs/slicer.md offscreen (no Slicer GUI needed).

Runs the same Logic a Slicer user runs, on real MRML nodes (slicer-core wheel), then draws what
the views would show: CT slices with the segments in their colours, the segments' closed
surfaces in 3D (VTK offscreen), the vBMD chart node with the ACR thresholds and the table node.

    .venv/bin/python docs/render_slicer_figures.py            # real CT from ../shared/data
    .venv/bin/python docs/render_slicer_figures.py --phantom  # digital phantom instead

Writes docs/images/spinebmd_views.png, spinebmd_chart.png, spinebmd_table.png (and, with
--icons, the extension and module icons).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SpineBMD"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Polygon, Rectangle  # noqa: E402

from spinekit import levels as lv  # noqa: E402
from spinekit import mrml  # noqa: E402
from SpineBMDLib.logic import COLUMN_TITLES, SpineBMDLogic  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ct_abdomen_3mm"


# --- icons: a lateral vertebra stack in the level colours (+ an ACR gauge for SpineBMD) ---
EDGE = (0.16, 0.18, 0.24)

def _icon_vertebra(ax, x, y, w, h, colour):
    # lateral view: body (left), pedicle + spinous process (right, pointing down-back)
    ax.add_patch(Polygon([(x + w - 0.02, y + 0.62 * h), (x + w + 0.10, y + 0.70 * h), (x + w + 0.24, y + 0.30 * h),
                          (x + w + 0.20, y + 0.18 * h), (x + w + 0.07, y + 0.35 * h), (x + w - 0.02, y + 0.30 * h)],
                         closed=True, fc=(0.88, 0.88, 0.86), ec=EDGE, lw=1.8, joinstyle="round"))
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={0.22 * h}",
                                fc=colour, ec=EDGE, lw=2.2))

def _draw_icon(path, names, gauge):
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1]); ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.axis("off")
    n = len(names); top, bottom = 0.94, 0.06
    pitch = (top - bottom) / n; h = 0.74 * pitch
    x0 = 0.10 if gauge else 0.16
    for i, name in enumerate(names):
        y = top - (i + 1) * pitch + 0.13 * pitch
        w = 0.40 + 0.025 * i  # bodies widen caudally
        _icon_vertebra(ax, x0 + 0.012 * i, y, w, h, lv.colour(name))
    if gauge:
        x = 0.84
        for y0, y1, c in ((0.08, 0.36, (0.84, 0.22, 0.16)), (0.36, 0.58, (0.97, 0.72, 0.16)), (0.58, 0.92, (0.22, 0.68, 0.32))):
            ax.add_patch(Rectangle((x, y0), 0.11, y1 - y0, fc=c, ec="none"))
        ax.add_patch(Rectangle((x, 0.08), 0.11, 0.84, fc="none", ec=EDGE, lw=2))
        ax.add_patch(Polygon([(x - 0.07, 0.47), (x - 0.01, 0.50), (x - 0.07, 0.53)], closed=True, fc=EDGE))
    fig.savefig(path, dpi=100, transparent=True)
    plt.close(fig)



def render_icons() -> None:
    """Resources/Icons/SpineKit.png and SpineBMD/Resources/Icons/SpineBMD.png (128 x 128)."""
    _draw_icon(REPO / "Resources" / "Icons" / "SpineKit.png", ["T11", "T12", "L1", "L2", "L3"], gauge=False)
    _draw_icon(REPO / "SpineBMD" / "Resources" / "Icons" / "SpineBMD.png", ["T12", "L1", "L2", "L3"], gauge=True)


def load_case(use_phantom: bool):
    """(image, SegmentationResult, description, age, sex)."""
    if use_phantom or not DATA.exists():
        from spinekit.phantom import CTPhantomConfig, generate_ct_phantom
        from spinekit.segmentation.base import SegmentationResult, records_from_labels

        ph = generate_ct_phantom(CTPhantomConfig(first_level="T11", last_level="L4", spacing_mm=(1.5, 1.5, 1.5),
                                                 densities_mg_cm3={"T11": 150, "T12": 140, "L1": 95, "L2": 90,
                                                                   "L3": 100, "L4": 105}, seed=0))
        seg = SegmentationResult(vertebrae=ph.vertebrae, bodies=ph.bodies,
                                 levels=records_from_labels(ph.vertebrae.array, ph.bodies.array), backend="truth")
        return ph.image, seg, "digital phantom (known truth)", 65.0, "F"
    from spinekit.image import read_image
    from spinekit.segmentation import segment

    image = read_image(DATA / "ct.nii.gz")
    seg = segment(image, backend="labelmap", labels=DATA / "ts_vertebrae.nii.gz",
                  bodies=DATA / "ts_vertebrae_body.nii.gz")
    return image, seg, "abdominal CT, 3 mm (TotalSegmentator test data), TotalSegmentator labels", 55.0, "M"


def as_lps(image):
    """The image resampled-free reoriented so array axes run L, P, S (display convention)."""
    import SimpleITK as sitk

    from spinekit.image import Image

    return Image.from_sitk(sitk.DICOMOrient(image.to_sitk(), "LPS"))


def overlay(ax, ct2d, lab2d, aspect, title):
    ax.imshow(np.clip(ct2d, -250, 750), cmap="gray", origin="upper", aspect=aspect)
    rgba = np.zeros(lab2d.shape + (4,))
    for vid in np.unique(lab2d):
        if vid in lv.VERSE_NAMES:
            rgba[lab2d == vid] = (*lv.colour(lv.level_name(int(vid))), 0.45)
    ax.imshow(rgba, origin="upper", aspect=aspect)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def render_3d(segmentation_node, size=(420, 520)) -> np.ndarray:
    """Segments' closed surfaces rendered offscreen with VTK (anterior-left view)."""
    import vtk
    from vtk.util import numpy_support

    segmentation_node.CreateClosedSurfaceRepresentation()
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.1, 0.1, 0.15)
    for level, seg_id in mrml.segment_ids_by_level(segmentation_node).items():
        poly = vtk.vtkPolyData()
        segmentation_node.GetClosedSurfaceRepresentation(seg_id, poly)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(poly)
        mapper.ScalarVisibilityOff()  # colour by the segment, not by stored scalars
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*lv.colour(level))
        renderer.AddActor(actor)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    renderer.ResetCamera()
    focal = np.array(camera.GetFocalPoint())
    camera.SetPosition(*(focal + np.array([-250.0, 350.0, 40.0])))  # RAS: from anterior-left
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.3)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    out = grab.GetOutput()
    w, h, _ = out.GetDimensions()
    return numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, -1)[::-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", action="store_true", help="use the digital phantom")
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    parser.add_argument("--icons", action="store_true", help="also redraw the extension and module icons")
    args = parser.parse_args(argv)
    if args.icons:
        render_icons()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    image, seg_result, description, age, sex = load_case(args.phantom)
    ctx = mrml.new_scene()
    volume = mrml.volume_node_from_image(image, ctx.scene, "CT")
    seg_node = mrml.labels_to_segmentation_node(seg_result.vertebrae, volume, bodies=seg_result.bodies)
    results = SpineBMDLogic(ctx.scene).process(volume, segmentationNode=seg_node, age=age, sex=sex)

    # Slices from what the nodes hold (the CT volume and the segmentation exported back),
    # reoriented to LPS so that rows/columns follow the radiological display convention.
    ct = as_lps(mrml.image_from_volume_node(volume))
    labels = as_lps(mrml.segmentation_node_to_labels(seg_node, volume))
    zc, yc, xc = (np.argwhere(labels.array > 0).mean(axis=0)).round().astype(int)
    sx, sy, sz = ct.spacing_mm
    fig = plt.figure(figsize=(12, 4.6), dpi=110)
    axes = [fig.add_axes([0.005 + 0.25 * i, 0.02, 0.24, 0.88]) for i in range(4)]
    # axial: anterior up, patient right on screen left; coronal/sagittal: head up, anterior left.
    overlay(axes[0], ct.array[zc], labels.array[zc], sy / sx, "axial")
    overlay(axes[1], ct.array[::-1, yc, :], labels.array[::-1, yc, :], sz / sx, "coronal")
    sag_ct, sag_lab = ct.array[::-1, :, xc], labels.array[::-1, :, xc]
    overlay(axes[2], sag_ct, sag_lab, sz / sy, "sagittal")
    for level, rec in ((r.level, r) for r in results.bmd.levels):
        zs, ys = np.nonzero(sag_lab == lv.level_id(level))
        if len(zs) and rec.vbmd_mg_cm3 is not None and np.isfinite(rec.vbmd_mg_cm3):
            axes[2].text(ys.min() - 2, zs.mean(), f"{level} {rec.vbmd_mg_cm3:.0f}", color="white", fontsize=7,
                         ha="right", va="center")
    axes[3].imshow(render_3d(seg_node))
    axes[3].set_title("3D (segments, closed surface)", fontsize=9)
    axes[3].axis("off")
    fig.suptitle(f"SpineBMD on {description}:  {results.summary_line}", fontsize=10)
    fig.savefig(out / "spinebmd_views.png")
    plt.close(fig)

    # The chart node, drawn from its own series.
    series = mrml.chart_series(results.chartNode)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, s in series.items():
        x, y = np.asarray(s["x"], float), np.asarray(s["y"], float)
        if name == "vBMD":
            ax.plot(x, y, "o-", color=(0.85, 0.33, 0.10), label=name)
            ax.set_xticks(x, s["labels"])
        else:
            ax.plot(x, y, "--", label=name)
    ax.set_xlabel(results.chartNode.GetXAxisTitle())
    ax.set_ylabel(results.chartNode.GetYAxisTitle())
    ax.set_title(results.chartNode.GetTitle(), fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "spinebmd_chart.png")
    plt.close(fig)

    # The table node as the table view shows it (titles and units from the node).
    table = results.tableNode
    cols = ["level", "vbmd_mg_cm3", "trabecular_hu_mean", "roi_voxels", "body_volume_cm3", "height_anterior_mm",
            "height_posterior_mm", "genant_grade", "flags"]
    header = [f"{COLUMN_TITLES.get(c, c)}" + (f"\n({table.GetColumnUnitLabel(c)})" if table.GetColumnUnitLabel(c) else "")
              for c in cols]
    rows = list(zip(*[mrml.table_column(table, c) for c in cols]))
    def fmt(column, v):
        if isinstance(v, float) and not np.isfinite(v):
            return ""
        if column == "genant_grade":  # a double column in the node (grades may be missing)
            return str(int(v))
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    cells = [[fmt(c, v) for c, v in zip(cols, row)] for row in rows]
    fig, ax = plt.subplots(figsize=(11, 0.45 * (len(rows) + 2)), dpi=110)
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    tab.scale(1, 1.5)
    fig.savefig(out / "spinebmd_table.png", bbox_inches="tight")
    plt.close(fig)
    print(results.summary_line)
    print("written:", *(out / n for n in ("spinebmd_views.png", "spinebmd_chart.png", "spinebmd_table.png")))


if __name__ == "__main__":
    main()
