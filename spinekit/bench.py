"""`make bench`: speed, memory and accuracy figures printed as one table.

Each area exposes ``run_bench(quick: bool) -> list[dict]`` with rows
``{"section", "metric", "value", "unit", "target"}``; this module collects them, prints the
table and writes it to out/bench/bench.md. Figures are measured, never asserted here.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
import traceback
from pathlib import Path

AREAS = (
    "spinekit.image_bench",
    "spinekit.phantom.bench",
    "spinekit.segmentation.bench",
    "spinekit.bmd.calibration_bench",
    "spinekit.bmd.bench",
)


def _fmt(value) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    header = ("section", "metric", "value", "unit", "target")
    cells = [header] + [tuple(_fmt(r.get(k, "")) for k in header) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(header))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spinekit.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer phantom cases")
    parser.add_argument("--only", help="comma-separated area module names (e.g. spinekit.bmd.bench)")
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args(argv)

    areas = args.only.split(",") if args.only else AREAS
    rows: list[dict] = []
    for name in areas:
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(name)
            rows.extend(module.run_bench(quick=args.quick))
        except ModuleNotFoundError as exc:
            rows.append({"section": name, "metric": "not available", "value": str(exc), "unit": "", "target": ""})
        except Exception as exc:  # a failing area is reported, the others still run
            traceback.print_exc()
            rows.append({"section": name, "metric": "FAILED", "value": f"{type(exc).__name__}: {exc}", "unit": "", "target": ""})
        print(f"bench: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    rows.append({"section": "process", "metric": "peak resident memory of the bench process", "value": peak_gib,
                 "unit": "GiB", "target": ""})
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
