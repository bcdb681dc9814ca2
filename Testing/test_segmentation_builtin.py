"""The builtin CT backend against phantom truth and against TotalSegmentator's labels on real CT.

Phantoms are generated at 2 mm so the whole file stays fast; the spacing / noise / density /
fracture sweep lives in ``spinekit.segmentation.bench``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from spinekit import levels as lv
from spinekit.masks import dice, identified_levels
from spinekit.errors import InputError
from spinekit.image import Image, read_image
from spinekit.phantom import TISSUE_IDS, CTPhantomConfig, generate_ct_phantom
from spinekit.segmentation.builtin import segment_builtin

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _phantom(**kw):
    # (The scoliotic views here were drawn, most from bench_random, while the phantom's curve spanned
    # the rendered range only: they keep that tighter stress geometry, scoliosis_span_mm=0.)
    base = dict(first_level="T11", last_level="L5", spacing_mm=(2.0, 2.0, 2.0), noise_hu=10.0, seed=0,
                scoliosis_span_mm=0.0)
    return generate_ct_phantom(CTPhantomConfig(**{**base, **kw}))


def _truth_levels(ph) -> list[str]:
    return [lv.level_name(int(i)) for i in np.unique(ph.vertebrae.array) if i]


def _best_match_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Per truth level: Dice with the predicted label that covers it most (name-agnostic)."""
    out = {}
    for t in np.unique(truth):
        if t == 0:
            continue
        m = truth == t
        ids, counts = np.unique(pred[m], return_counts=True)
        counts[ids == 0] = 0
        best = ids[int(np.argmax(counts))]
        out[int(t)] = dice(pred == best, m) if best else 0.0
    return out


def _unanchored_dice(ph) -> tuple[dict[int, float], dict[int, float]]:
    """Segment a view with no anchor in it: the names must be flagged as a guess, so the levels
    are matched by overlap. Returns best-match Dice per truth level, whole vertebrae and bodies."""
    res = segment_builtin(ph.image)
    assert res.labels_uncertain
    return (_best_match_dice(res.vertebrae.array, ph.vertebrae.array),
            _best_match_dice(res.bodies.array, ph.bodies.array))


@pytest.fixture(scope="module")
def lumbar_with_sacrum():
    ph = _phantom()
    return ph, segment_builtin(ph.image)


def test_phantom_with_sacrum_dice_and_names(lumbar_with_sacrum):
    ph, res = lumbar_with_sacrum
    assert res.backend == "builtin"
    assert not res.labels_uncertain
    assert res.vertebrae.same_grid(ph.image) and res.bodies.same_grid(ph.image)
    assert res.vertebrae.array.dtype == np.uint8
    truth_names = _truth_levels(ph)
    assert res.present_levels() == [n for n in lv.ORDER if n in truth_names]
    for name in truth_names:
        vid = lv.level_id(name)
        d = dice(res.vertebrae.array == vid, ph.vertebrae.array == vid)
        if name == "sacrum":
            # The sacrum is an anchor, not a measured level: its caudal tip (below the column
            # box) is missed and the sacral canal is filled in; measured 0.851 at 2 mm on the
            # partial-volume phantom (0.88 on the earlier point-sampled one).
            assert d >= 0.85, f"sacrum Dice {d:.3f}"
            continue
        assert d >= 0.9, f"{name} whole-vertebra Dice {d:.3f}"
        db = dice(res.bodies.array == vid, ph.bodies.array == vid)
        assert db >= 0.9, f"{name} body Dice {db:.3f}"
    for rec in res.levels:
        assert rec.confidence >= 0.8 and "label_uncertain" not in rec.flags


def test_chest_view_ending_at_l2_is_named_from_the_last_rib():
    # No sacrum in view: T12 is the lowest rib-bearing vertebra, counted up and down from there.
    ph = _phantom(first_level="T8", last_level="L2")
    res = segment_builtin(ph.image)
    assert not res.labels_uncertain
    assert res.present_levels() == _truth_levels(ph)
    for name in _truth_levels(ph):
        vid = lv.level_id(name)
        d = dice(res.vertebrae.array == vid, ph.vertebrae.array == vid)
        assert d >= 0.9, f"{name} whole-vertebra Dice {d:.3f}"


def test_thoracic_view_without_t12_is_marked_uncertain(thoracic):
    # Every vertebra in view carries ribs: the last rib-bearing one in view need not be T12.
    ph, res = thoracic
    assert res.labels_uncertain
    assert res.levels and all("label_uncertain" in r.flags and r.confidence < 0.5 for r in res.levels)
    # The vertebrae are still found and separated, whatever their names (Dice name-agnostic).
    # Measured 0.930-0.963, median 0.942 (0.912-0.943, median 0.924, while the processes'
    # in-plane faces were left out of the profile rule at 2 mm pixels; 0.889-0.933 before the
    # profile rule: at 2 mm the thin disc slice next to an endplate holds part of it, ~440 HU
    # against ~640 HU inside, and passed the half-maximum outline, 123 + 110 false voxels on T4's
    # two disc slices; the best single-HU-threshold outline, an oracle, reaches 0.917 there.
    # _past_profile_peak drops a face voxel darker than 0.7 of its inward neighbour, 0.8 in-plane
    # at 1.5-2.5 mm pixels).
    dices = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert len(res.levels) == len(dices)
    assert min(dices.values()) >= 0.92, dices
    assert np.median(list(dices.values())) >= 0.935, dices
    # Bodies (with the label matched on the whole vertebra): 0.928-0.970, median 0.956 (0.925-0.966
    # before the in-plane rule, 0.905-0.961 before the profile rule, 0.883-0.932 before the discs
    # were carved).
    body_dices = {}
    for t in dices:
        ids, counts = np.unique(res.vertebrae.array[ph.vertebrae.array == t], return_counts=True)
        counts[ids == 0] = 0
        best = ids[int(np.argmax(counts))]
        body_dices[t] = dice(res.bodies.array == best, ph.bodies.array == t)
    assert min(body_dices.values()) >= 0.915, body_dices


def test_outline_at_2_mm_pixels_drops_the_layer_outside_the_processes():
    # T6-T9 at 2 x 2 x 3 mm (a bench_random draw, seed 20270191 view 13). A 2 mm pixel centred
    # just outside a lamina or process holds part of its 1 mm cortex and reads far above soft
    # tissue; the profile rule took it off the bodies only (the real 3 mm CT's reference keeps
    # it), and a view of this kind held ~10 times as many voxels one layer outside the truth as
    # one layer inside. Below COARSE_MM every in-plane face is tested, at 0.8 of the inward
    # neighbour. Measured whole 0.915-0.933 (0.899-0.925 before), bodies 0.920-0.940 (0.918-0.936).
    ph = _phantom(first_level="T6", last_level="T9", spacing_mm=(2.0, 2.0, 3.0), noise_hu=29.1, scoliosis_mm=11.0,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, lordosis_deg=47.2, kyphosis_deg=34.0,
                  contrast_phase="native", effective_kev=59.5, seed=786, fractures={"T8": ("crush", 3)},
                  densities_mg_cm3={"T6": 126, "T7": 108, "T8": 210, "T9": 145})
    whole, body = _unanchored_dice(ph)
    assert len(whole) == 4
    assert min(whole.values()) >= 0.908 and min(body.values()) >= 0.9, (whole, body)


@pytest.fixture(scope="module")
def thoracic():
    ph = _phantom(first_level="T4", last_level="T10")
    return ph, segment_builtin(ph.image)


def test_thoracic_discs_and_rib_heads_stay_out_of_the_vertebrae(thoracic):
    # Thin kyphotic thoracic discs are cut obliquely by the axial slices and filled in as bone
    # unless carved out; rib necks stay on the bodies where the rib path stops short of the head.
    # Measured (T4-T10 phantom): disc voxels 3.0% of the body labels (7.5% before every disc was
    # carved), 16% of the disc labelled (44%); rib voxels 0.70% of the vertebra labels (1.27%
    # before the spurs went back to the ribs).
    ph, res = thoracic
    tissue = ph.tissues.array
    ids = ph.truth["tissue_ids"]
    vert, bodies = res.vertebrae.array > 0, res.bodies.array > 0
    disc, rib = tissue == ids["disc"], tissue == ids["rib"]
    assert (bodies & disc).sum() / bodies.sum() <= 0.04
    assert (vert & disc).sum() / disc.sum() <= 0.25
    assert (vert & rib).sum() / vert.sum() <= 0.009


def test_lumbar_view_without_sacrum_is_marked_uncertain():
    ph = _phantom(first_level="L1", last_level="L5", include_sacrum=False)
    res = segment_builtin(ph.image)
    assert res.labels_uncertain
    assert any("anchor" in w for w in res.warnings)
    dices = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert len(res.levels) == len(dices)
    assert min(dices.values()) >= 0.9, dices


def _anchored_segments(n_rib_free: int, n_thoracic: int = 3):
    """Working segments caudal -> cranial: the sacrum, n_rib_free rib-free vertebrae, then
    rib-bearing ones, every body top far enough above the scan's end to show its ribs."""
    from spinekit.segmentation.builtin.common import _Segment
    n = 1 + n_rib_free + n_thoracic
    segs = [_Segment(s_lo=30.0 * i, s_hi=30.0 * (i + 1), label=i + 1, ribs=2 if i > n_rib_free else 0)
            for i in range(n)]
    return segs, {sg.label: 30.0 * (sg.label + 1) for sg in segs}


@pytest.mark.parametrize("n_rib_free, lumbar", [(6, ["L6", "L5", "L4", "L3", "L2", "L1"]),
                                                (4, ["L5", "L4", "L3", "L2"]),
                                                (3, ["L5", "L4", "L3"])])
def test_sacrum_and_last_rib_that_disagree_leave_the_names_uncertain(n_rib_free, lumbar):
    # Six (or four) rib-free vertebrae above the sacrum: a transitional spine, a missed
    # hypoplastic twelfth rib, or a disc found inside a body (or one missed): the anchors
    # cannot tell which, so the names are kept and flagged, never given with confidence.
    from spinekit.segmentation.builtin.naming import _name_levels
    segs, body_top_mm = _anchored_segments(n_rib_free)
    warnings = []
    names, confidence, uncertain, t12 = _name_levels(segs, 0, body_top_mm, warnings)
    assert uncertain and confidence < 0.9
    assert t12 == 1 + n_rib_free
    assert names[:1 + n_rib_free] == ["sacrum"] + lumbar
    if n_rib_free != 3:  # a transitional count: thoracic levels from the last rib
        assert names[t12:] == ["T12", "T11", "T10"]
    assert all("anchor_conflict" in sg.flags for sg in segs[1:t12 + 1])
    assert any("disagree" in w for w in warnings)


def test_sacrum_and_last_rib_that_agree_name_with_confidence():
    from spinekit.segmentation.builtin.naming import _name_levels
    segs, body_top_mm = _anchored_segments(5)
    warnings = []
    names, confidence, uncertain, t12 = _name_levels(segs, 0, body_top_mm, warnings)
    assert not uncertain and confidence >= 0.9 and not warnings
    assert names == ["sacrum", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10"]
    assert not any(sg.flags for sg in segs)


def test_rib_stubs_under_rib_free_vertebrae_are_not_ribs():
    # Ribs run from T1 to T12 without a gap: a "stub" under two rib-free vertebrae is pelvis
    # (a sacral ala or iliac wing cut by the view's caudal end); under one (a thin rib missed
    # at 3 mm), or under rib-bearing ones, it stays.
    from spinekit.segmentation.builtin.common import _Segment
    from spinekit.segmentation.builtin.ribs import _drop_contradicted_stubs

    def segs(*kinds):   # caudal -> cranial: "s" stub, "r" ribs, "-" rib-free
        return [_Segment(float(i), float(i + 1), label=i + 1, ribs=2 * (k == "r"), rib_stubs=int(k == "s"))
                for i, k in enumerate(kinds)]

    for kinds, kept in [("s--r", False), ("s----", False), ("ss--", False), ("s-r", True), ("srr", True),
                        ("s-", True), ("s", True)]:
        sg = segs(*kinds)
        _drop_contradicted_stubs(sg)
        assert bool(sg[0].rib_stubs) == kept, kinds
        assert [x.ribs for x in sg] == [2 * (k == "r") for k in kinds]


def test_bone_rising_laterally_is_an_iliac_wing_not_a_rib():
    # Outside the column box (50 mm from the canal), a rib descends from its head and an iliac
    # wing rises from the sacroiliac joint to its crest.
    from spinekit.segmentation.builtin.ribs import _rises_laterally

    sp = 2.0
    adx = np.broadcast_to(np.arange(50.0, 130.0, sp)[None, None, :], (40, 10, 40))
    z = np.arange(40)[:, None, None]
    root_z = 20
    for slope, rises in [(-0.3, False), (0.3, True), (-0.05, False)]:
        centre = root_z + slope * (adx - 50.0) / sp
        piece = np.broadcast_to(np.abs(z - centre) <= 2, adx.shape)
        assert _rises_laterally(piece, adx, root_z, sp) == rises, slope
    # A piece that ends before it is judged (a rib head's stub) is kept.
    assert not _rises_laterally(np.broadcast_to(adx < 60.0, adx.shape) & (z == 30), adx, root_z, sp)


def test_pieces_below_the_sacrum_are_sacrum():
    # A sacrum split at a rudimentary sacral disc: the anchor is its highest piece (_find_sacrum),
    # and the pieces below it, unnamed before, are the rest of the sacrum, not dropped.
    from spinekit.segmentation.builtin.naming import _name_levels
    segs, body_top_mm = _anchored_segments(6)      # the lowest "rib-free vertebra" is sacral
    names, confidence, uncertain, t12 = _name_levels(segs, 1, body_top_mm, [])
    assert not uncertain and confidence >= 0.9
    assert names == ["sacrum", "sacrum", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10"]


def _assert_named_and_dice(ph, res, whole_min, body_min, levels=None):
    assert not res.labels_uncertain
    truth_names = _truth_levels(ph)
    assert res.present_levels() == [n for n in lv.ORDER if n in truth_names]
    for name in levels or truth_names:
        if name == "sacrum":
            continue
        vid = lv.level_id(name)
        d = dice(res.vertebrae.array == vid, ph.vertebrae.array == vid)
        db = dice(res.bodies.array == vid, ph.bodies.array == vid)
        assert d >= whole_min, f"{name} whole-vertebra Dice {d:.3f}"
        assert db >= body_min, f"{name} body Dice {db:.3f}"


def test_osteoporotic_phantom_is_found_and_named_from_the_sacrum():
    # 40 mg/cm3 (about 50 HU marrow, darker than the discs): marrow pockets enclosed by bone
    # look like canal content; the canal track must not jump to them (nor to the sacral
    # foramina) across the gap where the thin sacral canal is lost.
    ph = _phantom(densities_mg_cm3={n: 40.0 for n in ("T11", "T12", "L1", "L2", "L3", "L4", "L5")})
    res = segment_builtin(ph.image)
    assert res.provenance["anchors"]["sacrum"]
    _assert_named_and_dice(ph, res, 0.9, 0.9)


@pytest.fixture(scope="module")
def arterial():
    ph = _phantom(contrast_phase="arterial")
    return ph, segment_builtin(ph.image)


def test_arterial_aorta_touching_thoracic_bodies_is_removed(arterial):
    # Arterial phase: the aorta (contrast, bone-like HU) merges with T11/T12; where it does, its
    # cross-section is carried over from the slices where it stands free.
    # Measured T11 0.942/0.965, T12 0.932/0.951 (whole/body; 0.81/0.74 before); every level
    # 0.927-0.942 / 0.951-0.965 (L5 0.898/0.919 before the iliac branches hanging on L4/L5 by thin
    # contacts were taken out, now 0.937/0.961; L4 0.916/0.939 while the top of the right common
    # iliac, joined to the L4 body by a bridge of blurred, marrow-bright voxels, was kept: it is
    # taken out as a branch of the aorta now, 0.940/0.964).
    ph, res = arterial
    _assert_named_and_dice(ph, res, 0.9, 0.9, levels=("T11", "T12"))
    _assert_named_and_dice(ph, res, 0.92, 0.945)


def test_arterial_iliac_arteries_are_not_bone(arterial):
    # The common iliac arteries leave the aorta at L4 and run down in front of L4/L5: too thin
    # (6 mm radius, partly hidden by the iliac veins) to be found as tubes themselves. Pieces of
    # the aorta's lumen HU hanging on the column by thin contacts are taken out. Measured aorta /
    # iliac voxels in the L5 label 15 (212 before); the same 2 mm phantom in the portal-venous
    # phase (aorta 160 HU, darker than its trabecular bone) keeps its L5 at 0.903 (0.897 before).
    # Branches of the aorta (homogeneous, thin, off the midline, starting next to it) go with it:
    # aorta / iliac voxels in the L4 label 0 (237 before).
    ph, res = arterial
    artery = ph.tissues.array == TISSUE_IDS["aorta"]
    for name in ("L4", "L5"):
        assert int((artery & (res.vertebrae.array == lv.level_id(name))).sum()) < 60, name


def _blood_voxels_in_bodies(ph, res) -> dict[str, int]:
    """Per predicted level: contrast-filled aorta / IVC / heart voxels (phantom tissue map)
    inside its body label."""
    blood = np.isin(ph.tissues.array, [TISSUE_IDS[k] for k in ("aorta", "ivc", "heart")])
    return {name: int((blood & (res.bodies.array == lv.level_id(name))).sum()) for name in res.present_levels()}


def test_arterial_heart_next_to_thoracic_bodies_is_removed():
    # T8-L2 in the arterial phase: the contrast-filled heart (250 HU) lies against T8-T10 and
    # merged with them into one giant label (and an aorta fragment below L2 became an "L3", so
    # every name was shifted: Dice 0). Blood pools too thick for any vertebral body are removed
    # first. Measured min Dice 0.924/0.938 (T8-T10; 0.903/0.895 before the outline's profile
    # rule; the same view without contrast: 0.924/0.935), aorta + heart voxels in the T8 body 75
    # (14,627 in the giant label before).
    ph = _phantom(first_level="T8", last_level="L2", contrast_phase="arterial")
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.915, 0.925)
    assert max(_blood_voxels_in_bodies(ph, res).values()) < 250


def test_3mm_arterial_aorta_is_removed_and_levels_split():
    # At 3 mm the arterial aorta (~300 HU) and the bodies' blurred marrow (150-200 HU) share the
    # wide blood band and one erosion leaves them joined on every slice: the aorta was kept,
    # T11/T12 merged and every name shifted (Dice 0, aorta voxels in the labels 77 %). Narrower
    # HU bands hold the lumen apart; its partial-volume rim is grown downhill. Measured min
    # 0.896/0.921 at T11 (whole/body; 0.856/0.893 before the profile rule, 0.875/0.909 on a 2 mm
    # working grid that did not hold the 3 mm voxel centres, 0.884/0.900 at L4 while the top of
    # the left common iliac, 12 mm from the aorta's lumen after the erosion, was joined to the L4
    # body by the body closing; it is taken out as a branch of the aorta now), aorta voxels in
    # the labels 0.44 % (3.3 % before).
    ph = _phantom(spacing_mm=(3.0, 3.0, 3.0), contrast_phase="arterial")
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.89, 0.915)
    aorta = ph.tissues.array == TISSUE_IDS["aorta"]
    assert (res.vertebrae.array[aorta] > 0).mean() < 0.01


def test_tube_axes_and_lumen_pieces_ignore_what_joins_the_tube_in_another_slice():
    # A contrast tube is one component in 3D. In a slice it can also hold a piece of a body's
    # blurred endplate or low-density marrow joined to it in a slice above or below; the rim
    # growth then ran from that piece into the body. A vessel's axis is its lumen's deepest point,
    # median-filtered over slices, so one slice whose deepest point lies in such a piece does not
    # move it. A second vessel joined to the first (the IVC beside the aorta) has pieces on its
    # axis in most slices and is kept; pieces here and there are not a vessel, nor pieces in most
    # slices that do not have the lumen's HU (a low-density body's blurred cortex). Pieces are the
    # lumen's only when their HU is (median within its range, homogeneous).
    from spinekit.segmentation.builtin.common import _SLICE
    from spinekit.segmentation.builtin.vessels import _lumen_like_pieces, _tube_axes

    def axes_on_beside(lumen, like_mask=None):
        pieces, n = ndi.label(lumen, structure=_SLICE)
        like = None
        if like_mask is not None:    # pieces of the lumen's HU: those inside like_mask
            like = np.zeros(n + 1, bool)
            like[np.unique(pieces[lumen & like_mask])] = True
        axes, on_axis, beside = _tube_axes(pieces, like)
        return axes, on_axis[pieces], beside[pieces]

    yy, xx = np.mgrid[0:60, 0:60]
    aorta = (yy - 20) ** 2 + (xx - 15) ** 2 <= 6 ** 2
    ivc = (yy - 20) ** 2 + (xx - 40) ** 2 <= 4 ** 2
    marrow = (yy - 45) ** 2 + (xx - 40) ** 2 <= 8 ** 2
    lumen = np.zeros((20, 60, 60), bool)
    lumen[:] = aorta | ivc
    lumen[9] |= marrow                                               # deeper than the aorta, one slice
    lumen[3:6] = False                                               # slices without lumen
    axes, on_axis, beside = axes_on_beside(lumen)
    assert len(axes) == 2
    (ay, ax, ar), (iy, ix, ir) = axes
    assert np.allclose(ay, 20.0) and np.allclose(ax, 15.0) and abs(ar - 6.0) < 0.6
    assert np.allclose(iy, 20.0) and np.allclose(ix, 40.0) and abs(ir - 4.0) < 0.6
    assert on_axis[:, aorta | ivc].sum() == lumen[:, aorta | ivc].sum()
    assert not on_axis[9][marrow].any() and not beside[9][marrow].any()
    # The same second tube without the lumen's HU in most of its slices: no vessel.
    like_mask = np.ones_like(lumen)
    like_mask[:14, ivc] = False
    axes, on_axis, beside = axes_on_beside(lumen, like_mask)
    assert len(axes) == 1 and not beside[:, ivc].any()
    assert on_axis[:, aorta].sum() == lumen[:, aorta].sum()
    like_mask[:8, ivc] = True                                        # in most of them: a vessel
    assert len(axes_on_beside(lumen, like_mask)[0]) == 2
    lumen[:, ivc] = False
    lumen[2, ivc] = True                                             # a piece in one slice only
    axes, on_axis, beside = axes_on_beside(lumen)
    assert len(axes) == 1 and not beside[2][ivc].any()
    lumen[7, 26, 19] = True                                          # a fragment beside the aorta
    axes, on_axis, beside = axes_on_beside(lumen)
    assert beside[7, 26, 19] and not on_axis[7, 26, 19]

    rng = np.random.default_rng(0)
    h = np.full((1, 60, 60), 40.0) + rng.normal(0.0, 5.0, (1, 60, 60))
    bright = (np.abs(yy - 45) <= 1) & (np.abs(xx - 30) <= 8)         # cortex-bright crescent
    mixed = (np.abs(yy - 5) <= 2) & (np.abs(xx - 45) <= 6)           # a gradient across the lumen's HU
    split = (yy - 20) ** 2 + (xx - 30) ** 2 <= 2 ** 2                # a fragment of lumen HU
    h[0][aorta] += 260.0
    h[0][bright] = 480.0
    h[0][marrow] = 170.0
    h[0][mixed] = np.where(xx[mixed] < 45, 150.0, 450.0)
    h[0][split] = 300.0
    lumen = (aorta | bright | marrow | mixed | split)[None]
    pieces, _ = ndi.label(lumen, structure=_SLICE)
    kept = _lumen_like_pieces(pieces, h, 280.0, 340.0)[pieces][0]
    assert kept[aorta].all() and kept[split].all()
    assert not (kept & (bright | marrow | mixed)).any()


def test_low_density_bodies_beside_the_arterial_aorta_keep_their_marrow():
    # L1-L4 at 0.9 x 0.9 x 1.25 mm, arterial, L1 / L2 at 70 / 76 mg/cm3 (marrow ~170 HU, inside the
    # 160-520 HU blood band), a bench_random draw. The aorta's tube, one component with the
    # bodies' blurred rims in some slices, had its cross-section where it merged with L2 carried
    # over at the centroid of the clean slices, which those rims pulled into the body; the circle
    # and the rim growth from it took 5,600 marrow voxels of L2 (L2 0.908 whole / 0.875 body, L3
    # 0.924 / 0.895). The tube's axis is its lumen's deepest point now, pieces off it or of
    # another HU are not the vessel: measured L2 0.969 / 0.970, L3 0.968 / 0.966.
    ph = _phantom(first_level="L1", last_level="L4", spacing_mm=(0.9, 0.9, 1.25), noise_hu=6.6, scoliosis_mm=13.3,
                  lordosis_deg=36.1, kyphosis_deg=41.6, effective_kev=76.1, contrast_phase="arterial", seed=873,
                  densities_mg_cm3={"L1": 70, "L2": 76, "L3": 139, "L4": 206})
    whole, body = _unanchored_dice(ph)
    assert min(whole.values()) >= 0.95, whole
    assert min(body.values()) >= 0.95, body


def test_a_low_density_body_s_blurred_wall_is_no_second_vessel_beside_the_aorta():
    # T4-T7 at 0.9 x 0.9 x 3 mm, arterial, in an 18 mm scoliotic curve, T4 / T5 at 72 / 74 mg/cm3
    # (marrow ~111 HU), a bench_random draw. The aorta's tube held, in most of its slices, a
    # crescent of T5's blurred wall (cortex-bright inside, joined to the lumen in other slices).
    # It held a second axis, so it was taken as a second vessel (the IVC beside the aorta is one),
    # and its rim growth took T5's marrow: T5 0.828 whole / 0.776 body. A second vessel must have
    # the lumen's HU: measured T5 0.885 / 0.891 (the rest: T6's wedge of bone below the tilted
    # disc, and the 3 mm outline).
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(0.9, 0.9, 3.0), noise_hu=6.8, scoliosis_mm=-18.0,
                  lordosis_deg=19.8, kyphosis_deg=18.5, effective_kev=75.3, contrast_phase="arterial", seed=702,
                  basivertebral_vein=True, densities_mg_cm3={"T4": 72, "T5": 74, "T6": 243, "T7": 223})
    whole, body = _unanchored_dice(ph)
    t5 = lv.level_id("T5")
    assert whole[t5] >= 0.87 and body[t5] >= 0.87, (whole, body)
    assert min(whole.values()) >= 0.87 and min(body.values()) >= 0.87, (whole, body)


def test_lumen_rim_growth_stops_at_a_thin_cortex_around_osteoporotic_marrow():
    # T5-T10 at 0.7 x 0.7 x 3 mm, arterial, T5 at 43 mg/cm3 against the aorta (a bench_random
    # draw). The lumen's partial-volume rim is grown downhill from the lumen, which stops at a
    # cortex brighter than the lumen; this thin cortex, blurred over 3 mm, is not, and the growth
    # crossed it into the dark marrow: a fifth of T5's body went with the aorta (0.810 body).
    # Marrow darker than bone inside a bright ring is not grown over now: measured T5 0.922 /
    # 0.920 (whole / body), the other levels 0.923-0.951 / 0.915-0.943.
    ph = _phantom(first_level="T5", last_level="T10", spacing_mm=(0.7, 0.7, 3.0), noise_hu=21.8, scoliosis_mm=7.3,
                  lordosis_deg=23.9, kyphosis_deg=18.6, effective_kev=72.1, contrast_phase="arterial", seed=439,
                  fractures={"T8": ("crush", 2)},
                  densities_mg_cm3={"T5": 43, "T6": 95, "T7": 143, "T8": 161, "T9": 105, "T10": 154})
    whole, body = _unanchored_dice(ph)
    assert min(whole.values()) >= 0.91, whole
    assert min(body.values()) >= 0.9, body


def test_arterial_aorta_against_thoracolumbar_bodies_at_2_5_mm_slices():
    # T9-L2 at 1.5 x 1.5 x 2.5 mm, arterial, a bench_random draw: the aorta lies on T10-L1. The
    # circle carried over where it merged with a body sat on the blurred endplates that joined
    # the tube, and the rim growth ran into T11 and L1 (T11 0.870 / 0.838, L1 0.888 / 0.860).
    # Measured since: every level 0.935-0.951 whole, 0.944-0.959 body.
    ph = _phantom(first_level="T9", last_level="L2", spacing_mm=(1.5, 1.5, 2.5), noise_hu=10.1, scoliosis_mm=5.3,
                  lordosis_deg=35.9, kyphosis_deg=20.2, effective_kev=79.7, contrast_phase="arterial", seed=668)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.92, 0.925)


def test_branches_of_a_contrast_tube_are_found_next_to_it():
    # Common iliac arteries are too short and thin to be tubes themselves, and blurred below the
    # lumen's HU at coarse spacing. A piece next to a tube found, homogeneous, thin, off the
    # midline, >= 15 mm long, with the lumen's median HU is a branch; a piece far from the tube, a
    # short one, a body's marrow across the midline and one beside it (too large a cross-section)
    # are not.
    from spinekit.segmentation.builtin.vessels import _vessel_branches

    sp = 1.5
    lumen = (280.0, 320.0)
    zz, yy, xx = np.indices((60, 60, 80))
    dx = (xx - 40) * sp                           # mm from the midline

    def branches(*pieces):
        """_vessel_branches over a tube found (left of the midline, from z = 30 up) and `pieces`
        (centre y, x, radius in voxels, z range, HU); returns each piece's share found."""
        h = np.zeros(zz.shape, np.float32)
        tube = ((yy - 15) ** 2 + (xx - 60) ** 2 <= 16) & (zz >= 30)
        h[tube] = 300.0
        masks = []
        for cy, cx, r, z0, z1, hu in pieces:
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (zz >= z0) & (zz < z1)
            h[m] = hu + np.where((zz + yy + xx) % 2 == 0, 5.0, -5.0)[m]   # noise: IQR 10 HU
            masks.append(m)
        out = _vessel_branches(h > 160.0, tube, h, dx, lumen[0], lumen[1], sp)
        return [float(out[m].mean()) for m in masks]

    branch, far, short, marrow = branches(
        (15, 52, 3.5, 5, 25, 290.0),    # 30 mm long, 9 mm below the tube's end
        (45, 70, 3.5, 5, 30, 300.0),    # 38 mm from the tube
        (15, 70, 3.5, 22, 29, 300.0),   # 10 mm long, next to the tube
        (35, 40, 14, 0, 25, 300.0))     # a body's marrow, across the midline
    assert branch > 0.5
    assert far == short == marrow == 0.0
    # a body's marrow beside the midline (a scoliotic column), touching the tube's end
    assert branches((24, 60, 14, 2, 29, 300.0)) == [0.0]


def test_portal_venous_vessels_stay_out_of_the_bodies():
    # The demo's view (T10-L5, sacrum, ribs, portal-venous phase) at 2 mm: aorta, IVC and heart
    # (150-160 HU) are as bright as trabecular bone and touch the bodies. Before: 362-2,497 vessel
    # voxels in every body (body volumes +30..+90 %), min Dice 0.748/0.689, the heart labelled
    # "T9". Measured now: at most 23 (T11; 0 in L5), min Dice 0.924/0.953 (217 in L5, at the
    # iliac vein confluence, and 0.919/0.941 while the vessel bands began at 160 HU;
    # 0.892/0.893 and 327 in L5 before the outline's profile rule), no extra level.
    ph = _phantom(first_level="T10", include_ribs=True, contrast_phase="portal-venous",
                  densities_mg_cm3={"T10": 150.0, "T11": 140.0, "T12": 128.0, "L1": 104.0, "L2": 96.0,
                                    "L3": 88.0, "L4": 76.0, "L5": 70.0},
                  noise_hu=12.0, fractures={"T12": ("wedge", 2)}, seed=7)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.905, 0.92)
    blood = _blood_voxels_in_bodies(ph, res)
    assert max(blood.values()) < 300, blood
    assert sum(blood.values()) < 500, blood


def test_portal_venous_heart_aorta_and_ivc_in_a_thoracic_view_stay_out():
    # T6-T11 in the portal-venous phase (2 x 2 x 1.25 mm, 20 HU noise, no anchor in view): heart,
    # aorta and IVC (150-160 HU) are as bright as the marrow and touch the bodies. Before:
    # the aorta (160 HU) fell apart in the vessel bands starting at 160 HU and stayed, the
    # heart kept a 4.5 mm rim on T7/T8, and the IVC (51 mm from the view's end, too short for
    # a tube) was labelled T11: min whole/body Dice 0.73/0.73. Measured now 0.926/0.936.
    ph = _phantom(first_level="T6", last_level="T11", spacing_mm=(2.0, 2.0, 1.25), contrast_phase="portal-venous",
                  noise_hu=20.0, seed=878, kyphosis_deg=34.0, lordosis_deg=38.0)
    res = segment_builtin(ph.image)
    assert res.labels_uncertain                  # no sacrum, no rib-free vertebra: names a guess
    whole = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    body = _best_match_dice(res.bodies.array, ph.bodies.array)
    assert len(res.levels) == len(whole)
    assert min(whole.values()) >= 0.92, whole
    assert min(body.values()) >= 0.92, body
    blood = np.isin(ph.tissues.array, [TISSUE_IDS[k] for k in ("aorta", "ivc", "heart")])
    assert int((blood & (res.vertebrae.array > 0)).sum()) < 600   # measured 346 (6,659 before)


def test_noisy_portal_venous_heart_is_found_as_a_pool():
    # T8-L1, portal-venous, 28 HU noise at 2 mm: ~4 % of the heart's voxels fall below the blood
    # threshold, and between them no 20 mm ball fitted (largest 12 mm). The heart stayed in the
    # labels (12,208 voxels), merged T8 with T9 and shifted the names above T10. Pockets a slice
    # of blood encloses count as blood: 176 heart voxels left, every level named.
    ph = _phantom(first_level="T8", last_level="L1", contrast_phase="portal-venous", noise_hu=28.2,
                  scoliosis_mm=-11.2, lordosis_deg=39.5, kyphosis_deg=17.6, effective_kev=57.5,
                  fractures={"T12": ("crush", 2)}, basivertebral_vein=True, seed=112)
    res = segment_builtin(ph.image)
    assert not res.labels_uncertain
    assert res.present_levels() == _truth_levels(ph)
    heart = ph.tissues.array == TISSUE_IDS["heart"]
    assert int((heart & (res.vertebrae.array > 0)).sum()) < 1000
    for name in ("T8", "T9", "T10"):
        vid = lv.level_id(name)
        assert dice(res.vertebrae.array == vid, ph.vertebrae.array == vid) > 0.88, name   # measured 0.925-0.936


def test_a_heart_chamber_wedged_between_a_body_and_the_lung_is_blood():
    # The same view with its curve over 250 mm (the phantom's default): the heart lies against
    # T8-T9 where it narrows between the body and the lung, and no 20 mm ball reaches that wedge.
    # Its blood (2-12 mm from the balls' reach), joined to T9, stayed in the labels with islands
    # inside the chamber: T9 0.894 / 0.882 while the pool's rim grew only 6 mm, as a vessel's does.
    # Grown 14 mm over blood candidates once the vessels are known: measured 0.911 / 0.916.
    ph = _phantom(first_level="T8", last_level="L1", contrast_phase="portal-venous", noise_hu=28.2,
                  scoliosis_mm=-11.2, scoliosis_span_mm=250.0, lordosis_deg=39.5, kyphosis_deg=17.6,
                  effective_kev=57.5, fractures={"T12": ("crush", 2)}, basivertebral_vein=True, seed=112)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.905, 0.905)   # measured 0.911-0.950 / 0.916-0.959
    heart = ph.tissues.array == TISSUE_IDS["heart"]
    assert int((heart & (res.vertebrae.array == lv.level_id("T9"))).sum()) < 160   # measured 107 (270 before)


def test_noisy_portal_venous_aorta_is_found_as_a_tube():
    # Portal-venous blood (~150 HU) is a blood candidate only by the trabecular rule; at 28 HU
    # noise (2 mm) a third of the aorta's voxels dropped out and the one-voxel erosion broke it
    # into pieces too short for a tube: 2,631 aorta voxels stayed in the labels (L1 body 0.79).
    # A majority vote over each voxel's in-plane neighbours closes the noise holes.
    ph = _phantom(first_level="T8", last_level="L1", noise_hu=28.2, scoliosis_mm=-11.2, lordosis_deg=39.5,
                  kyphosis_deg=17.6, contrast_phase="portal-venous", effective_kev=57.5, seed=112,
                  fractures={"T12": ("crush", 2)}, basivertebral_vein=True)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.88, 0.88)     # measured 0.918-0.948 / 0.941-0.961
    aorta = ph.tissues.array == TISSUE_IDS["aorta"]
    assert int((res.vertebrae.array[aorta] > 0).sum()) < 800     # measured 244


def test_a_tube_is_carried_on_where_a_pool_hides_it():
    # A vessel found as a tube in slices 0-9 (axis at y 20, x 20, radius 4 voxels) runs on to
    # slice 17 with the lumen's HU, drifting 1 voxel sideways per 2 slices; past slice 17 there is
    # none. Beside it, a body's marrow of the same HU inside a bone ring (enclosed in-plane).
    from spinekit.segmentation.builtin.vessels import _carry_tube

    nz, ny, nx = 24, 40, 60
    zz, yy, xx = np.indices((nz, ny, nx))
    centre_x = 20.0 + np.maximum(zz - 9, 0) / 2.0
    lumen = ((yy - 20) ** 2 + (xx - centre_x) ** 2 <= 16) & (zz <= 17)
    h = np.where(lumen, 160.0, 40.0).astype(np.float32)
    marrow = (yy - 20) ** 2 + (xx - 40) ** 2 <= 36
    h[marrow] = 160.0
    enc = np.where(marrow, 8, 0).astype(np.uint8)
    vessel = lumen & (zz <= 9)
    o = (slice(0, 10), slice(0, ny), slice(0, nx))
    good = np.ones(10, bool)
    axis = (np.full(10, 20.0), np.full(10, 20.0), 4.0)
    _carry_tube(vessel, vessel.copy(), h, enc, o, good, axis, 120.0, 200.0)
    assert vessel[10:18][lumen[10:18]].mean() > 0.95       # followed, bend included
    assert not vessel[18:].any() and not vessel[marrow].any()
    # Where the vessel is found again further on (a second tube of it), it is not carried: between
    # the two it has merged with a body.
    vessel = lumen & ((zz <= 9) | (zz == 17))
    _carry_tube(vessel, vessel.copy(), h, enc, o, good, axis, 120.0, 200.0)
    assert not vessel[10:17].any()


def test_a_bright_lumen_is_carried_on_by_the_cortex_around_it_not_by_itself():
    # An arterial lumen (300 HU) found as a tube in slices 0-9 runs on to slice 17, drifting 1
    # voxel sideways per 2 slices. Beside it a body: marrow of the lumen's HU in a 700 HU ring.
    # Counted against bone = BONE_HU the lumen encloses itself and the carry stops at once;
    # against what is brighter than the lumen (the cortex), it is followed and the marrow stays.
    from spinekit.segmentation.builtin.common import BONE_HU, _enclosed
    from spinekit.segmentation.builtin.vessels import _bright_lumen_enclosure, _carry_tube

    nz, ny, nx = 24, 60, 80
    zz, yy, xx = np.indices((nz, ny, nx))
    centre_x = 20.0 + np.maximum(zz - 9, 0) / 2.0
    lumen = ((yy - 20) ** 2 + (xx - centre_x) ** 2 <= 16) & (zz <= 17)
    ring_r2 = (yy - 40) ** 2 + (xx - 55) ** 2
    marrow = ring_r2 < 81
    h = np.full((nz, ny, nx), 40.0, np.float32)
    h[lumen | marrow] = 300.0
    h[(ring_r2 >= 81) & (ring_r2 <= 121)] = 700.0
    o = (slice(0, 10), slice(0, ny), slice(0, nx))
    axis = (np.full(10, 20.0), np.full(10, 20.0), 4.0)
    found = lumen & (zz <= 9)
    vessel = found.copy()
    _carry_tube(vessel, found, h, _enclosed(h > BONE_HU, 17), o, np.ones(10, bool), axis, 250.0, 320.0)
    assert not vessel[10:].any()
    vessel = found.copy()
    _carry_tube(vessel, found, h, _bright_lumen_enclosure(h, 320.0, 1.5), o, np.ones(10, bool), axis, 250.0, 320.0)
    assert vessel[10:18][lumen[10:18]].mean() > 0.95 and not vessel[18:].any() and not vessel[marrow].any()


def test_an_arterial_aorta_bending_away_where_its_tube_merged_with_a_body_is_no_vertebra():
    # Random arterial T7-T12 at 1.5x1.5x1.25 mm, 19 mm scoliosis, kyphosis 33 deg (no anchor in
    # view: matched by overlap). Over the view's last 33 mm the aorta's tube merges with T12 and
    # bends 16 voxels away from where it ended: half its lumen stayed in T12 (0.880 / 0.854).
    ph = _phantom(first_level="T7", last_level="T12", spacing_mm=(1.5, 1.5, 1.25), noise_hu=8.2, scoliosis_mm=19.3,
                  scoliosis_span_mm=250.0, lordosis_deg=46.7, kyphosis_deg=33.0, contrast_phase="arterial",
                  effective_kev=66.8, fractures={"T10": ("wedge", 2)}, seed=315)
    res = segment_builtin(ph.image)
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.93, d   # measured 0.954-0.962 (T12 0.880)
    aorta = ph.tissues.array == TISSUE_IDS["aorta"]
    assert int((res.vertebrae.array[aorta] > 0).sum()) < 600   # measured 301 (2,415)


def test_a_tube_s_axis_is_not_carried_past_its_clean_slices_onto_a_body():
    # Random arterial T8-T12 at 0.7x0.7x2.5 mm (seed 20270192), T12 at 96 mg/cm3, no anchor in view:
    # matched by overlap. In the widest HU band the aorta was a clean tube (apart from the bodies)
    # only from 45 mm above T12; the disc of its axis, held where it was there, was carried
    # down through the slices where the tube had merged with T12, onto T12's blurred lateral wall:
    # 1,199 voxels of the body taken as blood (T12 0.908 / 0.866).
    ph = _phantom(first_level="T8", last_level="T12", spacing_mm=(0.7, 0.7, 2.5), noise_hu=10.6, scoliosis_mm=1.7,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, lordosis_deg=28.0, kyphosis_deg=28.8,
                  contrast_phase="arterial", effective_kev=78.1, seed=481, basivertebral_vein=True,
                  fractures={"T10": ("crush", 2)},
                  densities_mg_cm3={"T8": 209, "T9": 71, "T10": 204, "T11": 213, "T12": 96})
    whole, body = _unanchored_dice(ph)
    t12 = lv.level_id("T12")
    # measured T12 0.955 / 0.946; all levels 0.920-0.955 whole, 0.911-0.946 bodies
    assert whole[t12] >= 0.94 and body[t12] >= 0.93, (whole, body)
    assert min(whole.values()) >= 0.91 and min(body.values()) >= 0.9, (whole, body)


@pytest.fixture(scope="module")
def portal_venous_t7_l1():
    """A random view found by bench_random (seed 20261210): portal-venous, kyphotic, 10 mm
    scoliosis, 2x2x3 mm, 23 HU noise; the aorta runs beside the heart at its top."""
    return _phantom(first_level="T7", last_level="L1", spacing_mm=(2.0, 2.0, 3.0), noise_hu=23.4, seed=639,
                    contrast_phase="portal-venous", scoliosis_mm=10.4, lordosis_deg=29.1, kyphosis_deg=32.4,
                    effective_kev=79.9)


def test_the_aorta_beside_the_heart_at_a_views_top_is_no_vertebra(portal_venous_t7_l1):
    # Portal-venous T7-L1 at 2x2x3 mm: the aorta (~155 HU, as bright as marrow) runs beside the
    # heart's blood pool over the view's top 54 mm, where the pool's edge takes part of its
    # candidates and its tube ends; the lumen left beyond joined the column and the top
    # vertebra took 85 of its voxels (T7 0.888 whole / 0.914 body). Carried on along its axis
    # the vessel is found to the view's end: measured T7 0.918 / 0.957, 3 aorta voxels.
    ph = portal_venous_t7_l1
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.9, 0.9)
    t7 = res.vertebrae.array == lv.level_id("T7")
    aorta = ph.tissues.array == ph.truth["tissue_ids"]["aorta"]
    assert (t7 & aorta).sum() < 30


def test_fine_grid_outline_does_not_grow_over_the_arterial_aorta():
    # 1 x 1 x 3 mm, arterial: the outline redrawn on the native grid took lumen voxels (~300 HU,
    # above its 250 HU edge) back onto T10/T11 next to the aorta, a crescent 2-3 voxels thick:
    # body Dice 0.894 (T11). Blood found on the working grid is not grown over: bodies
    # 0.927-0.936, whole 0.935-0.946.
    ph = _phantom(first_level="T10", last_level="L1", spacing_mm=(1.0, 1.0, 3.0), contrast_phase="arterial",
                  noise_hu=11.0)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.93, 0.92)
    aorta = ph.tissues.array == TISSUE_IDS["aorta"]
    assert int((aorta & (res.bodies.array > 0)).sum()) < 500   # measured 311 (1,630 before)


def test_rib_goes_to_the_vertebra_whose_tilted_mid_plane_is_nearest():
    # A scoliotic vertebra is tilted in the coronal plane: a rib root 50 mm lateral sits well
    # above or below its body centre's height. Two bodies tilted 20 deg (mid-planes dropping
    # 12 voxels over 33 to the right), centres 20 voxels apart in z, between three discs tilted
    # as they are; a root 33 voxels to the right, 8 above the lower centre: by height alone it is
    # the lower body's (8 < 12), from the tilted mid-planes the upper one's (0 < 20).
    from spinekit.segmentation.builtin.common import _Segment
    from spinekit.segmentation.builtin.ribs import _body_frames, _rib_level

    zz, yy, xx = np.indices((80, 40, 90), dtype=float)
    tilt = np.tan(np.radians(20.0))
    bodies = np.zeros(zz.shape, np.uint8)
    for label, zc in ((1, 25.0), (2, 45.0)):
        h = zz - zc + tilt * (xx - 45.0)               # height along the tilted axis (approx.)
        bodies[(np.abs(h) < 6.0) & (np.abs(xx - 45.0) < 20.0) & (np.abs(yy - 20.0) < 14.0)] = label
    normal = np.array([1.0, 0.0, tilt]) / np.hypot(1.0, tilt)
    planes = [(np.array([z, 20.0, 45.0]), normal) for z in (15.0, 35.0, 55.0)]
    segs = [_Segment(1.0, 2.0, label=1), _Segment(2.0, 3.0, label=2)]   # (between planes 0-1, 1-2)
    frames = _body_frames(segs, bodies, planes)
    assert frames[1][1] @ normal == pytest.approx(1.0)   # the superior axis leans to +x (20 deg)
    assert frames[1][2] == pytest.approx(6.0, abs=1.0)   # half-height along the axis
    # (with no disc in view a body keeps its principal axis)
    alone = _body_frames(segs[:1], np.where(bodies == 1, 1, 0).astype(np.uint8), [])
    assert alone[1][1][2] > 0.25
    root = np.array([25.0 + 8.0, 20.0, 45.0 + 33.0])
    assert _rib_level(segs, frames, root, 1.5).label == 2
    flat = {k: (c, np.array([1.0, 0.0, 0.0]), h) for k, (c, _, h) in frames.items()}
    assert _rib_level(segs, flat, root, 1.5).label == 1
    # ... and none when the root is over 25 mm from every mid-plane
    assert _rib_level(segs, frames, np.array([75.0, 20.0, 45.0]), 1.5) is None


def test_rib_at_a_scoliotic_apex_goes_by_the_disc_between_opposite_tilts():
    # At the apex of a scoliotic curve two neighbours lean opposite ways (T12 +17 deg, L1 -17 deg
    # in a T11-L2 phantom with 18 mm scoliosis). Their mid-planes cross 36 voxels to the right,
    # where the rib roots lie (50-60 mm lateral), so there a root is as near to one mid-plane as
    # to the other: the phantom's 12th rib went to L1 and every level was named one too high,
    # with confidence. The disc between them is level (the mean of the two tilts) at z 36: a
    # root above it is the upper vertebra's. (Bodies 12 voxels high, centres at z 25 and 47.)
    from spinekit.segmentation.builtin.common import _Segment
    from spinekit.segmentation.builtin.ribs import _rib_level

    tilt = np.radians(17.0)
    frames = {label: (np.array([zc, 20.0, 45.0]), np.array([np.cos(tilt), 0.0, lean * np.sin(tilt)]), 6.0)
              for label, zc, lean in ((1, 25.0, -1.0), (2, 47.0, 1.0))}
    segs = [_Segment(0.0, 1.0, label=1), _Segment(1.0, 2.0, label=2)]
    root = np.array([38.0, 20.0, 45.0 + 40.0])
    mid_plane = {k: abs(float((root - c) @ u)) for k, (c, u, _) in frames.items()}
    assert mid_plane[1] < mid_plane[2]                   # the lower mid-plane is the nearer
    assert _rib_level(segs, frames, root, 1.5).label == 2
    assert _rib_level(segs, frames, np.array([34.0, 20.0, 85.0]), 1.5).label == 1


def test_rib_pair_is_judged_at_its_middle():
    # Two vertebrae (working voxels), bodies 12 voxels high at z 25 and 45, the disc plane between
    # them at z 35. A vertebra's two rib roots lie 40 voxels left and right of the column; where
    # the estimated sideways lean is off by a few degrees they lie at different heights: the
    # right one at z 44 (its room's upper half), the left one at z 34, just under the disc plane.
    # Alone, the left rib went to the vertebra below (tight scoliotic T12-L3: the view was named
    # one level high). As a pair both are judged at their middle, inside the upper room.
    from spinekit.segmentation.builtin.common import _Segment
    from spinekit.segmentation.builtin.ribs import _level_coordinate, _paired_roots, _rib_level

    up = np.array([1.0, 0.0, 0.0])
    frames = {1: (np.array([25.0, 20.0, 45.0]), up, 6.0), 2: (np.array([45.0, 20.0, 45.0]), up, 6.0)}
    segs = [_Segment(0.0, 1.0, label=1), _Segment(1.0, 2.0, label=2)]
    right, left = np.array([44.0, 20.0, 85.0]), np.array([34.0, 20.0, 5.0])
    assert _level_coordinate(frames, right) == pytest.approx(1 + 9 / 16)
    assert _level_coordinate(frames, left) == pytest.approx(15 / 16)
    assert _rib_level(segs, frames, left, 1.5).label == 1
    judged = _paired_roots([right, left], [1, -1], frames, 1.5)
    assert [_rib_level(segs, frames, p, 1.5).label for p in judged] == [2, 2]
    # Ribs of two vertebrae on the two sides, a level apart, are no pair; with all four in view
    # each pairs with its own partner.
    lower_left, lower_right = np.array([23.0, 20.0, 5.0]), np.array([22.0, 20.0, 85.0])
    assert np.array_equal(_paired_roots([right, lower_left], [1, -1], frames, 1.5)[1], lower_left)
    judged = _paired_roots([right, left, lower_left, lower_right], [1, -1, -1, 1], frames, 1.5)
    assert [_rib_level(segs, frames, p, 1.5).label for p in judged] == [2, 2, 1, 1]


def test_a_rib_broken_at_its_neck_is_one_rib():
    # Working voxels of 2 mm: a short piece at the column box's wall (the rib's neck, 3 voxels)
    # and, one empty voxel further out, the rib's shaft, which reaches no wall; another rib's
    # shaft 4 voxels (8 mm) away. The stub is joined to the shaft 4 mm from it, not to the other.
    from spinekit.segmentation.builtin.ribs import _linked_shaft

    lab = np.zeros((20, 10, 40), np.int32)
    lab[5, 5, 10:13] = 1          # neck stub
    lab[5, 5, 14:30] = 2          # its shaft, 4 mm out
    lab[9, 5, 10:30] = 3          # the next rib, 8 mm away
    objs = ndi.find_objects(lab)
    assert _linked_shaft(lab, objs, 0, {1, 2}, 2.0) == 1
    assert _linked_shaft(lab, objs, 0, {2}, 2.0) is None     # (a shaft with a root of its own is no orphan)


def test_a_thoracic_view_whose_lowest_ribs_broke_at_the_neck_is_not_named_from_them():
    # Random native T4-T8 at 2x2x3 mm, 20 HU noise, T5 crushed: both of T8's ribs broke at the
    # neck into a stub at the column box's wall and a shaft 2.8-4.0 mm further out. Seen as no
    # rib, T8 was a rib-free vertebra below the last rib, and the view was named T9-L1 with
    # confidence 0.85. Joined, T8 bears ribs, no anchor is in view, and the names are a guess.
    ph = _phantom(first_level="T4", last_level="T8", spacing_mm=(2.0, 2.0, 3.0), noise_hu=20.2, seed=572,
                  scoliosis_mm=18.8, scoliosis_span_mm=250.0, kyphosis_deg=31.1, lordosis_deg=40.9,
                  effective_kev=69.9, basivertebral_vein=True, fractures={"T5": ("crush", 3)},
                  densities_mg_cm3={"T4": 155, "T5": 194, "T6": 249, "T7": 79, "T8": 61})
    whole, body = _unanchored_dice(ph)
    assert min(whole.values()) >= 0.88, whole      # measured 0.897-0.926 (T5, crushed, 0.897)
    assert min(body.values()) >= 0.87, body        # measured 0.880-0.950


def test_scoliotic_view_without_sacrum_is_named_from_both_12th_ribs():
    # T12-L3 with a tight scoliotic curve (19 mm, kyphosis 36, lordosis 46 deg): the right 12th
    # rib leaves the column 14 mm lower than the left one and was given to L1 by height alone,
    # so the view was named T11-L2 with confidence. Along the bodies' tilted axes both go to T12.
    ph = _phantom(first_level="T12", last_level="L3", spacing_mm=(2.0, 2.0, 1.25), scoliosis_mm=-19.4,
                  lordosis_deg=46.0, kyphosis_deg=36.0, noise_hu=22.0, seed=751)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.93, 0.93)
    assert res.level("T12").flags.count("rib_bearing") == 1 and "rib_bearing" not in res.level("L1").flags


def test_a_rib_leans_with_its_vertebra_only_out_to_its_transverse_process():
    # T12-L4 with a 19 mm scoliosis over five levels: T12 and L1 lean 20 deg sideways. The 12th
    # ribs leave the column box 45-55 mm out; past the transverse-process tips (the costotransverse
    # joints) they run on level, as ribs do, not along the body's tilt. Judged on the tilted disc
    # planes extrapolated that far the left root went to L1, and the view was named T11-L3 with
    # confidence; judged 30 mm out (RIB_TILT_REACH_MM) both are T12's.
    ph = _phantom(first_level="T12", last_level="L4", spacing_mm=(1.5, 1.5, 1.5), noise_hu=9.7, seed=198,
                  scoliosis_mm=-19.2, lordosis_deg=29.1, kyphosis_deg=25.7, contrast_phase="portal-venous",
                  effective_kev=58.4)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.9, 0.9)
    assert res.level("T12").flags.count("rib_bearing") == 1 and "rib_bearing" not in res.level("L1").flags


def test_sparse_canal_track_keeps_its_curve():
    from spinekit.segmentation.builtin.canal import _smooth_track

    # Left-right canal centres (working voxels) picked in 29 of 69 slices of a scoliotic T4-T8
    # phantom (the thoracic arch is open between the pedicles); they lie within a voxel of the
    # true canal, which swings 12 voxels out and back. A median window of 27 samples spanned
    # 40 slices and more, flattened the swing and left the track 5.7 voxels off the canal (T6
    # took 1,773 canal voxels); 27 slices keep it within 3.
    z = np.array([9, 10, 12, 20, 21, 22, 24, 25, 26, 29, 30, 31, 38, 42, 43, 44, 45, 55, 56, 58, 61, 62, 63,
                  70, 72, 73, 74, 76, 77], float)
    x = np.array([108.8, 108.4, 108.6, 110.6, 112.1, 112.0, 113.6, 114.0, 116.4, 115.8, 116.0, 116.3, 120.3,
                  119.9, 119.3, 120.0, 119.1, 118.7, 118.2, 116.9, 114.4, 114.9, 114.6, 112.4, 109.6, 110.9,
                  110.8, 108.9, 108.3])
    flat = _smooth_track(z, x, 95, 27)
    curved = _smooth_track(z, x, 95, 27, in_slices=True)
    assert np.abs(flat[z.astype(int)] - x).max() > 5.0
    assert np.abs(curved[z.astype(int)] - x).max() < 3.0


def test_scoliotic_upper_thoracic_canal_is_tracked_where_it_is_seldom_enclosed():
    # T4-T8, 18 mm scoliosis: the canal's enclosed pockets are sparse, the flattened track ran
    # 7 mm off the canal and T6 / T7 were split wrongly (Dice 0.59 / 0.64). No anchor in view:
    # the names are a flagged guess, so the levels are matched by overlap.
    ph = _phantom(first_level="T4", last_level="T8", spacing_mm=(1.0, 1.0, 1.0), noise_hu=5.3, scoliosis_mm=17.8,
                  lordosis_deg=35.5, kyphosis_deg=18.4, effective_kev=57.1, seed=199,
                  densities_mg_cm3={"T4": 75, "T5": 101, "T6": 199, "T7": 47, "T8": 210})
    res = segment_builtin(ph.image)
    assert res.labels_uncertain
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d[lv.level_id(n)] for n in ("T5", "T6", "T7", "T8")) >= 0.94, d   # measured 0.956-0.971
    # The view's top vertebra: 0.897 while the narrow canal at the top went unfound (its pocket's
    # smoothed mean over 50 HU, its core's 35 HU or less); 0.959 since.
    assert d[lv.level_id("T4")] >= 0.93, d


def test_a_vertebra_below_a_sideways_leaning_disc_keeps_its_raised_side():
    # Random T4-T7 view at 0.9x0.9x2.5 mm, 19 mm scoliosis: the T6/T7 disc leans 23 deg sideways,
    # so the slices through it hold T7's raised side 8-25 mm off the canal. By the canal's measure
    # all of it lay beyond the rib heads' 15 mm, and the rib path took it with T7's pedicle
    # (T7 whole / body 0.909 / 0.899); measured from T7's own axis it is body (0.960 / 0.928).
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(0.9, 0.9, 2.5), noise_hu=10.5, seed=388,
                  scoliosis_mm=-19.1, lordosis_deg=34.9, kyphosis_deg=17.8, effective_kev=79.0)
    whole, body = _unanchored_dice(ph)
    t7 = lv.level_id("T7")
    assert whole[t7] >= 0.94 and body[t7] >= 0.915, (whole, body)
    # (T5 / T6 lose to a disc plane misplaced at 2.5 mm: 0.89 / 0.90, a limit of its own)
    assert min(whole.values()) >= 0.88, whole


def test_each_body_leans_as_its_discs_do(monkeypatch, portal_venous_t7_l1):
    # The rib path and the ribs' level read each body's superior axis. A thoracic body is about
    # as tall as it is deep, so its principal axis is unsure: at 2x2x3 mm, in this kyphotic
    # portal-venous T7-L1 view, T7-T10 came out 30-46 deg off. The disc planes around each body
    # give it to within 5 deg here (sweep of 530 phantom bodies: median 1.6, max 14 deg).
    import spinekit.segmentation.builtin.pipeline as pipeline

    seen = {}
    body_frames, working_grid = pipeline._body_frames, pipeline._working_grid

    def spy_frames(*args):
        seen["frames"] = body_frames(*args)
        return seen["frames"]

    def spy_grid(*args):
        seen["grid"] = working_grid(*args)
        return seen["grid"]

    monkeypatch.setattr(pipeline, "_body_frames", spy_frames)
    monkeypatch.setattr(pipeline, "_working_grid", spy_grid)
    ph = portal_venous_t7_l1
    segment_builtin(ph.image)
    grid = seen["grid"]
    origin = np.array(grid.reference.GetOrigin())
    truth = [t for t in ph.truth["levels"].values() if t["centroid_lps_mm"]]
    off_deg = []
    for centre, up, _ in seen["frames"].values():
        lps = origin + centre[::-1] * grid.spacing_mm          # (working zyx, LPS xyz)
        t = min(truth, key=lambda t: np.linalg.norm(np.array(t["centroid_lps_mm"]) - lps))
        cos = abs(float(up @ np.array(t["axis_superior"])[::-1]))
        off_deg.append(np.degrees(np.arccos(min(cos, 1.0))))
    assert len(off_deg) == 7 and max(off_deg) < 8.0, off_deg


def _canal_column(pocket_hu: float, sp: float = 1.5):
    """Working-grid HU of a straight column: a 7 mm-radius pocket inside a 7 mm-thick bony ring in
    the back of a soft-tissue torso, blurred in-plane as a scan blurs it."""
    from scipy import ndimage as ndi

    from spinekit.segmentation.builtin.common import BONE_HU

    y, x = np.mgrid[:100, :100] * sp
    torso = ((y - 75.0) / 70.0) ** 2 + ((x - 75.0) / 70.0) ** 2 <= 1.0
    r_mm = np.hypot(y - 100.0, x - 75.0)
    plane = np.where(torso, 40.0, -1000.0)
    plane = np.where(r_mm <= 14.0, 500.0, plane)
    plane = np.where(r_mm <= 7.0, pocket_hu, plane)
    hu = np.broadcast_to(ndi.gaussian_filter(plane, 0.7).astype(np.float32), (30, 100, 100)).copy()
    return hu, hu > BONE_HU, np.broadcast_to(torso, hu.shape).copy(), sp


def test_narrow_canal_is_told_from_marrow_by_its_core():
    # A 14 mm canal in bright bone: the bone's blur lifts the smoothed mean of the whole pocket to
    # 58 HU, above CANAL_MEAN_HU, so no slice held a canal (the upper thoracic canal of a kyphotic
    # view, below); its core, a voxel in from the rim, reads 28 HU. A pocket of 45 HU (the marrow
    # of a 40 mg/cm3 body) reads 53 in its core and is no canal.
    from spinekit.segmentation.builtin.canal import _track_canal

    track = _track_canal(*_canal_column(15.0))
    assert track is not None
    assert (track["z_lo"], track["z_hi"]) == (0, 29)
    assert abs(track["cy"][15] - 100.0 / 1.5) < 1.0 and abs(track["cx"][15] - 75.0 / 1.5) < 1.0
    assert _track_canal(*_canal_column(45.0)) is None


def test_narrow_upper_thoracic_canal_is_tracked_to_the_top_of_a_kyphotic_view():
    # T4-T7, 36 deg kyphosis, arterial phase, 1.5 x 1.5 x 1.25 mm (a bench_random draw). With no
    # canal pocket found in the top 25 mm (the test above), the track held its last value there,
    # 6 mm behind the canal as the kyphosis brings it forward, and T4's body took its pedicle roots:
    # T4 0.910 whole / 0.895 body before; measured 0.943 / 0.958 since, the other levels >= 0.927.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(1.5, 1.5, 1.25), noise_hu=19.8, scoliosis_mm=5.6,
                  lordosis_deg=27.4, kyphosis_deg=36.0, effective_kev=62.2, contrast_phase="arterial", seed=478,
                  densities_mg_cm3={"T4": 127, "T5": 172, "T6": 49, "T7": 154})
    whole, body = _unanchored_dice(ph)
    assert min(whole.values()) >= 0.92, whole
    assert min(body.values()) >= 0.92, body
    assert body[lv.level_id("T4")] >= 0.94, body


def test_disc_plane_leans_sideways_as_its_disc_does():
    from spinekit.segmentation.builtin.discs import _coronal_tilt

    # Body-core voxels (1.5 mm grid) of two bodies 40 mm wide and a 4.5 mm disc between them
    # whose plane leans 20 deg to the patient's left; bone weight 100, the disc holds none.
    sp = 1.5
    z, y, x = (a.ravel() for a in np.meshgrid(np.arange(-20, 21), np.arange(-8, 9), np.arange(-13, 14),
                                              indexing="ij"))
    for lean_deg in (20.0, -10.0, 0.0):
        normal = np.array([np.cos(np.radians(lean_deg)), 0.0, np.sin(np.radians(lean_deg))])
        bone = np.abs(np.stack([z, y, x], axis=1) @ normal) * sp > 2.25
        zb, yb, xb = z[bone] + 30.0, y[bone] + 40.0, x[bone] + 50.0
        w = np.full(zb.size, 100.0)
        assert _coronal_tilt(np.array([30.0, 40.0, 50.0]), np.array([1.0, 0.0, 0.0]), zb, yb, xb, w, sp) == lean_deg
    # Bone all through (a body, no disc at the point): no lean is darker, none is taken.
    w = np.full(z.size, 100.0)
    assert _coronal_tilt(np.zeros(3), np.array([1.0, 0.0, 0.0]), z.astype(float), y.astype(float),
                         x.astype(float), w, sp) == 0.0


def test_scoliotic_discs_lean_with_their_vertebrae():
    # Random T4-T8 view (seed 31), 15 mm scoliosis, 0.8x0.8x2 mm, portal-venous: the disc slabs
    # followed only the centreline's sideways slope, not each disc's own lean (T4 / T5 whole
    # 0.900 / 0.903). No anchor in view: matched by overlap.
    ph = _phantom(first_level="T4", last_level="T8", spacing_mm=(0.8, 0.8, 2.0), noise_hu=26.1,
                  scoliosis_mm=15.4, lordosis_deg=28.3, kyphosis_deg=41.4, contrast_phase="portal-venous",
                  effective_kev=55.0, basivertebral_vein=True, seed=480)
    res = segment_builtin(ph.image)
    assert res.labels_uncertain
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.915, d   # measured 0.926-0.951


def test_canal_chain_follows_the_canal_past_gaps_and_side_pockets():
    # Candidate pockets (z, y, x, area, front) on a 1.5 mm grid: the canal drifts 0.4 voxel per
    # slice to the right, with 10-slice runs where no pocket closes (15 mm) and, at every
    # fifth slice, a small pocket 6 voxels to its side (a foramen).
    from spinekit.segmentation.builtin.canal import _canal_chain

    canal = [(z, 100.0, 50.0 + 0.4 * z, 150.0, 95.0) for z in range(60) if not (15 <= z < 25 or 40 <= z < 50)]
    side = [(z, 100.0, 56.0 + 0.4 * z, 30.0, 97.0) for z in range(0, 60, 5)]
    rows8 = np.array(canal + side[::2])
    rows7 = np.array(side[1::2] + [(z, y + 1.0, x, 2 * a, f) for z, y, x, a, f in canal[::3]])
    chain = _canal_chain(rows8, rows7, 1.5)
    assert sorted(chain) == [z for z, *_ in canal]          # every canal slice, no side pocket
    assert all(chain[z][3] == 150.0 and chain[z][1] == 100.0 for z in chain)   # the 8-direction pocket
    # A lone pocket far off the line in a canal slice, with no chain of its own, is left out.
    chain = _canal_chain(np.vstack([rows8, [(30.0, 60.0, 20.0, 150.0, 55.0)]]), rows7, 1.5)
    assert chain[30][1] == 100.0


@pytest.mark.parametrize("kw", [
    # 2 mm, scoliosis 15 mm to the left: a walk from one seed lost the canal after one vertebra
    # and extrapolated past L3, whose transverse processes then read as ribs (named T9-T12, L3
    # Dice 0.21).
    dict(spacing_mm=(2.0, 2.0, 2.0), scoliosis_mm=15.3, lordosis_deg=19.3, kyphosis_deg=25.0, noise_hu=15.0,
         seed=279, effective_kev=79.0),
    # 1.5 mm pixels, a tight curve (19 mm, kyphosis 36, lordosis 46 deg): the arch of each tilted
    # vertebra closes around the canal in a few slices only, and the pockets step sideways from
    # one vertebra to the next; the walk stopped after 22 mm and the scan was refused.
    dict(spacing_mm=(1.5, 1.5, 1.25), scoliosis_mm=-19.4, lordosis_deg=46.0, kyphosis_deg=36.0, noise_hu=22.0,
         seed=751),
])
def test_canal_is_tracked_through_a_tight_scoliotic_curve(kw):
    # The canal is the best chain of enclosed pockets over all slices, not a walk from one seed.
    ph = _phantom(first_level="T12", last_level="L3", **kw)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.93, 0.95)    # measured 0.940-0.973 / 0.959-0.968


def test_arterial_aorta_in_front_of_a_scoliotic_lumbar_column_is_removed():
    # L1-L5 + sacrum, arterial, scoliosis 17 mm: the aorta runs in front of the bodies, 35-58 mm
    # ahead of the canal, and 41 % of its voxels lie within 8 mm of the canal's line, so it failed
    # the midline test meant for bodies and stayed (28,600 aorta voxels in the labels, min Dice
    # 0.83). The tube's midline share counts only level with the bodies (30 mm in front of the
    # canal's wall); per slice, where the tube merges with a body, every midline voxel counts.
    ph = _phantom(first_level="L1", spacing_mm=(0.9, 0.9, 2.0), noise_hu=28.1, scoliosis_mm=-17.3,
                  lordosis_deg=30.0, kyphosis_deg=28.2, contrast_phase="arterial", effective_kev=61.3, seed=950)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.92, 0.9)     # measured 0.938-0.971 / 0.919-0.969
    aorta = ph.tissues.array == TISSUE_IDS["aorta"]
    assert (res.vertebrae.array[aorta] > 0).mean() < 0.05


def test_dim_cortex_next_to_the_arterial_aorta_stays_bone():
    # Arterial phase at 79 keV with low-density bodies (47-129 mg/cm3): the cortex is as dim as
    # the lumen (~300 HU), its flanks joined the aorta's HU band and tube, and the rim growth ran
    # from them into the marrow (T10 / T11 / L1 bodies 0.83 / 0.87 / 0.82). Only voxels up to the
    # lumen's own HU make the tube now.
    ph = _phantom(first_level="T10", last_level="L2", spacing_mm=(1.0, 1.0, 2.0), noise_hu=15.4,
                  scoliosis_mm=-18.3, lordosis_deg=48.3, kyphosis_deg=12.9, contrast_phase="arterial",
                  effective_kev=79.3, seed=202,
                  densities_mg_cm3={"T10": 116, "T11": 92, "T12": 170, "L1": 47, "L2": 129})
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.93, 0.92)     # measured 0.952-0.966 / 0.944-0.963


def test_blurred_cortex_crescent_joined_to_the_aorta_stays_bone():
    # Arterial phase at 2 mm pixels: the osteoporotic T10's (82 mg/cm3) thin cortex, blurred to
    # the lumen's HU, joined the aorta's tube as a crescent in slices where the tube still looked
    # clean, and the rim growth ran from it into the marrow (T10 / L1 bodies 0.828 / 0.906).
    # The tube is opened in-plane first: the lumen is several voxels across, the crescent one.
    ph = _phantom(first_level="T10", last_level="L1", spacing_mm=(2.0, 2.0, 1.25), noise_hu=11.4,
                  scoliosis_mm=-4.2, lordosis_deg=15.9, kyphosis_deg=19.4, contrast_phase="arterial",
                  effective_kev=70.7, fractures={"T12": ("crush", 3)}, seed=421,
                  densities_mg_cm3={"T10": 82, "T11": 232, "T12": 104, "L1": 56})
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.9, 0.92)     # measured 0.917-0.951 / 0.946-0.964


def _scoliotic_apex_phantom(l1_mg_cm3: float):
    # T11-L2, 18 mm scoliosis with its apex at T12/L1 (T12 leans +17 deg, L1 -17 deg; the disc
    # between them is wedged 34 deg).
    return _phantom(first_level="T11", last_level="L2", spacing_mm=(0.8, 0.8, 1.25), noise_hu=15.4,
                    scoliosis_mm=-18.3, lordosis_deg=48.3, kyphosis_deg=12.9, contrast_phase="arterial",
                    effective_kev=79.3, seed=202,
                    densities_mg_cm3={"T11": 92, "T12": 170, "L1": l1_mg_cm3, "L2": 129})


def test_rib_at_a_scoliotic_apex_names_the_levels_right():
    # T12's rib root lies where the T12 and L1 mid-planes cross, it went to L1 and the view was
    # named T10-L1 with confidence (see the unit test above).
    ph = _scoliotic_apex_phantom(129)
    res = segment_builtin(ph.image)
    # (the T12/L1 disc is wedged 34 deg, its plane is placed level: T12 0.865 / 0.845)
    _assert_named_and_dice(ph, res, 0.83, 0.8)     # measured 0.865-0.979 / 0.845-0.966


def test_rib_heads_taken_are_the_small_pieces_beside_a_body():
    # Bone taken from the bodies as rib: a rib head beside the body (~0.5 cm3) is rib, and the
    # native outline must not grow the body back over it; a large piece (a body's side, taken
    # where a scoliotic apex shifts it lateral of the canal) is not blocked.
    from spinekit.segmentation.builtin.ribs import _rib_heads_taken

    body = np.zeros((20, 60, 80), bool)
    body[4:16, 10:40, 20:50] = True
    taken = np.zeros_like(body)
    taken[8:12, 30:35, 50:55] = True      # 4 x 5 x 5 voxels of 1.5 mm: 0.34 cm3
    taken[4:16, 10:30, 5:20] = True       # 12 x 20 x 15 voxels: 12.2 cm3
    heads = _rib_heads_taken(taken, body, 1.5)
    assert heads[8:12, 30:35, 50:55].all()
    assert not heads[:, :, :20].any()


def test_rib_heads_and_lumen_rims_stay_out_of_thoracic_bodies():
    # Arterial T4-T11 at 1x1x3 mm. The working grid gave the rib heads back, then the outline
    # redrawn on the native grid grew the bodies over them again (rib voxels in the bodies 575 ->
    # 1178, 2.6 % of the bodies); now 544 (1.2 %). The aorta's rim against the bodies (lumen HU,
    # two native voxels where one working voxel straddled the cortex) stayed: 1,129 voxels, 2.5 %;
    # now 168. Bodies 0.867-0.919 -> 0.891-0.940, whole 0.890-0.935 -> 0.901-0.943.
    ph = _phantom(first_level="T4", last_level="T11", spacing_mm=(1.0, 1.0, 3.0), noise_hu=7.8, seed=66,
                  contrast_phase="arterial", effective_kev=67.6, kyphosis_deg=31.1, lordosis_deg=38.0,
                  scoliosis_mm=-2.4, fractures={"T7": ("biconcave", 1)})
    res = segment_builtin(ph.image)
    bodies = res.bodies.array > 0
    for tissue, share in (("rib", 0.015), ("aorta", 0.01)):
        assert (bodies & (ph.tissues.array == TISSUE_IDS[tissue])).sum() / bodies.sum() <= share, tissue
    body_dice = _best_match_dice(res.bodies.array, ph.bodies.array)
    assert np.mean(list(body_dice.values())) >= 0.91, body_dice
    assert min(_best_match_dice(res.vertebrae.array, ph.vertebrae.array).values()) >= 0.895


def test_thoracic_pedicles_and_process_tips_stay_with_their_vertebra():
    # T4-T7 at 0.8x0.8x3 mm (random seed 137's view). The thoracic arch plane drops behind the
    # canal for the shingled laminae; dropped from the canal's centre it gave T5 the tops of T6's
    # pedicles and superior articular processes (683 of T6's voxels in T5; whole T5 / T6 0.880 /
    # 0.900). From the canal's posterior wall: 412, 0.901 / 0.918.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(0.8, 0.8, 3.0), noise_hu=16.8, scoliosis_mm=-11.2,
                  lordosis_deg=16.6, kyphosis_deg=29.4, effective_kev=67.7, seed=386,
                  densities_mg_cm3={"T4": 179.0, "T5": 174.0, "T6": 98.0, "T7": 224.0})
    from spinekit.segmentation.bench import _best_match

    res = segment_builtin(ph.image)
    pred, truth = res.vertebrae.array, ph.vertebrae.array
    t5, t6 = lv.level_id("T5"), lv.level_id("T6")
    assert ((truth == t6) & (pred == _best_match(pred, truth, t5))).sum() <= 0.045 * (truth == t6).sum()
    whole = _best_match_dice(pred, truth)
    assert min(whole[t5], whole[t6]) >= 0.895, whole


def test_upper_thoracic_transverse_processes_keep_their_tips():
    # Arterial T4-T7 at 1.5x1.5x1.25 mm (random seed 20261205's view). The thoracic width cut
    # reaches further on narrower (upper thoracic) bodies; T4's width was measured over all its
    # voxels, 37.6 mm with the rib heads left on its top slices, and its processes were cut 5 mm
    # short of their tips (whole 0.891). Measured slice by slice (median): 33.4 mm, whole 0.910.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(1.5, 1.5, 1.25), noise_hu=19.8, scoliosis_mm=5.6,
                  lordosis_deg=27.4, kyphosis_deg=36.0, contrast_phase="arterial", effective_kev=62.2, seed=478,
                  densities_mg_cm3={"T4": 127.0, "T5": 172.0, "T6": 49.0, "T7": 154.0})
    res = segment_builtin(ph.image)
    assert min(_best_match_dice(res.vertebrae.array, ph.vertebrae.array).values()) >= 0.9


def test_lumen_side_of_an_outline_is_told_by_the_lumen_hu():
    # A body (200 HU marrow, 1200 HU cortex) touched by a 300 HU contrast lumen; the labels hold a
    # two-voxel crescent of the lumen next to the cortex, which the soft-tissue edge threshold
    # keeps. Against the lumen's HU the crescent goes, the cortex and the marrow behind it stay.
    from spinekit.segmentation.builtin.outline import _lumen_side

    yy, xx = np.mgrid[0:40, 0:60]
    r_body = np.hypot(yy - 20, xx - 20)
    r_lumen = np.hypot(yy - 20, xx - 39)
    hu = np.full((1, 40, 60), 40.0, np.float32)
    hu[0][r_body <= 10] = 200.0
    hu[0][(r_body > 9) & (r_body <= 10)] = 1200.0
    hu[0][(r_lumen <= 9) & (r_body > 10)] = 300.0
    crescent = (r_body > 10) & (r_body <= 12) & (r_lumen <= 9)
    kept = ((r_body <= 10) | crescent)[None]
    blood = ((r_lumen <= 9) & (r_body > 12))[None]
    side = _lumen_side(kept, blood, hu)
    assert side[0][crescent].all()
    assert not side[0][r_body <= 10].any()
    # Without contrast (lumen darker than the edge threshold) nothing is tested.
    assert not _lumen_side(kept, blood, np.where(hu == 300.0, np.float32(45.0), hu)).any()


@pytest.mark.xfail(strict=True, reason="known: the T12/L1 disc at a scoliotic apex is missed when L1 is osteoporotic")
def test_osteoporotic_vertebra_at_a_scoliotic_apex_keeps_its_disc():
    # As above with L1 at 47 mg/cm3: the density profile of its marrow is darker than the disc
    # wedged 34 deg against T12, so the disc is no minimum (0.96 of the bodies beside it; 0.84
    # while the aorta's removal took part of T12, found as a weak disc then). T12 and L1 merge and
    # the names below T12 are lost.
    ph = _scoliotic_apex_phantom(47)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.83, 0.8)


@pytest.fixture(scope="module")
def fractured():
    ph = _phantom(fractures={"L1": ("wedge", 2), "T12": ("crush", 3)})
    return ph, segment_builtin(ph.image)


def test_pedicle_screws_with_beam_hardening_streaks_are_named_and_outlined():
    # Titanium screws in L3 with the streaks of an uncorrected two-energy beam (dark bands of
    # several hundred HU along and between the screws, bright ones beside them, which lift rays of
    # psoas, vena cava and canal above the bone threshold). Measured at 2 mm: L3 0.918 whole /
    # 0.949 body, seeds 0-4 0.918-0.921, screws in L1/L2/L4/L5 0.909-0.923 (0.903 / 0.932 and
    # 0.899-0.917 before the streaks were reduced (segmentation.metal); 0.886 / 0.908 before the
    # streak rays and pieces were also dropped in the screws' slices; 0.927 / 0.958 without streaks).
    ph = _phantom(first_level="L1", last_level="L5", metal_level="L3", metal_artifacts=1.0)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.9, 0.9)
    l3 = res.vertebrae.array == lv.level_id("L3")
    metal = ph.tissues.array == ph.truth["tissue_ids"]["metal"]
    assert l3[metal].mean() > 0.9       # the screws inside the bone stay with their vertebra


@pytest.fixture(scope="module")
def rod_construct():
    ph = _phantom(first_level="T12", last_level="L5", metal_level="L3-L4", metal_artifacts=1.0)
    return ph, segment_builtin(ph.image)


def test_screw_and_rod_construct_is_named_and_its_bodies_outlined(rod_construct):
    # Screws in L3 and L4 joined by rods, with the streaks of all of it, at 2 mm. Measured: bodies
    # L3 / L4 0.940 / 0.945 (0.916 / 0.927 before the streaks were reduced); the other levels as
    # without metal.
    ph, res = rod_construct
    _assert_named_and_dice(ph, res, 0.9, 0.9, levels=["T12", "L1", "L2", "L5"])
    for name in ("L3", "L4"):
        vid = lv.level_id(name)
        assert dice(res.bodies.array == vid, ph.bodies.array == vid) >= 0.9, name


def test_screw_and_rod_construct_whole_vertebrae_reach_the_target(rod_construct):
    # Measured: L3 / L4 0.914 / 0.922; 0.903 / 0.910 with the rods and screw heads labelled as
    # vertebra and streak-filled canals kept; 0.884 / 0.893 before the streaks were reduced as
    # well (the streaks lifted psoas beside the screwed bodies above the bone threshold, and with
    # metal in every slice between the screws no metal-free slice tells a streak ray from a
    # process).
    ph, res = rod_construct
    for name in ("L3", "L4"):
        vid = lv.level_id(name)
        assert dice(res.vertebrae.array == vid, ph.vertebrae.array == vid) >= 0.9, name
    # The rods and screw heads (metal outside the truth's vertebrae) are left out, the screws kept:
    # measured 0.21 of their voxels labelled (0.79 before; the rest partial volume under 2000 HU
    # or touching the bone), screws 0.984.
    metal = ph.tissues.array == ph.truth["tissue_ids"]["metal"]
    labelled = res.vertebrae.array > 0
    truth = ph.vertebrae.array > 0
    assert labelled[metal & ~truth].mean() < 0.3
    assert labelled[metal & truth].mean() > 0.9


def test_streak_rays_and_pieces_in_metal_slices_are_dropped():
    # Slice 2 holds a screw: a one-voxel ray off the body and a piece apart from it that stops in
    # the metal-free slices beside it are streaks; a piece that goes on into them is bone.
    from spinekit.segmentation.builtin.outline import _open_metal_slices

    vert = np.zeros((5, 40, 40), np.uint8)
    vert[:, 10:30, 10:30] = 1                      # body
    vert[1:4, 33:37, 15:20] = 1                    # a process, apart in-plane, in three slices
    vert[2, 2:6, 2:6] = 1                          # a streak piece, only in the metal slice
    vert[2, 20, 30:38] = 1                         # a streak ray, one voxel thick
    bodies = (vert > 0).astype(np.uint8)
    hu = np.where(vert > 0, 400, 40).astype(np.int16)
    hu[2, 18:21, 14:17] = 3071                     # the screw
    sub = Image(hu, (1.0, 1.0, 2.0))
    before = vert.copy()
    _open_metal_slices(vert, bodies, sub)
    assert not vert[2, 2:6, 2:6].any() and not vert[2, 20, 31:38].any()
    # (the opening rounds corners off)
    assert vert[2, 33:37, 15:20].sum() >= 16 and vert[2, 18:21, 14:17].all()
    assert vert[2, 11:29, 11:29].all()
    assert np.array_equal(vert[[0, 1, 3, 4]], before[[0, 1, 3, 4]])   # slices without metal untouched
    assert np.array_equal(bodies > 0, vert > 0)
    # Metal in every slice (rods spanning the view): no metal-free slice within reach tells a
    # process from a streak, so only the opening acts.
    rods, rod_hu = before.copy(), hu.copy()
    rod_hu[:, 18:21, 14:17] = 3071
    _open_metal_slices(rods, rods.copy(), Image(rod_hu, (1.0, 1.0, 2.0)))
    assert rods[2, 2:6, 2:6].sum() >= 12 and not rods[2, 20, 31:38].any()
    # no metal: nothing changes (a transpose of the axes as well: the axial axis is found from the
    # direction, here the array's last axis)
    # (dense cortex at a low effective energy is no metal: full-density cortical bone reads
    # ~2400 HU at 50 keV, ~2800 at 45 keV)
    plain = before.copy()
    _open_metal_slices(plain, plain.copy(), Image(np.full(before.shape, 2800, np.int16), (1.0, 1.0, 2.0)))
    assert np.array_equal(plain, before)
    t_vert, t_bodies = before.transpose(1, 2, 0).copy(), before.transpose(1, 2, 0).copy()
    t_hu = hu.transpose(1, 2, 0).copy()
    # (index axes x, y, z of the transposed array: the original slice axis, superior; the
    # original x, LPS x; the original y, LPS y. Columns of the direction are those axes.)
    direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    _open_metal_slices(t_vert, t_bodies, Image(t_hu, (2.0, 1.0, 1.0), direction=direction))
    assert np.array_equal(t_vert, vert.transpose(1, 2, 0))


def test_a_canal_the_streaks_fill_in_a_metal_slice_is_left_out():
    # A vertebra's ring around its canal in every slice; in slice 3 two screws' streaks lift the
    # canal above the bone threshold and it is labelled. The canal is open in the metal-free
    # slices beside and enclosed by the ring here: it goes. A transverse process seen only in the
    # screws' slice is not enclosed: it stays.
    from spinekit.segmentation.builtin.outline import _open_metal_slices

    yy, xx = np.mgrid[:60, :60]
    ring = (np.hypot(yy - 30, xx - 30) <= 14) & (np.hypot(yy - 30, xx - 30) > 7)
    vert = np.repeat(ring[None], 7, axis=0).astype(np.uint8)
    canal = np.hypot(yy - 30, xx - 30) <= 7
    vert[3][canal] = 1                             # the filled canal
    vert[3, 28:33, 44:56] = 1                      # a transverse process, only in slice 3
    hu = np.where(vert > 0, 400, 40).astype(np.int16)
    hu[3, 18:21, 20:23] = 3071                     # the screws, in the ring
    hu[3, 18:21, 38:41] = 3071
    bodies = vert.copy()
    _open_metal_slices(vert, bodies, Image(hu, (1.0, 1.0, 2.0)))
    assert not vert[3][np.hypot(yy - 30, xx - 30) <= 6].any()
    assert vert[3, 29:32, 45:55].all()
    assert vert[3][ring & (np.hypot(yy - 30, xx - 30) < 13) & (np.hypot(yy - 30, xx - 30) > 8)].all()


def test_rods_and_screw_heads_outside_the_bone_are_no_vertebra():
    # A screw runs through a body into the soft tissue behind it; a rod joined to its head runs
    # through the muscle behind the bone in every slice. The flood labels all of the metal with
    # the vertebra; the metal wrapped in bone stays, the metal in muscle goes.
    from spinekit.segmentation.builtin.outline import _open_metal_slices

    vert = np.zeros((12, 50, 40), np.uint8)
    vert[:, 8:30, 8:32] = 1                        # body and arch
    hu = np.where(vert > 0, 300, 40).astype(np.int16)
    hu[5:7, 12:32, 18:21] = 3071                   # the screw, its tail 2 mm out of the bone
    hu[:, 36:39, 18:21] = 3071                     # the rod, 6 mm behind the bone
    hu[5:7, 32:36, 18:21] = 3071                   # the screw's head, joining the two
    hu[5:7, 31, 18:21] = 2500                      # (partial volume between tail and head)
    metal = hu >= 2000
    vert[metal] = 1
    bodies = vert.copy()
    _open_metal_slices(vert, bodies, Image(hu, (1.0, 1.0, 2.0)))
    assert vert[5:7, 12:30, 18:21].all()           # the screw in the bone
    assert not vert[:, 36:39, 18:21].any()         # the rod
    assert not vert[5:7, 34:36, 18:21].any()       # the head's far side
    assert vert[:, 9:29, 9:31].all()               # the bone itself (the opening rounds its corners)
    assert np.array_equal(bodies > 0, vert > 0)


def test_fractured_bodies_keep_their_outline(fractured):
    # A wedge (L1) and a crush (T12) fracture: the short bodies are still split at their discs.
    # The 2 mm phantom's box-averaged cortex left one bright voxel layer outside the truth, which
    # weighs most on a crushed body (most surface per volume): whole min 0.897 (T12), at the
    # best single-HU-threshold outline (an oracle: 0.895); raising EDGE_FRACTION to 0.6 / 0.7 for
    # it cost the real 2 mm DICOM (0.719 -> 0.713 / 0.703). The profile rule
    # (_past_profile_peak) drops a face voxel darker than 0.7 of its inward neighbour instead:
    # measured min 0.918/0.935 (whole/body; 0.897/0.912 before).
    ph, res = fractured
    _assert_named_and_dice(ph, res, 0.91, 0.92)


def test_crushed_body_errors_are_outline_only(fractured):
    # The crushed T12 is short and its disc planes are close: the split must still follow them
    # (truth T12 voxels given to T11 / L1 measured 10 of 2838) and whatever T12 gets wrong lies in
    # one voxel layer at its outline (predicted voxels further than one voxel from the truth
    # vertebra measured 22).
    ph, res = fractured
    vid = lv.level_id("T12")
    truth, pred = ph.vertebrae.array == vid, res.vertebrae.array == vid
    to_neighbours = truth & (res.vertebrae.array > 0) & ~pred
    assert to_neighbours.sum() < 0.01 * truth.sum()
    beyond_layer = pred & (ndi.distance_transform_edt(~truth) > 1.5)
    assert beyond_layer.sum() < 0.02 * truth.sum()


def test_thick_slice_phantom_bodies_are_solid():
    # 0.8 mm pixels, 2.5 mm slices, 20 HU noise: the outline is redrawn on the fine native grid,
    # where the trabecular bone under the cortex is darker than the outline threshold; it must
    # not be cut out of the body. Measured min 0.948/0.936 (whole/body; 0.907/0.900 before).
    ph = _phantom(first_level="L3", last_level="L5", spacing_mm=(0.8, 0.8, 2.5), noise_hu=20.0)
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.92, 0.92)


def test_3mm_phantom_is_named_and_outlined():
    # The phantom's 3 mm voxels are box averages, so a voxel centred outside the bone still holds
    # the whole bright 1 mm cortex: no single HU threshold on the truth's outline band does better
    # than 0.86-0.89 per level (bench.single_threshold_dice, an oracle), and the half-maximum
    # outline measured 0.856/0.892 (whole/body). The profile rule (_past_profile_peak: a face
    # voxel darker than 0.7 of its inward neighbour lies past the cortex's peak) measured
    # 0.877/0.918. Dropping L5's detached pieces (iliac crests cut into the level) took L5 0.886 ->
    # 0.901. A working grid of 1.5 mm, whose voxel centres hold the 3 mm ones (2 mm before: every
    # other native voxel lay half-way between two working voxels, the labels drawn back shifted,
    # the right pedicles' marrow was lost) and pedicle seeds 3 mm from the disc planes (5 before):
    # 0.8999/0.920, T12 0.877 -> 0.900, false negatives 20-64 voxels per level. What is left is
    # the voxel whose centre lies just outside while it holds the whole cortex and its inward
    # neighbour only marrow: it is the profile's peak itself.
    ph = _phantom(spacing_mm=(3.0, 3.0, 3.0))
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, 0.895, 0.915)
    # No shift from drawing the labels back to the scan's grid: mean label-centroid offset along
    # z and x (symmetric anatomy) measured -0.11 / -0.01 mm (-0.55 / -0.19 mm on the 2 mm grid).
    assert res.provenance["working_spacing_mm"] == pytest.approx(1.5)
    offsets = [np.subtract(ndi.center_of_mass(res.vertebrae.array == v), ndi.center_of_mass(ph.vertebrae.array == v))
               for v in map(lv.level_id, ("T11", "T12", "L1", "L2", "L3", "L4", "L5"))]
    mean_mm = np.mean(offsets, axis=0) * 3.0
    assert abs(mean_mm[0]) < 0.3 and abs(mean_mm[2]) < 0.3, mean_mm
    l5 = lv.level_id("L5")
    assert dice(res.vertebrae.array == l5, ph.vertebrae.array == l5) >= 0.895


def test_3mm_thoracic_rib_necks_go_back_to_the_ribs():
    # At 3 mm the thin, sloping mid-thoracic ribs fall below the bone threshold between the column
    # box's wall (50 mm out) and ~70 mm, so no rib is found for T8-T10 and nothing used to take
    # their necks and heads off the vertebrae: 42-52 rib voxels per level, T10 Dice 0.864, bodies
    # 0.893. A ribless thoracic vertebra's bone beyond its transverse processes' reach, in front
    # of the canal and off the body, now seeds the path: measured rib voxels 12-14 per level,
    # whole T8/T9/T10 0.888/0.913/0.888, bodies 0.900/0.911/0.903.
    ph = _phantom(first_level="T8", last_level="L2", spacing_mm=(3.0, 3.0, 3.0))
    res = segment_builtin(ph.image)
    assert res.present_levels() == _truth_levels(ph) and not res.labels_uncertain
    rib = ph.tissues.array == ph.truth["tissue_ids"]["rib"]
    for name in ("T8", "T9", "T10"):
        vid = lv.level_id(name)
        assert ((res.vertebrae.array == vid) & rib).sum() <= 20, name
        assert dice(res.vertebrae.array == vid, ph.vertebrae.array == vid) >= 0.88, name
        assert dice(res.bodies.array == vid, ph.bodies.array == vid) >= 0.895, name


def test_slices_thicker_than_validated_flag_the_names_uncertain():
    # 0.8 mm pixels with 4 mm slices: the T11/T12 and T12/L1 discs are shallow in the body
    # profile (12 % deep). They were missed, and named from the sacrum and the last rib the spine
    # read as transitional with four lumbar vertebrae (T12 whole Dice 0.41); the dark band between
    # their endplates is now a candidate where the disc spacing expects a disc (measured whole
    # 0.898-0.952). At 5 mm no disc is a sure density minimum and an endplate cut by the view's
    # end, 15 mm above the T11/T12 disc, split T11 in two: endplate bands much closer than the
    # column's spacing keep only the stronger (measured 0.889-0.929). Thoracic discs at 4-5 mm
    # are still missed (T8-L2, T4-T10), so past the validated 3 mm the names stay flagged
    # uncertain, with a warning that says why; 3 mm slices are not.
    for thick_mm in (4.0, 5.0):
        ph = _phantom(spacing_mm=(0.8, 0.8, thick_mm))
        res = segment_builtin(ph.image)
        assert res.labels_uncertain
        assert all("label_uncertain" in r.flags and r.confidence <= 0.3 for r in res.levels)
        assert any(f"slices {thick_mm:.1f} mm thick" in w for w in res.warnings)
        assert res.present_levels() == _truth_levels(ph), thick_mm
        for vid in map(lv.level_id, ("T11", "T12", "L1")):
            assert dice(res.vertebrae.array == vid, ph.vertebrae.array == vid) >= 0.88, thick_mm


def test_profile_rule_drops_only_faces_past_the_cortex_peak():
    from spinekit.segmentation.builtin.outline import _past_profile_peak

    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:9, 3:9, 3:9] = 1
    hu_z = {3: 300.0, 4: 600.0, 5: 250.0, 6: 250.0, 7: 600.0, 8: 480.0}  # faces z=3 / z=8
    hu = np.zeros(labels.shape, np.float32)
    for z, v in hu_z.items():
        hu[z][labels[z] > 0] = v
    body = labels > 0
    past = _past_profile_peak(labels, body, hu, (2.0, 2.0, 2.0))
    # 300 < 0.7 * 600 lies past the bottom endplate's peak; 480 >= 0.7 * 600 holds it.
    assert past[3][labels[3] > 0].all()
    assert not past[4:].any()
    # A resolved axis (0.8 mm slices) is left to the half-maximum rule.
    assert not _past_profile_peak(labels, body, hu, (0.8, 2.0, 2.0)).any()
    # The field of view's end is no surface: the same block cut at z=0 keeps its first slice.
    assert not _past_profile_peak(labels[3:], body[3:], hu[3:], (2.0, 2.0, 2.0)).any()
    # Posterior elements (not body) at 3 mm pixels (COARSE_MM: the real 3 mm CT's reference keeps
    # their outline) only along the slice axis: a dark in-plane face stays. At 2 mm pixels every
    # in-plane face is tested.
    hu2 = np.where(body, 600.0, 0.0).astype(np.float32)
    hu2[:, :, 3][body[:, :, 3]] = 300.0
    face = body[:, :, 3]
    assert not _past_profile_peak(labels, np.zeros_like(body), hu2, (3.0, 3.0, 3.0)).any()
    assert _past_profile_peak(labels, body, hu2, (3.0, 3.0, 3.0))[:, :, 3][face].all()
    assert _past_profile_peak(labels, np.zeros_like(body), hu2, (3.0, 2.0, 2.0))[:, :, 3][face].all()
    # In-plane at 1.5-2.5 mm pixels a face darker than 0.8 of its inward neighbour is past the
    # peak (0.75 here); at 3 mm pixels 0.7 holds it.
    hu3 = np.where(body, 600.0, 0.0).astype(np.float32)
    hu3[:, :, 3][face] = 450.0
    assert _past_profile_peak(labels, body, hu3, (3.0, 2.0, 2.0))[:, :, 3][face].all()
    assert not _past_profile_peak(labels, body, hu3, (3.0, 3.0, 3.0)).any()


def test_the_view_end_is_no_outline():
    # A vertebra cut by the field of view has no surface there: the grid's far faces (past the
    # scan's last voxel centres) carry the edge values on instead of air, and the outline steps
    # do not treat the scan's first / last slice as the bone's outer layer (real 2 mm slab: the
    # marrow of T11's two top slices was lost, T11 Dice 0.403 -> 0.459).
    from spinekit.segmentation.builtin.outline import _refine_native, _trim_outline
    from spinekit.segmentation.builtin.common import _working_grid

    slab = Image(np.full((20, 30, 30), 300, np.int16), (1.0, 1.0, 2.0))   # 0-38 mm on a 1.5 mm grid
    hu = _working_grid(slab, 1.5).hu
    assert hu.shape[0] == 27 and hu.min() == pytest.approx(300.0)
    c = np.sqrt(0.5)   # ... but an oblique scan's box corners stay air
    turned = Image(slab.array, (1.0, 1.0, 2.0), direction=np.array([[c, -c, 0.0], [c, c, 0.0], [0.0, 0.0, 1.0]]))
    hu = _working_grid(turned, 1.5).hu
    assert hu[:, 0, 0].max() == -1024.0 and hu[:, hu.shape[1] // 2, hu.shape[2] // 2].min() == pytest.approx(300.0)

    # Marrow (150 HU) under a bright endplate (500 HU) one slice in from the view's end.
    vert = np.zeros((10, 20, 20), np.uint8)
    vert[0:8, 4:16, 4:16] = 20
    arr = np.full(vert.shape, 40, np.int16)
    arr[vert > 0] = 150
    arr[1][vert[1] > 0] = 500
    img = Image(arr, (2.0, 2.0, 2.0))
    v, b = _trim_outline(vert, vert.copy(), img, 0.5)
    assert (v[0, 5:15, 5:15] == 20).all() and (b[0, 5:15, 5:15] == 20).all()
    assert not v[8:].any()
    # The native refinement (1 mm scan, 1.5 mm grid): marrow darker than the outline threshold
    # stays inside the outline shell, at the view's end as in mid-body.
    arr = np.full(vert.shape, 40, np.int16)
    arr[vert > 0] = 150
    v, b = _refine_native(vert, vert.copy(), Image(arr, (1.0, 1.0, 1.0)), 1.5)
    assert (v[0] == 20).sum() == (v[4] == 20).sum() > 0
    assert (b[0] == 20).sum() == (b[4] == 20).sum()


def test_single_threshold_dice_sees_outline_partial_volume():
    from spinekit.segmentation.bench import single_threshold_dice

    truth = np.zeros((14, 14, 14), np.uint8)
    truth[2:12, 2:12, 2:12] = 7
    hu = np.where(truth > 0, 1000.0, 0.0)
    assert single_threshold_dice(hu, truth, 7) == pytest.approx(1.0)
    # A cortex-bright layer just outside one face cannot be told from the outline inside it:
    # keeping both costs 100 false voxels, dropping both 100 + 100 missed ones.
    hu[12, 2:12, 2:12] = 1000.0
    assert single_threshold_dice(hu, truth, 7) == pytest.approx(2000 / 2100)
    # A neighbour's voxels are the split's business, not the outline's.
    truth[12, 2:12, 2:12] = 8
    assert single_threshold_dice(hu, truth, 7) == pytest.approx(1.0)


def test_axis_flips_give_the_same_labels(lumbar_with_sacrum):
    # Same patient stored with x and y index axes reversed (direction diag(-1, -1, 1)).
    ph, res = lumbar_with_sacrum
    img = ph.image
    arr = img.array[:, ::-1, ::-1].copy()
    nx, ny = img.shape[2], img.shape[1]
    origin = np.asarray(img.index_to_physical(np.array([[0, ny - 1, nx - 1]]))[0])
    flipped = Image(arr, img.spacing_mm, tuple(origin), np.diag([-1.0, -1.0, 1.0]), dict(img.metadata))
    res2 = segment_builtin(flipped)
    assert res2.present_levels() == res.present_levels()
    back = res2.vertebrae.array[:, ::-1, ::-1]
    for name in res.present_levels():
        vid = lv.level_id(name)
        assert dice(back == vid, res.vertebrae.array == vid) >= 0.95


def test_progress_is_reported():
    ph = _phantom(first_level="L2", last_level="L5")
    seen = []
    segment_builtin(ph.image, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)


def test_ct_without_spine_is_refused():
    # A water cylinder in air: HU-like, but no bone and no spinal canal.
    zz, yy, xx = np.mgrid[0:40, 0:120, 0:120]
    arr = np.where((yy - 60) ** 2 + (xx - 60) ** 2 < 50 ** 2, 0, -1000).astype(np.int16)
    rng = np.random.default_rng(0)
    arr = (arr + rng.normal(0, 10, arr.shape)).astype(np.int16)
    img = Image(arr, (2.0, 2.0, 2.0), metadata={"Modality": "CT"})
    with pytest.raises(InputError, match="no vertebral column found"):
        segment_builtin(img)


def test_ct_with_bone_but_no_spine_is_refused():
    # A water cylinder holding two bone rods (like a femur pair): bone but no canal.
    zz, yy, xx = np.mgrid[0:40, 0:120, 0:120]
    arr = np.where((yy - 60) ** 2 + (xx - 60) ** 2 < 50 ** 2, 20, -1000)
    for cx in (35, 85):
        arr = np.where((yy - 60) ** 2 + (xx - cx) ** 2 < 10 ** 2, 900, arr)
    img = Image(arr.astype(np.int16), (2.0, 2.0, 2.0), metadata={"Modality": "CT"})
    with pytest.raises(InputError, match="no vertebral column found"):
        segment_builtin(img)


def test_mr_is_refused(lumbar_with_sacrum):
    ph, _ = lumbar_with_sacrum
    mr = ph.image.with_array(ph.image.array, Modality="MR")
    with pytest.raises(InputError, match="MR"):
        segment_builtin(mr)
    # No metadata, but intensities like an MR (no air or fat below -50 HU).
    arr = np.clip(ph.image.array.astype(np.int32) + 1024, 0, 4000).astype(np.int16)
    untagged = Image(arr, ph.image.spacing_mm, ph.image.origin_mm, ph.image.direction)
    with pytest.raises(InputError, match="Hounsfield"):
        segment_builtin(untagged)


# --- real CT against TotalSegmentator (a reference, not truth) --------------------------------
@pytest.fixture(scope="module")
def abdomen():
    folder = DATA / "ct_abdomen_3mm"
    if not folder.exists():
        pytest.skip("../shared/data/ct_abdomen_3mm is not available")
    ct = read_image(folder / "ct.nii.gz")
    ref = lv.to_verse(read_image(folder / "ts_vertebrae.nii.gz").array, "totalsegmentator_total")
    body_ref = read_image(folder / "ts_vertebrae_body.nii.gz").array == 1
    return ct, ref, body_ref, segment_builtin(ct)


# The issue's target: per-level Dice >= 0.85 for T12-L5, whole vertebrae and bodies. Measured
# (`make bench`): whole 0.858-0.934 (L5 lowest; 0.864 while the L5/S1 bodies were taken out as a
# vessel tube, 0.854 on a 2 mm working grid with pedicle seeds 5 mm from the disc planes), bodies
# 0.934-0.975 (L5 lowest).
REAL_TARGET_DICE = 0.85


def test_real_ct_levels_named_like_totalsegmentator(abdomen):
    ct, ref, _, res = abdomen
    assert not res.labels_uncertain
    for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
        assert name in res.present_levels()
        vid = lv.level_id(name)
        # Named right: our level overlaps TotalSegmentator's level of the same name most.
        ids, counts = np.unique(ref[res.vertebrae.array == vid], return_counts=True)
        counts[ids == 0] = 0
        assert ids[int(np.argmax(counts))] == vid, name
    # And by VerSe's identification rule (centroid < 20 mm from TS's, nearest to it).
    ident = identified_levels(res.vertebrae.array, ref, ct.spacing_zyx_mm)
    assert all(ident[lv.level_id(n)][0] for n in ("T12", "L1", "L2", "L3", "L4", "L5")), ident


def test_real_ct_dice_against_totalsegmentator(abdomen):
    ct, ref, body_ref, res = abdomen
    for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
        vid = lv.level_id(name)
        d = dice(res.vertebrae.array == vid, ref == vid)
        db = dice(res.bodies.array == vid, body_ref & (ref == vid))
        assert d >= REAL_TARGET_DICE, f"{name} whole Dice {d:.3f}"
        assert db >= REAL_TARGET_DICE, f"{name} body Dice {db:.3f}"


def test_real_ct_bodies_are_whole_for_morphometry(abdomen):
    # Bodies with holes or missing slabs read as false fractures (an empty anterior height, a
    # middle height of 8-15 mm were seen before). The same height measurement on
    # TotalSegmentator's body masks is the reference: every height present, within two voxels
    # (6 mm; measured <= 5.9 mm) and the same Genant grade for L1-L5 (T12 is cut by the field of
    # view).
    from spinekit.morphometry import measure_morphometry

    ct, ref, body_ref, res = abdomen
    ts_bodies = np.where(body_ref, ref, 0).astype(np.uint8)
    ours = measure_morphometry(res.bodies.array, ct.spacing_zyx_mm, vertebrae=res.vertebrae.array,
                               direction=ct.direction)
    theirs = measure_morphometry(ts_bodies, ct.spacing_zyx_mm, vertebrae=ref, direction=ct.direction)
    for name in ("L1", "L2", "L3", "L4", "L5"):
        a, b = ours[name], theirs[name]
        for pos in ("anterior", "middle", "posterior"):
            ha, hb = getattr(a, f"height_{pos}_mm"), getattr(b, f"height_{pos}_mm")
            assert ha is not None and hb is not None, (name, pos)
            assert abs(ha - hb) <= 6.0, f"{name} {pos} height {ha:.1f} mm vs {hb:.1f} mm"
        assert a.genant_grade == b.genant_grade, (name, a.genant_grade, b.genant_grade)


def _slices(ct: Image, z0: int, z1: int) -> Image:
    """Slices z0..z1-1 of a CT as a scan of their own (same geometry, shorter field of view)."""
    return ct.crop((slice(z0, z1), slice(None), slice(None)))


def _assert_real_whole_dice(res, ref: np.ndarray, **floors: float) -> None:
    """Every level T12-L5 of a real-CT result against the reference, whole vertebrae: each at
    least REAL_TARGET_DICE, or the floor given for it by name (T12=0.8)."""
    for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
        vid = lv.level_id(name)
        d = dice(res.vertebrae.array == vid, ref == vid)
        assert d >= floors.get(name, REAL_TARGET_DICE), f"{name} whole Dice {d:.3f}"


# Shorter scans of the same real CT (slice 0 is caudal; TotalSegmentator: S1 39-51, L5 42-58,
# T12 97-111): lumbar spine scans with the sacrum but no rib (0-96; 30-80, its lower sacral
# segments cut off, so the cut alae lie at the view's caudal end), a scan cut through the L5/S1
# disc (45-112), whose iliac wings are the only bone beside L5, and one cut through S1 (38-112),
# its alae cut at the view's end. Before the sacrum test compared amounts of ala bone, the
# sacrum was found before the ribs and the pelvis was told from ribs, the first two were flagged
# with every name one level off (the sacrum called L5), and the last two guessed T7-T12 and
# T6-T12 with the twelfth rib in view.
@pytest.mark.parametrize("z0, z1, anchor", [(0, 96, "sacrum"), (30, 80, "sacrum"), (45, 112, "T12"),
                                            (38, 112, "T12")])
def test_real_ct_shorter_scans_are_named_from_the_anchor_in_view(abdomen, z0, z1, anchor):
    ct, ref, _, _ = abdomen
    res = segment_builtin(_slices(ct, z0, z1))
    assert not res.labels_uncertain, res.warnings
    names = res.present_levels()
    assert anchor in names, names
    ours, theirs = res.vertebrae.array, ref[z0:z1]
    for name in names:
        vid = lv.level_id(name)
        ids, counts = np.unique(theirs[ours == vid], return_counts=True)
        counts[ids == 0] = 0
        assert ids[int(np.argmax(counts))] == vid, (name, lv.level_name(int(ids[int(np.argmax(counts))])))


def test_real_ct_cropped_inside_the_body_is_still_ct(abdomen):
    # A spine reconstruction cropped inside the body: no air in view (its bowel gas set to fat
    # here), only fat and soft tissue. It was refused as "not Hounsfield units".
    ct, ref, _, res = abdomen
    y0, y1, x0, x1 = 14, 60, 33, 83
    part = ct.crop((slice(None), slice(y0, y1), slice(x0, x1)))
    arr = part.array.copy()
    arr[arr < -500] = -100
    crop = segment_builtin(part.with_array(arr))
    assert crop.present_levels() == res.present_levels() and not crop.labels_uncertain
    # (measured 0.884-0.934; T12 0.884 against 0.902 uncropped, with or without the air: its ribs
    # leave the crop)
    _assert_real_whole_dice(crop, ref[:, y0:y1, x0:x1])


def test_real_ct_with_a_softer_kernel_keeps_its_top_vertebra(abdomen):
    # The same CT blurred in-plane (Gaussian, 0.7 voxel: a softer reconstruction kernel). The
    # canal's chain of pockets then ends 30 mm lower (at the L1/L2 disc, 65 mm below the view's
    # top) and the column box stopped 40 mm above it: T12 / L1 whole 0.142 / 0.471. Now the track
    # runs on to the view's top (T12 0.843), along the line of its pockets' last 60 mm
    # (CANAL_TOP_FIT_MM). (Measured T12 0.876, L1-L5 0.878-0.921.)
    ct, ref, _, res = abdomen
    soft = ndi.gaussian_filter(ct.array.astype(np.float32), (0, 0.7, 0.7))
    blurred = segment_builtin(ct.with_array(np.round(soft).astype(np.int16)))
    assert blurred.present_levels() == res.present_levels() and not blurred.labels_uncertain
    _assert_real_whole_dice(blurred, ref)


def test_real_ct_30_hu_darker_keeps_its_top_vertebra(abdomen):
    # The same CT read 30 HU low (a scanner's calibration offset). The canal's chain of pockets
    # ends at the L1/L2 disc, and the track is continued above along its end direction: a guess
    # of the canal's anterior wall, 3-5 mm in front of the bodies' back in T12 and L1. The body
    # zone ended there, the T12 ring could not close and its marrow was left out (T12 / L1 whole
    # 0.64 / 0.87). Now the zone reaches CONTINUED_FRONT_MARGIN_MM behind a continued track
    # (4.5 mm: T12 0.848). Continued along the line of its pockets (CANAL_TOP_FIT_MM) the wall
    # lies nearer the bodies' back, and 4.5 mm left the ring open again (T12 0.748); at 7.5 mm
    # measured T12 0.879, L1-L5 0.852-0.922.)
    ct, ref, _, res = abdomen
    dark = segment_builtin(ct.with_array((ct.array.astype(np.int16) - 30)))
    assert dark.present_levels() == res.present_levels() and not dark.labels_uncertain
    _assert_real_whole_dice(dark, ref)


@pytest.mark.parametrize("n_slices", [111, 109])
def test_real_ct_a_slightly_shorter_scan_is_segmented_the_same(abdomen, n_slices):
    # The same CT ending one or three slices (3 or 9 mm) sooner, in T12 (its top slice is the
    # CT's last). Before: one slice less and the marrow of T12 and L1 passed for a vessel (a
    # tube at the view's end needs only half the length), T12 / L1 whole 0.902 / 0.915 -> 0.860
    # / 0.876; three less and the T12/L1 disc, 1.4 disc spacings above the L1/L2 disc, was not
    # looked for (1.5 between two discs), so T12's piece and L1 were one vertebra (0.44).
    ct, ref, body_ref, res = abdomen
    cut = segment_builtin(_slices(ct, 0, n_slices))
    assert cut.present_levels() == res.present_levels() and not cut.labels_uncertain
    for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
        vid = lv.level_id(name)
        full = dice(res.vertebrae.array[:n_slices] == vid, ref[:n_slices] == vid)
        short = dice(cut.vertebrae.array == vid, ref[:n_slices] == vid)
        assert short >= full - 0.01, f"{name} whole Dice {short:.3f}, {full:.3f} on the full scan"


@pytest.mark.parametrize("n_slices", [107, 106])
def test_real_ct_ending_just_past_the_t12_l1_disc_keeps_t12_apart(abdomen, n_slices):
    # The same CT ending 9-11 mm (along the body profile) past the T12/L1 disc. Its dip was not
    # looked for 12 mm or less from the view's end, so T12's piece merged with L1, named L1 with
    # confidence: 19-25 % of its voxels were TotalSegmentator's T12 (0.3 % on the full scan), and
    # L1's BMD would have read T12's endplate (L1 whole 0.757 / 0.795). Now a disc is looked for
    # up to END_PIECE_MM from the end. (Measured: 1.9 %; T12 0.876 / 0.865, L1 0.906 / 0.905.)
    ct, ref, _, res = abdomen
    cut = segment_builtin(_slices(ct, 0, n_slices))
    assert cut.present_levels() == res.present_levels() and not cut.labels_uncertain
    ours_l1 = cut.vertebrae.array == lv.level_id("L1")
    t12_share = np.count_nonzero(ours_l1 & (ref[:n_slices] == lv.level_id("T12"))) / np.count_nonzero(ours_l1)
    assert t12_share < 0.05, f"{t12_share:.1%} of L1 is T12"
    _assert_real_whole_dice(cut, ref[:n_slices])


def _turned(ct: Image, ref: np.ndarray, axis: int, deg: float) -> tuple[Image, np.ndarray]:
    """The CT turned by deg about a physical axis through its centre (0, 1, 2: x, y, z; 2 the long axis),
    resampled linearly on its own grid, and the reference resampled nearest (which alone costs a
    few hundredths of Dice); only the slices whose spine region lay inside the CT."""
    grid = ct.to_sitk()
    turn = sitk.Euler3DTransform()
    turn.SetCenter(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in grid.GetSize()]))
    angles = [0.0, 0.0, 0.0]
    angles[axis] = float(np.radians(deg))
    turn.SetRotation(*angles)

    def resampled(img: sitk.Image, interpolator, fill: float) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Resample(img, grid, turn, interpolator, fill))

    hu = resampled(grid, sitk.sitkLinear, -1024.0)
    ref_turned = resampled(ct.with_array(ref).to_sitk(), sitk.sitkNearestNeighbor, 0)
    inside = resampled(ct.with_array(np.ones(ct.shape, np.uint8)).to_sitk(), sitk.sitkNearestNeighbor, 0)
    spine = ndi.binary_dilation((ref > 0).any(axis=0), iterations=5)
    kept = np.flatnonzero([inside[z][spine].all() for z in range(ct.shape[0])])
    z0, z1 = int(kept[0]), int(kept[-1]) + 1
    return _slices(ct.with_array(hu.astype(ct.array.dtype)), z0, z1), ref_turned[z0:z1]


# The real CT turned (README "Honest limits": the turned scans' top levels; measured whole Dice
# in the comments, the floors a few hundredths below).
# - 10 degrees about the long axis: its body profile dips mid-L1, 10 bins (15 mm) above the
#   L1/L2 disc; the pitch measured on those short gaps let a dip 7 bins below the view's top pass
#   for the next disc, the T12/L1 disc between went as a marrow dip, and L1 was cut in two (T12 /
#   L1 0.552 / 0.455). With the marrow of T12 kept (below) that dip is the last disc and was
#   kept (L1 0.470) until an end dip without a band gave way to the disc a spacing past the one
#   before it. Measured T12 0.867, L1 0.902, L2-L5 0.859-0.913.
# - 2 and 5 degrees about the long axis: the marrow of T12 and L1, whose front cortex the
#   resampling blurs, ran as a tube of the portal-venous band and was taken out as a vessel
#   (2 degrees: T12 / L1 0.714 / 0.767; 5 degrees: T12 0.667). A vessel is now clean in
#   VESSEL_CLEAN_SHARE (25 %) of its slices or over VESSEL_CLEAN_RUN_MM. Measured, 2 degrees: T12
#   0.871, L1 0.908, L2-L5 0.858-0.917; 5 degrees: T12 0.858, L1-L4 0.890-0.916, L5 0.849.
# - 5 degrees about the left-right axis: the canal's pockets end 47 mm below the view's top and
#   the track was continued along the last 20 mm of its median-filtered line, which lags behind
#   the tilted canal: it ran into the back of T12's body, which went to the arch (T12 whole /
#   body 0.789 / 0.677). Continued along the line of its pockets' last 60 mm (CANAL_TOP_FIT_MM):
#   measured T12 0.861, L1-L4 0.890-0.901, L5 0.854.
# - 10 degrees about the left-right axis: the same with L4 and L5 (0.853 / 0.725); with their
#   marrow kept the sacrum's ala share fell to 0.149 (L5 0.094) and the view was flagged, every
#   name one level off, until ALA_FRACTION was 0.12. Measured T12 0.805, L1-L4 0.887-0.907, L5 0.846.
@pytest.mark.parametrize("axis, deg, floors", [(2, 10.0, dict(T12=0.83)), (2, 2.0, dict(T12=0.84)),
                                               (2, 5.0, dict(T12=0.83, L5=0.82)), (0, 5.0, dict(T12=0.83, L5=0.83)),
                                               (0, 10.0, dict(T12=0.77, L5=0.8))])
def test_real_ct_turned_is_split_and_named_like_totalsegmentator(abdomen, axis, deg, floors):
    ct, ref, _, res = abdomen
    turned, ref_turned = _turned(ct, ref, axis, deg)
    out = segment_builtin(turned)
    assert out.present_levels() == res.present_levels() and not out.labels_uncertain
    _assert_real_whole_dice(out, ref_turned, **floors)


def test_short_dicom_slab_split_into_t12_t11_and_flagged():
    # 20 slices x 2 mm at T11/T12 (TotalSegmentator: T12 whole, T11 in part, mostly its posterior
    # elements). The thin T11/T12 disc holds as much bone-bright signal as the marrow (no density
    # minimum); it is found as the dark band between the two sclerotic endplates. The 12th ribs
    # leave the slab's caudal end beside the T12 arch (rib stubs), so the lowest vertebra is
    # rib-bearing; with no sacrum and no rib-free vertebra below (L1 is not in view) the names
    # are the no-anchor guess T12/T11 and must say so.
    folder = DATA / "ct_dicom_2mm"
    if not folder.exists():
        pytest.skip("../shared/data/ct_dicom_2mm is not available")
    from spinekit.image import resample_to

    ct = read_image(folder / "dicom")
    ref = lv.to_verse(resample_to(read_image(folder / "ts_total.nii.gz"), ct).array, "totalsegmentator_total")
    res = segment_builtin(ct)
    assert [r.name for r in res.levels] == ["T11", "T12"]
    assert res.labels_uncertain
    assert all("label_uncertain" in r.flags for r in res.levels)
    assert "rib_bearing" in res.levels[1].flags
    pred = res.vertebrae.array
    d12 = dice(pred == lv.level_id("T12"), ref == lv.level_id("T12"))
    d11 = dice(pred == lv.level_id("T11"), ref == lv.level_id("T11"))
    # measured T12 0.705, T11 0.458 before the chain (0.702 / 0.459 while T12, bearing only rib stubs, kept its
    # rib necks; 0.718 / 0.403 while the view's end counted as the bone's
    # outline: the marrow of T11's two top slices was lost, and with it the body centreline
    # there bent back, which left the T11/T12 disc plane 2 mm lower and untilted; 0.709 / 0.405 while a "vessel" tube of marrow and disc was
    # taken out: it removed the T12/L1 disc in the two caudal slices, now carved as a disc cut by
    # the view's end; 0.696 / 0.334 before the sloped arch split, 0.704 / 0.404
    # before the profile rule: of the 286 voxels it drops from T11, 194 lie outside TS's T11 too,
    # but at 0.40 overlap a kept TS voxel weighs more than two dropped false ones; the share of
    # our T11 inside TS's rose 0.499 -> 0.507). The contrast aorta (~150 HU, as bright
    # as the marrow) is grown over its rim next to the bodies: 1080 of its voxels stay in the
    # labels (was 2650). T11's pedicles are out of view above the slab, so its arch is seeded up
    # to the arch plane, which drops behind the canal above the rib-bearing T12 (shingled
    # laminae): none of TS's T11 arch voxels that we label go to T12 now (816 before). What is
    # left: TS's T11 holds ~2900 voxels inside T12's body, bone-bright voxels of T11's body in
    # the top slices have no TS label (its body interior two slices below the top), and the thin
    # arches are half covered after the native-grid refinement.
    # (T12 0.716 / T11 0.448 since the canal is tracked as the best chain of pockets: the chain
    # takes in four small pockets behind the canal in the slab's caudal slices, where the walk
    # from one seed had none; T12's body gained, T11's share inside TS's T11 went 0.591 -> 0.567.
    # Both stay identified, see below.)
    assert d12 >= 0.70, d12
    assert d11 >= 0.44, d11
    t11 = pred == lv.level_id("T11")
    assert (ref[t11] == lv.level_id("T11")).mean() >= 0.5
    # Found and named by VerSe's identification rule: each centroid within 20 mm of TS's and
    # nearer to it than to the other level's (measured T11 8.9 mm from TS's T11, 22.8 from its
    # T12; T12 7.6 mm). The rule does not depend on how either side draws the outlines, which
    # TS does in part here (see above).
    ident = identified_levels(pred, ref, ct.spacing_zyx_mm)
    assert ident[lv.level_id("T11")][0] and ident[lv.level_id("T12")][0], ident
    # (The coverage check this test made while the slab came out as one vertebra is replaced by
    # the per-level Dice above; the bench still prints it: 0.773, the carved disc band is partly
    # T12 in TS's coarse labels.)


def test_disc_cut_by_the_view_end_is_found_on_one_endplate():
    # A disc at the scan's end has an endplate on one side only: the band from the profile's end
    # up to half-way to that endplate, where it is >= 40 HU darker than the endplate and darker
    # than the marrow (real 2 mm slab: the T12/L1 disc in its two caudal slices was filled as T12
    # bone, T12 Dice 0.698 -> 0.718). A view ending in marrow just past an endplate is not a disc.
    from spinekit.segmentation.builtin.discs import _end_disc_band

    sp = 1.5
    nan = np.nan
    marrow = [140, 132, 128, 126, 130, 128, 131, 127, 129, 133, 150, 185, 192, nan, nan]
    disc_end = np.array([nan, 105, 98, 125, 190, 198, 170] + marrow)
    assert _end_disc_band(disc_end, [], True, sp) == (3, 198.0)
    # mirrored: the same disc at the cranial end
    assert _end_disc_band(disc_end[::-1].copy(), [], False, sp) == (len(disc_end) - 4, 198.0)
    # marrow at the view's end: as dark against the endplate, but not darker than the marrow
    marrow_end = np.array([nan, 127, 130, 190, 198, 170] + marrow)
    assert _end_disc_band(marrow_end, [], True, sp) is None
    # a disc found near the end already (the end is a sliver of the next vertebra)
    assert _end_disc_band(disc_end, [8], True, sp) is None
    # a bin too sparse for a percentile (nan) next to the end is no valley floor
    gap_end = np.array([nan, 127, nan, 190, 198, 170] + marrow)
    assert _end_disc_band(gap_end, [], True, sp) is None
    # no endplate within reach of the end: no band
    assert _end_disc_band(np.array([nan, 100, 101, 99, 100, 102, 100, 101, 130, 128, 131]), [], True, sp) is None


def test_thin_disc_between_endplates_is_found_without_a_density_minimum():
    from spinekit.segmentation.builtin.discs import _endplate_valleys, _find_discs

    sp = 1.5
    # Low-percentile HU along a 40 mm slab: marrow 120 HU, sclerotic endplates 160-200 HU around
    # a thin disc (85 HU) at bin 20; the mid-body marrow between endplates 15 mm apart is no disc.
    low = np.full(28, 120.0)
    low[[4, 5, 16, 17]] = 160.0
    low[[18, 23]] = 200.0
    low[[19, 21, 22]] = 100.0
    low[20] = 85.0
    low[:2] = np.nan
    score, _ = _endplate_valleys(np.stack([low, low + 5.0]), sp)
    assert score[20] >= 40.0
    assert np.all(score[6:16] < 40.0)
    # the density profile has no minimum there (the disc is as bright as marrow) ...
    prof = np.full(28, 1.0)
    discs, endplate_only = _find_discs(prof, sp, score)
    assert discs == [20] and endplate_only == [20]
    # ... and a sure density minimum keeps the endplate bands out
    prof[10] = 0.1
    discs, endplate_only = _find_discs(prof, sp, score)
    assert discs == [10] and endplate_only == []


def test_dip_in_a_low_density_body_is_no_disc():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Density-weighted body profile, 1.5 mm bins: dense bodies (100) and between them an
    # osteoporotic one (40) whose marrow dips to 25 mid-body, discs at bins 20 and 41 (5). Against
    # the dense bodies across the discs the dip is as deep as a disc (25 / 100); within its own
    # body it is not (25 / 40): arterial T10-L3 phantom, L1 at 47 mg/cm3 split in two and every
    # lumbar level named one too low.
    prof = np.full(62, 100.0)
    prof[22:40] = 40.0
    prof[29:32] = [30.0, 25.0, 30.0]
    prof[20:22] = prof[40:42] = 5.0
    discs, _ = _find_discs(prof, 1.5)
    assert discs == [20, 40]
    # Where the disc spacing expects a disc and the profile holds two weak candidates, the band
    # between two endplates is the disc, not the osteoporotic body's deeper mid-body dip (random
    # T9-L2 phantom, T10 at 53 mg/cm3, measured profile from bin 75).
    prof = np.full(124, 100.0)
    prof[[23, 45, 65]] = 5.0
    prof[75:] = [106, 108, 109, 107, 101, 95, 88, 86, 81, 64, 49, 67, 75, 67, 57, 51, 45, 44, 45, 45, 48,
                 54, 54, 54, 56, 62, 69, 75, 61, 51, 65, 80, 85, 83, 86, 89, 89, 87, 88, 92, 94, 85, 76,
                 69, 61, 53, 44, 23, 7]
    valley = np.full(124, np.nan)
    valley[[85, 104]] = [219.0, 161.0]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [23, 45, 65, 85, 104]


def test_a_disc_near_the_view_top_is_found_but_not_one_a_pitch_into_the_sacrum():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Body profile, 1.5 mm bins: sure discs (5) every 24 bins from bin 29 to 125 between bodies
    # (100), and two weak dips (60, ratio 0.6). At the top, bin 147 lies a pitch (less two bins)
    # above the last disc and 6 bins (9 mm) below the view's end, with the next body's bottom
    # beyond it: the real 3 mm CT ending 9 mm past its T12/L1 disc, whose dip was not looked for
    # (T12's piece merged with L1). At the bottom, bin 10 lies as near a pitch below the first
    # disc: a lumbar view's sacrum keeps a rudimentary S1/S2 disc there, and taking it split the
    # sacrum of the real CT with a softer kernel and shifted every name.
    prof = np.full(154, 100.0)
    prof[[29, 53, 77, 101, 125]] = 5.0
    prof[[10, 147]] = 60.0
    prof[:2] = [20.0, 60.0]
    prof[-2:] = [60.0, 20.0]
    discs, _ = _find_discs(prof, 1.5)
    assert discs == [29, 53, 77, 101, 125, 147]


def test_no_disc_near_the_view_top_on_a_pitch_a_false_dip_made():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Body profile, 1.5 mm bins, shaped on the real CT turned 10 degrees about its long axis:
    # banded discs every 25 bins to bin 170, a deep dip without a band mid-L1 (180), the T12/L1
    # disc 13 bins above it (193, weak, banded) and a dip 7 bins below the view's top (204).
    # Measured on the short gaps beside the false dip, the pitch (11.5 bins) let 204 in; the
    # T12/L1 disc, now between two short gaps, went as a marrow dip and L1 was cut at 180.
    prof = np.full(212, 100.0)
    prof[[71, 95, 120, 145, 170, 180]] = 5.0
    prof[[193, 204]] = [47.0, 59.0]
    prof[:2] = [20.0, 60.0]
    prof[-2:] = [60.0, 20.0]
    valley = np.full(prof.size, -np.inf)
    valley[[71, 95, 120, 145, 170, 193]] = 200.0
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [71, 95, 120, 145, 170, 193]


def test_marrow_dip_ending_the_discs_gives_way_to_the_disc_a_spacing_past_the_one_before():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Body profile, 1.5 mm bins, shaped on the real CT turned 10 degrees about its long axis with
    # all of its marrow kept (no false vessel): banded discs every 24-25 bins to bin 169, a sure
    # dip without a band mid-L1 (180, 0.39 of its flanks) and the T12/L1 disc 12 bins above it
    # (192, weak: 0.46, a faint band), 18 bins below the view's top. The false dip, the last
    # sure one, has a single gap; the pitch measured on it (17.5 bins) put the next disc at 197.5,
    # 5.5 bins from 192, outside its tolerance. L1 was cut at 180 (whole 0.47).
    prof = np.full(211, 100.0)
    prof[[71, 95, 120, 145, 169]] = 5.0
    prof[[180, 192]] = [39.0, 46.0]
    prof[:2] = [20.0, 60.0]
    prof[-2:] = [60.0, 20.0]
    valley = np.full(prof.size, -np.inf)
    valley[[71, 95, 120, 145, 169]] = 200.0
    valley[[180, 192]] = [0.0, 24.0]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [71, 95, 120, 145, 169, 192]
    # With an endplate band the same dip is a disc (a short vertebra's), and stays.
    valley[180] = 200.0
    discs, _ = _find_discs(prof, 1.5, valley)
    assert 180 in discs


def test_marrow_band_gives_way_to_the_disc_band_that_spaces_the_discs_evenly():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profiles (per cent of the peak, 2 mm bins) and endplate bands (HU) of two random
    # phantom views with no sure density dip, each with an osteoporotic vertebra (40-41 mg/cm3),
    # its marrow far darker than its own endplates. Bands closer than a vertebra exclude each
    # other, the stronger first. Native T4-T11 at 2x2x2.5 mm: a 167 HU band mid-T6 (bin 76)
    # beat the T7/T6 disc's 142 HU band at 71, leaving gaps of 19 and 6 bins against a spacing
    # of 14 (T6 / T7 whole 0.51 / 0.81). Portal-venous T5-T8: the T6/T5 band at 39, off the dip
    # as the osteoporotic T5 fades out of the view's top beyond it, counted at half its 86 HU
    # and lost to an 85 HU band mid-T5 at 44 (T5 0.65).
    prof = np.array([6, 22, 44, 56, 58, 63, 61, 60, 61, 63, 67, 72, 75, 81, 90, 67, 66, 83, 83, 79, 77, 74, 74, 76,
                     80, 80, 80, 82, 89, 87, 67, 82, 86, 85, 82, 79, 78, 78, 84, 84, 81, 81, 87, 78, 71, 86, 89, 80,
                     78, 77, 78, 81, 87, 85, 85, 86, 78, 65, 77, 87, 91, 92, 94, 95, 97, 100, 92, 85, 76, 59, 31, 48,
                     61, 56, 53, 51, 54, 61, 65, 63, 60, 35, 39, 59, 73, 77, 80, 81, 84, 87, 86, 79, 74, 66, 60, 63,
                     69, 74, 80, 76, 72, 68, 61, 52, 39, 18, 3], float)
    bands = {8: 2, 10: 1, 15: 224, 16: 116, 22: 1, 23: 5, 24: 2, 30: 290, 35: 1, 36: 4, 37: 7, 38: 2, 43: 72, 44: 274,
             48: 1, 49: 3, 50: 6, 51: 5, 52: 1, 57: 289, 62: 3, 63: 10, 64: 3, 69: 127, 70: 58, 71: 142, 75: 82,
             76: 167, 80: 104, 81: 184, 82: 233, 87: 24, 88: 47, 93: 273, 94: 216, 95: 1, 97: 2, 98: 44, 99: 12,
             100: 24}
    valley = np.full(prof.size, -np.inf)
    valley[list(bands)] = list(bands.values())
    discs, _ = _find_discs(prof, 2.0, valley)
    assert discs == [15, 30, 44, 57, 71, 82, 93]
    prof = np.array([6, 26, 48, 65, 72, 82, 96, 98, 97, 98, 98, 98, 100, 93, 78, 85, 95, 97, 97, 98, 97, 97, 95, 91,
                     87, 80, 57, 49, 70, 86, 86, 88, 89, 92, 96, 92, 86, 82, 77, 71, 72, 71, 62, 56, 56, 57, 60, 60,
                     56, 51, 32, 8], float)
    bands = {5: 3, 6: 4, 7: 2, 9: 8, 10: 1, 14: 269, 20: 29, 26: 184, 27: 332, 28: 4, 31: 2, 33: 24, 34: 7, 35: 3,
             39: 86, 44: 85, 45: 34, 46: 7}
    valley = np.full(prof.size, -np.inf)
    valley[list(bands)] = list(bands.values())
    discs, _ = _find_discs(prof, 2.0, valley)
    assert discs == [14, 27, 39]


def test_end_of_the_top_body_is_no_disc_between_endplates():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (per cent of its peak, 1.5 mm bins) and endplate valleys of a random
    # arterial T4-T7 phantom: no density minimum is sure, so the dark bands between endplates
    # are the discs (bins 16, 34, 49). At bin 64 the top body's profile runs out, with T4's
    # processes above it: bright on both sides, a 177 HU "valley", but no body beyond (20 % of
    # the peak). Taken as a disc it split T4 in two (whole Dice 0.69, five levels for four).
    prof = np.array([9, 29, 53, 64, 72, 81, 90, 96, 99, 100, 100, 99, 97, 89, 81, 75, 66, 34, 35, 56, 70, 69, 62,
                     57, 54, 53, 55, 59, 66, 65, 64, 66, 66, 49, 43, 53, 65, 74, 81, 84, 85, 85, 85, 85, 84, 86,
                     78, 72, 66, 47, 46, 55, 58, 67, 78, 78, 72, 68, 63, 59, 54, 52, 47, 39, 28, 20, 13, 10, 6], float)
    valley = np.full(prof.size, -np.inf)
    valley[[6, 9, 11, 12, 16, 17, 18, 23, 24, 26, 27, 34, 41, 42, 43, 49, 50, 52, 54, 55, 56, 58, 59, 64]] = [
        2, 7, 2, 2, 173, 167, 103, 1, 1, 4, 4, 201, 41, 13, 4, 310, 86, 4, 27, 19, 133, 1, 4, 177]
    discs, endplate_only = _find_discs(prof, 1.5, valley)
    assert discs == [16, 34, 49] and sorted(endplate_only) == [16, 34, 49]


def test_band_half_a_pitch_from_two_discs_is_no_disc():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile and endplate valleys (1.5 mm bins) of a random arterial T4-T8 phantom at
    # 3 mm slices: no density minimum is sure, the discs are the bands between endplates at bins
    # 18, 36, 52 and 66. The osteoporotic T6 (66 mg/cm3) shows a faint band (44 HU) mid-body, at
    # bin 44: half-way, 12 mm from the discs on either side. Two of the four gaps were that short,
    # so against the median gap it did not look short (T6 split, whole Dice 0.58); against the
    # gaps' 75th centile it does, and the weaker band goes.
    prof = np.array([3, 22, 46, 53, 61, 72, 83, 93, 98, 99, 100, 100, 100, 99, 92, 86, 85, 84, 71, 72, 73, 81, 88,
                     90, 89, 91, 91, 92, 94, 97, 96, 91, 86, 85, 82, 74, 63, 74, 78, 67, 61, 56, 54, 53, 56, 61,
                     65, 65, 66, 69, 73, 72, 64, 69, 74, 76, 76, 77, 78, 81, 84, 87, 84, 80, 76, 73, 68, 65, 65,
                     69, 71, 73, 73, 74, 77, 80, 80, 77, 71, 64, 56, 40, 14], float)
    valley = np.full(prof.size, -np.inf)
    valley[[2, 3, 8, 9, 10, 11, 13, 17, 18, 19, 21, 24, 25, 26, 27, 28, 29, 36, 42, 43, 44, 45, 46, 51, 52, 57,
            58, 60, 63, 65, 66, 67, 69, 71, 73, 74, 76]] = [
        2, 9, 2, 36, 2, 1, 1, 147, 233, 132, 5, 2, 1, 2, 1, 4, 3, 225, 2, 40, 44, 19, 2, 85, 161, 1, 33, 38, 8,
        42, 112, 40, 2, 1, 12, 10, 4]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [18, 36, 52, 66]


def test_osteoporotic_thoracic_body_at_3mm_is_not_split_mid_body():
    # The phantom of the test above, end to end. No anchor in view: matched by overlap.
    ph = _phantom(first_level="T4", last_level="T8", spacing_mm=(0.8, 0.8, 3.0), noise_hu=12.3, scoliosis_mm=-1.6,
                  lordosis_deg=18.4, kyphosis_deg=13.3, contrast_phase="arterial", effective_kev=71.8, seed=395,
                  densities_mg_cm3={"T4": 249, "T5": 196, "T6": 66, "T7": 204, "T8": 146})
    res = segment_builtin(ph.image)
    assert res.labels_uncertain and len(res.levels) == 5
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.88, d   # measured 0.905-0.952 (T6 0.58 when split)


def test_marrow_dip_cutting_the_disc_spacing_in_two_is_no_disc():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (/100) and endplate valleys (2 mm bins) of a random portal-venous T9-L1
    # view at 2x2x3 mm (below). No density minimum is sure; the discs are the bands at 17, 32 and
    # 61 and the weaker band at 47. T11 (52 mg/cm3, basivertebral vein) is a broad trough from 35
    # to 44 whose floor (bin 39, 0.58 of its flanks, a 10 HU band) ranked ahead of the disc at 47
    # where the spacing expected one: T11 was split in two and every level above it misnamed.
    # The dip cuts the spacing (15 bins) into gaps of 7 and 8 and has no endplate band.
    prof = np.array([44, 133, 172, 214, 221, 229, 252, 270, 283, 297, 308, 308, 296, 282, 286, 295, 230, 202, 269,
                     297, 279, 273, 261, 264, 265, 268, 287, 275, 264, 265, 292, 253, 194, 270, 272, 227, 185, 165,
                     158, 151, 154, 183, 195, 192, 212, 258, 232, 219, 260, 294, 309, 321, 321, 321, 324, 329, 326,
                     306, 287, 283, 229, 185, 250, 277, 287, 303, 309, 311, 312, 318, 309, 280, 242, 194, 120, 33],
                    float)
    valley = np.full(prof.size, -np.inf)
    valley[[6, 7, 9, 11, 17, 23, 24, 26, 27, 32, 38, 39, 40, 41, 43, 46, 47, 49, 52, 53, 55, 58, 59, 60, 61, 67,
            68, 69]] = [4, 3, 3, 5, 90, 6, 7, 0, 3, 70, 2, 10, 5, 1, 0, 39, 33, 1, 3, 4, 3, 2, 11, 65, 208, 8, 8, 2]
    discs, endplate_only = _find_discs(prof, 2.0, valley)
    assert discs == [17, 32, 47, 61]
    assert sorted(endplate_only) == [17, 32, 61]


def test_osteoporotic_body_with_a_basivertebral_vein_is_not_split():
    # The view of the test above (random seed 304), end to end: anchored by T12's ribs.
    ph = _phantom(first_level="T9", last_level="L1", spacing_mm=(2.0, 2.0, 3.0), noise_hu=23.8, scoliosis_mm=-5.6,
                  lordosis_deg=27.7, kyphosis_deg=26.0, contrast_phase="portal-venous", effective_kev=79.7,
                  basivertebral_vein=True, seed=304,
                  densities_mg_cm3={"L1": 111, "T10": 239, "T11": 52, "T12": 109, "T9": 187})
    res = segment_builtin(ph.image)
    # measured whole 0.916-0.936, bodies 0.931-0.948 (T11 0.55 split; T9-T11 named one level up)
    _assert_named_and_dice(ph, res, whole_min=0.9, body_min=0.9)


def test_marrow_darker_than_the_discs_gives_way_to_the_banded_discs_beside_it():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) and endplate valleys (HU) of a random
    # native T11-L5 view at 1.5x1.5x3 mm, 28 HU noise, T12 at 45 mg/cm3 with a basivertebral
    # vein (below). T12's marrow, darker than the discs, is a broad trough (121-135) whose floor,
    # 126, is a sure dip (0.41 of T12's own endplate peaks at 116 and 141); the T12/L1 and T11/T12
    # discs, bands of 162 and 105-135 HU at 118 and 138, only dip weakly, and the gaps the dip
    # leaves (31 and 32 bins against a spacing of 24) are too short for the spacing to ask for
    # them. T12 was split and T11 lost. The vein's bands in the marrow (124-125, 132) are as strong.
    prof = np.array([
        2.4, 20.3, 37.0, 45.7, 51.1, 56.6, 61.8, 66.6, 71.5, 77.7, 84.8, 91.0, 96.5, 100.0, 98.8, 96.9, 94.4, 89.6,
        83.1, 76.6, 70.7, 66.4, 64.4, 47.1, 12.2, 2.6, 14.8, 51.0, 63.5, 59.4, 59.9, 63.0, 63.8, 61.8, 62.1, 62.3,
        62.8, 63.0, 64.1, 66.0, 68.2, 68.8, 67.7, 64.4, 60.3, 56.4, 52.2, 48.7, 13.5, 1.3, 0.0, 0.1, 2.6, 18.6, 49.0,
        57.7, 65.2, 72.8, 78.9, 83.3, 84.4, 83.1, 79.9, 76.2, 71.6, 66.9, 62.1, 57.4, 52.7, 21.1, 5.2, 1.9, 1.1, 9.9,
        41.7, 51.3, 59.6, 71.6, 83.1, 91.6, 94.9, 96.4, 96.8, 98.8, 98.2, 97.6, 97.5, 97.6, 93.0, 84.9, 77.9, 73.2,
        72.4, 65.1, 44.4, 20.2, 21.7, 47.4, 55.1, 53.1, 47.3, 43.3, 35.5, 30.9, 30.8, 32.2, 33.3, 34.5, 36.8, 37.6,
        39.7, 43.2, 47.3, 51.6, 56.2, 62.2, 68.2, 53.0, 43.6, 59.2, 64.4, 55.1, 46.2, 39.9, 30.2, 26.2, 25.3, 26.8,
        27.4, 28.8, 32.1, 32.1, 33.9, 37.5, 41.2, 46.7, 54.6, 57.8, 40.8, 46.0, 58.7, 61.0, 52.1, 47.0, 44.2, 40.8,
        39.0, 38.5, 38.7, 39.6, 42.2, 44.9, 43.1, 41.4, 39.2, 37.1, 34.4, 29.8, 9.3])
    valley = np.full(prof.size, -np.inf)
    valley[[23, 25, 26, 61, 70, 96, 97, 118, 124, 125, 131, 132, 133, 138, 139]] = [
        33, 49, 37, 30, 50, 80, 56, 162, 183, 175, 26, 196, 27, 105, 135]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [25, 50, 72, 95, 118, 138]


def test_an_osteoporotic_body_darker_than_its_discs_is_neither_split_nor_merged():
    # The view of the test above end to end (its curve over 250 mm, the phantom's default),
    # anchored by T12's ribs: T11 0.0 / T12 0.36 whole, named T12-L5, before.
    ph = _phantom(first_level="T11", last_level="L5", spacing_mm=(1.5, 1.5, 3.0), noise_hu=27.9, scoliosis_mm=9.7,
                  scoliosis_span_mm=250.0, lordosis_deg=19.2, kyphosis_deg=36.3, effective_kev=79.5, seed=928,
                  basivertebral_vein=True, include_sacrum=False, fractures={"L3": ("crush", 2)},
                  densities_mg_cm3={"L1": 65, "L2": 187, "L3": 148, "L4": 111, "L5": 224, "T11": 81, "T12": 45})
    res = segment_builtin(ph.image)
    _assert_named_and_dice(ph, res, whole_min=0.9, body_min=0.9)   # measured 0.923-0.946 / 0.926-0.952


def test_marrow_between_the_depressed_endplates_of_a_biconcave_body_is_no_disc():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) and endplate valleys (HU) of a random
    # arterial L1-L4 view at 0.9x0.9x3 mm (below). L3, a grade-3 biconcave fracture at 42 mg/cm3,
    # holds a sure dip at 34 between its two depressed endplates, its dark marrow a 135-178 HU band
    # (27-32) beside it; so the rule for unbanded marrow dips kept it. Its gaps, 9 and 13 bins
    # against a spacing of 24, are shorter than any vertebra with its disc (a grade-3 crush keeps
    # over half a pitch): L3 was split in two.
    prof = np.array([
        5.3, 25.1, 36.9, 38.7, 40.6, 42.9, 45.9, 48.1, 50.1, 52.1, 53.8, 55.9, 59.7, 59.6, 59.4, 59.1, 61.0, 62.9,
        64.7, 65.2, 63.4, 65.1, 71.6, 47.3, 10.1, 4.7, 23.2, 50.8, 56.3, 52.0, 53.1, 59.5, 50.2, 36.2, 26.4, 28.1,
        33.0, 39.5, 43.7, 52.9, 61.5, 65.6, 65.8, 64.3, 65.2, 68.9, 46.5, 18.3, 18.6, 42.7, 66.2, 77.0, 84.1, 84.6,
        90.6, 98.1, 96.5, 96.2, 96.3, 98.0, 100.0, 99.8, 97.9, 95.7, 91.9, 86.4, 81.7, 81.2, 86.0, 78.7, 45.4, 29.2,
        46.5, 68.0, 81.4, 75.0, 65.7, 58.1, 51.2, 49.2, 46.6, 46.2, 48.6, 51.5, 55.3, 51.2, 45.8, 45.0, 47.6, 52.7,
        44.8, 40.0, 40.5, 35.3, 21.5, 6.1])
    valley = np.full(prof.size, -np.inf)
    valley[[3, 7, 9, 10, 11, 12, 13, 16, 24, 27, 28, 29, 32, 35, 37, 38, 39, 43, 45, 48, 58, 59, 60, 61, 62, 63, 66,
            70, 72, 79, 80, 81, 82, 83, 84, 85, 86, 88]] = [
        13, 0, 0, 2, 2, 2, 2, 1, 2, 160, 135, 135, 178, 5, 24, 25, 6, 4, 50, 62, 2, 2, 1, 0, 0, 0, 0, 79, 78, 2, 1, 1,
        0, 1, 1, 1, 1, 0]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [25, 47, 71]


def test_a_grade_3_biconcave_osteoporotic_body_is_not_split():
    # The view of the test above end to end (random seed 698); no anchor in view: matched by overlap.
    ph = _phantom(first_level="L1", last_level="L4", spacing_mm=(0.9, 0.9, 3.0), noise_hu=16.6, scoliosis_mm=-7.3,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, lordosis_deg=29.0, kyphosis_deg=24.5,
                  contrast_phase="arterial", effective_kev=77.8, basivertebral_vein=True, seed=698,
                  fractures={"L3": ("biconcave", 3)}, densities_mg_cm3={"L1": 64, "L2": 123, "L3": 42, "L4": 72})
    whole, body = _unanchored_dice(ph)
    # measured 0.943-0.961 whole, 0.937-0.952 bodies (L3 0.62 / 0.55, split, before)
    assert min(whole.values()) >= 0.9 and min(body.values()) >= 0.9, (whole, body)


def test_a_disc_on_a_density_floor_lies_at_its_endplate_band():
    # Random portal-venous T6-T11 view at 2x2x2.5 mm (seed 577), T8 at 55 mg/cm3 between 248 and
    # 249 mg/cm3 neighbours; no anchor in view: matched by overlap. The T8/T9 disc shows as a band
    # between endplates on a density floor that falls on into T8's marrow; the floor's bottom,
    # which stands in for the band when candidates are rated, was taken as the disc itself: 4 mm
    # into T8 (T9 0.906 whole / 0.910 body, T8 0.884 / 0.895).
    ph = _phantom(first_level="T6", last_level="T11", spacing_mm=(2.0, 2.0, 2.5), noise_hu=26.6, scoliosis_mm=0.8,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, lordosis_deg=21.4, kyphosis_deg=10.6,
                  contrast_phase="portal-venous", effective_kev=78.2, seed=577, fractures={"T10": ("crush", 2)},
                  densities_mg_cm3={"T6": 180, "T7": 248, "T8": 55, "T9": 249, "T10": 141, "T11": 182})
    whole, body = _unanchored_dice(ph)
    t8, t9 = lv.level_id("T8"), lv.level_id("T9")
    # measured T9 0.941 / 0.958, T8 0.895 / 0.902 (its thick-slice endplate voxels: README "Honest limits")
    assert whole[t9] >= 0.93 and body[t9] >= 0.94, (whole, body)
    assert whole[t8] >= 0.89 and min(whole.values()) >= 0.89, (whole, body)


def test_dark_marrow_round_a_basivertebral_vein_stays_in_the_body():
    # Random arterial T5-T12 view at 1.5x1.5x1 mm (seed 357), T9 at 45 mg/cm3 with a basivertebral
    # vein; no anchor in view (no rib-free vertebra below T12): matched by overlap. The vein's
    # channel opens into the canal, so in 3D the marrow lining it is surface, and the outline trim
    # dropped it where it read under half the bone beside it: 325 voxels of T9's body in-plane
    # interior, and the channel itself left out (T9 0.914 whole / 0.899 body, T10 0.928 / 0.919,
    # T12 0.931 / 0.920). Bodies are solid.
    ph = _phantom(first_level="T5", last_level="T12", spacing_mm=(1.5, 1.5, 1.0), noise_hu=6.1, scoliosis_mm=6.3,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, lordosis_deg=45.9, kyphosis_deg=15.1,
                  contrast_phase="arterial", effective_kev=73.8, basivertebral_vein=True, seed=357,
                  densities_mg_cm3={"T5": 224, "T6": 164, "T7": 145, "T8": 167, "T9": 45, "T10": 80, "T11": 182,
                                    "T12": 113})
    whole, body = _unanchored_dice(ph)
    # measured 0.945-0.963 whole, 0.951-0.968 bodies
    assert min(whole.values()) >= 0.94 and min(body.values()) >= 0.94, (whole, body)


def test_hole_filling_by_labelling_matches_scipy():
    from spinekit.masks import fill_holes as _fill_holes
    from spinekit.masks import in_plane
    from spinekit.segmentation.builtin.common import _SLICE, _SLICE8

    # fill_holes labels the background once instead of flooding it (2.1 -> 0.6 s of fills on a
    # 512x512x400 CT); it must give scipy's voxels exactly, the view's faces included: in-plane
    # structures leave a slice's holes filled at the ends of the stack.
    rng = np.random.default_rng(7)
    for it in range(120):
        mask = rng.random(tuple(rng.integers(1, 12, size=3))) < rng.uniform(0.2, 0.8)
        if it % 2:
            mask = ndi.binary_dilation(mask)
        for structure in (None, _SLICE, _SLICE8, ndi.generate_binary_structure(3, 3)):
            assert (_fill_holes(mask, structure) == ndi.binary_fill_holes(mask, structure=structure)).all()
    ring = np.zeros((2, 9, 9), bool)
    ring[:, 2:7, 2:7] = True
    ring[:, 3:6, 3:6] = False
    assert _fill_holes(ring, _SLICE)[:, 3:6, 3:6].all() and not _fill_holes(ring)[:, 3:6, 3:6].any()
    # 2D masks, and planes normal to any axis (label-map canals, body refills) as a loop of 2D fills
    assert (in_plane(0) == _SLICE).all()
    for it in range(40):
        mask = ndi.binary_dilation(rng.random(tuple(rng.integers(1, 16, size=2))) < 0.3)
        assert (_fill_holes(mask) == ndi.binary_fill_holes(mask)).all()
        stack = rng.random(tuple(rng.integers(2, 14, size=3))) < 0.3
        for axis in range(3):
            stack = ndi.binary_dilation(stack, in_plane(axis))
            loop = np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(stack, axis, 0)], axis=axis)
            assert (_fill_holes(stack, in_plane(axis)) == loop).all()


def test_bodies_are_refilled_round_an_open_pocket_but_not_inside_an_endplate_rim():
    from spinekit.segmentation.builtin.outline import _fill_body_holes

    # A body (label 3; z, y, x) whose vein channel runs from its centre out through the back wall,
    # with the dark marrow lining it dropped by the trim: open to the outside, so no 3D hole and
    # none in the axial slices it crosses, but enclosed in coronal planes. Its last slice is only
    # the endplate's rim, a ring round the disc: an axial hole, open to the disc below in the other
    # planes. A neighbour's voxel (label 4) inside the body's outline stays the neighbour's.
    zz, yy, xx = np.mgrid[:12, :20, :20]
    inside = (yy - 10) ** 2 + (xx - 10) ** 2 <= 49
    channel = (zz >= 5) & (zz <= 6) & (np.abs(xx - 10) <= 1) & (yy >= 10)
    lining = (zz >= 4) & (zz <= 7) & (np.abs(xx - 10) <= 2) & (yy >= 8) & (yy <= 15)
    pocket = (channel | lining) & inside
    rim = (zz == 1) & inside & ((yy - 10) ** 2 + (xx - 10) ** 2 >= 25)
    disc = (zz == 1) & inside & ~rim

    def labels():
        bodies = np.where((inside & (zz >= 2) & (zz <= 9) & ~pocket) | rim, 3, 0).astype(np.uint8)
        vert = bodies.copy()
        vert[3, 10, 10], bodies[3, 10, 10] = 4, 0
        return vert, bodies

    vert, bodies = labels()
    _fill_body_holes(vert, bodies, axes=(0,))
    assert not bodies[pocket & (zz >= 5) & (zz <= 6)].any() and bodies[disc].all()   # axial planes alone
    vert, bodies = labels()
    _fill_body_holes(vert, bodies, axes=(1, 2))
    held = pocket & (yy < 17)   # (where the channel leaves the wall, nothing encloses it)
    assert (bodies[held] == 3).all() and (vert[held] == 3).all()
    assert not bodies[disc].any() and not vert[disc].any()
    assert vert[3, 10, 10] == 4 and bodies[3, 10, 10] == 0


def test_faint_bands_in_every_short_body_are_no_discs():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) and endplate valleys (HU) of a random
    # portal-venous T5-T9 view at 0.9x0.9x2.5 mm (below). No density dip is sure; the discs are
    # bands of 289-430 HU (20, 37, 53, 70), and each short upper-thoracic body's marrow, between
    # endplates blurred by the slices, a faint band of 50-52 HU (45, 62, 78). Evenly spaced,
    # they made every gap half a pitch: each body was split in two.
    prof = np.array([
        3.2, 11.5, 30.7, 48.4, 59.9, 67.5, 74.8, 83.1, 88.7, 91.2, 94.2, 97.6, 100.0, 98.4, 95.3, 91.5, 89.4, 88.4,
        81.5, 67.5, 62.4, 75.4, 78.2, 73.6, 67.5, 63.0, 58.9, 56.9, 56.8, 58.8, 63.5, 67.2, 68.3, 71.3, 75.6, 78.7,
        74.3, 56.9, 64.6, 69.6, 79.9, 83.0, 83.6, 82.7, 83.1, 85.0, 86.4, 85.5, 83.8, 81.6, 79.2, 76.7, 71.9, 55.9,
        46.5, 57.1, 64.0, 71.6, 72.1, 72.6, 73.9, 74.8, 76.3, 78.3, 79.6, 78.9, 73.7, 69.9, 69.3, 66.1, 57.1, 59.2,
        63.4, 66.7, 65.1, 63.9, 64.1, 64.7, 66.9, 69.9, 70.7, 67.9, 63.3, 56.7, 47.5, 33.9, 9.4])
    valley = np.full(prof.size, -np.inf)
    valley[[3, 8, 9, 10, 11, 12, 17, 19, 20, 21, 27, 28, 29, 37, 38, 39, 44, 45, 52, 53, 61, 62, 63, 65, 70, 71,
            77, 78, 79]] = [33, 1, 1, 2, 0, 1, 32, 232, 298, 38, 2, 28, 15, 303, 110, 62, 2, 50, 140, 430, 3, 52, 4,
                            0, 289, 153, 40, 50, 26]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [20, 37, 53, 70]
    # A faint band where a disc is due (without it, the stretch between clear bands is two
    # pitches long) stays a disc.
    valley[[45, 52, 62, 78]] = -np.inf
    valley[53] = 45.0
    assert _find_discs(prof, 1.5, valley)[0] == [20, 37, 53, 70]


def test_a_faint_band_is_judged_against_the_clearer_band_beside_it():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile and endplate valleys (HU) of a random native T4-T8 view at 0.7x0.7x3 mm
    # (below): disc bands at 20, 36, 52, 68 (255, 216, 220, 195 HU), T5's and T6's marrow bands
    # at 44 (51 HU) and 60 (49 HU). 60 lay just over a quarter of the weaker band beside it
    # (195 HU); kept as clear, its half-pitch gaps made the spacing that kept 44 too, and T5 and
    # T6 were each split in two (whole 0.60 and 0.52).
    prof = np.array([
        2.9, 12.4, 22.1, 36.3, 51.1, 64.6, 73.1, 77.9, 88.0, 94.5, 97.1, 97.6, 99.5, 100.0, 98.1, 95.2, 93.4, 93.7,
        86.2, 75.7, 74.6, 81.1, 85.3, 83.4, 85.1, 86.3, 86.4, 86.4, 87.7, 89.9, 91.0, 89.2, 85.1, 81.9, 82.4, 79.9,
        72.8, 72.7, 74.9, 78.5, 78.4, 75.5, 74.7, 74.3, 75.1, 76.6, 79.2, 81.0, 81.6, 79.3, 78.1, 76.7, 69.6, 67.5,
        69.3, 74.0, 74.8, 74.4, 75.4, 75.7, 76.8, 78.6, 80.4, 81.1, 78.0, 73.3, 71.8, 68.9, 62.7, 64.2, 67.0, 69.2,
        70.5, 71.0, 71.2, 72.3, 74.2, 74.6, 72.2, 67.9, 60.2, 51.1, 27.9, 5.5])
    valley = np.full(prof.size, -np.inf)
    valley[[5, 7, 8, 9, 10, 18, 19, 20, 21, 23, 26, 27, 29, 30, 36, 37, 42, 43, 44, 45, 46, 52, 53, 55, 59, 60, 61,
            67, 68, 74, 75, 76, 77]] = [88, 6, 6, 2, 5, 51, 254, 255, 119, 3, 2, 2, 1, 0, 216, 190, 1, 6, 51, 7, 0,
                                        220, 147, 8, 16, 49, 10, 11, 195, 38, 116, 46, 9]
    assert _find_discs(prof, 1.5, valley)[0] == [20, 36, 52, 68]


def test_short_thoracic_bodies_with_faint_marrow_bands_are_not_split():
    # The view of the test above end to end: T5-T8 each split in two before (whole 0.53-0.66).
    ph = _phantom(first_level="T5", last_level="T9", spacing_mm=(0.9, 0.9, 2.5), noise_hu=5.2, seed=27,
                  scoliosis_mm=11.6, scoliosis_span_mm=250.0, kyphosis_deg=19.7, lordosis_deg=28.0,
                  contrast_phase="portal-venous", effective_kev=55.7, fractures={"T7": ("biconcave", 2)},
                  densities_mg_cm3={"T5": 84, "T6": 176, "T7": 243, "T8": 44, "T9": 192})
    whole, body = _unanchored_dice(ph)
    assert len(whole) == 5
    assert min(whole.values()) >= 0.92, whole      # measured 0.941-0.955
    assert min(body.values()) >= 0.92, body        # measured 0.934-0.957


def test_band_on_a_shallow_density_floor_is_still_a_candidate():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Sure discs (empty slabs) at bins 20, 40 and 60 of a 1.5 mm profile; the next disc, 20
    # bins up, shows only as a dark band between endplates (valley 143 HU at bin 80) on a shallow
    # density floor whose next bin is a hair darker. Rated at the band's own bin it had no
    # deeper-free side and was no candidate: here the dip at bin 86 was taken instead; in a
    # random T6-T11 view at 3 mm no other candidate fitted and T6 and T7 merged (test below).
    # The candidate is rated at the floor's darkest bin beside the band, 81, and the disc placed
    # at the band, 80, between its endplates.
    prof = np.full(101, 50.0)
    prof[[20, 40, 60]] = 5.0
    prof[74:87] = [47, 44, 41, 38, 37.2, 37.1, 37.0, 36.9, 38, 40, 39, 36, 34]
    valley = np.full(prof.size, -np.inf)
    valley[80] = 143.0
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [20, 40, 60, 80]


def test_band_on_a_falling_density_floor_is_rated_at_its_bottom():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) of a random portal-venous T8-L2 view
    # at 0.9x0.9x3 mm, kyphosis 34 deg, and its endplate valleys (HU). The discs at 23-104 hold
    # a minimum; the T8/T9 disc, 20 bins above the last, shows as a strong band at 122 (274 HU)
    # on a floor that keeps falling for two bins (66.5, 66.3, 64.7). The band's darker
    # neighbour, 123, was not a minimum either, so no candidate was left; T8 and T9 merged (whole
    # Dice 0.0 for T8, the view named T9-L2). The candidate is rated at the floor's bottom, 124;
    # the disc lies at the band, 122, between its endplates (3 mm below the floor's bottom).
    prof = np.array([
        6.7, 25.5, 36.7, 44.6, 54.9, 58, 62.7, 67.7, 74, 80.7, 86.3, 92.5, 100, 98.2, 96.5, 92.6, 85.7, 77, 69.5,
        66.4, 66.5, 55.2, 37.7, 21.6, 31.2, 50.4, 63.7, 76.4, 79.9, 84.4, 88.7, 91.4, 93.2, 94.3, 95.3, 95.8, 94.6,
        92.5, 90.2, 88.2, 88, 86.8, 86.6, 78.7, 74.2, 59.4, 61.5, 69.4, 70.9, 77.3, 76.7, 79.6, 82.6, 83.2, 82.9,
        84.3, 87, 86.8, 84.1, 82.4, 78.7, 76.2, 73.1, 74.2, 72.5, 60.9, 60.8, 70.8, 71.5, 76.5, 71.2, 72.5, 76.9,
        78.4, 76, 75.5, 80.2, 82.8, 80.5, 79.3, 75.1, 71.7, 70.5, 69.2, 65, 56, 61.2, 64.9, 67.2, 70.7, 69.7, 71.3,
        72.5, 73, 72.8, 72.6, 73.7, 75.6, 74.5, 71.6, 69.2, 69.6, 68.5, 65.7, 55.6, 56.8, 60.2, 63.8, 67.5, 68.3,
        69.6, 71.4, 72.3, 73.6, 74.9, 76.1, 75.1, 72.6, 69.8, 68.2, 67.4, 66.7, 66.5, 66.3, 64.7, 65.4, 68.5, 70.8,
        71.7, 73.1, 73.9, 70.2, 62.1, 56.5, 53.4, 52.8, 53.3, 49.3, 41.6, 36.9, 27.3, 13.7, 7.1, 3])
    valley = np.full(prof.size, -np.inf)
    valley[[22, 24, 45, 46, 64, 65, 66, 67, 68, 85, 86, 104, 105, 121, 122, 123, 138]] = [
        223, 248, 332, 147, 24, 156, 302, 29, 105, 299, 173, 298, 185, 67, 274, 179, 99]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [23, 45, 66, 85, 104, 122]


def test_a_band_a_few_percent_below_its_flanks_is_not_in_a_dip():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) of a random native T4-T7 view at
    # 0.9x0.9x3 mm (seed 214) and its endplate valleys (HU). No minimum is sure, so the bands are
    # taken strongest first. The T5/T4 disc's band, 87 HU at bin 50, lies in a dip 19 % below its
    # flanks; a 94 HU band in T4's marrow at 57 lay 3.5 % below them, counted as a dip at full
    # weight, and pushed it out 7 bins away: T4 and T5 were cut in T4 (whole 0.68 / 0.77).
    prof = np.array([
        6.1, 24.9, 38.7, 51.4, 64.0, 71.2, 78.0, 86.2, 88.4, 92.2, 96.2, 99.4, 100.0, 97.2, 94.8, 93.9, 89.4, 80.8,
        73.3, 75.8, 78.7, 79.5, 79.6, 79.0, 79.3, 80.4, 84.7, 92.7, 94.3, 90.6, 88.0, 84.1, 82.0, 75.9, 71.3, 70.8,
        71.8, 77.3, 75.3, 74.9, 76.7, 79.1, 81.8, 85.5, 87.5, 83.2, 78.9, 76.0, 74.6, 69.2, 63.8, 65.6, 68.5, 69.9,
        70.1, 71.1, 72.9, 75.8, 78.5, 78.5, 76.2, 70.3, 59.9, 49.4, 17.1])
    valley = np.full(prof.size, -np.inf)
    bands = {7: 1, 9: 8, 10: 13, 11: 1, 12: 6, 18: 260, 19: 145, 25: 6, 27: 8, 34: 296, 35: 110, 37: 1, 40: 21,
             41: 94, 43: 38, 49: 19, 50: 87, 55: 1, 56: 39, 57: 94, 58: 28}
    valley[list(bands)] = list(bands.values())
    discs, endplate_only = _find_discs(prof, 1.5, valley)
    assert discs == [18, 34, 50] and sorted(endplate_only) == [18, 34, 50]


def test_the_view_whose_top_body_held_a_band_in_a_shallow_dip():
    # The view of the test above end to end; no anchor in view: matched by overlap.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(0.9, 0.9, 3.0), noise_hu=14.6, scoliosis_mm=-5.2,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, lordosis_deg=43.8, kyphosis_deg=21.8,
                  contrast_phase="native", effective_kev=63.5, seed=214)
    whole, body = _unanchored_dice(ph)
    # measured 0.919-0.935 whole, 0.906-0.936 bodies (T4 / T5 0.68 / 0.77 whole before)
    assert len(whole) == 4 and min(whole.values()) >= 0.9 and min(body.values()) >= 0.9, (whole, body)


def test_band_whose_floor_falls_to_the_profile_end_is_no_disc():
    from spinekit.segmentation.builtin.discs import _find_discs

    # A band near the profile's end on a floor that keeps falling to the end: the walk downhill
    # reaches the last bin, which has no profile beyond it (it raised an error there) and is no
    # disc.
    prof = np.full(60, 50.0)
    prof[[10, 30]] = 5.0
    prof[50:] = np.arange(49.0, 39.0, -1.0)
    valley = np.full(prof.size, -np.inf)
    valley[57] = 100.0
    assert _find_discs(prof, 1.5, valley) == ([10, 30], [])


def test_clear_band_goes_before_a_faint_band_in_dark_marrow():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) and endplate valleys (HU) of a random
    # native T6-T11 view at 1x1x2 mm, kyphosis 45 deg, T6 at 41 mg/cm3 (marrow darker than the
    # discs). The T6/T7 disc is a clear band at 91-92 (220 HU); T6's marrow shows a faint band at
    # 99 (55 HU) over a deeper dip at 98. Ranked on the dip's depth alone, 98 won and T6 lost its
    # lower half to T7 (whole 0.82, body 0.70).
    prof = np.array([
        11.4, 27.7, 42.9, 56.3, 61.6, 65.1, 68, 70.3, 71.8, 75.3, 78.8, 80, 81.5, 82.4, 82.1, 81.8, 82.7, 84.4,
        79.9, 57.9, 43.8, 63.1, 77.2, 80.1, 83.8, 88.1, 92.7, 95.4, 96.1, 96, 96.7, 98.2, 100, 97.2, 91.1, 86.1,
        81.7, 78.2, 52, 23.7, 24.2, 42.6, 56.6, 68.5, 73.5, 70.3, 66.5, 68, 68.5, 69.2, 69.1, 71.5, 72.2, 71.8,
        74.2, 65.6, 35.6, 25.2, 42.3, 57.6, 70.9, 78.7, 84.1, 84.9, 85.4, 86, 86.6, 87.9, 89.9, 91.5, 85.6, 79.5,
        76.6, 72.8, 63.2, 51.4, 62.4, 69.3, 73.5, 69.9, 68.6, 68.1, 68.1, 69, 70.7, 74.1, 76.7, 73.9, 70.6, 68.5,
        67.9, 59.3, 50.1, 56.1, 60.4, 57.2, 49.5, 40.5, 39.2, 41.7, 41.2, 42.6, 46.8, 47.5, 50.1, 50, 46.5, 40.9,
        16.1])
    valley = np.full(prof.size, -np.inf)
    valley[[20, 21, 38, 39, 40, 41, 56, 57, 58, 75, 83, 91, 92, 99]] = [
        299, 61, 122, 147, 235, 67, 227, 234, 137, 298, 12, 220, 137, 55]
    discs, _ = _find_discs(prof, 1.5, valley)
    assert discs == [20, 39, 57, 75, 92]


def test_osteoporotic_top_vertebra_keeps_its_lower_half():
    # The view of the test above (random seed 157), end to end. No anchor: matched by overlap.
    ph = _phantom(first_level="T6", last_level="T11", spacing_mm=(1.0, 1.0, 2.0), noise_hu=10.0,
                  scoliosis_mm=6.8, lordosis_deg=35.4, kyphosis_deg=44.7, effective_kev=66.2, seed=126,
                  fractures={"T9": ("wedge", 2)},
                  densities_mg_cm3={"T6": 41, "T7": 108, "T8": 238, "T9": 91, "T10": 162, "T11": 90})
    res = segment_builtin(ph.image)
    assert res.labels_uncertain and len(res.levels) == 6
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.9, d   # measured 0.940-0.959 (T6 0.82)


def test_thick_slice_thoracolumbar_view_keeps_its_top_disc():
    # The view of the test above (random seed 101), end to end: anchored by T12's ribs.
    ph = _phantom(first_level="T8", last_level="L2", spacing_mm=(0.9, 0.9, 3.0), noise_hu=11.7,
                  scoliosis_mm=-5.3, lordosis_deg=25.8, kyphosis_deg=34.3, contrast_phase="portal-venous",
                  effective_kev=56.9, seed=820)
    res = segment_builtin(ph.image)
    # measured whole 0.922-0.954 (T8 0.0 when merged), bodies 0.876-0.949 (thick-slice
    # thoracic bodies, see README's limits)
    _assert_named_and_dice(ph, res, whole_min=0.9, body_min=0.85)


@pytest.mark.parametrize("kw", [
    # T6-T11 at 3 mm, T8 crushed: the T6/T7 band sat on a shallow density floor (see above).
    dict(first_level="T6", last_level="T11", spacing_mm=(0.8, 0.8, 3.0), noise_hu=11.6, scoliosis_mm=-9.5,
         lordosis_deg=15.1, kyphosis_deg=39.5, effective_kev=75.0, basivertebral_vein=True, seed=677,
         fractures={"T8": ("crush", 1)},
         densities_mg_cm3={"T6": 97, "T7": 221, "T8": 148, "T9": 71, "T10": 207, "T11": 229}),
    # T5-T8 arterial, T7 crushed (grade 3): the disc spacing above came from the crushed T7 alone
    # (13 bins) and the T6/T5 band 18 bins up was too far from it; T5 and T6 merged.
    dict(first_level="T5", last_level="T8", spacing_mm=(0.9, 0.9, 1.25), noise_hu=28.9, scoliosis_mm=-4.4,
         lordosis_deg=16.6, kyphosis_deg=20.7, contrast_phase="arterial", effective_kev=71.4, seed=919,
         fractures={"T7": ("crush", 3)}),
])
def test_thoracic_discs_next_to_a_crushed_vertebra_are_found(kw):
    # Random views (seed 73); no anchor in view: matched by overlap.
    ph = _phantom(**kw)
    res = segment_builtin(ph.image)
    assert res.labels_uncertain and len(res.levels) == len(_truth_levels(ph))
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.9, d   # measured 0.928-0.951 / 0.937-0.954 (0.59 / 0.60 merged)


def test_two_false_bands_do_not_set_the_disc_spacing():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile and endplate valleys (1.5 mm bins) of a random native T4-T7 view at
    # 2.5 mm slices, noise 27 HU: bands between endplates at 18, 33, 41, 49 and 57, the true
    # discs 18, 33 and 49. Three of the four gaps were the false bands' (8 bins), so against
    # every centile of the gaps they looked regular (T5 / T6 split, whole 0.57). The spacing a
    # close band is judged against leaves that band out, and its two gaps merged must make one
    # regular gap.
    prof = np.array([3, 18, 41, 59, 74, 84, 85, 85, 86, 88, 92, 98, 100, 97, 91, 88, 87, 78, 70, 75, 76, 81, 82,
                     82, 83, 85, 87, 90, 90, 88, 87, 80, 75, 67, 52, 54, 65, 74, 75, 77, 78, 80, 82, 85, 88, 86,
                     80, 73, 69, 67, 62, 64, 66, 69, 74, 77, 71, 66, 63, 61, 59, 54, 49, 43, 33, 20, 9, 5, 2], float)
    valley = np.full(prof.size, -np.inf)
    valley[[8, 9, 17, 18, 19, 26, 27, 33, 34, 41, 48, 49, 50, 55, 56, 57, 58]] = [
        14, 15, 145, 263, 121, 15, 11, 163, 47, 44, 17, 209, 140, 19, 95, 132, 56]
    discs, endplate_only = _find_discs(prof, 1.5, valley)
    assert discs == [18, 33, 49] and sorted(endplate_only) == [18, 33, 49]


def test_regular_bands_are_not_thinned_by_their_own_double_gap():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum) and endplate valleys (1.5 mm bins) of a random
    # native T4-T9 view at 1.5x1.5x3 mm: no sure density minimum; the discs are the bands at 20,
    # 37, 55, 71 and 85, 14-18 bins apart. Dropping the 14-bin gap's weaker band (71) leaves a
    # double gap of 30, which raised the spacing it was judged by to 24 bins (the 75th centile of
    # 17, 18 and 30), so neither 14 nor the merged 30 looked regular: 71 went, then 37, and the
    # six vertebrae came out as four (T5-T8 whole 0.57-0.61). The merged gap is now judged
    # against the other gaps' spacing (17.75 bins).
    prof = np.array([4, 14, 25, 36, 54, 65, 72, 78, 85, 91, 94, 98, 100, 98, 96, 96, 95, 97, 90, 80, 73, 82, 84, 78,
                     75, 72, 68, 67, 68, 71, 77, 78, 78, 79, 80, 81, 81, 71, 71, 74, 73, 62, 52, 46, 43, 43, 46, 52,
                     56, 57, 59, 63, 70, 75, 68, 71, 72, 75, 69, 64, 62, 60, 61, 65, 70, 71, 67, 68, 71, 74, 65, 65,
                     67, 72, 73, 72, 72, 73, 76, 79, 82, 80, 76, 73, 70, 61, 59, 62, 63, 55, 49, 46, 44, 46, 52, 54,
                     53, 53, 50, 43, 34, 12], float)
    valley = np.full(prof.size, -np.inf)
    valley[[3, 4, 8, 9, 10, 11, 12, 13, 16, 20, 21, 27, 28, 30, 36, 37, 39, 45, 46, 47, 49, 54, 55, 57, 61, 62, 63,
            66, 70, 71, 73, 77, 78, 83, 85, 86, 91, 92, 93, 94]] = [
        20, 55, 1, 1, 2, 4, 4, 0, 0, 163, 93, 2, 14, 2, 85, 128, 16, 6, 2, 14, 1, 124, 130, 19, 3, 38, 8, 1, 131,
        150, 5, 56, 136, 4, 176, 101, 0, 26, 39, 4]
    discs, endplate_only = _find_discs(prof, 1.5, valley)
    assert discs == [20, 37, 55, 71, 85] and sorted(endplate_only) == discs


def test_band_in_a_density_dip_goes_before_a_band_on_the_marrow_plateau():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) and endplate valleys (HU) of a random
    # native T4-T7 view at 0.8x0.8x3 mm: no sure density minimum, so the discs are the endplate
    # bands, strongest first. The T6/T5 band at 35 (46 HU, in a density dip, 57 between 83 and
    # 88) lost to a band 7 bins above it at 42 (47 HU, on T6's brightest stretch, 87); the close
    # bands left then set the spacing and T4-T7 came out as six vertebrae (whole Dice 0.57).
    prof = np.array([
        2, 12, 36, 58, 68, 75, 82, 86, 89, 91, 91, 93, 97, 100, 93, 87, 82, 78, 68, 54, 61, 69, 76, 76, 73, 72, 71,
        74, 79, 83, 82, 81, 79, 74, 61, 57, 66, 73, 78, 81, 83, 85, 87, 88, 90, 88, 84, 79, 75, 71, 69, 68, 69, 70,
        71, 74, 78, 74, 70, 65, 61, 57, 55, 52, 46, 39, 31, 24, 15, 10, 6, 2], float)
    valley = np.full(prof.size, -np.inf)
    valley[[19, 27, 28, 34, 35, 41, 42, 47, 49, 50, 56, 57, 58, 60, 62, 67]] = [
        232, 53, 30, 28, 46, 18, 47, 14, 112, 190, 30, 40, 66, 33, 13, 29]
    discs, endplate_only = _find_discs(prof, 1.5, valley)
    assert discs == [19, 35, 50] and sorted(endplate_only) == [19, 35, 50]


def test_band_with_no_body_beyond_it_before_the_views_end_is_no_disc():
    from spinekit.segmentation.builtin.discs import _find_discs

    # Measured profile (share of its maximum, 1.5 mm bins) and endplate valleys (HU) of the upper
    # part of a random arterial T7-L1 view at 1x1x3 mm, noise 25 HU: no sure density minimum, the
    # discs are the endplate bands at 4, 23 and 41 (T10/T9 .. T8/T7). T7, the view's top vertebra,
    # fades from bin 48 to the view's end; a 54 HU band at 54 (0.68 of a pitch above the last disc)
    # was taken too, and split T7 into T7 and a "T6" (whole Dice 0.755). Beyond it the profile only
    # falls: no body there for a second endplate.
    prof = np.array([77, 74, 72, 66, 51, 42, 50, 57, 67, 70, 73, 74, 75, 75, 76, 77, 79, 79, 76, 73, 73, 70, 65,
                     57, 58, 63, 67, 70, 69, 71, 71, 71, 71, 73, 75, 75, 71, 69, 68, 67, 65, 63, 63, 64, 66, 68,
                     64, 65, 71, 70, 67, 61, 57, 53, 48, 45, 42, 34, 13, 2], float)
    valley = np.full(prof.size, -np.inf)
    valley[[4, 5, 8, 12, 14, 15, 23, 24, 29, 30, 31, 32, 33, 40, 41, 46, 47, 48, 49, 50, 51, 54, 55]] = [
        247, 150, 1, 3, 12, 6, 244, 150, 1, 0, 5, 16, 3, 107, 238, 5, 10, 5, 4, 1, 1, 54, 5]
    discs, endplate_only = _find_discs(prof, 1.5, valley)
    assert discs == [4, 23, 41] and sorted(endplate_only) == [4, 23, 41]


def test_noisy_thick_slice_view_keeps_its_fading_top_vertebra_whole():
    # The view of the test above (random seed 167), end to end: T12 in view, so named.
    ph = _phantom(first_level="T7", last_level="L1", spacing_mm=(1.0, 1.0, 3.0), noise_hu=25.3, scoliosis_mm=6.0,
                  lordosis_deg=19.3, kyphosis_deg=33.7, contrast_phase="arterial", effective_kev=62.4,
                  basivertebral_vein=True, seed=692)
    res = segment_builtin(ph.image)
    assert res.present_levels() == _truth_levels(ph) and not res.labels_uncertain
    d = {n: dice(res.vertebrae.array == lv.level_id(n), ph.vertebrae.array == lv.level_id(n)) for n in _truth_levels(ph)}
    assert min(d.values()) >= 0.89, d   # measured 0.913 (T7) - 0.956; T7 0.755 when split


def test_thick_slice_upper_thoracic_view_keeps_its_four_vertebrae():
    # The view of the test above (random seed 137), end to end. No anchor: matched by overlap.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(0.8, 0.8, 3.0), noise_hu=16.8,
                  scoliosis_mm=-11.2, lordosis_deg=16.6, kyphosis_deg=29.4, effective_kev=67.7, seed=386,
                  densities_mg_cm3={"T4": 179, "T5": 174, "T6": 98, "T7": 224})
    res = segment_builtin(ph.image)
    assert res.labels_uncertain and len(res.levels) == 4
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.85, d   # measured 0.878-0.936 (0.57 as six vertebrae)


def test_noisy_thick_slice_thoracic_view_is_split_at_its_discs_only():
    # The phantom of the test above (seed 89), end to end. No anchor in view: matched by overlap.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(1.5, 1.5, 2.5), noise_hu=27.2, scoliosis_mm=4.9,
                  lordosis_deg=26.6, kyphosis_deg=21.5, effective_kev=63.8, seed=749)
    res = segment_builtin(ph.image)
    assert res.labels_uncertain and len(res.levels) == 4
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.88, d   # measured 0.905-0.930


def test_top_vertebra_of_a_view_is_not_split_at_its_processes():
    # The phantom above: T4 is the view's top vertebra, with nothing above its processes. No
    # anchor in view: matched by overlap.
    ph = _phantom(first_level="T4", last_level="T7", spacing_mm=(1.5, 1.5, 1.25), noise_hu=19.8, scoliosis_mm=5.6,
                  lordosis_deg=27.4, kyphosis_deg=36.0, contrast_phase="arterial", effective_kev=62.2, seed=478,
                  densities_mg_cm3={"T4": 127, "T5": 172, "T6": 49, "T7": 154})
    res = segment_builtin(ph.image)
    assert res.labels_uncertain and len(res.levels) == 4
    d = _best_match_dice(res.vertebrae.array, ph.vertebrae.array)
    assert min(d.values()) >= 0.87, d   # measured 0.891 (T4) - 0.939


def _slab(img: Image, lo: int, height_mm: float) -> Image:
    """Slices lo.. of img covering height_mm (a thin scan of the same patient)."""
    hi = lo + int(round(height_mm / img.spacing_mm[2]))
    origin = np.asarray(img.origin_mm) + img.direction @ np.array([0.0, 0.0, lo * img.spacing_mm[2]])
    return Image(np.ascontiguousarray(img.array[lo:hi]), spacing_mm=img.spacing_mm, origin_mm=tuple(origin),
                 direction=img.direction, metadata=img.metadata)


def test_short_lumbar_slab_has_no_ribs(lumbar_with_sacrum):
    # A 40 mm slab across L2/L3 (phantom, no anchor in view): lumbar transverse processes cut by
    # the slab's ends must not pass for ribs cut short.
    ph = lumbar_with_sacrum[0]
    zz = np.nonzero((ph.vertebrae.array == lv.level_id("L3")).any(axis=(1, 2)))[0]
    res = segment_builtin(_slab(ph.image, int(zz.mean()), 40.0))
    assert len(res.levels) == 2
    assert res.labels_uncertain
    assert not any("rib_bearing" in r.flags for r in res.levels)


@pytest.fixture(scope="module")
def thoracolumbar_with_ribs():
    return _phantom(first_level="T6", last_level="L2", include_ribs=True)


@pytest.mark.parametrize("start_mm", [90.0, 150.0, 210.0])
def test_thoracic_slab_cut_through_a_vertebra_is_not_named_with_confidence(thoracolumbar_with_ribs, start_mm):
    # 40 mm slabs of a T6-L2 phantom (around T11, T9 and T7) whose lowest vertebra is cut by the
    # scan's end: its ribs descend out of view, so it looks rib-free below a rib-bearing one, like
    # L1 below T12. The last rib is then not confirmed; these slabs were named T12/L1 without a
    # flag before.
    ph = thoracolumbar_with_ribs
    res = segment_builtin(_slab(ph.image, int(round(start_mm / ph.image.spacing_mm[2])), 40.0))
    assert res.labels_uncertain
    assert not res.provenance["anchors"]["last_rib_T12"]


def test_min_levels_is_enforced():
    ph = _phantom(first_level="L3", last_level="L5")
    res = segment_builtin(ph.image, min_levels=3)
    assert res.provenance["anchors"]["sacrum"]
    with pytest.raises(InputError, match="need at least 6"):
        segment_builtin(ph.image, min_levels=6)


def test_detached_fragments_of_a_label_are_dropped():
    # A vertebra is one bone: a small piece of its label far from the main part is other bone
    # (the 3 mm phantom's iliac crests beside L5: L5 whole Dice 0.886 -> 0.901); a piece close
    # by (a process split off by the outline trim) and a large piece stay.
    from spinekit.segmentation.builtin.outline import _drop_detached_fragments
    vert = np.zeros((20, 40, 60), np.uint8)
    vert[5:15, 5:25, 5:25] = 24           # main part, 4000 voxels
    vert[8:10, 10:12, 40:42] = 24         # 8 voxels, 15 voxels (45 mm) away: dropped
    vert[8:10, 10:12, 26:28] = 24         # 8 voxels, 6 mm (centre to centre) away: kept
    vert[5:15, 30:40, 50:58] = 24         # 800 voxels (20 %), far: kept
    vert[5:15, 30:35, 5:10] = 25          # another label, untouched
    bodies = np.where(vert == 24, 24, 0).astype(np.uint8)
    v2, b2 = _drop_detached_fragments(vert.copy(), bodies.copy(), (3.0, 3.0, 3.0))
    assert not v2[8:10, 10:12, 40:42].any() and not b2[8:10, 10:12, 40:42].any()
    assert (v2[8:10, 10:12, 26:28] == 24).all()
    assert (v2[5:15, 30:40, 50:58] == 24).all()
    assert (v2 == 25).sum() == (vert == 25).sum()
    assert (v2 == 24).sum() == (vert == 24).sum() - 8


def test_working_grid_holds_the_voxel_centres_of_coarse_scans():
    # A 3 mm scan on a 2 mm grid has every other voxel half-way between two working voxels (its
    # labels drawn back shift there); 1.5 mm holds its centres. 0.75 mm scans keep 1.5 mm, 2 mm
    # scans 2 mm; a coarse scan whose aligned grid would exceed MAX_WORKING_VOXELS keeps 2 mm.
    from spinekit.segmentation.builtin.common import MAX_WORKING_VOXELS, _working_spacing

    def spacing_for(shape_zyx, spacing_xyz):
        return _working_spacing(Image(np.zeros(shape_zyx, np.int16), spacing_xyz))

    assert spacing_for((100, 100, 100), (3.0, 3.0, 3.0)) == pytest.approx(1.5)
    assert spacing_for((60, 100, 100), (4.0, 4.0, 5.0)) == pytest.approx(2.0)
    assert spacing_for((60, 100, 100), (5.0, 5.0, 5.0)) == pytest.approx(5.0 / 3.0)
    assert spacing_for((400, 512, 512), (0.75, 0.75, 1.0)) == pytest.approx(1.5)
    assert spacing_for((100, 100, 100), (2.0, 2.0, 2.0)) == pytest.approx(2.0)
    side = int(round((MAX_WORKING_VOXELS * 2.0) ** (1 / 3) / 2.0))  # ~2x the budget at 1.5 mm
    assert spacing_for((side, side, side), (3.0, 3.0, 3.0)) == pytest.approx(2.0)
    # The budget counts the working grid itself: an oblique scan's axis-aligned grid covers its
    # rotated box (a 45 degree turn about z widens x and y by sqrt(2), 2x the voxels).
    from spinekit.segmentation.builtin.common import _working_grid
    side = int(round((MAX_WORKING_VOXELS * 0.7) ** (1 / 3) / 2.0))  # 0.7x the budget when straight
    c = np.sqrt(0.5)
    turned = np.array([[c, -c, 0.0], [c, c, 0.0], [0.0, 0.0, 1.0]])
    assert spacing_for((side, side, side), (3.0, 3.0, 3.0)) == pytest.approx(1.5)
    oblique = Image(np.zeros((side, side, side), np.int16), (3.0, 3.0, 3.0), direction=turned)
    assert _working_spacing(oblique) == pytest.approx(2.0)
    small = Image(np.zeros((10, 12, 14), np.int16), (3.0, 3.0, 3.0), direction=turned)
    n_voxels = _working_grid(small, _working_spacing(small)).hu.size
    assert n_voxels == pytest.approx(((13 * 3 + 11 * 3) * c / 1.5 + 1) ** 2 * 19, rel=0.05)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, 1.0, -1.0]),
                                       np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])])
def test_native_box_holds_every_voxel_the_working_labels_reach(direction):
    # The outline steps run on the native box around the labels only (512x512x400 CT: 17.6 ->
    # 13.0 s, peak 1.74 -> 1.10 GB, labels byte-identical). Every native voxel whose nearest
    # working voxel is in the labels' box - and the margin the outline refinement grows into -
    # must be inside it, in any storage orientation; the cropped image keeps their positions.
    from spinekit.segmentation.builtin.common import _native_box, _working_grid

    img = Image(np.zeros((30, 40, 50), np.int16), (0.8, 0.9, 1.7), origin_mm=(-10.0, 20.0, 5.0),
                direction=direction)
    grid = _working_grid(img, 1.5)
    wbox = (slice(5, 12), slice(8, 20), slice(3, 9))
    box = _native_box(wbox, grid, img)
    idx = np.argwhere(np.ones(img.shape, bool))
    pts = img.index_to_physical(idx)
    w = np.rint((pts - np.asarray(grid.reference.GetOrigin())) / 1.5)[:, ::-1]   # working [z, y, x]
    labelled = np.all([(w[:, a] >= s.start) & (w[:, a] < s.stop) for a, s in enumerate(wbox)], axis=0)
    # (_refine_native grows the labels drawn back by 1.5 working voxels, and needs one more)
    k = np.ceil(1.5 * 1.5 / np.asarray(img.spacing_zyx_mm)).astype(int) + 1
    reach = ndi.binary_dilation(labelled.reshape(img.shape), structure=np.ones(2 * k + 1, bool)).ravel()
    inside = np.all([(idx[:, a] >= s.start) & (idx[:, a] < s.stop) for a, s in enumerate(box)], axis=0)
    assert labelled.any() and inside[reach].all()
    assert inside.sum() < 0.6 * inside.size           # a crop, not the whole image
    sub = img.crop(box)
    some = np.array([[b.start for b in box], [b.stop - 1 for b in box]])
    assert np.allclose(sub.index_to_physical(some - some[0]), img.index_to_physical(some))


def test_a_chest_view_from_t1_to_l1_is_named_from_the_twelfth_rib():
    # A chest CT's spine: all twelve rib-bearing levels and L1, the small upper-thoracic bodies at
    # the top of a kyphotic column. No sacrum, so T12 is the only anchor; eleven levels are named
    # by counting up from it. (Neither the sweep nor bench_random, T4-L5, reaches T1-T3.)
    ph = _phantom(first_level="T1", last_level="L1", spacing_mm=(1.5, 1.5, 2.0), noise_hu=20.0, kyphosis_deg=25.0,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, contrast_phase="portal-venous", seed=6)
    res = segment_builtin(ph.image)
    assert res.provenance["anchors"]["last_rib_T12"] and not res.provenance["anchors"]["sacrum"]
    # measured 0.915-0.960 whole, 0.914-0.968 bodies
    _assert_named_and_dice(ph, res, 0.91, 0.91)


def test_an_upper_thoracic_view_without_an_anchor_is_segmented_and_flagged():
    # T1-T5, scoliotic and kyphotic at 0.8x0.8x2 mm: no twelfth rib and no sacrum in view, so the
    # names are a flagged guess; the levels are matched by overlap.
    ph = _phantom(first_level="T1", last_level="T5", spacing_mm=(0.8, 0.8, 2.0), noise_hu=14.5, scoliosis_mm=-17.6,
                  scoliosis_span_mm=CTPhantomConfig().scoliosis_span_mm, kyphosis_deg=35.3, seed=862)
    whole, body = _unanchored_dice(ph)
    assert len(whole) == 5
    # measured 0.926-0.953 whole, 0.928-0.944 bodies
    assert min(whole.values()) >= 0.92 and min(body.values()) >= 0.92, (whole, body)
