"""Vertebra vocabulary, label conventions, terminology codes and colours.

The project's own label maps use VerSe ids: C1-C7 = 1-7, T1-T12 = 8-19, L1-L5 = 20-24,
L6 = 25, sacrum = 26, T13 = 28. Foreign conventions are converted on import with
``to_verse``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

# --- the vocabulary ------------------------------------------------------------------------
CERVICAL = tuple(f"C{i}" for i in range(1, 8))
THORACIC = tuple(f"T{i}" for i in range(1, 13))
LUMBAR = tuple(f"L{i}" for i in range(1, 6))

VERSE_IDS: dict[str, int] = {
    **{name: i + 1 for i, name in enumerate(CERVICAL)},
    **{name: i + 8 for i, name in enumerate(THORACIC)},
    **{name: i + 20 for i, name in enumerate(LUMBAR)},
    "L6": 25,
    "sacrum": 26,
    "T13": 28,
}
VERSE_NAMES: dict[int, str] = {v: k for k, v in VERSE_IDS.items()}

# Cranio-caudal order of every named level (transitional T13 / L6 in their anatomical place).
ORDER: tuple[str, ...] = CERVICAL + THORACIC + ("T13",) + LUMBAR + ("L6", "sacrum")

# Levels that SpineBMD reports (T1-L5).
BMD_LEVELS: tuple[str, ...] = THORACIC + LUMBAR


def level_id(name: str) -> int:
    """VerSe id of a level name ('L1' -> 20). Case-insensitive; 'S' is the sacrum."""
    key = name.strip()
    key = {"s": "sacrum", "s1": "sacrum", "sacrum": "sacrum"}.get(key.lower(), key.upper())
    if key not in VERSE_IDS:
        raise InputError(f"'{name}' is not a vertebra level name (expected e.g. C7, T12, L1, sacrum).")
    return VERSE_IDS[key]


def level_name(verse_id: int) -> str:
    """Level name of a VerSe id (20 -> 'L1')."""
    try:
        return VERSE_NAMES[int(verse_id)]
    except KeyError:
        raise InputError(f"{verse_id} is not a VerSe vertebra id.") from None


def order_index(name: str) -> int:
    """Position in cranio-caudal order; lets levels be sorted and neighbours found."""
    return ORDER.index(level_name(level_id(name)))


def neighbours(name: str) -> tuple[str | None, str | None]:
    """(cranial, caudal) neighbour among the standard 24 + sacrum (T13/L6 skipped).

    A transitional level gets the standard levels around it: T13 -> (T12, L1), L6 -> (L5, sacrum).
    """
    standard = CERVICAL + THORACIC + LUMBAR + ("sacrum",)
    level = level_name(level_id(name))
    if level == "T13":
        return ("T12", "L1")
    if level == "L6":
        return ("L5", "sacrum")
    i = standard.index(level)
    return (standard[i - 1] if i > 0 else None, standard[i + 1] if i + 1 < len(standard) else None)


# --- foreign conventions -------------------------------------------------------------------
def _ts_total() -> dict[int, str]:
    # TotalSegmentator `total` (v2): sacrum 25, S1 26, L5 27 ... L1 31, T12 32 ... T1 43,
    # C7 44 ... C1 50. S1 is part of the sacrum in the VerSe convention.
    m = {25: "sacrum", 26: "sacrum"}
    m.update({27 + i: f"L{5 - i}" for i in range(5)})
    m.update({32 + i: f"T{12 - i}" for i in range(12)})
    m.update({44 + i: f"C{7 - i}" for i in range(7)})
    return m


def _ts_vertebrae_mr() -> dict[int, str]:
    # TotalSegmentator `vertebrae_mr`: sacrum 1, L5 2 ... L1 6, T12 7 ... T1 18, C7 19 ... C1 25.
    m = {1: "sacrum"}
    m.update({2 + i: f"L{5 - i}" for i in range(5)})
    m.update({7 + i: f"T{12 - i}" for i in range(12)})
    m.update({19 + i: f"C{7 - i}" for i in range(7)})
    return m


def _totalspineseg() -> dict[int, str]:
    # TotalSpineSeg: C1-C7 = 11-17, T1-T12 = 21-32, L1-L5 = 41-45, sacrum = 50
    # (discs 6x/7x/9x, cord 1, canal 2 are not vertebrae and are dropped).
    m = {11 + i: f"C{i + 1}" for i in range(7)}
    m.update({21 + i: f"T{i + 1}" for i in range(12)})
    m.update({41 + i: f"L{i + 1}" for i in range(5)})
    m[50] = "sacrum"
    return m


def _spineps() -> dict[int, str]:
    # SPINEPS instance masks use VerSe ids for vertebrae (1-28); 100+id are discs and 200+id
    # endplates, which are not vertebrae.
    return dict(VERSE_NAMES)


CONVENTIONS: dict[str, dict[int, str]] = {
    "verse": dict(VERSE_NAMES),
    "totalsegmentator_total": _ts_total(),
    "totalsegmentator_vertebrae_mr": _ts_vertebrae_mr(),
    "totalspineseg": _totalspineseg(),
    "spineps": _spineps(),
}

# TotalSegmentator `vertebrae_body` is not a per-level map: 1 = vertebral bodies, 2 = discs.
TS_VERTEBRAE_BODY = {"body": 1, "disc": 2}


def conversion_lut(convention: str) -> np.ndarray:
    """Lookup table foreign id -> VerSe id (0 where the id is not a vertebra)."""
    if convention not in CONVENTIONS:
        known = ", ".join(sorted(CONVENTIONS))
        raise InputError(f"unknown label convention '{convention}' (known: {known}).")
    mapping = CONVENTIONS[convention]
    lut = np.zeros(max(max(mapping), 255) + 1, dtype=np.uint8)
    for foreign, name in mapping.items():
        lut[foreign] = VERSE_IDS[name]
    return lut


def to_verse(labels: np.ndarray, convention: str) -> np.ndarray:
    """Convert a label array from a known convention to VerSe ids (non-vertebra -> 0)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0):
        raise InputError("label map has negative values; expected non-negative integer labels.")
    lut = conversion_lut(convention)
    if labels.size and labels.max() >= lut.size:
        lut = np.concatenate([lut, np.zeros(int(labels.max()) + 1 - lut.size, dtype=np.uint8)])
    return lut[labels.astype(np.int64)]


def _gap_free(names: set[str]) -> bool:
    """True when the levels form one unbroken cranio-caudal run (T13/L6 may be absent)."""
    pos = sorted(ORDER.index(n) for n in names)
    optional = {ORDER.index("T13"), ORDER.index("L6")}
    return all(p in pos or p in optional for p in range(pos[0], pos[-1] + 1))


def guess_convention(present_ids: set[int] | np.ndarray) -> str:
    """Best guess of the convention from the ids present (used when the user gives none).

    The spine in a field of view is one unbroken run of levels, so a convention is plausible
    only when the ids it reads as vertebrae name a gap-free run; among plausible conventions the
    one that explains the most ids wins (VerSe on ties). This separates full TotalSegmentator
    maps (organs at 1-24 would read as scattered VerSe levels) and TotalSpineSeg (41-45 = L1-L5
    next to sacrum 50). Id sets that several conventions explain equally (e.g. VerSe vs.
    `vertebrae_mr` ids 1-25, or `vertebrae_body` 1/2) are read as VerSe: pass the convention
    explicitly for those. When no convention is gap-free (a level missing from the map), the
    fraction of ids explained decides.
    """
    ids = {int(i) for i in np.unique(np.asarray(list(present_ids))) if int(i) != 0}
    if not ids:
        raise InputError("label map is empty (no non-zero labels).")
    explained: dict[str, int] = {}
    plausible: dict[str, bool] = {}
    for name, mapping in CONVENTIONS.items():
        hits = ids & set(mapping)
        explained[name] = len(hits)
        plausible[name] = bool(hits) and _gap_free({mapping[i] for i in hits})
    candidates = [k for k in CONVENTIONS if plausible[k]] or list(CONVENTIONS)
    return max(candidates, key=lambda k: (explained[k], k == "verse"))


# --- terminology ---------------------------------------------------------------------------
# SNOMED CT codes of DICOM CID 7603 "Vertebra" (+ sacrum), used as segment terminology.
SNOMED: dict[str, tuple[str, str]] = {
    "C1": ("14806007", "C1 vertebra"),
    "C2": ("39976000", "C2 vertebra"),
    "C3": ("113205007", "C3 vertebra"),
    "C4": ("5329002", "C4 vertebra"),
    "C5": ("36978003", "C5 vertebra"),
    "C6": ("36054005", "C6 vertebra"),
    "C7": ("87391001", "C7 vertebra"),
    "T1": ("64864005", "T1 vertebra"),
    "T2": ("53733008", "T2 vertebra"),
    "T3": ("1626008", "T3 vertebra"),
    "T4": ("73071006", "T4 vertebra"),
    "T5": ("56401006", "T5 vertebra"),
    "T6": ("45296009", "T6 vertebra"),
    "T7": ("62487009", "T7 vertebra"),
    "T8": ("11068009", "T8 vertebra"),
    "T9": ("82687006", "T9 vertebra"),
    "T10": ("7610001", "T10 vertebra"),
    "T11": ("12989004", "T11 vertebra"),
    "T12": ("23215003", "T12 vertebra"),
    "L1": ("66794005", "L1 vertebra"),
    "L2": ("14293000", "L2 vertebra"),
    "L3": ("36470004", "L3 vertebra"),
    "L4": ("11994002", "L4 vertebra"),
    "L5": ("49668003", "L5 vertebra"),
    "sacrum": ("54735007", "Sacrum"),
}
# Transitional vertebrae have no code of their own: they are tagged with the nearest region's
# generic code and named by level.
SNOMED["T13"] = ("122495006", "Thoracic spine")
SNOMED["L6"] = ("122496007", "Lumbar spine")

# Category/type used for the segment terminology (Slicer's "Anatomical Structure").
TERMINOLOGY_CATEGORY = ("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Terminology:
    category: tuple[str, str, str]
    type: tuple[str, str, str]


def terminology(name: str) -> Terminology:
    code, meaning = SNOMED[level_name(level_id(name))]
    return Terminology(category=TERMINOLOGY_CATEGORY, type=("SCT", code, meaning))


# --- colours -------------------------------------------------------------------------------
def _ramp(names, start, end):
    out = {}
    n = len(names)
    for i, name in enumerate(names):
        t = i / max(n - 1, 1)
        out[name] = tuple(round(float(a + (b - a) * t), 4) for a, b in zip(start, end))
    return out


# One hue family per region, graded cranio-caudally so neighbouring levels are always
# distinguishable while the region stays recognisable at a glance.
COLOURS: dict[str, tuple[float, float, float]] = {
    **_ramp(CERVICAL, (0.55, 0.80, 1.00), (0.15, 0.45, 0.90)),
    **_ramp(THORACIC, (0.60, 1.00, 0.55), (0.10, 0.60, 0.25)),
    **_ramp(LUMBAR, (1.00, 0.85, 0.45), (0.90, 0.35, 0.10)),
    "T13": (0.05, 0.45, 0.20),
    "L6": (0.75, 0.20, 0.05),
    "sacrum": (0.85, 0.60, 0.85),
}


def colour(name: str) -> tuple[float, float, float]:
    """Display colour (RGB 0-1) of a level."""
    return COLOURS[level_name(level_id(name))]
