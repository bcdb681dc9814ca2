"""Morphometry: heights vs analytic truth, Genant grades for wedge / biconcave / crush, volume."""

from __future__ import annotations

import numpy as np
import pytest

from spinekit.bmd.bench import synthetic_column
from spinekit.morphometry import KONG_RATIO_LIMIT, genant_grade, measure_morphometry

SPACING = (0.5, 1.0, 1.0)  # fine z: the 20-25 % grade-1 band is only 1.3 mm of a 26 mm body


@pytest.mark.parametrize("kind", ["wedge", "biconcave", "crush"])
@pytest.mark.parametrize("loss,grade", [(0.10, 0), (0.225, 1), (0.32, 2), (0.50, 3)])
def test_genant_grade_and_heights(kind, loss, grade):
    tilt = 18.0 if grade in (1, 3) else 0.0  # half the cases on a tilted column (own frame)
    col = synthetic_column(spacing_zyx_mm=SPACING, deformity={"L2": (kind, loss)}, tilt_deg=tilt)
    res = measure_morphometry(col.bodies, col.spacing_zyx_mm)
    m, t = res["L2"], col.truth["L2"]
    assert genant_grade(t["height_loss"]) == grade  # the truth itself sits in the intended band
    for k in ("height_anterior_mm", "height_middle_mm", "height_posterior_mm"):
        # within one voxel of the coarsest spacing
        assert abs(getattr(m, k) - t[k]) <= 1.0, (k, getattr(m, k), t[k])
    assert abs(m.height_loss - t["height_loss"]) < 0.02
    assert m.genant_grade == grade
    assert m.deformity == (kind if grade else None)
    # the undeformed neighbours stay grade 0
    assert all(res[n].genant_grade == 0 for n in ("T12", "L4"))
    if grade == 3:
        assert "kong_ratio_below_3sd" in m.flags  # ratio 0.5 < 0.91 - 3 x 0.08


def test_body_volume_and_dimensions():
    depth, width, height = 30.0, 40.0, 25.0
    col = synthetic_column(spacing_zyx_mm=(1.0, 1.0, 1.0), depth_mm=depth, width_mm=width, height_mm=height)
    res = measure_morphometry(col.bodies, (1.0, 1.0, 1.0))
    analytic_cm3 = np.pi * depth / 2 * width / 2 * height / 1000.0
    for m in res.values():
        assert abs(m.body_volume_cm3 - analytic_cm3) / analytic_cm3 < 0.04
        assert abs(m.depth_mm - depth) <= 1.0 and abs(m.width_mm - width) <= 1.0


def test_genant_boundaries():
    assert genant_grade(0.199) == 0
    assert genant_grade(0.20) == 1 and genant_grade(0.249) == 1
    assert genant_grade(0.25) == 2 and genant_grade(0.40) == 2
    assert genant_grade(0.401) == 3
    assert genant_grade(None) is None
    assert abs(KONG_RATIO_LIMIT - 0.67) < 1e-9


def test_fragment_labelled_as_neighbour_does_not_tilt_the_level():
    """A small blob far in front of the spine carrying the next level's id (a vessel labelled as
    a vertebra at the edge of the field of view) must not re-orient its neighbour's frame."""
    col = synthetic_column(spacing_zyx_mm=(1.0, 1.0, 1.0), tilt_deg=10.0)
    clean = measure_morphometry(col.bodies, (1.0, 1.0, 1.0))
    ids = sorted(int(i) for i in np.unique(col.bodies) if i)
    top = max(ids, key=lambda i: np.nonzero(col.bodies == i)[0].mean())  # most cranial level
    zs, ys, xs = np.nonzero(col.bodies == top)
    bodies = col.bodies.copy()
    # a 6 mm cube of the top level's id placed 40 mm anterior of its body, at its top
    z0, y0, x0 = zs.max() - 6, max(ys.min() - 40, 0), int(xs.mean())
    bodies[bodies == top] = 0
    bodies[z0:z0 + 6, y0:y0 + 6, x0:x0 + 6] = top
    below = max((i for i in ids if i != top), key=lambda i: np.nonzero(col.bodies == i)[0].mean())
    res = measure_morphometry(bodies, (1.0, 1.0, 1.0))
    name = [k for k, v in clean.items() if v.verse_id == below][0]
    for k in ("height_anterior_mm", "height_middle_mm", "height_posterior_mm"):
        assert abs(getattr(res[name], k) - getattr(clean[name], k)) <= 0.5, k
    assert res[name].genant_grade == clean[name].genant_grade == 0
