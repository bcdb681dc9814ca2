"""Contrast phase from vessel HU, and the vBMD correction for contrast-enhanced scans.

Detection is a small rule set on the aorta and IVC (or portal vein) HU; the user may override
the phase in the pipeline, these functions just take it. Correction: Toelly et al. 2017
(linear conversion of arterial / portal-venous vBMD to the native equivalent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

PHASES = ("native", "arterial", "portal-venous")

# Thresholds (HU). Unenhanced blood reads 30-60 HU (haematocrit-dependent; NIST "Blood (ICRP)"
# is ~50-55 HU at 60-80 keV); TotalSegmentator's phase model and the Comp2Comp contrast
# classifier likewise separate native scans by an aorta below ~70-100 HU. Arterial scans (bolus
# tracking triggers at ~100-150 HU and acquires later) show the aorta well above 200 HU while the
# infrarenal IVC is still unenhanced or barely enhanced; in the portal-venous phase (60-80 s)
# the aorta falls to ~120-200 HU and the IVC/portal vein approach it.
NATIVE_AORTA_MAX_HU = 70.0           # aorta below this: native
ARTERIAL_AORTA_MIN_HU = 200.0        # aorta above this with a much darker IVC: arterial
ARTERIAL_GAP_MIN_HU = 60.0           # aorta − IVC at least this in the arterial phase
PORTAL_VENOUS_GAP_MAX_HU = 60.0      # aorta − IVC/portal vein within this: portal-venous
# Width (HU) of the soft margin around each threshold used for the confidence.
CONFIDENCE_MARGIN_HU = 25.0

# Toelly et al. 2017 (Eur Radiol): native = a + b · contrast-enhanced vBMD (mg/cm³).
TOELLY_2017: dict[str, tuple[float, float]] = {
    "native": (0.0, 1.0),
    "arterial": (-2.287, 0.964),
    "portal-venous": (-4.517, 0.978),
}


@dataclass
class ContrastPhase:
    detected: str                     # 'native' | 'arterial' | 'portal-venous' | 'unknown'
    confidence: float
    aorta_hu: float | None
    ivc_hu: float | None
    features: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"detected": self.detected, "confidence": round(float(self.confidence), 3),
                "aorta_hu": None if self.aorta_hu is None else round(float(self.aorta_hu), 1),
                "ivc_hu": None if self.ivc_hu is None else round(float(self.ivc_hu), 1),
                "features": self.features}


def _sig(x: float) -> float:
    """Soft step: 0.5 at the threshold, ~0.88 one margin beyond it."""
    return float(1.0 / (1.0 + np.exp(-2.0 * x / CONFIDENCE_MARGIN_HU)))


def _get(hu: Mapping[str, float], *names: str) -> float | None:
    for n in names:
        v = hu.get(n)
        if v is not None and np.isfinite(v):
            return float(v)
    return None


def detect_contrast_phase(tissues, metadata: Mapping[str, Any] | None = None) -> ContrastPhase:
    """Phase from the aorta HU and the IVC (or portal vein) HU of a ``ReferenceTissues``
    (or a plain dict of tissue HU). 'unknown' when the aorta was not found; the DICOM
    ContrastBolusAgent tag, when present, is recorded and breaks ties toward enhancement."""
    hu = dict(getattr(tissues, "hu", tissues) or {})
    aorta = _get(hu, "aorta", "blood")
    ivc = _get(hu, "ivc", "portal_vein")
    agent = None
    if metadata:
        agent = metadata.get("ContrastBolusAgent") or metadata.get("contrast_bolus_agent")
    features: dict[str, Any] = {"aorta_hu": aorta, "ivc_hu": ivc,
                                "aorta_minus_ivc_hu": None if aorta is None or ivc is None else aorta - ivc,
                                "contrast_bolus_agent": None if agent in (None, "") else str(agent)}
    if aorta is None:
        features["reason"] = "aorta not found"
        return ContrastPhase("unknown", 0.0, None, ivc, features)

    p_native = _sig(NATIVE_AORTA_MAX_HU - aorta)
    if features["contrast_bolus_agent"] and aorta < NATIVE_AORTA_MAX_HU + CONFIDENCE_MARGIN_HU:
        # the tag says contrast was given; an aorta at the border is then more likely late/venous
        p_native *= 0.7
    if p_native >= 0.5:
        return ContrastPhase("native", p_native, aorta, ivc, features)

    # enhanced: arterial vs portal-venous
    if ivc is not None:
        gap = aorta - ivc
        p_art = _sig(aorta - ARTERIAL_AORTA_MIN_HU) * _sig(gap - ARTERIAL_GAP_MIN_HU)
        p_pv = _sig(PORTAL_VENOUS_GAP_MAX_HU - gap)
        # normalise the two enhanced hypotheses
        s = p_art + p_pv
        p_art, p_pv = (p_art / s, p_pv / s) if s > 0 else (0.5, 0.5)
    else:
        # without a vein only the aorta level speaks; confidence is kept lower
        features["reason"] = "IVC/portal vein not found: phase from the aorta HU alone"
        p_art = 0.8 * _sig(aorta - ARTERIAL_AORTA_MIN_HU) + 0.1
        p_pv = 1.0 - p_art
    enhanced = 1.0 - p_native
    if p_art > p_pv:
        return ContrastPhase("arterial", enhanced * p_art, aorta, ivc, features)
    return ContrastPhase("portal-venous", enhanced * p_pv, aorta, ivc, features)


def correct_vbmd_for_phase(vbmd_mg_cm3, phase: str):
    """Native-equivalent vBMD (mg/cm³) from a contrast-enhanced measurement (Toelly 2017).

    native: identity; arterial: −2.287 + 0.964·x; portal-venous: −4.517 + 0.978·x.
    'unknown' (or any other phase) is returned unchanged: no evidence for a correction.
    """
    a, b = TOELLY_2017.get(phase, (0.0, 1.0))
    out = a + b * np.asarray(vbmd_mg_cm3, dtype=float)
    return float(out) if np.ndim(out) == 0 else out
