"""Self-contained HTML report of a SpineBMD result (PNG figures embedded as base64)."""

from __future__ import annotations

import base64
import datetime as _dt
import html

from .. import __version__
from . import figures


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fmt(v, nd=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.banner{background:#b00020;color:#fff;padding:8px 12px;font-weight:bold;border-radius:4px;margin:8px 0}
.summary{font-size:16px;background:#f6f8fa;padding:10px 14px;border-radius:6px}
.warn{color:#8a4b00} .cat-normal{color:#137333} .cat-osteopenia{color:#b06000} .cat-osteoporosis{color:#b00020}
.figs img{max-width:100%;margin:6px 12px 6px 0;vertical-align:top} .small{font-size:12px;color:#555}
"""


def render_bmd_report(result, image) -> str:
    """HTML text for a ``BMDResult`` of ``image`` (Image)."""
    from ..bmd.interpret import default_table, parse_sex

    s = result.summary
    meta = image.metadata or {}
    phantom = bool(meta.get("phantom")) or bool(s.get("phantom"))
    parts: list[str] = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>SpineBMD report</title>",
                        f"<style>{CSS}</style></head><body>", "<h1>SpineBMD report</h1>"]
    parts.append(f"<div class='small'>spinekit {__version__} · {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} · "
                 f"segmentation: {html.escape(str(s.get('segmentation_backend')))} · ROI: {html.escape(str(s.get('roi_mode')))}"
                 "</div>")
    if phantom:
        parts.append("<div class='banner'>DIGITAL PHANTOM — this report is computed on a synthetic digital phantom, "
                     "not on a patient.</div>")
    if s.get("labels_uncertain"):
        parts.append("<div class='banner'>Level names are uncertain (no anatomical anchor in view, anchors that disagree, or slices too thick): check the labels.</div>")

    # summary
    cat = s.get("category")
    used = s.get("levels_used") or []
    pair = "-".join(used) if used else "L1-L2"
    if s.get("vbmd_l1_l2") is not None:
        line = (f"{html.escape(pair)} mean vBMD <b>{s['vbmd_l1_l2']:.1f} mg/cm³</b> "
                f"({html.escape(str(s['calibration']['mineral']).upper())}) — ACR: "
                f"<b class='cat-{cat}'>{html.escape(str(cat))}</b>")
    else:
        line = "No L1-L2 vBMD (see the warnings)."
    extras = []
    for key, label in (("t_score", "T-score"), ("z_score", "Z-score"), ("bmd_age", "BMD age (y)")):
        if s.get(key) is not None:
            extras.append(f"{label} {s[key]:.1f}")
    if s.get("age_years") is not None or s.get("sex"):
        extras.append(f"patient: {_fmt(s.get('sex'))}, {_fmt(s.get('age_years'), 0)} y")
    parts.append(f"<div class='summary'>{line}<br>{' · '.join(extras)}</div>")
    if s.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in s["warnings"]) + "</ul>")

    # figures
    names = [r.level for r in result.levels]
    reference = None
    ref_label = ""
    sex = parse_sex(s.get("sex"))
    if sex is not None:
        table = default_table()
        if s.get("age_years") is not None:
            reference = table.band(sex, float(s["age_years"]))
            ref_label = f"reference {sex}, {s['age_years']:.0f} y (mean ± SD)"
        else:
            m, sd, _ = table.peak(sex)
            reference = (m, sd)
            ref_label = f"young-adult reference {sex} (mean ± SD)"
    figs = [
        _img(figures.sagittal_overlay_png(image.array, image.spacing_zyx_mm, result.segmentation.bodies.array,
                                          result.roi_labels, image.direction), "sagittal overlay"),
        _img(figures.vbmd_chart_png(names, [r.vbmd_mg_cm3 for r in result.levels], reference=reference,
                                    reference_label=ref_label, used=used), "vBMD per level"),
    ]
    parts.append("<h2>Images</h2><div class='figs'>" + "".join(figs) + "</div>")

    # table
    cols = [("level", "Level", 0), ("vbmd_mg_cm3", "vBMD mg/cm³", 1), ("trabecular_hu_mean", "HU mean", 1),
            ("trabecular_hu_median", "HU median", 1), ("roi_voxels", "ROI voxels", 0),
            ("body_volume_cm3", "Body cm³", 1), ("height_anterior_mm", "Ha mm", 1),
            ("height_middle_mm", "Hm mm", 1), ("height_posterior_mm", "Hp mm", 1),
            ("genant_grade", "Genant", 0), ("flags", "Flags", 0)]
    rows = ["<table><tr>" + "".join(f"<th class='{'l' if k in ('level', 'flags') else ''}'>{h}</th>" for k, h, _ in cols) + "</tr>"]
    for r in result.levels:
        cells = []
        for k, _, nd in cols:
            v = getattr(r, k)
            if k == "flags":
                v = ", ".join(v)
            cells.append(f"<td class='{'l' if k in ('level', 'flags') else ''}'>{_fmt(v, nd)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    parts.append("<h2>Per level</h2>" + "".join(rows))

    # QC
    c = s.get("calibration", {})
    ph = s.get("contrast_phase", {})
    qc = ["<table>",
          f"<tr><th class='l'>Calibration</th><td class='l'>{_fmt(c.get('mode'))} ({_fmt(c.get('mineral'))})"
          f"{' — ' + html.escape(c['error']) if c.get('error') else ''}</td></tr>",
          f"<tr><th class='l'>Effective energy</th><td class='l'>{_fmt(c.get('effective_kev'))} keV</td></tr>",
          f"<tr><th class='l'>Fit residual</th><td class='l'>{_fmt(c.get('residual'), 2)} HU</td></tr>",
          "<tr><th class='l'>Reference tissues (HU)</th><td class='l'>"
          + ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in (c.get("tissue_hu") or {}).items())
          + (f"; not found: {html.escape(', '.join(c['missing_tissues']))}" if c.get("missing_tissues") else "")
          + "</td></tr>",
          f"<tr><th class='l'>Contrast phase</th><td class='l'>detected {_fmt(ph.get('detected'))}"
          f" (confidence {_fmt(ph.get('confidence'), 2)}), used {_fmt(ph.get('used'))}, "
          f"{'corrected to native (Toelly 2017)' if ph.get('corrected') else 'no correction'}</td></tr>",
          "<tr><th class='l'>Levels excluded from the mean</th><td class='l'>"
          + (", ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in (s.get("excluded_levels") or {}).items()) or "none")
          + "</td></tr>",
          "</table>"]
    parts.append("<h2>Quality control</h2>" + "".join(qc))
    parts.append("<p class='small'>ACR/ISCD QCT categories on the mean trabecular vBMD of two lumbar vertebrae: "
                 "&gt; 120 normal, 80–120 osteopenia, &lt; 80 osteoporosis (mg/cm³). Normative reference: "
                 "spinekit/data/normative_qct.csv (Cheng 2021 anchors, interpolated bands; see normative_qct.md). "
                 "Opportunistic, phantomless vBMD is not a diagnostic QCT measurement.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
