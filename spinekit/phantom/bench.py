"""Bench rows for the CT phantom: generation time and memory at clinical size, and the
self-consistency of its truth (core HU, label volume against the analytic volume)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
from scipy import ndimage


def _row(metric, value, unit="", target=""):
    return {"section": "phantom", "metric": metric, "value": value, "unit": unit, "target": target}


def _core_errors_hu(ph, margin_mm: float = 4.0) -> np.ndarray:
    """Mean HU of each body eroded by margin_mm minus its true trabecular HU."""
    out = []
    for t in ph.truth["levels"].values():
        body = ph.bodies.array == t["verse_id"]
        core = ndimage.distance_transform_edt(body, sampling=ph.image.spacing_zyx_mm) > margin_mm
        if core.sum() > 10:
            out.append(float(ph.image.array[core].mean()) - t["true_trabecular_hu"])
    return np.array(out)


def run_bench(quick: bool = False) -> list[dict]:
    from .ct import CTPhantomConfig, generate_ct_phantom

    rows = []
    cases = [("512x512x400, 0.8x0.8x1.0 mm, T8-L5", dict(first_level="T8", last_level="L5",
                                                       shape_zyx=(400, 512, 512), spacing_mm=(0.8, 0.8, 1.0)))]
    if not quick:
        cases.append(("T1-L5 at 1.5 mm", dict(first_level="T1", last_level="L5", spacing_mm=(1.5, 1.5, 1.5))))
    for label, kwargs in cases:
        t0 = time.perf_counter()
        ph = generate_ct_phantom(CTPhantomConfig(seed=1, **kwargs))
        dt = time.perf_counter() - t0
        rows.append(_row(f"generate {label} ({'x'.join(map(str, ph.image.shape[::-1]))})", dt, "s", "seconds"))
        del ph
        # peak of numpy + Python allocations (numpy reports to tracemalloc), a second run
        tracemalloc.start()
        ph = generate_ct_phantom(CTPhantomConfig(seed=1, **kwargs))
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append(_row(f"peak allocated memory, {label}", peak_bytes / 1024**3, "GiB"))
        del ph
    ph = generate_ct_phantom(CTPhantomConfig(first_level="T10", last_level="L5", spacing_mm=(1.0, 1.0, 1.0),
                                             fractures={"L1": ("wedge", 2)}))
    rows.append(_row("trabecular core mean HU - truth (max |error| T10-L5, 1 mm, noise 10 HU)",
                     float(np.abs(_core_errors_hu(ph)).max()), "HU", "< 1"))
    vol = [abs(t["body_volume_cm3"] / t["body_volume_analytic_cm3"] - 1) for t in ph.truth["levels"].values()]
    rows.append(_row("body volume of the label vs analytic (max over levels, 1 mm)", 100 * max(vol), "%", "< 3"))
    return rows
