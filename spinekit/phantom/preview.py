"""Quick-look PNGs of a CT (phantom or real) with a label overlay: one sagittal, one axial."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..image import Image

WINDOW_HU = (-200.0, 1000.0)


def _to_arrays(phantom_or_image, labels):
    image = getattr(phantom_or_image, "image", phantom_or_image)
    if labels is None:
        labels = getattr(phantom_or_image, "vertebrae", None)
    lab = labels.array if isinstance(labels, Image) else (None if labels is None else np.asarray(labels))
    if not isinstance(image, Image):
        raise TypeError("render_previews needs a CTPhantom or an Image")
    if lab is not None and lab.shape != image.shape:
        raise ValueError(f"labels shape {lab.shape} does not match image shape {image.shape}")
    return image, lab


def render_previews(phantom_or_image, labels=None, out_dir=".", prefix: str = "preview") -> list[Path]:
    """Write <prefix>_sagittal.png and <prefix>_axial.png (window [-200, 1000] HU, label contours).

    The sagittal slice passes through the labels' centroid (image centre without labels); the
    axial slice through the centroid of the most caudal lumbar-or-lowest label present.
    Displayed with physical aspect ratio; anterior left in the sagittal view, patient left on the
    right of the axial view (radiological convention).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image, lab = _to_arrays(phantom_or_image, labels)
    arr = image.array.astype(np.float32)
    sx, sy, sz = image.spacing_mm
    nz, ny, nx = arr.shape
    if lab is not None and np.any(lab > 0):
        idx = np.argwhere(lab > 0)
        cz, _, cx = (int(round(c)) for c in idx.mean(axis=0))
        ids = [i for i in np.unique(lab) if 0 < i < 26]
        if ids:  # axial slice through the centre of the level nearest L1 (VerSe 20)
            target = min(ids, key=lambda i: abs(int(i) - 20))
            cz = int(round(np.argwhere(lab == target)[:, 0].mean()))
    else:
        cz, cx = nz // 2, nx // 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    vmin, vmax = WINDOW_HU
    views = {
        # sagittal: rows = z (superior up), cols = y (anterior left)
        "sagittal": (arr[::-1, :, cx], None if lab is None else lab[::-1, :, cx], sy / sz),
        # axial: rows = y (anterior up), cols = x flipped so patient left is on the right
        "axial": (arr[cz, :, ::-1], None if lab is None else lab[cz, :, ::-1], sx / sy),
    }
    for name, (img2d, lab2d, aspect_wh) in views.items():
        h, w = img2d.shape
        fig_w = 6.0
        fig_h = fig_w * h / (w * aspect_wh)
        fig = plt.figure(figsize=(fig_w, max(fig_h, 1.0)), dpi=100)
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(img2d, cmap="gray", vmin=vmin, vmax=vmax, aspect=1.0 / aspect_wh, interpolation="nearest")
        if lab2d is not None:
            vals = [v for v in np.unique(lab2d) if v > 0]
            for v in vals:
                ax.contour((lab2d == v).astype(float), levels=[0.5], linewidths=0.8,
                           colors=[plt.cm.tab20(int(v) % 20)])
        ax.set_axis_off()
        path = out / f"{prefix}_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
