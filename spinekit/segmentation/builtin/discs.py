"""Intervertebral discs along the body centreline: density profiles over tilted slabs, the
deep minima and the dark bands between endplates, each disc's plane and the carving of its content."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks

from ...errors import InputError
from .canal import _smooth_track


MIN_VERTEBRA_MM = 12.0   # shortest vertebra + disc pitch kept (crush fractures included)
DISC_DEPTH = 0.45        # a disc slab holds under half the bone of the bodies next to it
CLOSE_DISC_FRACTION = 0.6  # endplate-only bands closer than this share of the disc spacing: the weaker goes
CLOSE_DISC_PERCENTILE = 75.0  # ... the spacing's centile over the gaps (a false band makes two short gaps)
CLOSE_DISC_MERGED = 1.25   # ... and only where its two gaps merged are at most this share of the spacing
FAINT_BAND_SHARE = 0.25  # an endplate-only band this much fainter than the clearer band beside it: marrow, if ...
SHORTEST_PITCH_SHARE = 0.45  # no vertebra + disc is shorter than this share of the spacing (a grade-3
#                              crush keeps half its body and all of its disc: over half a pitch)
WEAK_DISC_DEPTH = 0.85   # a tilted / narrow disc, accepted where the disc spacing expects one
MARROW_BAND_REACH = 0.6  # banded weak dips this share of the spacing beside a sure dip may stand for it (dark marrow)
ENDPLATE_PERCENTILE = 25.0  # low percentile of body HU per slab: the disc content, not the bright rim
ENDPLATE_REACH_MM = 6.0  # endplates lie this close above and below a disc's centre (thin thoracic discs)
ENDPLATE_CONTRAST_HU = 40.0  # a disc band is this much darker than the endplates on both sides
ENDPLATE_BODY_SHARE = 0.4    # ... with the body profile this high (share of its 75th centile) within 20 mm on both
END_DISC_MARGIN_HU = 10.0    # ... and a disc cut by the view's end this much darker than the marrow
END_BAND_SHARE = 0.5  # a band before the view's end with only fading profile beyond: no disc under this share
#                        of the view's other bands' median contrast
OFF_DIP_WEIGHT = 0.5  # bands where the body profile does not dip rank at this share of their contrast
BAND_DIP_SHARE = 0.05  # ... a dip: the profile this share below the lower of its flanks' maxima
END_PIECE_MM = 6.0  # a disc is looked for between the last disc and the view's top a pitch and this apart, and
#                     this far from the top (12 mm missed the T12/L1 disc of the real 3 mm CT ending 9-11 mm past
#                     it along the profile: T12's piece merged with L1, L1 whole 0.757 / 0.795 -> 0.906 / 0.905)
DEFAULT_PITCH_MM = 30.0  # vertebra + disc height when too few discs are seen to measure it
PITCH_TOLERANCE = 0.3    # a weak dip is a disc within this share of the pitch from where the spacing expects one
BAND_REGULARITY_GAIN = 0.5  # a band gives way to a rival band closer than a vertebra that at least halves
#                            the irregularity of the disc spacing around it (no sure dips in view)
TILTS_DEG = (-30.0, -15.0, 0.0, 15.0, 30.0)  # sagittal tilts of the disc-finding slabs
CORONAL_TILTS_DEG = tuple(float(d) for d in range(-30, 31, 5))  # sideways tilts tried on each disc found
CORONAL_GAIN = 0.85      # ... taken when its slab holds under this share of the untilted slab's bone


def _curve_coordinates(cz, cy, cx, sp):
    """Arc length and unit tangent (z, y, x) of a per-slice centre curve, in mm."""
    pts = np.stack([cz, cy, cx], axis=1) * sp
    d = np.gradient(pts, axis=0)
    t = d / np.linalg.norm(d, axis=1, keepdims=True)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    return s, t


def _binned_percentile(values: np.ndarray, bins: np.ndarray, nb: int, q: float,
                       min_count: Optional[int] = None) -> np.ndarray:
    """q-th percentile of values per bin (the lower of the two values it falls between), NaN where
    a bin holds under `min_count` values; by default under a quarter of the typical count (the
    slab only grazes the bodies there)."""
    cnt = np.bincount(bins, minlength=nb)
    out = np.full(nb, np.nan)
    if values.size == 0:
        return out
    order = np.lexsort((values, bins))
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    ok = cnt >= (max(1.0, 0.25 * np.median(cnt[cnt > 0])) if min_count is None else max(1, min_count))
    out[ok] = values[order][start[ok] + np.floor(q / 100.0 * (cnt[ok] - 1)).astype(int)]
    return out


def _endplate_valleys(low: np.ndarray, sp: float):
    """Per profile bin: how much darker it is than the brightest bins within ENDPLATE_REACH_MM on
    both sides (the weaker side counts), best over the slab tilts, and that tilt's index. A disc
    is a thin dark band between two sclerotic endplates; the marrow in mid-body is darker than
    the endplates too, but they lie much further away than a disc's half-thickness."""
    k = max(2, int(round(ENDPLATE_REACH_MM / sp)))
    nt, nb = low.shape
    pad = np.full((nt, k), np.nan)
    padded = np.concatenate([pad, low, pad], axis=1)
    win = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1, axis=1)   # (nt, nb, 2k+1)
    lo_fill = np.where(np.isnan(win), -np.inf, win)     # missing bins: no endplate, no floor
    left = lo_fill[..., :k].max(axis=-1)
    right = lo_fill[..., k + 1:].max(axis=-1)
    near = np.where(np.isnan(win), np.inf, win)[..., k - 1:k + 2].min(axis=-1)
    with np.errstate(invalid="ignore"):
        score = np.minimum(left, right) - low
        # only at the valley floor (the darkest of its immediate neighbours)
        score[~(low <= near)] = -np.inf
    score = np.where(np.isfinite(score), score, -np.inf)
    best = np.argmax(score, axis=0)
    return score[best, np.arange(nb)], best


def _downhill(prof: np.ndarray, p: int, max_steps: int) -> int:
    """The bin reached from `p` stepping to the darker neighbour while there is one (at most
    `max_steps` bins): the bottom of the dip that `p` lies on."""
    for _ in range(max_steps):
        lo = max(p - 1, 0)
        q = lo + int(np.argmin(prof[lo:p + 2]))
        if prof[q] >= prof[p]:
            break
        p = q
    return p


def _find_discs(prof: np.ndarray, sp: float, valley: Optional[np.ndarray] = None):
    """Disc positions (profile bins) = minima of the body-bone profile along the centreline, and
    the subset seen only as a dark band between endplates (`valley`, see _endplate_valleys)."""
    bw = sp
    nb = len(prof)
    ref = np.percentile(prof[prof > 0], 75) if np.any(prof > 0) else 1.0
    # A disc empties the body slab almost completely; a mid-body dip (bright endplates on both
    # sides) does not. Minima well below the maxima on both sides are sure discs; weaker minima
    # are accepted only where the spacing of the sure discs says a disc is missing.
    peaks, _ = find_peaks(-prof, distance=max(1, int(round(6.0 / bw))))
    reach = max(2, int(round(20.0 / bw)))
    ratio = {}

    def flanks(p):
        """The profile within 20 mm below and above bin p, each ordered outwards from p."""
        return prof[max(0, p - reach):p][::-1], prof[p + 1:p + 1 + reach]

    def rate(p):
        """ratio[p] = the profile at p over the lower of the maxima within 20 mm on either side,
        each taken only up to the nearest deeper minimum (left unset where those maxima are near
        empty: the profile's ends). A dip in a low-density body is not measured against the
        next vertebra's marrow, across the disc between them."""
        def reach_max(side):
            """Max of `side` (ordered outwards from p) up to its first bin deeper than p."""
            deeper = np.nonzero(side < prof[p])[0]
            return side[:deeper[0]].max(initial=0.0) if deeper.size else side.max(initial=0.0)

        left, right = (reach_max(side) for side in flanks(p))
        if min(left, right) > 0.15 * ref:
            ratio[int(p)] = prof[p] / min(left, right)

    for p in peaks:
        if 2 <= p <= nb - 3:
            rate(p)
    sure = sorted(p for p, r in ratio.items() if r < DISC_DEPTH)
    chosen: list[int] = []
    for p in sorted(sure, key=lambda p: ratio[p]):
        if all(abs(p - q) * bw >= MIN_VERTEBRA_MM for q in chosen):
            chosen.append(p)
    chosen.sort()
    # A thin disc between sclerotic endplates (common in the thoracic spine and with age) may hold
    # as much bone-bright signal as the marrow around it, so the density profile shows no minimum.
    # Such bands are taken outright only where no density minimum is sure (a short slab); with
    # sure discs in view they are weak candidates, taken where the disc spacing expects a disc.
    def flank_max(p):
        """The lower of the profile's maxima within 20 mm on either side of bin p."""
        return min(side.max() for side in flanks(p))

    endplate: list[int] = []
    if valley is not None:
        cand, _ = find_peaks(np.where(np.isfinite(valley), valley, -1e9), height=ENDPLATE_CONTRAST_HU,
                             distance=max(1, int(round(6.0 / bw))))
        # (two endplates need two bodies: a body's end against the processes rising above the
        # view's top vertebra is no disc; random arterial T4-T7: T4 split in two, whole 0.69)
        endplate = [int(p) for p in cand if 2 <= p <= nb - 3 and flank_max(p) >= ENDPLATE_BODY_SHARE * ref]
    endplate_only: list[int] = []
    if not chosen:
        # Strongest bands first, a band where the density does not dip (the profile there not
        # below flank_max) counting at OFF_DIP_WEIGHT of its contrast: of two too close to both be
        # discs, one on the marrow's plateau goes after one in a dip unless much stronger (random
        # T4-T7 at 3 mm: a band on T6's brightest stretch, 1 HU stronger, pushed out the T6/T5
        # disc 7 bins below it). A dip of a few % is none: a disc empties much of the body slab
        # (random T4-T7 at 0.9x0.9x3 mm: a 94 HU band 3.5 % below its flanks in the top body,
        # T4, pushed out the T5/T4 disc's 87 HU band in a 19 % dip 7 bins below it; T4 and T5
        # whole 0.68 / 0.77).
        def in_dip(p):
            return prof[p] < (1.0 - BAND_DIP_SHARE) * flank_max(p)

        for p in sorted(endplate, key=lambda p: -valley[p] * (1.0 if in_dip(p) else OFF_DIP_WEIGHT)):
            if all(abs(p - q) * bw >= MIN_VERTEBRA_MM for q in chosen):
                chosen.append(p)
                endplate_only.append(p)
        chosen.sort()
        # A band with the view's end within 20 mm and the profile only falling from it to there
        # may be a disc before a vertebra cut by the view (real 2 mm slab: the T11/T12 band, 70
        # HU, the only one), or the top body fading out of the view: so where the view's other
        # bands are far clearer, it is no disc (random arterial T7-L1 at 3 mm, noise 25 HU: a
        # 54 HU band in T7's fading top, 0.68 of a pitch above the last disc, its discs 238-247
        # HU, split T7 and made a "T6", whole Dice 0.755).
        for p in list(chosen):
            others = [valley[q] for q in chosen if q != p]
            fading = [side for side, at_end in zip(flanks(p), (p - reach <= 0, p + reach >= nb - 1)) if at_end]
            if (fading and all(side.max() <= prof[p] for side in fading) and others
                    and valley[p] < END_BAND_SHARE * np.median(others)):
                chosen.remove(p)
                endplate_only.remove(p)
        # Bands much closer together than the column's spacing: the weaker is no disc (5 mm
        # slices: an endplate cut by the view's end, 15 mm above the T11/T12 disc). A band
        # mid-body cuts one gap into two short ones, so the spacing is the gaps' upper centile
        # (random T4-T8 at 3 mm: a faint band in an osteoporotic T6, two of four gaps half a pitch)
        # without the band judged (two false bands made three of four gaps short in a noisy T4-T7
        # view); and the two gaps it cuts, merged, must make a gap of that spacing (a crushed
        # vertebra's short gap merged with its neighbour's makes a gap much longer).
        while len(chosen) >= 3:
            gaps = np.diff(chosen)
            k = int(np.argmin(gaps))
            weaker = min(chosen[k], chosen[k + 1], key=lambda p: valley[p])
            rest = [p for p in chosen if p != weaker]
            rest_gaps = np.diff(rest)
            spacing = np.percentile(rest_gaps if len(rest) >= 3 else gaps, CLOSE_DISC_PERCENTILE)
            i = chosen.index(weaker)
            merged = chosen[i + 1] - chosen[i - 1] if 0 < i < len(chosen) - 1 else 0
            # (the merged gap against the spacing of the others: counted in, the double gap left by
            # a true disc's removal raises the spacing it is judged by; random T4-T9 at 3 mm, five
            # regular bands 14-18 bins apart: the 14-bin one's merged 30 against a 24-bin spacing,
            # two discs dropped and four vertebrae merged in pairs)
            others = np.delete(rest_gaps, i - 1) if merged and len(rest) >= 3 else np.array([])
            merged_spacing = np.percentile(others, CLOSE_DISC_PERCENTILE) if others.size else spacing
            if gaps[k] >= CLOSE_DISC_FRACTION * spacing or merged > CLOSE_DISC_MERGED * merged_spacing:
                break
            chosen.remove(weaker)
            endplate_only.remove(weaker)
        # A short body's marrow, between its endplates blurred by thick slices, reads as a faint band
        # of its own (random portal-venous T5-T9 at 0.9x0.9x2.5 mm: 50 HU mid-body bands between
        # 290-430 HU discs). One in every body spaces the bands evenly at half a pitch, so the test
        # above, against the bands' own spacing, never fires (T5-T8 each split in two, whole Dice
        # 0.53-0.66). A band under FAINT_BAND_SHARE of the clearer band beside it (the one beside
        # it at the view's end) is no disc where the stretch it cuts, between the bands that stay (or
        # the view's end), is no longer than CLOSE_DISC_MERGED times their spacing: a missed disc
        # would leave two vertebrae there.
        # (against the clearer band beside it: against the fainter, a marrow band at 0.251 of a
        # 195 HU disc stayed "clear" in a T4-T8 view at 0.7x0.7x3 mm, its half-pitch gaps set the
        # spacing, and T5 and T6 were split, whole 0.60 / 0.52; the stretch test is the guard)
        faint = [p for i, p in enumerate(chosen) if valley[p] < FAINT_BAND_SHARE * max(
            valley[q] for q in chosen[max(0, i - 1):i + 2] if q != p)] if len(chosen) >= 3 else []
        clear = [p for p in chosen if p not in faint]
        ends = [0] + clear + [nb - 1]
        for p in faint if len(clear) >= 2 else []:
            lo, hi = max(q for q in ends if q < p), min(q for q in ends if q > p)
            # (the spacing of the other clear gaps: the one it cuts is two pitches if it is a disc;
            # the median, as a missed faint disc elsewhere makes a double gap too)
            others = [b - a for a, b in zip(clear[:-1], clear[1:]) if not a < p < b]
            spacing = np.median(others) if others else DEFAULT_PITCH_MM / bw
            if hi - lo <= CLOSE_DISC_MERGED * spacing:
                chosen.remove(p)
                endplate_only.remove(p)
        # Bands closer than a vertebra exclude each other, the stronger taken first; but the marrow
        # of an osteoporotic body, far darker than its own bright endplates, can make a stronger
        # band than the disc beside it (random native T4-T11 at 2x2x2.5 mm, T6 at 40 mg/cm3: a
        # 167 HU band mid-T6 beat the T7/T6 disc's 142 HU band 5 bins below, whose density dip
        # is the deeper; T6 / T7 whole 0.51 / 0.81), or the disc's band is halved as off the dip
        # where an osteoporotic top vertebra fades out of the view beyond it (random T5-T8, T5 at
        # 41 mg/cm3: T5 0.65). A band gives way to the rival it pushed out where the rival at
        # least halves the irregularity of the gaps to the bands beside it (the largest
        # |log(gap / spacing)|, the spacing from the other gaps).
        for i, p in enumerate(list(chosen) if len(chosen) >= 3 else []):
            beside = [chosen[j] for j in (i - 1, i + 1) if 0 <= j < len(chosen)]
            others = np.delete(np.diff(chosen), [j for j in (i - 1, i) if 0 <= j < len(chosen) - 1])
            if not others.size:
                continue
            spacing = float(np.percentile(others, CLOSE_DISC_PERCENTILE))

            def irregularity_at(q):
                return max(abs(np.log(abs(q - n) / spacing)) for n in beside)

            rivals = [q for q in endplate if q not in chosen and abs(q - p) * bw < MIN_VERTEBRA_MM
                      and all(abs(q - n) * bw >= MIN_VERTEBRA_MM for n in beside)]
            best = min(rivals, key=irregularity_at, default=None)
            if best is not None and irregularity_at(best) < BAND_REGULARITY_GAIN * irregularity_at(p):
                chosen[i] = best
                endplate_only[endplate_only.index(p)] = best
        chosen.sort()

    def pitch_near(a, b):
        """Typical disc spacing near the interval (a, b), from the other intervals, and how far
        from it a disc may lie: PITCH_TOLERANCE of it from two intervals, 0.5 from one (one
        vertebra may be a crushed one: random T5-T8, T7 crushed to 13 bins, the T6/T5 band 18
        bins above the T7/T6 disc was missed and T5 and T6 merged)."""
        gaps = np.diff(chosen).astype(float)
        mids = (np.array(chosen[:-1]) + np.array(chosen[1:])) / 2.0
        other = [(abs(m - (a + b) / 2), g) for m, g, lo_, hi_ in zip(mids, gaps, chosen[:-1], chosen[1:])
                 if not (lo_ == a and hi_ == b)]
        if not other:
            return DEFAULT_PITCH_MM / bw, PITCH_TOLERANCE
        other.sort()
        return float(np.median([g for _, g in other[:2]])), (PITCH_TOLERANCE if len(other) >= 2 else 0.5)

    weak = [p for p, r in ratio.items() if r < WEAK_DISC_DEPTH and p not in chosen]
    # A dark band between endplates is a candidate there too: on thick slices a disc is never
    # sampled alone and its density dip can stay shallow (4 mm slices: T12/L1 12 % deep).
    floor_bins: dict[int, float] = {}   # candidates standing in for a band beside them (below): its contrast
    floor_band: dict[int, int] = {}     # ... and, where it is a candidate only through it, the band's bin
    for p in endplate:
        if p not in chosen and p not in weak:
            rate(p)
            band_hu, band_bin = float(valley[p]), None
            if p not in ratio:
                band_bin = p
                # On a shallow density floor the next bin may be a hair darker, and the band
                # counted as no dip at all (random T6-T11 at 3 mm: the T6/T7 disc was lost and
                # the two merged): the candidate is then the floor's bottom beside it, downhill
                # from the band (random T8-L2 at 3 mm: the floor fell for two bins past the T8/T9
                # band, which was lost, and T8 and T9 merged).
                p = _downhill(prof, p, max(2, int(round(ENDPLATE_REACH_MM / bw))))
                rate(p)
                floor_bins[p] = max(band_hu, floor_bins.get(p, band_hu))
            if p in ratio and p not in chosen and p not in weak:
                weak.append(p)
                if band_bin is not None and not valley[p] >= ENDPLATE_CONTRAST_HU:
                    floor_band[p] = band_bin

    def band_hu(p):
        """The endplate-band contrast (HU) at bin p, or that of the band a floor bin stands in for."""
        return max(floor_bins.get(p, -np.inf), -np.inf if valley is None else float(valley[p]))

    def rank(p):
        """Of several weak candidates, a dark band between two endplates first: the mid-body dip
        of an osteoporotic body can be as deep as its discs, but has no endplate within reach
        (random T9-L2 phantom, T10 at 53 mg/cm3: its dip was taken for both discs). And a clear
        band (twice ENDPLATE_CONTRAST_HU) before a faint one: marrow darker than the discs
        shows faint bands and deep dips of its own (random T6-T11, T6 at 41 mg/cm3: a 55 HU band
        in its marrow beat the 220 HU T6/T7 band on the dip's depth)."""
        band = band_hu(p)
        banded = 0 if band >= 2 * ENDPLATE_CONTRAST_HU else 1 if band >= ENDPLATE_CONTRAST_HU else 2
        return (banded, ratio[p])

    changed = True
    while changed and weak:
        changed = False
        ends = [0] + chosen + [nb - 1]
        # (the gaps' 75th centile: a pitch under CLOSE_DISC_FRACTION of it comes from short gaps, below)
        gaps = np.diff(chosen)
        spacing = float(np.percentile(gaps, CLOSE_DISC_PERCENTILE)) if gaps.size else 0.0
        for a, b in zip(ends[:-1], ends[1:]):
            pitch, tolerance = pitch_near(a, b)
            # Between two discs a missed one leaves 1.5 pitches or more. Between a disc and the
            # view's end a pitch and a piece of the vertebra beyond, cut by the view, hold one:
            # END_PIECE_MM of it at the view's top (real 3 mm CT ending 9-15 mm past the T12/L1
            # disc, 1.4 pitches past the L1/L2 disc: the disc was missed and T12's piece merged
            # with L1), MIN_VERTEBRA_MM at its bottom, where a lumbar view's sacrum lies beyond
            # the L5/S1 disc and keeps a rudimentary S1/S2 disc about a pitch below it (the same
            # CT given a softer kernel: a dip there split the sacrum and every name shifted).
            # The candidate lies as far from the view's end. Not with a pitch measured on short
            # gaps (under CLOSE_DISC_FRACTION of the gaps' 75th centile), which a false dip
            # makes: the real CT turned 10 degrees about its long axis shows one mid-L1, 10 bins
            # above the L1/L2 disc; the pitch of 11.5 bins then let a dip 7 bins below the view's
            # top in, the T12/L1 disc between went as a marrow dip, and L1 was split (whole T12 /
            # L1 0.75 / 0.82 -> 0.55 / 0.46).
            cranial_end = a in chosen and b == nb - 1
            regular = pitch >= CLOSE_DISC_FRACTION * spacing
            end_piece_mm = END_PIECE_MM if cranial_end and regular else MIN_VERTEBRA_MM
            one_end = (a in chosen) != (b in chosen)
            if (b - a) < (pitch + end_piece_mm / bw if one_end else 1.5 * pitch):
                continue
            # Expected disc one pitch away from a sure disc (or the profile end).
            targets = ([a + pitch] if a in chosen else []) + ([b - pitch] if b in chosen else [])
            best = None
            for p in weak:
                # (its dip's far flank must still rise, see rate(): a fading view's end is no disc)
                if not (a < p < b) or (p - a) * bw < MIN_VERTEBRA_MM or (b - p) * bw < end_piece_mm:
                    continue
                dist = min((abs(p - t) for t in targets), default=0.0)
                if dist <= tolerance * pitch and (best is None or rank(p) < rank(best)):
                    best = p
            if best is not None:
                chosen.append(best)
                chosen.sort()
                weak.remove(best)
                changed = True
                break
    # Marrow darker than the discs (an osteoporotic body, ~45 mg/cm3) makes the deepest dip of the
    # profile mid-body, measured against the body's own bright endplates: a sure "disc", while the
    # real discs on either side, between those endplates and the next bodies', dip only weakly
    # (random T11-L5 at 1.5x1.5x3 mm, T12 at 45 mg/cm3 with a vein: T12 split at its marrow, its
    # halves merged with T11 and L1, T11 lost). Marrow bands are no guide there (a vein's band
    # 180 HU). So a sure dip is swapped for two clearly banded weak dips about a vertebra apart
    # within MARROW_BAND_REACH of the spacing on either side of it where that makes the vertebrae's
    # heights more regular: the largest deviation from the spacing (log ratio) over the gaps it
    # changes, a view's end segment counted where longer than the spacing.
    def irregularity(cuts, lo, hi, spacing, lo_disc, hi_disc):
        """The largest |log(gap / spacing)| between lo, the cuts and hi; a segment reaching the
        view's end (lo or hi no disc) counted only where longer than the spacing."""
        gaps = np.diff([lo] + cuts + [hi]).astype(float)
        keep = np.ones(gaps.size, bool)
        keep[0] = lo_disc or gaps[0] > spacing
        keep[-1] = hi_disc or gaps[-1] > spacing
        return float(np.abs(np.log(gaps[keep] / spacing)).max(initial=0.0))

    for p in list(chosen) if valley is not None and len(chosen) >= 2 else []:
        i = chosen.index(p)
        gaps = np.diff(chosen)
        others = np.delete(gaps, [j for j in (i - 1, i) if 0 <= j < gaps.size])
        spacing = float(np.percentile(others, CLOSE_DISC_PERCENTILE)) if others.size else DEFAULT_PITCH_MM / bw
        lo_disc, hi_disc = i > 0, i + 1 < len(chosen)
        lo = chosen[i - 1] if lo_disc else 0
        hi = chosen[i + 1] if hi_disc else nb - 1
        banded = [q for q in weak if band_hu(q) >= 2 * ENDPLATE_CONTRAST_HU]
        below = [q for q in banded if lo < q < p and p - q <= MARROW_BAND_REACH * spacing
                 and (q - lo) * bw >= MIN_VERTEBRA_MM]
        above = [q for q in banded if p < q < hi and q - p <= MARROW_BAND_REACH * spacing
                 and (hi - q) * bw >= MIN_VERTEBRA_MM]
        pairs = [(irregularity([a, b], lo, hi, spacing, lo_disc, hi_disc), a, b) for a in below for b in above
                 if CLOSE_DISC_FRACTION * spacing <= b - a <= CLOSE_DISC_MERGED * spacing]
        if pairs and min(pairs)[0] < irregularity([p], lo, hi, spacing, lo_disc, hi_disc):
            _, a, b = min(pairs)
            chosen = sorted([q for q in chosen if q != p] + [a, b])
            weak = [q for q in weak if q not in (a, b)]
    # The marrow of an osteoporotic body can dip nearly as deep as a disc (random T9-L1 at 2x2x3
    # mm, T11 at 52 mg/cm3 with a basivertebral vein: 0.58 of its flanks, taken where the spacing
    # expected a disc, ahead of the real one 8 bins above on the depth of its dip; T11 split in
    # two and every level above misnamed). Such a dip cuts the disc spacing into two short gaps
    # and, unlike a disc, has no endplate band: it is no disc. (A crushed vertebra's discs are
    # banded, and make one short gap.) Nor, banded or not, is a dip that leaves a gap shorter
    # than any vertebra with its disc: the marrow of a grade-3 biconcave body between its two
    # depressed endplates reads as a band of its own (random arterial L1-L4 at 0.9x0.9x3 mm, L3
    # at 42 mg/cm3: a 178 HU band beside its marrow dip, gaps of 9 and 13 bins against a spacing
    # of 24; L3 split in two, 0.62 whole, and L4 named L5).
    while valley is not None and len(chosen) >= 4:
        marrow = []
        all_gaps = np.diff(chosen)
        for i in range(1, len(chosen) - 1):
            # (the spacing of the other vertebrae: the gaps beside the dip left out)
            spacing = np.percentile(np.delete(all_gaps, [i - 1, i]), CLOSE_DISC_PERCENTILE)
            gaps = (all_gaps[i - 1], all_gaps[i])
            band = band_hu(chosen[i])
            if (max(gaps) < CLOSE_DISC_FRACTION * spacing and sum(gaps) <= CLOSE_DISC_MERGED * spacing
                    and (not band >= ENDPLATE_CONTRAST_HU or min(gaps) < SHORTEST_PITCH_SHARE * spacing)):
                marrow.append((band, chosen[i]))
        if not marrow:
            break
        chosen.remove(min(marrow)[1])
    # The same marrow dip as the view's last (or first) disc has one gap only, so the rule above
    # keeps it; and the search for weak dips beyond it took its short gap for the pitch, too
    # short to reach the disc past it (the real 3 mm CT turned 10 degrees about its long axis: a
    # sure dip mid-L1, 11 bins above the L1/L2 disc and without an endplate band, ended the
    # discs, the T12/L1 dip 12 bins above it never taken; L1 split in two, whole 0.47). An end
    # dip with no band, its gap under CLOSE_DISC_FRACTION of the other gaps' spacing, gives way
    # to a weak dip beyond it a spacing past the disc before it, where there is one.
    for cranial in (True, False) if valley is not None and len(chosen) >= 4 else ():
        p, prev = (chosen[-1], chosen[-2]) if cranial else (chosen[0], chosen[1])
        spacing = float(np.percentile(np.diff(chosen[:-1] if cranial else chosen[1:]), CLOSE_DISC_PERCENTILE))
        if abs(p - prev) >= CLOSE_DISC_FRACTION * spacing or band_hu(p) >= ENDPLATE_CONTRAST_HU:
            continue
        target = prev + spacing if cranial else prev - spacing
        past = [q for q in weak if (q > p if cranial else q < p) and abs(q - target) <= PITCH_TOLERANCE * spacing
                and (nb - 1 - q if cranial else q) * bw >= MIN_VERTEBRA_MM]
        if past:
            q = min(past, key=rank)
            chosen = sorted([c for c in chosen if c != p] + [q])
            weak.remove(q)
    # A floor bin stood in for its band to be rated; where it lies outside the band, the disc
    # itself lies at the band, between the endplates: the floor's bottom beside an osteoporotic
    # body is in its marrow (random portal-venous T6-T11 at 2x2x2.5 mm, T8 at 55 mg/cm3: the
    # T8/T9 disc placed 4 mm into T8, T8 0.884 whole). (A floor bin inside a broad band stays:
    # the band's peak there is no better placed, and the disc's tilt is judged where it is.)
    chosen = sorted({floor_band.get(p, p) for p in chosen})
    return chosen, endplate_only


def _disc_planes(column, anterior, hu_s, dx, canal_cx, sp):
    """The intervertebral disc planes along the body centreline, caudal -> cranial: for the
    bodies [(point zyx in voxels, unit normal zyx)] tilted to each disc, and for the arches the
    same points with the untilted normal. Each disc's dark band (and that of a disc cut by the
    view's end) is carved out of `column` (in place)."""
    nz = column.shape[0]
    body_core = column & anterior & (np.abs(dx) < 18.0)
    zb, yb, xb = np.nonzero(body_core)
    if zb.size == 0:
        raise InputError("no vertebral column found in the CT (no vertebral bodies in front of the canal).")
    cntb = np.bincount(zb, minlength=nz).astype(float)
    okz = np.nonzero(cntb > 0)[0]
    bcy = np.bincount(zb, weights=yb, minlength=nz)[okz] / cntb[okz]
    win = max(3, int(round(30.0 / sp)) | 1)
    by = _smooth_track(okz.astype(float), bcy, nz, win)
    # Left-right, the body sits in front of the canal (the canal track is the steadier one).
    bx = canal_cx.copy()
    by = ndi.gaussian_filter1d(by, 10.0 / sp)
    bx = ndi.gaussian_filter1d(bx, 10.0 / sp)
    s_z, t_z = _curve_coordinates(np.arange(nz, dtype=float), by, bx, sp)

    # Discs are tilted against the centreline normal at the lordotic/kyphotic bends (L5/S1
    # most): profiles over slabs tilted in the sagittal plane, the deepest one per position.
    def tilted(t, deg):
        c, si = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        return np.stack([t[..., 0] * c - t[..., 1] * si, t[..., 0] * si + t[..., 1] * c, t[..., 2]], axis=-1)

    off = np.stack([np.zeros(zb.size), (yb - by[zb]) * sp, (xb - bx[zb]) * sp], axis=1)
    s_lo = s_z[zb].min() - 40.0
    s_hi = s_z[zb].max() + 40.0
    nb = int(np.ceil((s_hi - s_lo) / sp)) + 1
    # Weight by density: a tilted disc cut axially looks like a bone ring and gets filled, but
    # its content (~85 HU) is darker than the bodies' trabecular bone.
    hu_body = hu_s[zb, yb, xb]
    w_body = np.clip(hu_body - 50.0, 10.0, 150.0)
    profiles = []
    low_profiles = []
    for deg in TILTS_DEG:
        n_t = tilted(t_z[zb], deg)
        sv = s_z[zb] + np.sum(off * n_t, axis=1) / np.maximum(np.sum(t_z[zb] * n_t, axis=1), 0.5)
        bins = np.clip(((sv - s_lo) / sp).astype(int), 0, nb - 1)
        profiles.append(ndi.gaussian_filter1d(np.bincount(bins, weights=w_body, minlength=nb), 0.75))
        low = _binned_percentile(hu_body, bins, nb, ENDPLATE_PERCENTILE)
        # A tilted slab cut by an end of the field of view samples only part of the body: its
        # percentile is not comparable with the others (a false endplate at the scan's end). A
        # slab counts as cut when over half of it lies beyond the body's range (the median
        # reach; the 95th centile also dropped the last endplate below a slightly oblique
        # centreline, where the slab is nearly whole).
        spread = float(np.percentile(np.abs(sv - s_z[zb]), 50)) if zb.size else 0.0
        centre = s_lo + (np.arange(nb) + 0.5) * sp
        low[(centre - spread < s_z[zb].min()) | (centre + spread > s_z[zb].max())] = np.nan
        low_profiles.append(low)
    profiles = np.array(profiles)
    prof = profiles.min(axis=0)
    # Trim the empty margins so end effects do not create discs.
    nzb = np.nonzero(prof > 0.02 * prof.max())[0]
    b0, b1 = nzb.min(), nzb.max() + 1
    low_profiles = np.array(low_profiles)
    valley, valley_tilt = _endplate_valleys(low_profiles[:, b0:b1], sp)
    disc_bins, endplate_only = _find_discs(prof[b0:b1], sp, valley)
    disc_bins = [d + b0 for d in disc_bins]
    endplate_only = {d + b0 for d in endplate_only}
    def level_plane(b):
        """Slice index at profile bin b, and the untilted plane there (centreline point, tangent)."""
        zf = float(np.interp(s_lo + (b + 0.5) * sp, s_z, np.arange(nz)))
        zi = int(round(min(max(zf, 0), nz - 1)))
        return zi, (np.array([zf, by[zi], bx[zi]]), t_z[zi] / np.linalg.norm(t_z[zi]))

    planes = []   # (point zyx in voxels, unit normal zyx)
    arch_planes = []
    for d in disc_bins:
        zi, flat_plane = level_plane(d)
        # (a disc seen only as a dark band between endplates: the tilt that shows it best)
        deg = TILTS_DEG[int(valley_tilt[d - b0]) if d in endplate_only else int(np.argmin(profiles[:, d]))]
        n_d = tilted(t_z[zi], deg)
        n_d = n_d / np.linalg.norm(n_d)
        # (and leaning sideways as the disc does: 15 mm scoliotic T4-T8 at 0.8x0.8x2 mm, T4 / T5
        # whole 0.900 / 0.903 -> 0.926 / 0.926)
        phi = _coronal_tilt(flat_plane[0], n_d, zb, yb, xb, w_body, sp)
        n_d = _rotate_coronal(n_d, phi)
        planes.append((flat_plane[0], n_d))
        # Behind the body the sagittally untilted normal: a tilted disc plane (L5/S1) extended
        # backwards would rise through the arch of the vertebra above. The sideways lean holds
        # for the arch too (the same T4 / T5: 0.903 / 0.901 without it).
        arch_planes.append((flat_plane[0], _rotate_coronal(flat_plane[1], phi)))
        # Every disc's content is taken out, not only that of discs seen between endplates: a
        # thin disc in the kyphotic thorax is cut obliquely by the axial slices, its rim looks like
        # a cortical ring and gets filled as bone (T4-T10 phantom: the discs held 10-25% of the
        # bodies' false positives).
        # (the band's extent from the tilt that shows it darkest between its endplates; the
        # plane's own tilt: real 3 mm CT L1-L4 0.001-0.003 lower)
        _carve_disc(column, anterior, hu_s, low_profiles[int(valley_tilt[d - b0])], d, planes[-1], sp)
    # A disc cut by an end of the view has an endplate on one side only, so neither profile
    # shows it; its rim closes a ring and its content is filled as bone (real 2 mm slab: the
    # T12/L1 disc in the two caudal slices). Judged on the untilted slabs, which the view's end
    # does not cut.
    flat = low_profiles[TILTS_DEG.index(0.0)]
    for caudal in (True, False):
        if not (zb.min() == 0 if caudal else zb.max() == nz - 1):
            continue
        band = _end_disc_band(flat, disc_bins, caudal, sp)
        if band is not None:
            edge, endplate_hu = band
            _carve_end_disc(column, anterior, hu_s, level_plane(edge)[1], endplate_hu, caudal, sp)
    return planes, arch_planes


def _rotate_coronal(normal: np.ndarray, deg: float) -> np.ndarray:
    """A zyx unit vector rotated by `deg` in the coronal (z-x) plane."""
    c, si = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    out = np.array([normal[0] * c - normal[2] * si, normal[1], normal[0] * si + normal[2] * c])
    return out / np.linalg.norm(out)


def _coronal_tilt(point, normal, zb, yb, xb, w_body, sp) -> float:
    """The coronal tilt (deg) of a disc plane through `point`: of the normal rotated over
    CORONAL_TILTS_DEG, the one whose thin slab (one voxel, shifted up to a voxel along it) holds
    the least body weight `w_body` of the body-core voxels (zb, yb, xb), when that is under
    CORONAL_GAIN of the untilted slab's; else 0. The profile slabs tilt only sagittally and
    follow the centreline's lateral slope, so a scoliotic level's own lean is missed."""
    rel = np.stack([zb - point[0], yb - point[1], xb - point[2]], axis=1).astype(np.float32)
    near = np.abs(rel @ normal.astype(np.float32)) * sp < 40.0   # (the bodies next to the disc)
    rel, w = rel[near], w_body[near]
    scores = []
    for deg in CORONAL_TILTS_DEG:
        dist = rel @ _rotate_coronal(normal, deg).astype(np.float32) * sp
        scores.append(min(float(w[np.abs(dist - off) < 0.5 * sp].sum()) for off in (-sp, 0.0, sp)))
    best = int(np.argmin(scores))
    return float(CORONAL_TILTS_DEG[best]) if scores[best] < CORONAL_GAIN * scores[CORONAL_TILTS_DEG.index(0.0)] else 0.0


def _end_disc_band(low: np.ndarray, disc_bins, caudal: bool, sp: float):
    """A disc cut by the view's caudal (or cranial) end on the profile `low`: from the profile's
    end inwards a band darker than the endplate within ENDPLATE_REACH_MM of it by
    ENDPLATE_CONTRAST_HU and darker than the marrow (median of the profile) by END_DISC_MARGIN_HU
    (a view ending in the marrow just past an endplate is that dark against the endplate too).
    Returns (the band's inner bin, the endplate's HU), or None."""
    finite = np.nonzero(np.isfinite(low))[0]
    if finite.size < 3:
        return None
    step = 1 if caudal else -1
    end = int(finite[0] if caudal else finite[-1])
    k = max(2, int(round(ENDPLATE_REACH_MM / sp)))
    reach = [end + step * i for i in range(0, k + 1) if 0 <= end + step * i < len(low)]
    vals = np.where(np.isfinite(low[reach]), low[reach], -np.inf)
    top = int(np.argmax(vals))
    if top == 0:
        return None
    endplate_hu = float(vals[top])
    before = vals[:top]
    floor = float(np.min(before[np.isfinite(before)]))   # (bins too sparse for a percentile are nan)
    marrow_hu = float(np.median(low[finite]))
    if endplate_hu - floor < ENDPLATE_CONTRAST_HU or floor > marrow_hu - END_DISC_MARGIN_HU:
        return None
    if any(abs(d - end) * sp < MIN_VERTEBRA_MM for d in disc_bins):
        return None
    half = 0.5 * (floor + endplate_hu)
    inner = [b for b, v in zip(reach[:top], before) if np.isfinite(v) and v < half]
    return inner[-1], endplate_hu


def _carve_end_disc(column, anterior, hu_s, plane, endplate_hu, caudal, sp):
    """Take the body voxels beyond `plane` (the inner edge of a disc cut by the view's end) and
    darker than its endplate out of the column (in place), as _carve_disc does between two."""
    nz = column.shape[0]
    zi = int(round(plane[0][0]))
    margin = int(np.ceil(40.0 / sp))  # the plane's tilt across a body, in slices
    if caudal:
        _clear_band(column, anterior, hu_s, plane, slice(0, min(nz, zi + 1 + margin)), -np.inf, 0.5 * sp,
                    endplate_hu, sp)
    else:
        _clear_band(column, anterior, hu_s, plane, slice(max(0, zi - margin), nz), -0.5 * sp, np.inf,
                    endplate_hu, sp)


def _clear_band(column, anterior, hu_s, plane, zs, lo_mm, hi_mm, below_hu, sp):
    """Body voxels (`column & anterior`) in the slices `zs`, lo_mm..hi_mm along the normal of
    `plane` from its point and darker than below_hu, leave the column (in place)."""
    pnt, nrm = plane
    z, y, x = np.nonzero(column[zs] & anterior[zs])
    z = z + zs.start
    dist = (np.stack([z, y, x], axis=1) - pnt) @ nrm * sp
    cut = (dist >= lo_mm) & (dist <= hi_mm) & (hu_s[z, y, x] < below_hu)
    column[z[cut], y[cut], x[cut]] = False


def _carve_disc(column, anterior, hu_s, low, d, plane, sp):
    """Take a disc seen only between its endplates out of the column (in place): its content is
    as bright as marrow, so it was filled in as bone. The disc = the profile bins around `d`
    darker than half-way from the valley floor to the endplates; there, body voxels darker
    than the dimmer endplate go (the bright rim of the ring apophysis stays)."""
    k = max(2, int(round(ENDPLATE_REACH_MM / sp)))
    left = np.nanmax(low[max(0, d - k):d]) if np.isfinite(low[max(0, d - k):d]).any() else np.nan
    right = np.nanmax(low[d + 1:d + 1 + k]) if np.isfinite(low[d + 1:d + 1 + k]).any() else np.nan
    endplate_hu = min(left, right)
    if not np.isfinite(endplate_hu) or not np.isfinite(low[d]):
        return
    half = 0.5 * (low[d] + endplate_hu)
    lo_b = d
    while lo_b - 1 >= max(0, d - k) and np.isfinite(low[lo_b - 1]) and low[lo_b - 1] < half:
        lo_b -= 1
    hi_b = d
    while hi_b + 1 <= min(len(low) - 1, d + k) and np.isfinite(low[hi_b + 1]) and low[hi_b + 1] < half:
        hi_b += 1
    z_mid = plane[0][0]
    reach = (max(d - lo_b, hi_b - d) + 1) * sp
    zs = slice(max(0, int(np.floor(z_mid - reach / sp)) - 2), int(np.ceil(z_mid + reach / sp)) + 3)
    _clear_band(column, anterior, hu_s, plane, zs, (lo_b - d - 0.5) * sp, (hi_b - d + 0.5) * sp, endplate_hu, sp)
