"""Soft tissue of the CT phantom, painted slice by slice around the spine centre line.

Sizes (mm) are adult averages, simplified to ellipses: body outline ~320x240 (abdomen),
subcutaneous fat 15-22 mm, a 12 mm muscle wall, erector spinae behind the laminae, psoas growing
from L1 to L5, aorta (22 mm) left-anterior of the bodies with its bifurcation at L4, IVC
right-anterior, portal vein (14 mm, T12-L1), liver, kidneys (T12-L3), heart and lungs above a
sloping diaphragm.
"""

from __future__ import annotations

import numpy as np

from ..progress import report
from ._grid import TISSUE_IDS as T
from ._grid import Grid
from ._spine import SPINE_LEVELS, SpineCurve

OUTLINE_OFFSET_MM = 20.0  # outline centre lies this far anterior of the body centre line
WALL_MUSCLE_MM = 12.0


def outline(z, zc: dict, sac_z: float):
    """Body outline semi-axes (LR, AP) and subcutaneous fat thickness (mm) by height z."""
    anchors = [(sac_z - 60, 170, 115, 22), (sac_z, 165, 118, 22), (zc["L3"], 160, 120, 20),
               (zc["T12"], 155, 115, 18), (zc["T8"], 145, 105, 16), (zc["T1"], 130, 95, 15)]
    zs = np.array([a[0] for a in anchors])
    o = np.argsort(zs)
    cols = [np.array([a[k] for a in anchors])[o] for k in (1, 2, 3)]
    return tuple(np.interp(z, zs[o], c) for c in cols)


class _Slice:
    """Paint ellipses into one axial slice, each computed only inside its own window."""

    def __init__(self, t: np.ndarray, x: np.ndarray, y: np.ndarray):
        self.t, self.x, self.y = t, x, y
        self.x0, self.dx = float(x[0]), float(x[1] - x[0])
        self.y0, self.dy = float(y[0]), float(y[1] - y[0])

    def window(self, cx, cy, a, b):
        nx, ny = self.x.size, self.y.size
        i0 = max(0, int(np.floor((cx - a - self.x0) / self.dx)))
        i1 = min(nx, int(np.ceil((cx + a - self.x0) / self.dx)) + 1)
        j0 = max(0, int(np.floor((cy - b - self.y0) / self.dy)))
        j1 = min(ny, int(np.ceil((cy + b - self.y0) / self.dy)) + 1)
        return slice(j0, j1), slice(i0, i1)

    def ellipse(self, cx, cy, a, b, value=None, where=None, only=None):
        """Mask of the ellipse in its window (and paint `value` there). `where`: full-slice mask
        that must hold; `only`: tissue ids that may be overwritten."""
        wy, wx = self.window(cx, cy, a, b)
        if wy.stop <= wy.start or wx.stop <= wx.start:
            return wy, wx, np.zeros((0, 0), bool)
        m = ((self.x[wx][None, :] - cx) / a) ** 2 + ((self.y[wy][:, None] - cy) / b) ** 2 <= 1
        if where is not None:
            m &= where[wy, wx]
        if only is not None:
            m &= np.isin(self.t[wy, wx], only)
        if value is not None:
            self.t[wy, wx][m] = value
        return wy, wx, m


def paint_soft_tissue(mat: np.ndarray, grid: Grid, curve: SpineCurve, levels, dims, zc, progress=None) -> None:
    """Write tissue ids into `mat` (z, y, x), one axial slice at a time, following the body centre
    line of the rendered levels (clamped above and below them)."""
    nz = grid.shape[0]
    zw = grid.axis(2)
    # Body centre line as a function of z over the rendered levels (clamped beyond them).
    s_lo = curve.level_top_s[levels[0]] + dims[levels[0]].body_height_mm / 2
    s_hi = curve.level_top_s[levels[-1]] + dims[levels[-1]].body_height_mm / 2
    pts = np.array([curve.point(s) for s in np.linspace(s_lo, s_hi, 200)])
    order = np.argsort(pts[:, 2])
    xs = np.interp(zw, pts[order, 2], pts[order, 0])
    ys = np.interp(zw, pts[order, 2], pts[order, 1])
    zlev = np.array([zc[n] for n in SPINE_LEVELS])
    o = np.argsort(zlev)

    def by_z(attr):
        vals = np.array([getattr(dims[n], attr) for n in SPINE_LEVELS])
        return np.interp(zw, zlev[o], vals[o])

    W, D, CW = by_z("body_width_mm"), by_z("body_depth_mm"), by_z("canal_width_mm")
    sac_z = float(curve.point(curve.sacrum_top_s)[2])
    A, B, F = outline(zw, zc, sac_z)
    X, Y = grid.axis(0), grid.axis(1)
    X2, Y2 = X[None, :], Y[:, None]
    z_l1_top = zc["L1"] + dims["L1"].body_height_mm / 2
    z_low = sac_z - 60.0  # psoas / vessels leave the pelvis slab here
    z_bif, z_conf = zc["L4"], zc["L5"]
    z_dia0 = zc["T12"] + 10.0  # posterior recess of the diaphragm; the dome is ~50 mm higher anteriorly
    z_lung_top = zc["T1"] + 40.0
    z_liver = (zc["L2"], zc["T9"])
    z_kidney = (zc["L3"], zc["T12"])
    z_heart = (zc["T10"], zc["T5"])

    def profile(z, lo_hi):  # smooth 0..1..0 bump over a z range
        lo, hi = lo_hi
        f = (z - lo) / (hi - lo)
        return float(np.sin(np.pi * f)) if 0.0 < f < 1.0 else 0.0

    for k in range(nz):
        z = float(zw[k])
        xs_, ys_ = float(xs[k]), float(ys[k])
        a, b, f = float(A[k]), float(B[k]), float(F[k])
        w, d, cw = float(W[k]), float(D[k]), float(CW[k])
        cx, cy = xs_, ys_ - OUTLINE_OFFSET_MM
        t = mat[k]
        S = _Slice(t, X, Y)
        S.ellipse(cx, cy, a, b, T["subcutaneous_fat"])
        S.ellipse(cx, cy, a - f, b - f, T["wall_muscle"])
        in1 = ((X2 - cx) / (a - f)) ** 2 + ((Y2 - cy) / (b - f)) ** 2 <= 1
        ai, bi = a - f - WALL_MUSCLE_MM, b - f - WALL_MUSCLE_MM
        r_in = ((X2 - cx) / ai) ** 2 + ((Y2 - cy) / bi) ** 2
        # Behind the bodies and next to the spine the inner compartment is posterior wall muscle.
        back = (((X2 - xs_) / (w / 2 + 45)) ** 2 + ((Y2 - ys_ - d / 2 - 25) / (d / 2 + 40)) ** 2 <= 1) & (Y2 > ys_)
        inner = (r_in <= 1) & ~back
        t[inner] = T["viscera"]
        # Diaphragm height rises anteriorly (fraction of AP depth from the posterior wall).
        z_dia = z_dia0 + 50.0 * np.clip((cy + bi - Y2) / (2 * bi), 0.0, 1.0)  # (ny, 1)
        below = np.broadcast_to(z < z_dia, t.shape)
        ring = inner & below & (((X2 - cx) / (ai - 12)) ** 2 + ((Y2 - cy) / (bi - 12)) ** 2 > 1)
        t[ring] = T["visceral_fat"]
        p = profile(z, z_liver)
        if p > 0:  # liver: right upper quadrant, under the diaphragm
            S.ellipse(cx - 0.42 * ai, cy - 0.1 * bi, 0.5 * ai * p ** 0.5, 0.7 * bi * p ** 0.5, T["liver"],
                      where=inner & below)
        p = profile(z, z_kidney)
        if p > 0.15:
            for side in (-1, 1):
                S.ellipse(xs_ + side * (w / 2 + 40), ys_ + 0.15 * d, 28 * p ** 0.5, 24 * p ** 0.5, T["kidney"],
                          where=inner)
        S.ellipse(xs_, ys_ - d / 2 - 15, w / 2 + 45, d / 2 + 15, T["visceral_fat"], where=inner,
                  only=(T["viscera"], T["visceral_fat"]))
        if z > z_dia0:
            p = profile(z, z_heart)
            heart = None
            if p > 0:
                hy, hx, heart = S.ellipse(cx + 0.15 * ai, cy - 0.3 * bi, 0.45 * ai * p ** 0.5, 0.5 * bi * p ** 0.5)
            if z < z_lung_top:
                lung = (r_in <= ((ai - 5) / ai) ** 2) & ~below & inner
                # Mediastinum (great vessels, oesophagus) and the paravertebral gutters stay soft tissue.
                lung &= ((X2 - xs_) / 28.0) ** 2 + ((Y2 - (ys_ - d / 2 - 45)) / 55.0) ** 2 > 1
                lung &= ((X2 - xs_) / (w / 2 + 14)) ** 2 + ((Y2 - ys_ - 10) / (d / 2 + 22)) ** 2 > 1
                t[lung] = T["lung"]
            if heart is not None and heart.size:
                t[hy, hx][heart & ~below[hy, hx]] = T["heart"]
        # Erector spinae + multifidus behind the laminae, under the fat.
        pa, pb = 0.45 * w + 3, 0.8 * d + 4
        pcy = ys_ + d / 2 + 8 + pb
        for side in (-1, 1):
            S.ellipse(xs_ + side * (cw / 2 + pa - 2), pcy, pa, pb, T["paraspinal_muscle"], where=in1)
        if z_low < z < z_l1_top:
            r = float(np.interp(z, [zc["L5"], z_l1_top], [22.0, 4.0]))
            for side in (-1, 1):
                S.ellipse(xs_ + side * (w / 2 + 0.9 * r), ys_, r, r, T["psoas"])
        # Aorta: left-lateral of the thoracic bodies, left-anterior in the abdomen; bifurcates at L4.
        if z > z_low:
            r = 11.0
            if z > z_bif:
                ab = float(np.clip((zc["T10"] - z) / (zc["T10"] - zc["T12"]), 0, 1))
                ax = xs_ + (1 - ab) * (w / 2 + 0.6 * r) + ab * 0.25 * w
                ay = ys_ + (1 - ab) * (-0.2 * d) + ab * (-d / 2 - r - 1)
                S.ellipse(ax, ay, r, r, T["aorta"])
            else:
                dz = z_bif - z
                for side in (-1, 1):
                    S.ellipse(xs_ + side * (8 + 0.5 * dz), ys_ - d / 2 - 8 - 0.2 * dz, 6.0, 6.0, T["aorta"])
            if zc["T12"] > z > zc["L1"] - 10:  # portal vein in the liver hilum, right-anterior
                S.ellipse(xs_ - 0.35 * w - 12, ys_ - d / 2 - 45, 7.0, 7.0, T["portal_vein"])
            if zc["T10"] > z > z_conf:
                S.ellipse(xs_ - (0.3 * w + 14), ys_ - d / 2 - 10, 13.0, 9.0, T["ivc"])
            elif z <= z_conf:
                dz = z_conf - z
                for side in (-1, 1):
                    S.ellipse(xs_ + side * (14 + 0.5 * dz), ys_ - d / 2 - 6, 7.0, 7.0, T["ivc"])
        if progress is not None and k % 64 == 0:
            report(progress, 0.05 + 0.2 * k / nz, "phantom: soft tissue")
