"""Bench rows for the CT phantom: generation time and memory at clinical size."""

from __future__ import annotations

import resource
import time


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_bench(quick: bool = False) -> list[dict]:
    from .ct import CTPhantomConfig, generate_ct_phantom

    rows = []
    cases = [("512x512x400, 0.8x0.8x1.0 mm, T8-L5", dict(first_level="T8", last_level="L5",
                                                       shape_zyx=(400, 512, 512), spacing_mm=(0.8, 0.8, 1.0)))]
    if not quick:
        cases.append(("T1-L5 at 1.5 mm", dict(first_level="T1", last_level="L5", spacing_mm=(1.5, 1.5, 1.5))))
    for label, kwargs in cases:
        rss0 = _peak_rss_gib()
        t0 = time.perf_counter()
        ph = generate_ct_phantom(CTPhantomConfig(seed=1, **kwargs))
        dt = time.perf_counter() - t0
        rows.append({"section": "phantom", "metric": f"generate {label} ({'x'.join(map(str, ph.image.shape[::-1]))})",
                     "value": dt, "unit": "s", "target": "seconds"})
        rows.append({"section": "phantom", "metric": f"peak memory growth, {label}",
                     "value": max(_peak_rss_gib() - rss0, 0.0), "unit": "GiB", "target": ""})
        del ph
    return rows
