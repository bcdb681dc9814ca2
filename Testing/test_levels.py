"""spinekit.levels: vocabulary, id conventions, terminology codes, colours.

Independent references: the published id tables (written out here by hand from the tools'
documentation, not derived from levels.py), pydicom's copy of the DICOM/SNOMED concept
dictionary, and TotalSegmentator's own label maps in ../shared/data.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spinekit import levels as lv
from spinekit.errors import InputError

ALL_NAMES = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]

# name -> id, typed from each tool's documentation (not computed from levels.py).
VERSE_TRUTH = {**{f"C{i}": i for i in range(1, 8)}, **{f"T{i}": 7 + i for i in range(1, 13)},
               **{f"L{i}": 19 + i for i in range(1, 6)}, "L6": 25, "sacrum": 26, "T13": 28}
TS_TOTAL_TRUTH = {"sacrum": 25, "S1": 26, "L5": 27, "L4": 28, "L3": 29, "L2": 30, "L1": 31,
                  "T12": 32, "T11": 33, "T10": 34, "T9": 35, "T8": 36, "T7": 37, "T6": 38, "T5": 39,
                  "T4": 40, "T3": 41, "T2": 42, "T1": 43, "C7": 44, "C6": 45, "C5": 46, "C4": 47,
                  "C3": 48, "C2": 49, "C1": 50}
TS_MR_TRUTH = {"sacrum": 1, "L5": 2, "L4": 3, "L3": 4, "L2": 5, "L1": 6, "T12": 7, "T11": 8, "T10": 9,
               "T9": 10, "T8": 11, "T7": 12, "T6": 13, "T5": 14, "T4": 15, "T3": 16, "T2": 17, "T1": 18,
               "C7": 19, "C6": 20, "C5": 21, "C4": 22, "C3": 23, "C2": 24, "C1": 25}
TSS_TRUTH = {**{f"C{i}": 10 + i for i in range(1, 8)}, **{f"T{i}": 20 + i for i in range(1, 13)},
             **{f"L{i}": 40 + i for i in range(1, 6)}, "sacrum": 50}


def _check_convention(convention: str, truth: dict[str, int]) -> None:
    foreign = np.array(sorted(truth.values()), dtype=np.uint8)
    converted = lv.to_verse(foreign, convention)
    by_id = {v: k for k, v in truth.items()}
    for f, v in zip(foreign, converted):
        name = by_id[int(f)]
        expected = VERSE_TRUTH["sacrum" if name == "S1" else name]
        assert v == expected, f"{convention}: id {f} ({name}) -> {v}, expected {expected}"


def test_verse_ids():
    for name, vid in VERSE_TRUTH.items():
        assert lv.level_id(name) == vid
        assert lv.level_name(vid) == name
    _check_convention("verse", VERSE_TRUTH)
    _check_convention("spineps", VERSE_TRUTH)


def test_totalsegmentator_total():
    _check_convention("totalsegmentator_total", TS_TOTAL_TRUTH)
    # Organs and muscles of the `total` task are not vertebrae.
    assert not lv.to_verse(np.array([1, 5, 24, 52, 86, 87, 88, 89, 117]), "totalsegmentator_total").any()


def test_totalsegmentator_vertebrae_mr():
    _check_convention("totalsegmentator_vertebrae_mr", TS_MR_TRUTH)


def test_totalspineseg():
    _check_convention("totalspineseg", TSS_TRUTH)
    # Cord, canal and discs are dropped.
    assert not lv.to_verse(np.array([1, 2, 63, 71, 82, 91, 95]), "totalspineseg").any()


def test_to_verse_keeps_shape_and_background():
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3] = 31  # L1 in TS total
    labels[2, 0, 0] = 200  # unknown id -> 0
    out = lv.to_verse(labels, "totalsegmentator_total")
    assert out.shape == labels.shape and out.dtype == np.uint8
    assert out[1, 2, 3] == 20 and out.sum() == 20
    big = np.array([300, 31], dtype=np.int32)  # ids beyond the table are not vertebrae
    np.testing.assert_array_equal(lv.to_verse(big, "totalsegmentator_total"), [0, 20])


def test_to_verse_bad_input():
    with pytest.raises(InputError, match="unknown label convention 'nnunet'"):
        lv.to_verse(np.array([1]), "nnunet")
    with pytest.raises(InputError, match="negative"):
        lv.to_verse(np.array([-1, 3]), "verse")


def test_level_name_round_trip_and_spelling():
    for name in list(VERSE_TRUTH):
        assert lv.level_name(lv.level_id(name)) == name
    for vid in VERSE_TRUTH.values():
        assert lv.level_id(lv.level_name(vid)) == vid
    assert lv.level_id(" l1 ") == 20 and lv.level_id("t12") == 19
    assert lv.level_id("S") == lv.level_id("S1") == lv.level_id("Sacrum") == 26
    with pytest.raises(InputError, match="'L7' is not a vertebra level"):
        lv.level_id("L7")
    with pytest.raises(InputError, match="27 is not a VerSe"):
        lv.level_name(27)


def test_order_and_neighbours():
    names = ALL_NAMES + ["sacrum"]
    assert sorted(names, key=lv.order_index) == names
    assert lv.order_index("T12") < lv.order_index("T13") < lv.order_index("L1")
    assert lv.order_index("L5") < lv.order_index("L6") < lv.order_index("sacrum")
    assert lv.neighbours("C1") == (None, "C2")
    assert lv.neighbours("C7") == ("C6", "T1")
    assert lv.neighbours("T12") == ("T11", "L1")
    assert lv.neighbours("L1") == ("T12", "L2")
    assert lv.neighbours("L5") == ("L4", "sacrum")
    assert lv.neighbours("sacrum") == ("L5", None)
    # Transitional levels sit between the standard ones.
    assert lv.neighbours("T13") == ("T12", "L1")
    assert lv.neighbours("L6") == ("L5", "sacrum")
    assert lv.BMD_LEVELS == tuple(ALL_NAMES[7:])


def test_colours_distinct_and_valid():
    names = ALL_NAMES + ["T13", "L6", "sacrum"]
    cols = {n: np.asarray(lv.colour(n)) for n in names}
    for c in cols.values():
        assert c.shape == (3,) and (0 <= c).all() and (c <= 1).all()
    # Every pair distinct; anatomical neighbours clearly so (max channel difference).
    for a, b in itertools.combinations(names, 2):
        assert np.abs(cols[a] - cols[b]).max() > 0.01, (a, b)
    ordered = ALL_NAMES + ["sacrum"]
    for a, b in zip(ordered, ordered[1:]):
        assert np.abs(cols[a] - cols[b]).max() >= 0.04, (a, b)


def test_snomed_codes_match_dicom_dictionary():
    """Codes and meanings equal pydicom's DICOM concept dictionary (CID 7603 'Vertebra')."""
    from pydicom.sr._concepts_dict import concepts

    sct = {code: (meaning, cids) for entry in concepts["SCT"].values() for code, (meaning, cids) in entry.items()}
    for name in ALL_NAMES + ["sacrum"]:
        code, meaning = lv.SNOMED[name]
        assert code in sct, f"{name}: {code} is not a SNOMED code in the DICOM dictionary"
        assert sct[code][0] == meaning, (name, code, sct[code][0])
        if name != "sacrum":
            assert 7603 in sct[code][1], f"{name}: {code} not in CID 7603"
    assert len({lv.SNOMED[n][0] for n in ALL_NAMES + ["sacrum"]}) == 25
    term = lv.terminology("L1")
    assert term.type == ("SCT", "66794005", "L1 vertebra")
    assert term.category == lv.TERMINOLOGY_CATEGORY
    for name in ("T13", "L6"):  # transitional levels carry a region code that exists
        assert lv.SNOMED[name][0] in sct


def test_guess_convention_synthetic():
    assert lv.guess_convention(set(VERSE_TRUTH.values())) == "verse"
    assert lv.guess_convention({20, 21, 22, 23, 24}) == "verse"
    assert lv.guess_convention({19, 20, 21}) == "verse"
    assert lv.guess_convention(set(TS_TOTAL_TRUTH.values())) == "totalsegmentator_total"
    assert lv.guess_convention({27, 28, 29, 30, 31, 32}) == "totalsegmentator_total"
    assert lv.guess_convention(set(TSS_TRUTH.values())) == "totalspineseg"
    # TotalSpineSeg lumbar output with cord (1), canal (2) and discs (91-95).
    assert lv.guess_convention({1, 2, 41, 42, 43, 44, 45, 50, 91, 92, 93, 94, 95}) == "totalspineseg"
    # A full TotalSegmentator `total` map: organs at 1-24 must not be read as VerSe levels.
    organs = {1, 2, 3, 5, 6, 7, 10, 13, 18, 20, 52, 63, 86, 87, 88, 89, 117}
    assert lv.guess_convention(organs | {30, 31, 32, 33}) == "totalsegmentator_total"
    with pytest.raises(InputError, match="empty"):
        lv.guess_convention({0})


@pytest.mark.parametrize("rel", ["ct_abdomen_3mm/ts_vertebrae.nii.gz", "ct_abdomen_3mm/ct_crop30_ts_total.nii.gz",
                                 "ct_dicom_2mm/ts_total.nii.gz"])
def test_guess_convention_on_totalsegmentator_maps(shared_data, rel):
    from spinekit.image import read_image

    labels = read_image(shared_data / rel).array
    assert lv.guess_convention(np.unique(labels)) == "totalsegmentator_total"
    verse = lv.to_verse(labels, "totalsegmentator_total")
    present = {lv.level_name(i) for i in np.unique(verse) if i}
    if rel.endswith("ts_vertebrae.nii.gz"):  # README: S1, L5 ... L1, T12, T11
        assert present == {"sacrum", "L5", "L4", "L3", "L2", "L1", "T12", "T11"}
        # Cranio-caudal order: sacrum lowest, T11 highest (z of the label centroids, RAS file
        # read into LPS: larger z = superior).
        img = read_image(shared_data / rel)
        z_mm = {}
        for name in present:
            idx = np.argwhere(verse == lv.level_id(name)).mean(axis=0)
            z_mm[name] = img.index_to_physical(idx[None])[0, 2]
        ordered = sorted(present, key=lv.order_index)
        assert all(z_mm[a] > z_mm[b] for a, b in zip(ordered, ordered[1:]))
    if rel.startswith("ct_dicom_2mm"):  # README: 32 T12, 33 T11
        assert present == {"T12", "T11"}
