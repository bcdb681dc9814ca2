"""Level names from the anchors: the sacrum (L5 above it) and the last rib-bearing vertebra (T12)."""

from __future__ import annotations

import numpy as np

from ... import levels as lv


ALA_FRACTION = 0.12      # share of a segment's bone lateral-anterior (sacral alae): real 3 mm CT's sacrum
#                          0.149-0.156 (turned, or its marrow kept), L5 0.081-0.099; phantoms' sacrum 0.27-0.31,
#                          their other lowest segments at most 0.085
ALA_ABOVE_RATIO = 0.5    # ... the vertebra above holds less than this much of the sacrum's
RIB_VIEW_BELOW_HEAD_MM = 30.0  # scan reach below a rib head that shows its rib leaving the column


def _names_from(anchor_index: int, anchor_name: str, n: int) -> list[str]:
    """Names for segments 0..n-1 (caudal -> cranial) given one anchored segment."""
    seq = lv.CERVICAL + lv.THORACIC + lv.LUMBAR + ("sacrum",)
    a = seq.index(anchor_name)
    out = []
    for i in range(n):
        j = a - (i - anchor_index)   # cranial segments go up the list
        out.append(seq[j] if 0 <= j < len(seq) else "")
    return out


def _find_sacrum(segs, vert, dx, anterior):
    """Index of the lowest segment if it is the sacrum (wide alae lateral to the body)."""
    if len(segs) < 2:
        return None
    scores, ala = [], []
    for sg in segs[:4]:
        m = vert == sg.label
        # Alae: solid bone lateral to the body (25-50 mm from the canal axis) in front of the
        # canal wall; lumbar transverse processes are thin and sit behind that wall.
        lat = m & (np.abs(dx) > 25.0) & anterior
        ala.append(float(lat.sum()))
        scores.append(ala[-1] / max(1.0, m.sum()))
    # The sacrum has much more lateral-anterior bone than any lumbar vertebra. Sacral
    # segments (fused, with rudimentary discs) may be split: the highest sacral one counts.
    sac = [i for i, sc in enumerate(scores) if sc > ALA_FRACTION]
    if not sac:
        return None
    k = max(sac)
    # The vertebra above must hold less than half as much of it. (Amounts, not shares: a whole
    # sacrum's share is diluted by its fused lower segments. Real 3 mm CT: sacrum 0.154 of its
    # voxels, L5 0.081, but L5 holds 0.34 of the sacrum's lateral-anterior bone.)
    if k + 1 < len(ala) and ala[k + 1] > ALA_ABOVE_RATIO * ala[k]:
        return None
    return k


def _name_levels(segs, sacrum_seg, body_top_mm, warnings):
    """Level names (caudal -> cranial) from the anchors in view: the sacrum for L5 and the
    lowest rib-bearing vertebra for T12, both when both are seen (a transitional spine with 4 or
    6 lumbar vertebrae is named from both and flagged uncertain), a flagged guess when neither is.
    `body_top_mm`: per working label, how far above the scan's caudal end its body's top lies.
    Returns (names, confidence, uncertain, index of T12 or None); warnings are appended."""
    n = len(segs)
    rib_idx = [i for i, sg in enumerate(segs) if sg.ribs > 0]
    # Ribs cut short by the scan's end: a rib-bearing vertebra for a guess, not an anchor.
    any_rib_idx = [i for i, sg in enumerate(segs) if sg.rib_bearing]
    # The lowest rib-bearing vertebra is T12 only when a rib-free vertebra is seen below it.
    # ... and only when the scan reaches far enough below that one's rib heads (at the top of its
    # body) to show a rib leaving the column: ribs descend laterally from their heads, so a
    # vertebra cut short by the scan's caudal end may hide its ribs, and a thoracic slab would
    # be named T12/L1 with confidence.
    t12 = None
    if rib_idx and rib_idx[0] > (0 if sacrum_seg is None else 1) and any_rib_idx[0] == rib_idx[0]:
        if body_top_mm.get(segs[rib_idx[0] - 1].label, 0.0) >= RIB_VIEW_BELOW_HEAD_MM:
            t12 = rib_idx[0]
        else:
            warnings.append("the vertebra below the lowest rib-bearing one is cut by the field of view; "
                            "its ribs may be out of view, so the last rib is not confirmed")
    uncertain = False
    confidence = 0.95
    if sacrum_seg is not None and t12 is not None:
        names = _names_from(sacrum_seg, "sacrum", n)
        n_lumbar = t12 - sacrum_seg - 1
        if n_lumbar != 5:
            warnings.append(f"{n_lumbar} rib-free vertebrae between the sacrum and the last rib-bearing "
                            "vertebra; lumbar levels named from the sacrum")
            if n_lumbar in (4, 6):
                # A transitional spine: lumbar from the sacrum (L6 when six), thoracic from the ribs.
                # caudal -> cranial; VerSe calls the sixth lumbar vertebra (the lowest) L6.
                lumb = ["L6", "L5", "L4", "L3", "L2", "L1"] if n_lumbar == 6 else ["L5", "L4", "L3", "L2"]
                thor = _names_from(t12, "T12", n)
                for i in range(t12, n):
                    names[i] = thor[i]
                for k, i in enumerate(range(sacrum_seg + 1, t12)):
                    names[i] = lumb[k]
            for i in range(sacrum_seg + 1, min(n, t12 + 1)):
                segs[i].flags.append("anchor_conflict")
            # Anchors that disagree leave the names open: a transitional spine, a hypoplastic
            # twelfth rib missed, or a disc missed or found inside a body all look alike here.
            warnings.append("the sacrum and the last rib disagree on the level names; they are uncertain")
            uncertain = True
            confidence = 0.6
    elif sacrum_seg is not None:
        names = _names_from(sacrum_seg, "sacrum", n)
        confidence = 0.9
    elif t12 is not None:
        names = _names_from(t12, "T12", n)
        confidence = 0.85
    else:
        uncertain = True
        confidence = 0.2
        names = _guess_names(segs, any_rib_idx, n)
        warnings.append("no anatomical anchor (sacrum or last rib) in view; level names are a guess")
    if sacrum_seg is not None:
        # Segments below the one taken as the sacrum (its highest) are the rest of it, split at a
        # rudimentary sacral disc: they were left unlabelled (a straight canal track through a
        # 40-80 mg/cm3 lumbar phantom's sacrum split it: sacrum Dice 0.87 -> 0.33-0.76, and
        # 0.71-0.84 with the pieces below named).
        for i in range(sacrum_seg):
            names[i] = "sacrum"
    return names, confidence, uncertain, t12


def _guess_names(segs, rib_idx, n):
    """Best guess without anchors (always flagged uncertain): rib-bearing vertebrae in view ->
    the lowest one is taken as T12 (the most caudal a rib-bearing vertebra can be); none ->
    the lowest is taken as L5 (a lumbar view usually reaches down towards the sacrum)."""
    if rib_idx:
        return _names_from(rib_idx[0], "T12", n)
    return _names_from(0, "L5", n)
