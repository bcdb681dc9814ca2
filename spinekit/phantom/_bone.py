"""Bone of the CT phantom: discs, canal, vertebrae (body + posterior elements), ribs, sacrum, pelvis.

Each structure is computed in its own local frame (u lateral, v posterior, w superior; mm) and
only inside its bounding box. Painting writes material ids (see ``_grid.Materials``).
"""

from __future__ import annotations

import numpy as np

from ..levels import VERSE_IDS
from ._grid import TISSUE_IDS as T
from ._grid import box_corners, cortex, local_coords
from ._soft import OUTLINE_OFFSET_MM, WALL_MUSCLE_MM, outline
from ._spine import SPINE_LEVELS, LevelDims

CORTEX_MM, ENDPLATE_MM = 1.0, 1.0
FRACTURE_TYPES = ("wedge", "biconcave", "crush")
# Height loss at the middle of each Genant band (grade 3 band is open: >40 %, use 50 %).
GENANT_LOSS = {1: 0.225, 2: 0.325, 3: 0.50}


def body_heights(dims: LevelDims, fracture: tuple[str, int] | None):
    """Height profile H(u, v, r2) of the body (mm) and its truth (anterior, middle, posterior).

    Heights are taken at 15 / 50 / 85 % of the AP depth on the mid-sagittal line. A normal body
    has its physiological wedge (dims.natural_wedge = Ha/Hp) with the mean height at mid-depth;
    fractures follow Genant: wedge Ha = (1 - loss) Hp, biconcave Hm = (1 - loss) Hp (central
    endplate depression reaching 60 % of the radius), crush all heights x (1 - loss).
    """
    hn, r = dims.body_height_mm, dims.natural_wedge
    b = dims.body_depth_mm / 2.0
    ha, hp = hn * 2 * r / (1 + r), hn * 2 / (1 + r)
    kind, loss = (fracture[0], GENANT_LOSS[int(fracture[1])]) if fracture else (None, 0.0)
    if kind == "wedge":
        ha = hp * (1 - loss)
    scale = (1 - loss) if kind == "crush" else 1.0
    dip = (ha + hp) / 2 - hp * (1 - loss) if kind == "biconcave" else 0.0

    def lin(f):  # linear in depth: ha at f = 0.15, hp at f = 0.85
        return hp + (ha - hp) * (0.85 - f) / 0.70

    def h(u, v, r2):
        f = np.clip((v + b) / (2 * b), 0.0, 1.0)
        out = lin(f)
        if dip:
            out = out - dip * np.clip(1.0 - r2 / 0.36, 0.0, 1.0)
        return (scale * out).astype(np.float32)

    truth = tuple(float(scale * (lin(f) - (dip if f == 0.5 else 0.0))) for f in (0.15, 0.5, 0.85))
    return h, truth


# --- discs and canal -------------------------------------------------------------------------
def paint_disc(mat, grid, curve, dims, upper, lower):
    du = dims[upper]
    s_a = curve.level_top_s[upper] + du.body_height_mm  # inferior endplate of the upper body
    gap = du.disc_below_mm
    fr = curve.frame(s_a + gap / 2)
    if lower is None:  # L5/S1
        a, b = du.body_width_mm / 2 * 0.97, du.body_depth_mm / 2 * 0.97
    else:
        dl = dims[lower]
        a = (du.body_width_mm + dl.body_width_mm) / 4 * 0.97
        b = (du.body_depth_mm + dl.body_depth_mm) / 4 * 0.97
    hw = gap / 2 + 4.0
    sl = grid.bbox(box_corners(fr, (-a, a), (-b, b), (-hw, hw)))
    if sl is None:
        return
    u, v, w = local_coords(grid, fr, sl)
    m = ((u / a) ** 2 + (v / b) ** 2 <= 1) & (np.abs(w) <= hw)
    mat[sl][m] = T["disc"]


def canal_geom(d: LevelDims):
    b = d.body_depth_mm / 2
    return b + d.canal_depth_mm / 2, d.canal_width_mm / 2, d.canal_depth_mm / 2  # vc, semi-axes


def paint_canal(mat, grid, fr, d):
    vc, ca, cb = canal_geom(d)
    hw = d.body_height_mm / 2 + d.disc_below_mm / 2 + 3.0
    sl = grid.bbox(box_corners(fr, (-ca, ca), (vc - cb, vc + cb), (-hw, hw)))
    if sl is None:
        return
    u, v, w = local_coords(grid, fr, sl)
    m = ((u / ca) ** 2 + ((v - vc) / cb) ** 2 <= 1) & (np.abs(w) <= hw)
    mat[sl][m] = T["canal"]


# --- vertebra --------------------------------------------------------------------------------
def paint_vertebra(mat, M, vertebrae, bodies, grid, fr, d, above, vid, fracture, trab_hu,
                   cortical_hu, metal=False, vein_material=None, truth=True, body_above=None) -> dict:
    """Body (elliptic cylinder, 1 mm cortex and endplates, fracture profile) + posterior elements.
    truth=False skips the analytic volume / centroid (sub-sample grids of the partial volume).
    `body_above`: the "body_depth" entry this function returned for the vertebra above, if any.
    Two bodies bent round a scoliotic apex sharper than they allow (a 20 mm curve over a 4-level
    view: adjacent bodies tilted up to 50 deg apart) interpenetrate on the concave side; a voxel
    inside both goes to the body it lies deeper in (their bisector, not painting order), and this
    vertebra's processes stay out of the body above.
    Returned "body_depth": (grid slices, mm inside the nearer endplate; -inf outside the body)."""
    a, b, H = d.body_width_mm / 2, d.body_depth_mm / 2, d.body_height_mm
    vc, ca, cb = canal_geom(d)
    lam = d.lamina_mm
    u0 = ca + d.pedicle_width_mm / 2  # pedicle axis distance from the midline
    w_ped = 0.15 * H
    disc_above = above.disc_below_mm if above is not None else 5.0
    sp_v0 = vc + cb + lam - 2.0
    sp_dv = d.sp_length_mm * np.cos(np.radians(d.sp_down_deg))
    sp_dw = d.sp_length_mm * np.sin(np.radians(d.sp_down_deg))
    umax = max(a, d.tp_tip_mm) + 3
    tp_dv = (d.tp_tip_mm - u0) * np.tan(np.radians(d.tp_posterior_deg))
    vmax = max(sp_v0 + sp_dv, vc + tp_dv) + d.sp_half_height_mm + 3
    wlo = -(H / 2 + d.disc_below_mm / 2 + 4) - sp_dw
    whi = H / 2 + disc_above / 2 + 4
    sl = grid.bbox(box_corners(fr, (-umax, umax), (-b - 3, vmax), (wlo, whi)))
    hfun, heights = body_heights(d, fracture)
    out = {"heights": heights, "normal_heights": body_heights(d, None)[1], "bbox": sl}
    if truth:
        # Analytic body volume: integral of H over the elliptic cross-section (fine 2D grid).
        gu, gv = np.meshgrid(np.linspace(-a, a, 401), np.linspace(-b, b, 401), indexing="ij")
        r2g = (gu / a) ** 2 + (gv / b) ** 2
        hg = np.broadcast_to(hfun(gu, gv, r2g), gu.shape)
        inside = r2g <= 1
        volume = float(np.sum(hg[inside]) * (gu[1, 0] - gu[0, 0]) * (gv[0, 1] - gv[0, 0]))
        # Endplates collapse symmetrically about w = 0, so the centroid only moves along v.
        v_centroid = float(np.sum((hg * gv)[inside]) / np.sum(hg[inside]))
        out.update(volume_mm3=volume, centroid_world=fr.to_world(0.0, v_centroid, 0.0))
    if sl is None:
        return out
    m_trab, m_cort = M(T["vertebra"], trab_hu), M(T["vertebra"], cortical_hu)
    # Each part is evaluated only inside its own box (speed: the sub-sample grids of the partial
    # volume are dense). Posterior elements first, then the body overwrites their overlap.
    pw, ph = d.pedicle_width_mm / 2, d.pedicle_height_mm / 2
    w_sup, w_inf = H / 2 + disc_above / 2 + 2, -(H / 2 + d.disc_below_mm / 2 + 2)
    pe_sl = _sub(grid, fr, sl, (-umax, umax), (b - 4, vmax), (wlo, whi))
    if pe_sl is not None:
        u, v, w = local_coords(grid, fr, pe_sl)
        shape = np.broadcast_shapes(u.shape, v.shape, w.shape)
        pe = np.zeros(shape, bool)

        def part(ur, vr, wr):
            """Views (local u, v, w and the pe mask) of a sub-box of the posterior-element box."""
            g = _sub(grid, fr, pe_sl, ur, vr, wr)
            if g is None:
                return None
            r = tuple(slice(gs.start - ps.start, gs.stop - ps.start) for gs, ps in zip(g, pe_sl))
            return u[r], v[r], w[r], pe[r]

        tan_tp = np.float32(np.tan(np.radians(d.tp_posterior_deg)))
        tan_sp = np.float32(np.tan(np.radians(d.sp_down_deg)))
        q = part((-u0 - pw, u0 + pw), (b - 4, vc + 0.25 * cb), (w_ped - ph, w_ped + ph))
        if q is not None:  # pedicles
            pu, pv, pw_, m = q
            m |= (((np.abs(pu) - u0) / pw) ** 2 + ((pw_ - w_ped) / ph) ** 2 <= 1) & (pv >= b - 4) \
                & (pv <= vc + 0.25 * cb)
        q = part((-ca - lam, ca + lam), (vc, vc + cb + lam), (-0.5 * H, 0.4 * H))
        if q is not None:  # laminae (canal removed below)
            pu, pv, pw_, m = q
            m |= ((pu / (ca + lam)) ** 2 + ((pv - vc) / (cb + lam)) ** 2 <= 1) & (pv >= vc) \
                & (np.abs(pw_ + 0.05 * H) <= 0.45 * H)
        for vcen, wr in ((vc, (w_ped, w_sup)), (vc + 8, (w_inf, w_ped))):  # articular processes
            q = part((-u0 - pw - 1, u0 + pw + 1), (vcen - 3.5, vcen + 3.5), wr)
            if q is not None:
                pu, pv, pw_, m = q
                m |= (((np.abs(pu) - u0) / (pw + 1)) ** 2 + ((pv - vcen) / 3.5) ** 2 <= 1) \
                    & (pw_ >= wr[0]) & (pw_ <= wr[1])
        for sgn in (-1.0, 1.0):  # transverse processes
            ur = (u0, d.tp_tip_mm) if sgn > 0 else (-d.tp_tip_mm, -u0)
            q = part(ur, (vc - d.tp_half_ap_mm, vc + tp_dv + d.tp_half_ap_mm),
                     (w_ped - d.tp_half_height_mm, w_ped + d.tp_half_height_mm))
            if q is not None:
                pu, pv, pw_, m = q
                au = pu * sgn
                tp_v = vc + (au - u0) * tan_tp
                m |= (((pv - tp_v) / d.tp_half_ap_mm) ** 2 + ((pw_ - w_ped) / d.tp_half_height_mm) ** 2 <= 1) \
                    & (au >= u0) & (au <= d.tp_tip_mm)
        q = part((-d.sp_half_width_mm, d.sp_half_width_mm), (sp_v0, sp_v0 + sp_dv),
                 (-0.05 * H - sp_dw - d.sp_half_height_mm, -0.05 * H + d.sp_half_height_mm))
        if q is not None:  # spinous process
            pu, pv, pw_, m = q
            sp_w = -0.05 * H - (pv - sp_v0) * tan_sp
            m |= (pv >= sp_v0) & (pv <= sp_v0 + sp_dv) & (np.abs(pw_ - sp_w) <= d.sp_half_height_mm) \
                & (np.abs(pu) <= d.sp_half_width_mm)
        q = part((-ca, ca), (vc - cb, vc + cb), (wlo, whi))
        if q is not None:
            pu, pv, pw_, m = q
            m &= ~((pu / ca) ** 2 + ((pv - vc) / cb) ** 2 <= 1)
        if body_above is not None:   # (nor does a process reach into the body above)
            pe &= ~_deeper_in_above(body_above, pe_sl, None, bodies)
        pe_cortex = cortex(pe, grid.spacing_zyx)
        m_s, v_s = mat[pe_sl], vertebrae[pe_sl]
        v_s[pe] = vid
        m_s[pe] = m_trab
        m_s[pe_cortex] = m_cort
    # Half of the largest height: H is linear in depth (extremes at the walls); the dip only lowers it.
    h_max = float(np.max(hfun(np.zeros(2), np.array([-b, b]), np.ones(2)))) / 2 + 1.0
    body_sl = _sub(grid, fr, sl, (-a, a), (-b, b), (-h_max, h_max))
    if body_sl is not None:
        u, v, w = local_coords(grid, fr, body_sl)
        r2 = (u / a) ** 2 + (v / b) ** 2
        Hh = hfun(u, v, r2) / 2
        body = (r2 <= 1) & (np.abs(w) <= Hh)
        depth = np.where(body, Hh - np.abs(w), -np.inf).astype(np.float32)
        out["body_depth"] = (body_sl, depth)
        if body_above is not None:
            body &= ~_deeper_in_above(body_above, body_sl, depth, bodies)
        shell = (((u / (a - CORTEX_MM)) ** 2 + (v / (b - CORTEX_MM)) ** 2) > 1) | (np.abs(w) > Hh - ENDPLATE_MM)
        m_s, v_s, b_s = mat[body_sl], vertebrae[body_sl], bodies[body_sl]
        v_s[body] = vid
        b_s[body] = vid
        m_s[body] = m_trab
        m_s[body & shell] = m_cort
        if vein_material is not None:  # basivertebral vein: 6x8 mm channel entering the posterior body wall
            vein = body & ((u / 3.0) ** 2 + ((v - b + 4.0) / 4.0) ** 2 <= 1) & (np.abs(w) <= 0.3 * H)
            m_s[vein] = vein_material
    if metal:  # two pedicle screws (6.5 mm), entry at the lamina, tip in the anterior body
        u, v, w = local_coords(grid, fr, sl)
        m_s, v_s = mat[sl], vertebrae[sl]
        for side in (-1.0, 1.0):
            m = _segment_dist2((u, v, w), screw_entry_local(d, side), np.array([side * 5.0, -b + 6.0, w_ped])) \
                <= 3.25 ** 2
            m_s[m] = T["metal"]
            v_s[m] = vid
    return out


def _segment_dist2(xyz, p, q):
    """Squared distance of points (three broadcastable coordinate arrays) to the segment p-q
    (a point when p == q)."""
    d = q - p
    rel = [c - pc for c, pc in zip(xyz, p)]
    t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / max(float(d @ d), 1e-12), 0, 1)
    return (rel[0] - t * d[0]) ** 2 + (rel[1] - t * d[1]) ** 2 + (rel[2] - t * d[2]) ** 2


TULIP_RADIUS_MM = 5.0   # polyaxial screw head, behind the screw's entry in the lamina
ROD_RADIUS_MM = 2.75    # 5.5 mm rod


def screw_entry_local(d: LevelDims, side: float) -> np.ndarray:
    """Local (u, v, w) entry point of a pedicle screw: mid-lamina on the pedicle's axis."""
    vc, ca, cb = canal_geom(d)
    return np.array([side * (ca + d.pedicle_width_mm / 2), vc + cb + d.lamina_mm * 0.5, 0.15 * d.body_height_mm])


def paint_spinal_rods(mat, grid, frames, dims, names) -> None:
    """A posterior construct over `names` (contiguous, cranial -> caudal, screws painted by
    paint_vertebra): a screw head (tulip) behind each screw's entry, and on each side a rod
    through the heads. Metal where it lies; the labels are left as they are (hardware outside
    the bone is no vertebra)."""
    for side in (-1.0, 1.0):
        heads = []
        for n in names:
            fr = frames[n]
            u, v, w = screw_entry_local(dims[n], side)
            heads.append(fr.to_world(u, v + TULIP_RADIUS_MM, w))
        r_max = max(TULIP_RADIUS_MM, ROD_RADIUS_MM)
        for k, c in enumerate(heads):
            segs = [(c, c, TULIP_RADIUS_MM)] + ([(heads[k - 1], c, ROD_RADIUS_MM)] if k else [])
            for p, q, r in segs:
                sl = grid.bbox(np.array([p, q]), margin_mm=r_max + 1.0)
                if sl is None:
                    continue
                mat[sl][_segment_dist2(grid.coords(sl), p, q) <= r * r] = T["metal"]


def _deeper_in_above(body_above, sl, depth, bodies) -> np.ndarray:
    """Mask over the grid slices `sl`: voxels that the body above (slices, depth; paint_vertebra's
    "body_depth") still holds and lies deeper inside than `depth` (an array over `sl`), or holds
    at all when `depth` is None."""
    above_sl, above_depth = body_above
    common = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(above_sl, sl))
    keep = np.zeros(tuple(s.stop - s.start for s in sl), bool)
    if any(c.stop <= c.start for c in common):
        return keep
    here = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(common, sl))
    there = tuple(slice(c.start - a.start, c.stop - a.start) for c, a in zip(common, above_sl))
    inside = above_depth[there] > (-np.inf if depth is None else depth[here])
    keep[here] = (bodies[common] > 0) & inside
    return keep


def _sub(grid, fr, outer, ur, vr, wr):
    """Grid slices of a local box, clipped to the slices `outer`; None if empty."""
    g = grid.bbox(box_corners(fr, ur, vr, wr))
    if g is None:
        return None
    r = tuple(slice(max(gs.start, os_.start), min(gs.stop, os_.stop)) for gs, os_ in zip(g, outer))
    return None if any(x.stop <= x.start for x in r) else r


# --- ribs, sacrum, pelvis --------------------------------------------------------------------
def paint_rib(mat, M, grid, curve, fr, d, name, side, zc, cortical_hu, marrow_hu):
    """Rib: a neck from the body's posterolateral corner (costovertebral joint, ~2 mm gap) to just
    in front of the transverse-process tip (costotransverse joint), then a flat-elliptic tube that
    follows the chest wall forward and down. T11/T12 carry short floating ribs."""
    i = SPINE_LEVELS.index(name)
    vc, _, _ = canal_geom(d)
    u0 = d.canal_width_mm / 2 + d.pedicle_width_mm / 2
    tip = d.tp_tip_mm
    tp_v = vc + (tip - u0) * np.tan(np.radians(d.tp_posterior_deg))
    p_tip = fr.to_world(side * tip, tp_v, 0.15 * d.body_height_mm)
    z0 = float(p_tip[2])
    sac_z = float(curve.point(curve.sacrum_top_s)[2])
    A, B, F = (float(x[0]) for x in outline(np.array([z0]), zc, sac_z))
    x_e = float(fr.origin[0])
    y_c = float(fr.origin[1]) - OUTLINE_OFFSET_MM
    inset = F + WALL_MUSCLE_MM + 4.0
    hh, tr = 5.5, 3.0  # half height, half thickness (mm)
    y_post = float(p_tip[1]) - (d.tp_half_ap_mm + tr + 1.5)  # passes 1.5 mm in front of the TP tip
    y_ant = y_c - (B - inset)
    Br = (y_post - y_ant) / 2
    y_e = y_post - Br
    Ar = A - inset
    th0 = float(np.arcsin(np.clip(tip / Ar, 0, 0.99)))
    th_end = {10: 0.55 * np.pi, 11: 0.35 * np.pi}.get(i, 0.85 * np.pi)  # T11/T12 floating ribs
    drop = 25.0 + 20.0 * i / 11.0  # lower ribs slope more
    m_marrow, m_cort = M(T["rib"], marrow_hu), M(T["rib"], cortical_hu)
    # Neck: from the arc's start to 2 mm off the body's posterolateral corner near its upper endplate.
    a, b = d.body_width_mm / 2, d.body_depth_mm / 2
    p0 = np.array([x_e + side * Ar * np.sin(th0), y_e + Br * np.cos(th0), z0])
    p1 = fr.to_world(side * (0.8 * a + 4.5), 0.5 * b, 0.3 * d.body_height_mm)
    _tube(mat, grid, p0, p1, 3.5, m_marrow, m_cort)
    xa = x_e + side * np.array([tip - 8, Ar + tr + 2])
    pts = np.array([[xa.min(), y_ant - 8, z0 - drop - 8], [xa.max(), y_post + 8, z0 + 8]])
    sl = grid.bbox(pts)
    if sl is None:
        return
    X = grid.axis(0, sl[2].start, sl[2].stop)[None, :]
    Y = grid.axis(1, sl[1].start, sl[1].stop)[:, None]
    dx = (X - x_e) * side
    dy = Y - y_e
    th = np.arctan2(dx / Ar, dy / Br)
    rho = np.sqrt((dx / Ar) ** 2 + (dy / Br) ** 2)
    R = np.sqrt((Ar * np.sin(th)) ** 2 + (Br * np.cos(th)) ** 2)
    dr = (rho - 1.0) * R
    cand = (np.abs(dr) <= tr) & (th >= th0) & (th <= th_end)
    iy, ix = np.nonzero(cand)
    if iy.size == 0:
        return
    zc_r = z0 - drop * (th[iy, ix] - th0) / (np.pi - th0)
    drc = dr[iy, ix]
    Z = grid.axis(2, sl[0].start, sl[0].stop)[:, None]
    e = ((Z - zc_r[None]) / hh) ** 2 + (drc[None] / tr) ** 2
    inside = e <= 1
    core = ((Z - zc_r[None]) / (hh - 1.2)) ** 2 + (drc[None] / (tr - 1.2)) ** 2 <= 1
    zz, cc = np.nonzero(inside)
    gz, gy, gx = zz + sl[0].start, iy[cc] + sl[1].start, ix[cc] + sl[2].start
    mat[gz, gy, gx] = np.where(core[zz, cc], m_marrow, m_cort).astype(np.uint8)


def _tube(mat, grid, p0, p1, radius, m_core, m_cort, shell_mm=1.2):
    """Round tube (capsule) between two world points: cortex shell around a marrow core."""
    sl = grid.bbox(np.array([p0, p1]), margin_mm=radius + 1)
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    dvec = (p1 - p0).astype(np.float32)
    L2 = float(dvec @ dvec)
    t = np.clip(((x - p0[0]) * dvec[0] + (y - p0[1]) * dvec[1] + (z - p0[2]) * dvec[2]) / L2, 0.0, 1.0)
    d2 = (x - p0[0] - t * dvec[0]) ** 2 + (y - p0[1] - t * dvec[1]) ** 2 + (z - p0[2] - t * dvec[2]) ** 2
    m_s = mat[sl]
    m_s[d2 <= radius ** 2] = m_cort
    m_s[d2 <= (radius - shell_mm) ** 2] = m_core


def paint_sacrum(mat, M, vertebrae, grid, curve, cortical_hu, trab_hu) -> bool:
    """Tapering, anteriorly concave block along the tilted sacral axis; sacral canal inside."""
    L, h1 = 100.0, 14.0
    fr = curve.sacrum_frame(curve.sacrum_top_s + h1)
    sl = grid.bbox(box_corners(fr, (-55, 55), (-45, 30), (h1 - L, h1)))
    if sl is None:
        return False
    u, v, w = local_coords(grid, fr, sl)
    frac = np.clip((h1 - w) / L, 0.0, 1.0)
    a_s = 50.0 - 36.0 * frac
    b_s = 18.0 - 8.0 * frac
    v_cen = -0.003 * (w - h1) ** 2
    sac = ((u / a_s) ** 2 + ((v - v_cen) / b_s) ** 2 <= 1) & (w <= h1) & (w >= h1 - L)
    canal = ((u / (11.0 - 5.0 * frac)) ** 2 + ((v - v_cen - 0.55 * b_s) / (5.0 - 2.0 * frac)) ** 2 <= 1) & sac
    bone = sac & ~canal
    ctx = cortex(bone, grid.spacing_zyx)
    m_s, v_s = mat[sl], vertebrae[sl]
    m_s[canal] = T["canal"]
    v_s[bone] = VERSE_IDS["sacrum"]
    m_s[bone] = M(T["sacrum_pelvis"], trab_hu)
    m_s[ctx] = M(T["sacrum_pelvis"], cortical_hu)
    return bool(bone.any())


def paint_pelvis(mat, M, grid, sac_top_pt, cortical_hu, trab_hu):
    """Iliac wings: an 8 mm elliptic shell lateral to the sacrum that flares like a bowl from the
    hip level (90 mm below S1, half-width 90 mm) to the crest (40 mm above S1, 130 mm)."""
    xs, ys, zs = (float(c) for c in sac_top_pt)
    cy, Bw, th = ys - 60.0, 75.0, 4.0
    z_lo, z_hi, a_lo, a_hi = zs - 90.0, zs + 40.0, 90.0, 130.0
    pts = np.array([[xs - a_hi - 10, cy - 20, z_lo], [xs + a_hi + 10, ys + 30, z_hi]])
    sl = grid.bbox(pts, margin_mm=0.0)
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    A = a_lo + (a_hi - a_lo) * np.clip((z - z_lo) / (z_hi - z_lo), 0.0, 1.0)  # (nz, 1, 1)
    dx, dy = x - xs, y - cy
    rho = np.sqrt((dx / A) ** 2 + (dy / Bw) ** 2)
    ang = np.arctan2(dx / A, dy / Bw)
    R = np.sqrt((A * np.sin(ang)) ** 2 + (Bw * np.cos(ang)) ** 2)
    m = (np.abs((rho - 1) * R) <= th) & (np.abs(dx) >= 48) & (y >= cy - 15) & (y <= ys + 30) \
        & (z >= z_lo) & (z <= z_hi)
    ctx = cortex(m, grid.spacing_zyx)
    m_s = mat[sl]
    keep = m & (M.tissue[m_s] != T["sacrum_pelvis"])
    m_s[keep] = M(T["sacrum_pelvis"], trab_hu)
    m_s[keep & ctx] = M(T["sacrum_pelvis"], cortical_hu)
