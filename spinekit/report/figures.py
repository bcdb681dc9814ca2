"""Report figures as PNG bytes (matplotlib, Agg backend; nothing is shown or written here)."""

from __future__ import annotations

import io

import numpy as np

from .. import levels as lv

CT_WINDOW_HU = (-250.0, 1250.0)


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def sagittal_overlay_png(ct: np.ndarray, spacing_zyx_mm, bodies: np.ndarray, roi_labels: np.ndarray | None = None,
                         direction: np.ndarray | None = None, title: str = "") -> bytes:
    """Mid-sagittal CT slice through the vertebral bodies with level colours and ROI outlines."""
    ct = np.asarray(ct)
    nz, ny, nx = ct.shape
    # The sagittal plane through the bodies: the median x of the body voxels (a few slices
    # sampled so this stays cheap on a large CT).
    sample = bodies[:: max(1, nz // 64)]
    xs = np.nonzero(sample)[2]
    x0 = int(np.median(xs)) if xs.size else nx // 2
    img = ct[:, :, x0].astype(float)
    lab = np.asarray(bodies)[:, :, x0]
    roi = None if roi_labels is None else np.asarray(roi_labels)[:, :, x0]
    d = np.eye(3) if direction is None else np.asarray(direction, float)
    # Show the head up and anterior left: flip the array axes whose physical direction says so.
    if d[2, 2] > 0:  # z index increases towards superior -> put high z at the top
        img, lab = img[::-1], lab[::-1]
        roi = None if roi is None else roi[::-1]
    if d[1, 1] < 0:  # y index increases towards anterior -> anterior to the left
        img, lab = img[:, ::-1], lab[:, ::-1]
        roi = None if roi is None else roi[:, ::-1]
    sz, sy = float(spacing_zyx_mm[0]), float(spacing_zyx_mm[1])
    h_mm, w_mm = nz * sz, ny * sy
    scale = 6.0 / max(h_mm, w_mm)
    fig = _figure(max(w_mm * scale, 2.5), max(h_mm * scale, 2.5))
    ax = fig.add_subplot(111)
    extent = (0, w_mm, 0, h_mm)
    ax.imshow(img, cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], extent=extent, interpolation="nearest")
    rgba = np.zeros(lab.shape + (4,))
    for vid in [int(v) for v in np.unique(lab) if v]:
        if vid in lv.VERSE_NAMES:
            rgba[lab == vid] = (*lv.colour(lv.level_name(vid)), 0.35)
    ax.imshow(rgba, extent=extent, interpolation="nearest")
    if roi is not None and roi.any():
        ax.contour(np.flipud(roi > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.8,
                   extent=extent)
    for vid in [int(v) for v in np.unique(lab) if v]:
        if vid not in lv.VERSE_NAMES:
            continue
        zz, yy = np.nonzero(lab == vid)
        ax.text((yy.max() + 2) * sy, h_mm - zz.mean() * sz, lv.level_name(vid), color="white", fontsize=8,
                va="center", ha="left", bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    ax.set_xlabel("mm (anterior left)")
    ax.set_ylabel("mm (superior up)")
    ax.set_title(title or "Mid-sagittal slice: bodies (colour), trabecular ROI (yellow)", fontsize=9)
    return _png(fig)


def vbmd_chart_png(level_names: list[str], vbmd_mg_cm3: list[float | None], *,
                   reference: tuple[float, float] | None = None, reference_label: str = "",
                   used: list[str] | None = None) -> bytes:
    """vBMD per level with the ACR thresholds (80 / 120 mg/cm³) and a normative band (mean ± SD)."""
    from ..bmd.interpret import ACR_NORMAL_ABOVE_MG_CM3 as HI, ACR_OSTEOPOROSIS_BELOW_MG_CM3 as LO

    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(111)
    x = np.arange(len(level_names))
    vals = np.array([np.nan if v is None else float(v) for v in vbmd_mg_cm3])
    top = max(250.0, np.nanmax(vals) * 1.1 if np.isfinite(vals).any() else 0)
    ax.axhspan(0, LO, color="#f4c7c3", alpha=0.6, label="osteoporosis (< 80)")
    ax.axhspan(LO, HI, color="#fce8b2", alpha=0.6, label="osteopenia (80-120)")
    ax.axhspan(HI, top, color="#b7e1cd", alpha=0.4, label="normal (> 120)")
    if reference is not None:
        m, sd = reference
        ax.axhspan(m - sd, m + sd, color="#4a86e8", alpha=0.18, label=reference_label or "reference mean ± SD")
        ax.axhline(m, color="#4a86e8", lw=1)
    used = used or []
    colours = ["#1c4587" if n in used else "#666666" for n in level_names]
    ax.bar(x, np.nan_to_num(vals), color=colours, width=0.6)
    for xi, v in zip(x, vals):
        if np.isfinite(v):
            ax.text(xi, v + 3, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(level_names, fontsize=8)
    ax.set_ylim(0, top)
    ax.set_ylabel("vBMD (mg/cm³)")
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    ax.set_title("Trabecular vBMD per level (dark bars: levels in the L1-L2 mean)", fontsize=9)
    return _png(fig)
