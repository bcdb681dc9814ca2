"""Interpretation of trabecular vBMD: the level pair, the ACR category, T/Z scores, BMD age.

ACR/ISCD QCT categories on the mean vBMD of two lumbar vertebrae (L1-L2 by default, the next
valid adjacent pair otherwise): > 120 normal, 80-120 osteopenia, < 80 osteoporosis (mg/cm³).
Both boundaries belong to osteopenia: 120.0 is osteopenia, 80.0 is osteopenia.

T-score: against the young-adult (peak) band of the same sex; Z-score: against the age/sex
band; BMD age: the age at which the sex-specific reference mean (linear between band
midpoints, after the peak) equals the patient's value. The reference is a data file,
``spinekit/data/normative_qct.csv`` (source in ``normative_qct.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..image import parse_age_years as dicom_age_years

ACR_NORMAL_ABOVE_MG_CM3 = 120.0
ACR_OSTEOPOROSIS_BELOW_MG_CM3 = 80.0
CATEGORIES = ("normal", "osteopenia", "osteoporosis")

# Preferred level pairs, best first, within T12-L4 (the ACR QCT practice parameter's range):
# L1-L2, then L2-L3, T12-L1 and L3-L4. L5 is left out (iliac crest, degenerative sclerosis).
LEVEL_PAIRS: tuple[tuple[str, str], ...] = (("L1", "L2"), ("L2", "L3"), ("T12", "L1"), ("L3", "L4"))

NORMATIVE_CSV = Path(__file__).resolve().parent.parent / "data" / "normative_qct.csv"


def acr_category(vbmd_mg_cm3: float | None) -> str | None:
    """ACR category of a (pair-mean) trabecular vBMD; None when there is no value."""
    if vbmd_mg_cm3 is None or not np.isfinite(vbmd_mg_cm3):
        return None
    if vbmd_mg_cm3 > ACR_NORMAL_ABOVE_MG_CM3:
        return "normal"
    if vbmd_mg_cm3 < ACR_OSTEOPOROSIS_BELOW_MG_CM3:
        return "osteoporosis"
    return "osteopenia"


# --- age and sex from DICOM or arguments ----------------------------------------------------
def parse_age_years(value) -> float | None:
    """Age in years from a number or a DICOM AS string ('065Y', '018M', '010W', '120D')."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float, np.number)):
        v = float(value)
        return v if np.isfinite(v) and v >= 0 else None
    years = dicom_age_years(value)  # DICOM AS ('065Y', '018M', ...)
    if years is None:
        try:  # a plain number typed by a user, e.g. "65.5"
            years = float(str(value))
        except ValueError:
            raise InputError(f"age '{value}' is not a number of years or a DICOM age such as 065Y.") from None
        if not (np.isfinite(years) and years >= 0):
            raise InputError(f"age '{value}' is not a number of years or a DICOM age such as 065Y.")
    return years


def parse_sex(value) -> str | None:
    """'F' or 'M' from 'F'/'female'/'w'/'M'/'male'; None for empty / 'O' / unknown."""
    if value is None:
        return None
    v = str(value).strip().upper()
    if v in ("F", "FEMALE", "W", "WOMAN"):
        return "F"
    if v in ("M", "MALE", "MAN"):
        return "M"
    return None


# --- the normative table ---------------------------------------------------------------------
@dataclass
class NormativeTable:
    rows: pd.DataFrame          # sex, age_low, age_high, mean_mg_cm3, sd_mg_cm3, source
    path: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> "NormativeTable":
        path = Path(path) if path else NORMATIVE_CSV
        if not path.exists():
            raise InputError(f"{path}: normative table not found.")
        rows = pd.read_csv(path)
        need = {"sex", "age_low", "age_high", "mean_mg_cm3", "sd_mg_cm3", "source"}
        if not need <= set(rows.columns):
            raise InputError(f"{path}: normative table lacks columns {sorted(need - set(rows.columns))}.")
        rows = rows.sort_values(["sex", "age_low"]).reset_index(drop=True)
        return cls(rows=rows, path=str(path))

    def _sex_rows(self, sex: str) -> pd.DataFrame:
        r = self.rows[self.rows["sex"] == sex]
        if r.empty:
            raise InputError(f"the normative table has no rows for sex '{sex}'.")
        return r

    def band(self, sex: str, age_years: float) -> tuple[float, float]:
        """(mean, sd) of the band holding the age; the first/last band outside the table."""
        r = self._sex_rows(sex)
        hit = r[(r["age_low"] <= age_years) & (age_years < r["age_high"] + 1)]
        row = hit.iloc[0] if len(hit) else (r.iloc[0] if age_years < r["age_low"].min() else r.iloc[-1])
        return float(row["mean_mg_cm3"]), float(row["sd_mg_cm3"])

    def peak(self, sex: str) -> tuple[float, float, float]:
        """(mean, sd, band-midpoint age) of the young-adult peak band (the highest mean; the
        oldest such band when several share it, i.e. where the decline starts)."""
        r = self._sex_rows(sex)
        top = r[r["mean_mg_cm3"] == r["mean_mg_cm3"].max()].iloc[-1]
        return float(top["mean_mg_cm3"]), float(top["sd_mg_cm3"]), float((top["age_low"] + top["age_high"] + 1) / 2)

    def decline_curve(self, sex: str) -> tuple[np.ndarray, np.ndarray]:
        """(band-midpoint ages, means) from the peak on: the monotone part BMD age inverts."""
        r = self._sex_rows(sex)
        _, _, peak_age = self.peak(sex)
        mid = ((r["age_low"] + r["age_high"] + 1) / 2).to_numpy(float)
        mean = r["mean_mg_cm3"].to_numpy(float)
        keep = mid >= peak_age
        ages, means = mid[keep], mean[keep]
        # Enforce monotone decline (a noisy table must not make the inverse ambiguous).
        means = np.minimum.accumulate(means)
        return ages, means


@lru_cache(maxsize=4)
def _default_table(path: str) -> NormativeTable:
    return NormativeTable.load(path)


def default_table() -> NormativeTable:
    return _default_table(str(NORMATIVE_CSV))


def t_score(vbmd_mg_cm3: float, sex: str, table: NormativeTable | None = None) -> float:
    table = table or default_table()
    mean, sd, _ = table.peak(sex)
    return (vbmd_mg_cm3 - mean) / sd


def z_score(vbmd_mg_cm3: float, sex: str, age_years: float, table: NormativeTable | None = None) -> float:
    table = table or default_table()
    mean, sd = table.band(sex, age_years)
    return (vbmd_mg_cm3 - mean) / sd


def bmd_age(vbmd_mg_cm3: float, sex: str, table: NormativeTable | None = None) -> tuple[float, str | None]:
    """Age (years) at which the sex's reference mean equals the value, and a note when the
    value lies outside the table (the age is then clipped to the peak / oldest midpoint)."""
    table = table or default_table()
    ages, means = table.decline_curve(sex)
    if vbmd_mg_cm3 >= means[0]:
        return float(ages[0]), f"at or above the young-adult peak (<= {ages[0]:g} y)"
    if vbmd_mg_cm3 <= means[-1]:
        return float(ages[-1]), f"below the oldest reference band (>= {ages[-1]:g} y)"
    # np.interp needs increasing x: interpolate age over the decreasing means reversed.
    return float(np.interp(vbmd_mg_cm3, means[::-1], ages[::-1])), None


# --- the level pair and the whole interpretation ---------------------------------------------
def select_level_pair(level_vbmd: dict[str, float | None],
                      excluded: dict[str, str] | None = None) -> tuple[tuple[str, str] | None, list[str]]:
    """First valid pair of LEVEL_PAIRS and the reasons others were skipped.

    A level is valid when it has a finite value and is not in ``excluded`` (level -> reason,
    e.g. 'metal', 'fracture', 'roi_small', 'truncated').
    """
    excluded = excluded or {}
    notes: list[str] = []

    def ok(name: str) -> bool:
        v = level_vbmd.get(name)
        return name not in excluded and v is not None and np.isfinite(v)

    for pair in LEVEL_PAIRS:
        if all(ok(n) for n in pair):
            return pair, notes
        if pair == ("L1", "L2"):
            for n in pair:
                if n in excluded:
                    notes.append(f"{n} left out of the pair ({excluded[n]}).")
                elif level_vbmd.get(n) is None:
                    notes.append(f"{n} is not measured.")
    return None, notes


@dataclass
class Interpretation:
    vbmd_mg_cm3: float | None
    levels_used: list[str]
    category: str | None
    t_score: float | None = None
    z_score: float | None = None
    bmd_age: float | None = None
    age_years: float | None = None
    sex: str | None = None
    reference: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def interpret(level_vbmd: dict[str, float | None], *, excluded: dict[str, str] | None = None,
              age_years: float | None = None, sex: str | None = None,
              table: NormativeTable | None = None) -> Interpretation:
    """Pair mean, ACR category and (when sex is known) T-score, Z-score (also needs age) and BMD age."""
    pair, notes = select_level_pair(level_vbmd, excluded)
    warnings = list(notes)
    if pair is None:
        pairs = ", ".join(f"{a}-{b}" for a, b in LEVEL_PAIRS)
        warnings.append(f"No valid pair of adjacent vertebrae ({pairs}) was measured, so no L1-L2 vBMD or "
                        "category is given.")
        return Interpretation(None, [], None, age_years=age_years, sex=sex, warnings=warnings)
    value = float(np.mean([level_vbmd[n] for n in pair]))
    if pair != ("L1", "L2"):
        warnings.append(f"{pair[0]}-{pair[1]} used instead of L1-L2.")
    out = Interpretation(value, list(pair), acr_category(value), age_years=age_years, sex=sex, warnings=warnings)
    sex = parse_sex(sex)
    out.sex = sex
    if sex is None:
        out.warnings.append("Sex unknown: no T-score, Z-score or BMD age (give --sex F|M).")
        return out
    table = table or default_table()
    out.reference = Path(table.path).name
    out.t_score = t_score(value, sex, table)
    out.bmd_age, note = bmd_age(value, sex, table)
    if note:
        out.warnings.append(f"BMD age clipped: the value is {note}.")
    if age_years is None:
        out.warnings.append("Age unknown: no Z-score (give --age).")
    else:
        out.z_score = z_score(value, sex, age_years, table)
    return out
