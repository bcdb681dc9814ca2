"""Interpretation: ACR boundaries, pair fallback, T/Z scores and BMD age against the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinekit.bmd import interpret as ip
from spinekit.errors import InputError


def test_acr_boundaries():
    assert ip.acr_category(120.01) == "normal"
    assert ip.acr_category(120.0) == "osteopenia"
    assert ip.acr_category(80.0) == "osteopenia"
    assert ip.acr_category(79.99) == "osteoporosis"
    assert ip.acr_category(None) is None and ip.acr_category(float("nan")) is None


def test_pair_fallback_states_which():
    vals = {"T12": 100.0, "L1": 90.0, "L2": 110.0, "L3": 130.0, "L4": 70.0}
    r = ip.interpret(vals)
    assert r.levels_used == ["L1", "L2"] and r.vbmd_mg_cm3 == pytest.approx(100.0) and r.category == "osteopenia"
    r = ip.interpret(vals, excluded={"L1": "metal in the ROI"})
    assert r.levels_used == ["L2", "L3"] and r.vbmd_mg_cm3 == pytest.approx(120.0)
    assert any("L2-L3 used instead of L1-L2" in w for w in r.warnings)
    assert any("L1" in w and "metal" in w for w in r.warnings)
    r = ip.interpret(vals, excluded={"L2": "fracture"})
    assert r.levels_used == ["T12", "L1"]
    r = ip.interpret({"T12": 100.0, "T11": 90.0})
    assert r.vbmd_mg_cm3 is None and r.category is None and r.levels_used == []
    assert any("No valid pair" in w for w in r.warnings)


def test_scores_against_the_table():
    table = ip.default_table()
    rows = table.rows
    for sex in ("F", "M"):
        peak = rows[rows.sex == sex].mean_mg_cm3.max()
        peak_sd = float(rows[(rows.sex == sex) & (rows.mean_mg_cm3 == peak)].sd_mg_cm3.iloc[0])
        assert ip.t_score(peak, sex) == pytest.approx(0.0)
        assert ip.t_score(peak - 2 * peak_sd, sex) == pytest.approx(-2.0)
        band = rows[(rows.sex == sex) & (rows.age_low == 60)].iloc[0]
        assert ip.z_score(band.mean_mg_cm3, sex, 62) == pytest.approx(0.0)
        assert ip.z_score(band.mean_mg_cm3 - band.sd_mg_cm3, sex, 62) == pytest.approx(-1.0)
        # BMD age inverts the band-midpoint curve: a band mean maps to its midpoint age
        for lo in (40, 60, 75):
            b = rows[(rows.sex == sex) & (rows.age_low == lo)].iloc[0]
            age, note = ip.bmd_age(float(b.mean_mg_cm3), sex)
            assert note is None and age == pytest.approx((b.age_low + b.age_high + 1) / 2, abs=1e-6)
        # half-way between two band means -> half-way between their midpoints
        b1 = rows[(rows.sex == sex) & (rows.age_low == 50)].iloc[0]
        b2 = rows[(rows.sex == sex) & (rows.age_low == 55)].iloc[0]
        age, _ = ip.bmd_age(float((b1.mean_mg_cm3 + b2.mean_mg_cm3) / 2), sex)
        assert age == pytest.approx(55.0, abs=1e-6)
        # outside the table: clipped to the oldest band still at the peak / the oldest band's
        # midpoint, with a note
        at_peak = rows[(rows.sex == sex) & (rows.mean_mg_cm3 == peak)].sort_values("age_low").iloc[-1]
        oldest = rows[rows.sex == sex].sort_values("age_low").iloc[-1]
        age, note = ip.bmd_age(peak + 50, sex)
        assert note is not None and age == pytest.approx((at_peak.age_low + at_peak.age_high + 1) / 2)
        age, note = ip.bmd_age(1.0, sex)
        assert note is not None and age == pytest.approx((oldest.age_low + oldest.age_high + 1) / 2)


def test_published_anchors_in_the_table():
    rows = ip.default_table().rows
    get = lambda s, lo: float(rows[(rows.sex == s) & (rows.age_low == lo)].mean_mg_cm3.iloc[0])
    # Cheng 2021: peak 185 (women) / 177 (men) at 30-34 y; 62 / 92 at 80 y
    assert get("F", 30) == 185.0 and get("M", 30) == 177.0
    assert get("F", 80) == 62.0 and get("M", 80) == 92.0
    assert rows.source.str.len().min() > 10  # every row names its source
    for sex in ("F", "M"):
        means = rows[rows.sex == sex].sort_values("age_low").mean_mg_cm3.to_numpy()
        assert np.all(np.diff(means) <= 0)  # never rises with age


def test_interpret_with_age_and_sex():
    r = ip.interpret({"L1": 100.0, "L2": 110.0}, age_years=ip.parse_age_years("065Y"), sex="F")
    tbl = ip.default_table()
    m, sd = tbl.band("F", 65)
    assert r.z_score == pytest.approx((105.0 - m) / sd)
    assert r.t_score == pytest.approx((105.0 - 185.0) / tbl.peak("F")[1])
    assert 60 < r.bmd_age < 70
    r = ip.interpret({"L1": 100.0, "L2": 110.0})
    assert r.t_score is None and any("Sex unknown" in w for w in r.warnings)


def test_age_and_sex_parsing():
    assert ip.parse_age_years("065Y") == 65.0
    assert ip.parse_age_years("018M") == pytest.approx(1.5)
    assert ip.parse_age_years(55) == 55.0
    assert ip.parse_age_years("") is None
    with pytest.raises(InputError):
        ip.parse_age_years("sixty")
    assert ip.parse_sex("female") == "F" and ip.parse_sex("M") == "M" and ip.parse_sex("O") is None


def test_custom_table(tmp_path):
    p = tmp_path / "t.csv"
    pd.DataFrame({"sex": ["F", "F", "F"], "age_low": [30, 50, 70], "age_high": [49, 69, 89],
                  "mean_mg_cm3": [200.0, 150.0, 100.0], "sd_mg_cm3": [25.0, 25.0, 25.0],
                  "source": ["test"] * 3}).to_csv(p, index=False)
    t = ip.NormativeTable.load(p)
    assert ip.bmd_age(125.0, "F", t)[0] == pytest.approx(70.0)
    assert ip.t_score(150.0, "F", t) == pytest.approx(-2.0)
    with pytest.raises(InputError):
        ip.NormativeTable.load(tmp_path / "missing.csv")


def test_pairs_stay_within_t12_l4():
    # only L4 and L5 valid: L4-L5 is not an ACR pair (range T12-L4)
    r = ip.interpret({"L4": 100.0, "L5": 100.0, "L1": 90.0}, excluded={"L1": "fracture"})
    assert r.vbmd_mg_cm3 is None and r.category is None
    r = ip.interpret({"L3": 100.0, "L4": 110.0})
    assert r.levels_used == ["L3", "L4"] and r.category == "osteopenia"
