"""Ribs: rib heads given back from the bodies, the rib-bearing vertebrae counted (each rib to the
vertebra between whose tilted disc planes its medial end lies), the bodies' frames they use."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .common import ROI_LATERAL_MM, _SLICE8
from .discs import _binned_percentile


THORACIC_HALF_WIDTH_MM = 30.0       # transverse process tips of T10-T12 (bodies >= 38 mm wide)
TP_TIP_T1_MM = 38.0                 # ... of T1 (body ~28 mm wide): upper thoracic processes reach further
BODY_WIDTH_T1_MM = 28.0
BODY_WIDTH_T10_MM = 38.0
THORACIC_BODY_HALF_WIDTH_MM = 22.0  # thoracic bodies; rib heads sit just lateral
RIB_HEAD_MIN_MM = 15.0              # rib heads articulate this far from the midline
RIB_NECK_MM = 6.0                   # a rib head / neck (7-10 mm thick) left on a body is thinner than a
#                                     disc of this radius; thoracic bodies hold it (8 mm: phantom T4-T10
#                                     whole +0.004; 10 mm eats the T6 body)
RIB_HEAD_MAX_MM3 = 1000.0  # a rib head beside a body (~10 mm across)
RIB_MAX_MM3 = 60000.0    # bigger bone pieces beside the column are pelvis / shoulder girdle
RIB_STUB_MIN_MM = 25.0   # rib necks run lateral of the pedicles and articular processes
RIB_STUB_END_MM = 35.0   # ... and lie this far out where the scan's caudal end cuts them
RIB_STUB_RISE_MM = 8.0   # ... rising at least this much from there to the rib head
RIB_GAP_MM = 12.0        # a rib's bone may resume this far outside the column box (the joints and
#                          the thin rib neck fall below the bone threshold, more so on noisy scans)
RIB_LINK_MM = 5.0        # a rib's pieces this close are one rib (its neck broken at coarse spacing; ribs
#                          of neighbouring levels lie 8 mm or more apart there)
RIB_TILT_REACH_MM = 30.0  # a rib leans with its vertebra only out to its costotransverse joint (the transverse
#                          process tip, 25-35 mm lateral): a root on the box wall, 50-60 mm out, is judged as if
#                          this far from the column's axis (scoliotic T12-L4, 20 deg lean: the 12th ribs' roots
#                          went to T12 and L1 and the view was named one level high)
RIB_RISE_REACH_MM = 20.0  # a piece is judged rising or descending this far lateral of the box wall
STUB_CONTRADICTED_BY = 2  # rib-free vertebrae directly above that make a rib stub pelvis (_drop_contradicted_stubs)
RIB_PAIR_LEVELS = 0.75   # a left and a right rib root this close along the column (vertebra units) are a pair


def _lateral_mm(vert, frames, dx, sp) -> np.ndarray:
    """Per working voxel, how far (mm) it lies sideways: |dx| from the canal, or for a voxel of a
    labelled vertebra with a body, the nearer of that and the left-right part of its offset from
    the line through the body's centroid along its superior axis (_body_frames). In a slice
    through a disc that leans sideways (scoliosis) the vertebra below shows only its body's
    raised side, 8-25 mm off the canal, which the rib path took as rib neck (random native T4-T7
    at 0.9x0.9x2.5 mm, 19 mm scoliosis: T7 whole / body 0.909 / 0.899 -> 0.960 / 0.928). The
    body's own axis alone costs the 3 mm phantoms' T11 / T12 0.004-0.006 (measured with the
    principal axis and again with the disc planes' axis), so a voxel counts as lateral only
    when it is by both measures."""
    out = np.array(np.broadcast_to(np.abs(dx), vert.shape), np.float32)
    objs = ndi.find_objects(vert)
    for label, (centre, up, _) in frames.items():
        o = objs[label - 1] if label - 1 < len(objs) else None
        if o is None:
            continue
        z, y, x = np.nonzero(vert[o] == label)
        rel = np.stack([z + o[0].start, y + o[1].start, x + o[2].start], axis=1) - centre
        side = rel[:, 2] - (rel @ up) * up[2]
        out[o][z, y, x] = np.minimum(out[o][z, y, x], np.abs(side) * sp)
    return out


def _give_rib_heads_back(segs, vert, bodies, ribs, box, dx, dy, frames, sp) -> np.ndarray:
    """Rib heads and necks inside the column box belong to the ribs (in place): thoracic
    vertebrae (the rib-bearing ones and all above them, rib stubs included) are narrower than the
    box, their transverse processes end about 30 mm from the midline (sideways as _lateral_mm
    measures it). Returns the rib bone: the ribs found outside the box and what was taken from
    the column."""
    any_rib_idx = [i for i, sg in enumerate(segs) if sg.rib_bearing]
    if not any_rib_idx:
        return ribs
    adx = _lateral_mm(vert, frames, dx, sp)
    in_body = bodies > 0
    is_thoracic = np.zeros(256, bool)
    for sg in segs[any_rib_idx[0]:]:
        is_thoracic[sg.label] = True
    # Follow each rib medially through the labelled bone beside the body and in front of
    # the transverse processes (rib neck and head), and give that bone back to the rib.
    # (The path is taken before the width cut below, which would break it between the box
    # wall and the rib neck.)
    rib_zone = (adx > RIB_HEAD_MIN_MM) & (dy < 2.0)
    path = is_thoracic[vert] & rib_zone
    beyond = is_thoracic[vert] & (adx > _tp_reach_mm(segs, bodies, is_thoracic, adx)[vert])
    # A thoracic vertebra whose rib was not found outside the box (3 mm: thin sloping mid-thoracic
    # ribs fall below the bone threshold between the box wall and ~70 mm out) still has its rib
    # neck inside: its bone beyond the transverse processes' reach, in front of the canal and off
    # the body (a wide body's own rim reaches that far: real 2 mm slab, T12 with only rib stubs).
    # That seeds the path too, grown only to about the body's width (further it would run on
    # through the pedicles).
    # (so does one whose ribs were found only broken at the neck, _find_ribs: the path from the
    # stub at the box wall misses the neck's bone further in, 3 mm T8-L2 phantom: T10 0.891 ->
    # 0.868 whole)
    ribless = np.zeros(256, bool)
    for sg in segs:
        ribless[sg.label] = is_thoracic[sg.label] and sg.ribs == sg.broken_ribs
    neck = beyond & rib_zone & ribless[vert] & (bodies == 0)
    vert[beyond] = 0
    del beyond
    bodies[is_thoracic[bodies] & (adx > THORACIC_BODY_HALF_WIDTH_MM)] = 0
    grown = ribs & ~box
    steps = int(np.ceil((ROI_LATERAL_MM - RIB_HEAD_MIN_MM) / sp)) + 2
    grown = ndi.binary_dilation(grown, iterations=steps, mask=grown | path)
    if neck.any():
        steps = int(np.ceil((THORACIC_HALF_WIDTH_MM - THORACIC_BODY_HALF_WIDTH_MM) / sp)) + 1
        grown |= ndi.binary_dilation(neck, iterations=steps, mask=path)
    del neck
    vert[grown & path] = 0
    bodies[grown & path] = 0
    # The path stops a few voxels short of the head where the neck runs obliquely; what is
    # left sticks out of the body's rounded outline as a spur attached to the removed rib.
    # An axial opening wider than the neck tells that spur from the body (extra path steps
    # ran on into the bodies instead).
    _drop_rib_spurs(vert, bodies, is_thoracic, grown & path, rib_zone,
                    (adx > THORACIC_BODY_HALF_WIDTH_MM) & (dy < 0.0), sp)
    return ribs | _rib_heads_taken(in_body & (vert == 0), bodies > 0, sp)


def _rib_heads_taken(taken, body, sp):
    """The pieces of bone `taken` from the bodies as rib whose part beside a body (within two
    voxels) is a rib head's size (RIB_HEAD_MAX_MM3); a bigger one is the body's own side, taken
    where a scoliotic apex shifts it lateral of the canal (T11-L2 phantom, T12 leaning 17 deg:
    1.76 cm3 beside the body; rib heads 0.27-0.56 cm3 on the phantoms)."""
    heads = np.zeros_like(taken)
    box = ndi.find_objects(taken.astype(np.uint8))
    if not box:
        return heads
    crop = tuple(slice(max(0, b.start - 2), b.stop + 2) for b in box[0])
    lab, n = ndi.label(taken[crop], structure=np.ones((3, 3, 3), bool))
    beside = ndi.binary_dilation(body[crop], iterations=2) & (lab > 0)
    small = np.bincount(lab[beside], minlength=n + 1) * sp ** 3 <= RIB_HEAD_MAX_MM3
    small[0] = False
    heads[crop] = small[lab]
    return heads


def _tp_reach_mm(segs, bodies, is_thoracic, adx):
    """Per working label: how far from the midline a thoracic vertebra's transverse processes
    reach. The upper thoracic bodies are narrower but their processes longer (tips ~38 mm out at
    T1, ~30 mm at T10-T12): interpolated on the body's width, measured over its anterior half
    (the rib heads articulate posterolaterally)."""
    reach = np.full(256, THORACIC_HALF_WIDTH_MM)
    objs = ndi.find_objects(bodies)
    for sg in segs:
        o = objs[sg.label - 1] if sg.label - 1 < len(objs) else None
        if o is None or not is_thoracic[sg.label]:
            continue
        z, y, x = np.nonzero(bodies[o] == sg.label)
        ant = y < np.median(y)
        if ant.sum() < 10:
            continue
        a = np.broadcast_to(adx, bodies.shape)[o][z[ant], y[ant], x[ant]]
        # (each slice's width, and their median: rib heads left on the body's top or bottom
        # slices widen those only; random arterial T4-T7, T4 measured 37.6 mm wide over all its
        # voxels against 33.4 mm slice by slice: reach 30.4 -> 33.7 mm, its process tips at
        # 35.2 mm; whole 0.891 -> 0.903)
        per_slice = _binned_percentile(a, z[ant], int(z[ant].max()) + 1, 98.0, min_count=10)
        per_slice = per_slice[np.isfinite(per_slice)]
        width_mm = 2.0 * float(np.median(per_slice) if per_slice.size else np.percentile(a, 98))
        t = (width_mm - BODY_WIDTH_T1_MM) / (BODY_WIDTH_T10_MM - BODY_WIDTH_T1_MM)
        reach[sg.label] = float(np.clip(TP_TIP_T1_MM + t * (THORACIC_HALF_WIDTH_MM - TP_TIP_T1_MM),
                                        THORACIC_HALF_WIDTH_MM, TP_TIP_T1_MM))
    return reach


def _drop_rib_spurs(vert, bodies, is_thoracic, rib_taken, zone, beside, sp):
    """Give rib heads and necks left on thoracic vertebrae back to the rib (in place): body
    voxels in the costovertebral `zone` that an axial opening with a disc of RIB_NECK_MM radius
    removes (a spur on the body's rounded outline), and vertebra voxels `beside` the body, in
    pieces that touch the rib bone already taken from the column."""
    fg = is_thoracic[vert]
    if not fg.any() or not rib_taken.any():
        return
    r = max(1, int(round(RIB_NECK_MM / sp)))
    zs, ys, xs = ndi.find_objects(fg.astype(np.uint8))[0]
    crop = (zs, slice(max(0, ys.start - r - 1), ys.stop + r + 1), slice(max(0, xs.start - r - 1), xs.stop + r + 1))
    cube = np.ones((3, 3, 3), bool)
    rib = ndi.binary_dilation(rib_taken[crop], structure=cube)

    def touching(mask):
        lab, _ = ndi.label(mask, structure=cube)
        hit = np.unique(lab[rib & mask])
        return np.isin(lab, hit[hit > 0])

    body = is_thoracic[bodies[crop]]
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (yy ** 2 + xx ** 2 <= r * r + r)[None]
    spur = touching(body & ~ndi.binary_opening(body, structure=disc) & np.broadcast_to(zone, vert.shape)[crop])
    vert[crop][spur] = 0
    bodies[crop][spur] = 0
    # Beside the body and in front of the canal (lateral of the body width cut) a thoracic
    # vertebra has no bone of its own (pedicles lie nearer the canal, transverse processes
    # behind it): bone there that touches the rib (or the spur just taken) is rib head.
    rib |= ndi.binary_dilation(spur, structure=cube)
    near = is_thoracic[vert[crop]] & (bodies[crop] == 0) & np.broadcast_to(beside, vert.shape)[crop]
    vert[crop][touching(near)] = 0


def _body_frames(segs, bodies, planes) -> dict[int, tuple[np.ndarray, np.ndarray, float]]:
    """Per working label with a body: its centroid (z, y, x, working voxels), its superior axis
    and its half-height along that axis (voxels; a uniform slab's, from the variance). The axis
    is the mean normal of the disc planes that bound the body (`planes`, _disc_planes: tilted
    with the discs, sagittally and sideways), not the body's principal axis: a thoracic body is
    about as tall as it is deep, so its moments hardly tell the axes apart (phantom sweep, 530
    bodies against the truth: principal axis median 7.9 deg off, 104 over 15 deg, up to 55 deg
    at 2x2x3 mm; disc normals median 1.6 deg, all within 14 deg). A body cut by the view's end
    has the disc on its other side (its moments say little: a real caudal L1 cut by the view
    leaned 21 deg by them and took T12's rib). A lone body with no disc in view keeps its
    principal axis nearest the slice axis. One pass of moment sums over the body voxels."""
    idx = np.nonzero(bodies)
    lab = bodies[idx]
    pts = [c.astype(float) for c in idx]
    counts = np.bincount(lab, minlength=256).astype(float)
    sums = [np.bincount(lab, weights=c, minlength=256) for c in pts]
    second = {(a, b): np.bincount(lab, weights=pts[a] * pts[b], minlength=256)
              for a in range(3) for b in range(a, 3)}
    del idx, lab, pts
    out = {}
    for sg in segs:
        n = counts[sg.label]
        if n < 10:
            continue
        mean = np.array([s_[sg.label] / n for s_ in sums])
        cov = np.empty((3, 3))
        for (a, b), m in second.items():
            cov[a, b] = cov[b, a] = m[sg.label] / n - mean[a] * mean[b]
        # (segment i lies between disc planes i - 1 and i)
        i = int(sg.s_lo)
        normals = [planes[j][1] * np.sign(planes[j][1][0]) for j in (i - 1, i) if 0 <= j < len(planes)]
        if normals:
            up = np.sum(normals, axis=0)
            up = up / np.linalg.norm(up)
        else:
            axes = np.linalg.eigh(cov)[1]
            up = axes[:, int(np.argmax(np.abs(axes[0])))]
            up = up if up[0] > 0 else -up
        # (var = h^2 / 12 for a uniform slab of height h)
        out[sg.label] = (mean, up, 0.5 * float(np.sqrt(max(12.0 * (up @ cov @ up), 0.0))))
    return out


def _rib_rooms(frames):
    """The room of each vertebra with a body: labels caudal -> cranial and the disc planes
    between them [(point, unit normal)], zyx working voxels. A disc's plane lies half-way between
    the two bodies' facing ends and is tilted as the mean of their axes."""
    order = sorted(frames, key=lambda k: frames[k][0][0])      # caudal -> cranial
    planes = []
    for a, b in zip(order[:-1], order[1:]):
        (ca, ua, ha), (cb, ub, hb) = frames[a], frames[b]
        planes.append((0.5 * ((ca + ha * ua) + (cb - hb * ub)), (ua + ub) / np.linalg.norm(ua + ub)))
    return order, planes


def _medial(frames, p, sp) -> np.ndarray:
    """Rib root p (zyx working voxels) moved sideways to at most RIB_TILT_REACH_MM from the
    column's axis (the bodies' centres, interpolated at its height), where the tilted disc planes
    judge it."""
    p = np.array(p, float)
    centres = sorted((c for c, _, _ in frames.values()), key=lambda c: c[0])
    x_axis = float(np.interp(p[0], [c[0] for c in centres], [c[2] for c in centres]))
    reach = RIB_TILT_REACH_MM / sp
    p[2] = x_axis + float(np.clip(p[2] - x_axis, -reach, reach))
    return p


def _level_coordinate(frames, p) -> float:
    """Where point p lies along the column in vertebra units: k + 0.5 at the middle of the k-th
    room from the caudal end (between its disc planes; an end vertebra's outer side is its body's
    end), k at the disc plane below it."""
    order, planes = _rib_rooms(frames)
    p = np.asarray(p, float)
    signed = [float((p - pnt) @ nrm) for pnt, nrm in planes]
    level = sum(d > 0 for d in signed)
    c, u, h = frames[order[level]]
    along = float((p - c) @ u)
    below = signed[level - 1] if level > 0 else along + h     # above the room's lower side
    above = -signed[level] if level < len(planes) else h - along
    return level + float(np.clip(below / max(below + above, 1e-6), 0.0, 1.0))


def _rib_level(segs, frames, root_zyx, sp):
    """The vertebra a rib belongs to, from its medial end (ribs slope down, so the label of the
    bone they touch is less reliable), or None when that lies over 25 mm from the vertebra's
    mid-plane (through its centroid, across its superior axis). Each vertebra holds the room
    between the planes of the discs above and below it (_rib_rooms). The tilt counts, out to
    RIB_TILT_REACH_MM from the column's axis (_medial): there a root sits 4 mm higher or lower on
    an 8 degree scoliotic tilt. (Each body's own mid-plane does not do: at a scoliotic apex two
    neighbours lean opposite ways, their mid-planes cross beside the column, and a root there is
    as near to both.)"""
    p = _medial(frames, root_zyx, sp)
    order, planes = _rib_rooms(frames)
    label = order[sum(int((p - pnt) @ nrm > 0) for pnt, nrm in planes)]
    c, u, _ = frames[label]
    if abs(float((p - c) @ u)) * sp > 25.0:
        return None
    return next((sg for sg in segs if sg.label == label), None)


def _paired_roots(roots, sides, frames, sp):
    """Where each rib is judged: the middle of its pair where the rib opposite lies within
    RIB_PAIR_LEVELS of it along the column (_level_coordinate, at _medial) and each is the other's
    nearest there, else its own root. A pair's middle lies near the column's axis, where an error in the
    vertebrae's sideways lean does not move it between rooms; a root 55 mm lateral does (tight
    scoliotic T12-L3: T12's two roots lay 0.9 of a half-height apart along its estimated axis,
    and the left one went to L1)."""
    coord = np.array([_level_coordinate(frames, _medial(frames, r, sp)) for r in roots])
    out = [np.asarray(r, float) for r in roots]
    for i in range(len(roots)):
        opp = [j for j in range(len(roots)) if sides[j] != sides[i]]
        if not opp:
            continue
        j = min(opp, key=lambda k: abs(coord[k] - coord[i]))
        back = min((k for k in range(len(roots)) if sides[k] == sides[i]), key=lambda k: abs(coord[k] - coord[j]))
        if back == i and abs(coord[j] - coord[i]) < RIB_PAIR_LEVELS:
            out[i] = 0.5 * (np.asarray(roots[i], float) + np.asarray(roots[j], float))
    return out


def _find_ribs(segs, vert, frames, bone, box, dx, sp, ribless=frozenset()):
    """Count ribs per vertebra: elongated bone pieces outside the column box whose medial end
    meets the box's lateral wall next to the column (or a short piece there with such a piece
    that reaches no wall within RIB_LINK_MM: a rib broken at its neck), and that do not rise
    laterally (_rises_laterally). A rib is given to the vertebra whose room
    between its disc planes holds that medial end, or its pair's middle (_paired_roots,
    _rib_level; ribs slope down, so labels of the bone they touch are less reliable than the
    body level); none to the working labels in `ribless` (the sacrum and L5, once the sacrum
    is found: the bone beside them is pelvis)."""
    outside = bone & ~box
    ribs = np.zeros(vert.shape, bool)
    lab, n = ndi.label(outside)
    if n == 0:
        return ribs
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * sp ** 3
    objs = ndi.find_objects(lab)
    if not frames:
        return ribs
    # Rib roots: just outside the lateral walls of the box, beside labelled column bone.
    wall = np.broadcast_to((np.abs(dx) >= ROI_LATERAL_MM) & (np.abs(dx) < ROI_LATERAL_MM + RIB_GAP_MM), vert.shape)
    near_col = ndi.binary_dilation(vert > 0, iterations=max(1, int(round(RIB_GAP_MM / sp))), mask=wall | (vert > 0))
    found = []   # (component indices, root zyx, side)
    stubs, orphans = [], set()
    for i, o in enumerate(objs):
        v = sizes[i + 1]
        if o is None or v > RIB_MAX_MM3:
            continue
        ext = np.array([(sl.stop - sl.start) * sp for sl in o])
        shaft = v >= 300.0 and max(ext[1], ext[2]) >= 30.0   # ribs run laterally / antero-posteriorly
        touch = near_col[o] & wall[o] & (lab[o] == i + 1)
        if touch.sum() < 2:
            if shaft:
                orphans.add(i)
            continue
        root = np.array([c.mean() + sl.start for c, sl in zip(np.nonzero(touch), o)])
        if shaft and _rises_laterally(lab[o] == i + 1, np.broadcast_to(np.abs(dx), vert.shape)[o],
                                      root[0] - o[0].start, sp):
            continue
        side = np.sign(np.broadcast_to(dx, vert.shape)[tuple(np.round(root).astype(int))])
        (found if shaft else stubs).append(([i], root, side))
    # A rib whose neck thins below the bone threshold breaks into a short piece at the box wall
    # and its shaft a few mm further out, which reaches no wall (random T4-T8 at 2x2x3 mm, 20 HU
    # noise: both of T8's ribs, 2.8 and 4.0 mm gaps; T8 was taken for a rib-free L1 and the view
    # named T9-L1 with confidence). A stub and a shaft of no root within RIB_LINK_MM are one rib.
    for idx, root, side in stubs:
        j = _linked_shaft(lab, objs, idx[0], orphans, sp)
        if j is not None:
            orphans.discard(j)
            found.append((idx + [j], root, side))
    if not found:
        return ribs
    judged = _paired_roots([r for _, r, _ in found], [sd for _, _, sd in found], frames, sp)
    for (idx, _, _), point in zip(found, judged):
        sg = _rib_level(segs, frames, point, sp)
        if sg is None or sg.label in ribless:
            continue
        sg.ribs += 1
        sg.broken_ribs += len(idx) > 1
        for i in idx:
            o = objs[i]
            ribs[o] |= lab[o] == i + 1
    return ribs


def _drop_contradicted_stubs(segs) -> None:
    """Rib stubs are weak evidence (a rib cut by the view's caudal end). Ribs run from T1 to T12
    without a gap, so a vertebra with stubs under STUB_CONTRADICTED_BY rib-free vertebrae is not
    thoracic: its "stub" is pelvis (a sacral ala or iliac wing cut by the view; real 3 mm CT cut
    at the L5/S1 disc: L5 took two, the view was guessed as T7-T12). Cleared in place. (One
    rib-free vertebra above is allowed: a thin mid-thoracic rib can be missed at 3 mm.)"""
    for i in reversed(range(len(segs))):   # (cranial first: a stub cleared counts as rib-free below it)
        sg = segs[i]
        above = segs[i + 1:i + 1 + STUB_CONTRADICTED_BY]
        if sg.rib_stubs and len(above) == STUB_CONTRADICTED_BY and not any(a.rib_bearing for a in above):
            sg.rib_stubs = 0


def _rises_laterally(piece, adx, root_z, sp) -> bool:
    """Whether a bone piece outside the column box lies higher RIB_RISE_REACH_MM and more lateral
    of its root (z index root_z in the piece's box) than at the root: an iliac wing, which flares
    up from the sacroiliac joint to its crest beside L4/L5, not a rib, which descends from its
    head. (Real 3 mm CT cut 0-15 mm below the L5/S1 disc: both iliac wings, 36-38 cm3 in view,
    were the only bone beside L5 and came out as its ribs; they rise 6-8 mm there, the 12th
    rib descends 18 mm and the phantoms' ribs 6-10 mm.)"""
    far = piece & (adx >= ROI_LATERAL_MM + RIB_RISE_REACH_MM)
    if not far.any():
        return False
    return float(np.nonzero(far)[0].mean()) > root_z


def _linked_shaft(lab, objs, i, orphans, sp):
    """The piece among `orphans` (indices into objs) nearest to piece i within RIB_LINK_MM, or None."""
    if not orphans:
        return None
    m = int(np.ceil(RIB_LINK_MM / sp))
    box = tuple(slice(max(0, sl.start - m), min(n, sl.stop + m)) for sl, n in zip(objs[i], lab.shape))
    local = lab[box]
    dist = ndi.distance_transform_edt(local != i + 1, sampling=sp)
    near = (dist <= RIB_LINK_MM) & np.isin(local - 1, list(orphans)) & (local > 0)
    if not near.any():
        return None
    return int(local[near][np.argmin(dist[near])]) - 1


def _find_rib_stubs(segs, vert, frames, dx, dy, sp, ribless=frozenset()):
    """Count ribs cut short by the caudal end of the scan (a thin slab at the thoracolumbar
    junction): a rib descends laterally from its head beside the pedicle, so in view it is a bar
    of the vertebra's bone that leaves the scan's caudal end well lateral of the arch, as a
    separate cross-section there, and rises medially towards its head. The outside-the-box
    test of _find_ribs cannot see it (the piece in view stays inside the column box). Lumbar
    transverse processes run level and join their arch in the same slice; articular processes
    stay medial. Counted in segs[].rib_stubs, for the vertebra _rib_level gives the head to
    (none for the labels in `ribless`: the sacrum's alae, cut by the view, look like such a bar)."""
    ke = max(1, int(round(4.0 / sp)))           # the end slab: the last few mm of the scan
    # Only the caudal part of the scan can hold such a rib with its head (about one vertebra).
    zc = min(vert.shape[0], ke + int(round(60.0 / sp)))
    if vert.shape[0] <= 2 * ke or not (vert[:ke] > 0).any():
        return
    if not frames:
        return
    v = vert[:zc] > 0
    adx = np.abs(dx[:zc])                        # (z, 1, x): broadcast, not materialised
    lateral = v & (adx >= RIB_STUB_MIN_MM) & (dy[:zc] > -10.0)
    lab, n = ndi.label(lateral)
    if n == 0:
        return
    # In-plane pieces of vertebra bone in the end slab that reach medial of the rib zone: the
    # arch, or a transverse process joined to it.
    end_lab, _ = ndi.label(v[:ke], structure=_SLICE8)
    joined = np.unique(end_lab[(end_lab > 0) & (adx[:ke] < RIB_STUB_MIN_MM)])
    for i, o in enumerate(ndi.find_objects(lab)):
        if o is None or o[0].start >= ke:
            continue
        m = lab[o] == i + 1
        a = np.broadcast_to(adx[o[0], :, o[2]], m.shape)
        zz = np.nonzero(m)[0] + o[0].start
        am = a[m]
        # its cross-section at the scan's end: well lateral, and not joined to the arch there
        tip = m & (a >= RIB_STUB_END_MM)
        tip[max(0, ke - o[0].start):] = False
        if not tip.any():
            continue
        ez = slice(o[0].start, min(ke, o[0].stop))
        if np.isin(end_lab[ez, o[1], o[2]][tip[:ez.stop - ez.start]], joined).any():
            continue
        medial = am < RIB_STUB_MIN_MM + 5.0
        at_end = zz < ke
        if not medial.any() or (zz[medial].mean() - zz[at_end].mean()) * sp < RIB_STUB_RISE_MM:
            continue
        root = np.array([c[medial].mean() + sl.start for c, sl in zip(np.nonzero(m), o)])
        sg = _rib_level(segs, frames, root, sp)
        if sg is not None and sg.label not in ribless:
            sg.rib_stubs += 1
