"""HU -> mineral density (mg/cm³): phantomless, asynchronous and phantom calibration.

Every mode returns a ``Calibration``: a straight line HU = intercept + slope·ρ (ρ in mg/cm³ of
HA or K₂HPO₄) plus what was measured on the way (tissue HU, fitted energy, residual), so the
mode used and its QC always travel with the numbers.

- phantomless (default; Michalski et al. 2020 idea): the effective energy E is the one at which
  NIST attenuation (``spinekit.physics``) best explains the HU of air, subcutaneous fat,
  paraspinal muscle and -- native scans only -- blood; then ρ = density_from_hu(HU, E).
- phantom: rods of known concentration in the same scan (Mindways or ESP convention).
- asynchronous: per-scanner coefficients from a phantom scan on another day, stored in a
  ``CalibrationTable`` (JSON) keyed by manufacturer, model, kVp and (optionally) kernel.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from scipy.optimize import minimize_scalar

from .. import physics
from ..errors import InputError

MODES = ("phantomless", "asynchronous", "phantom")
MINERALS = tuple(physics.MINERALS)
CONVENTIONS = ("mindways", "esp")

# Mindways QCT Pro convention (DESIGN.md section 4): HU_rod = ρ_water,rod + σ·ρ_K2HPO4,rod + β;
# BMD = (HU − β_CT)/σ_CT with σ_CT = σ − 0.2174 and β_CT = β + 999.6.
MINDWAYS_SIGMA_OFFSET = 0.2174
MINDWAYS_BETA_OFFSET = 999.6
MINDWAYS_DEFAULT_WATER_MG_CM3 = 1000.0

# Phantomless fit: prior uncertainty (HU) of each tissue's model, i.e. how far a real tissue may
# sit from its NIST composition. Fat carries most of the energy information (its HU moves
# ~1 HU/keV near 70 keV); muscle and blood move < 0.2 HU/keV; air is -1000 HU at every energy
# by the definition of HU, so it only checks the scanner's air calibration.
TISSUE_SIGMA_HU: dict[str, float] = {
    "air": 20.0,
    "fat": 8.0,
    "muscle": 10.0,
    "blood": 10.0,
    "cortical_bone": 80.0,
}
# Tissues the phantomless fit uses; blood only on native scans (contrast raises it).
PHANTOMLESS_TISSUES = ("air", "fat", "muscle", "blood", "cortical_bone")
# Huber scale (in units of sigma) of the robust fit: a tissue far off its model counts linearly.
HUBER_K = 1.5
# The optional linear scanner correction HU_true = a·HU_meas + b is applied only when it is
# well-determined: at least this many tissues and a slope within these bounds.
SCANNER_CORRECTION_MIN_TISSUES = 3
SCANNER_CORRECTION_SLOPE_BOUNDS = (0.9, 1.1)


@dataclass
class Calibration:
    """HU -> mg/cm³ as a line: ρ = (HU − intercept_hu) / slope_hu_per_mg_cm3."""

    mode: str
    mineral: str
    slope_hu_per_mg_cm3: float
    intercept_hu: float
    effective_kev: float | None = None
    tissue_hu: dict[str, float] = field(default_factory=dict)
    residual_hu: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_mg_cm3(self, hu):
        """Mineral density (mg/cm³) of a CT number or an array of them."""
        out = (np.asarray(hu, dtype=float) - self.intercept_hu) / self.slope_hu_per_mg_cm3
        return float(out) if np.ndim(out) == 0 else out

    def to_hu(self, density_mg_cm3):
        """Inverse of ``to_mg_cm3`` (for QC plots and tests)."""
        out = self.intercept_hu + self.slope_hu_per_mg_cm3 * np.asarray(density_mg_cm3, dtype=float)
        return float(out) if np.ndim(out) == 0 else out

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "mineral": self.mineral,
            "effective_kev": _round(self.effective_kev, 2),
            "tissue_hu": {k: _round(v, 2) for k, v in self.tissue_hu.items()},
            "residual": _round(self.residual_hu, 3),
            "slope": _round(self.slope_hu_per_mg_cm3, 6),
            "intercept": _round(self.intercept_hu, 4),
            "details": _jsonable(self.details),
        }


def _round(v, nd):
    return None if v is None else round(float(v), nd)


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _check_mineral(mineral: str) -> str:
    m = str(mineral).lower()
    if m not in MINERALS:
        raise InputError(f"mineral '{mineral}' is not supported (choose one of {', '.join(MINERALS)}).")
    return m


# --- phantomless --------------------------------------------------------------------------
def _tissue_dict(tissue_hu) -> tuple[dict[str, float], list[str]]:
    """Accept a plain dict or a ReferenceTissues; return (hu per tissue, warnings)."""
    warnings: list[str] = []
    if hasattr(tissue_hu, "hu"):
        hu = dict(tissue_hu.hu)
        warnings = list(getattr(tissue_hu, "warnings", []))
    else:
        hu = dict(tissue_hu or {})
    return {k: float(v) for k, v in hu.items() if v is not None and np.isfinite(v)}, warnings


def _model_hu(tissues: Iterable[str], kev: float) -> np.ndarray:
    return np.array([physics.tissue_hu(t, kev) for t in tissues])


def _huber(r: np.ndarray, k: float = HUBER_K) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= k, 0.5 * r * r, k * (a - 0.5 * k))


def fit_effective_energy(tissue_hu: Mapping[str, float], kev_range=physics.ENERGY_RANGE_KEV,
                         sigma_hu: Mapping[str, float] | None = None) -> tuple[float, dict[str, float], float]:
    """Effective energy (keV) whose NIST tissue HU best explain the measured ones.

    Returns (kev, residual per tissue in HU (measured − model), weighted RMS residual in HU).
    A coarse 1 keV grid finds the basin, a bounded 1-D search refines it (the cost is smooth).
    """
    sig = {**TISSUE_SIGMA_HU, **(sigma_hu or {})}
    names = [t for t in tissue_hu if t in sig]
    meas = np.array([tissue_hu[t] for t in names])
    w = np.array([1.0 / sig[t] for t in names])

    def cost(kev: float) -> float:
        return float(np.sum(_huber((meas - _model_hu(names, kev)) * w)))

    lo, hi = float(kev_range[0]), float(kev_range[1])
    grid = np.arange(lo, hi + 0.5, 1.0)
    costs = np.array([cost(e) for e in grid])
    i = int(np.argmin(costs))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(cost, bounds=(a, b), method="bounded", options={"xatol": 0.01})
    kev = float(res.x) if res.fun <= costs[i] else float(grid[i])
    resid = {t: float(m - physics.tissue_hu(t, kev)) for t, m in zip(names, meas)}
    rms = float(np.sqrt(np.sum((np.array(list(resid.values())) * w) ** 2) / np.sum(w * w)))
    return kev, resid, rms


def calibrate_phantomless(tissue_hu, phase: str = "native", mineral: str = "ha",
                          scanner_correction: bool = False) -> Calibration:
    """Internal (phantomless) calibration from reference-tissue HU.

    tissue_hu: dict of mean HU ('air', 'fat', 'muscle', 'blood' or 'aorta', optionally
    'cortical_bone') or a ``ReferenceTissues``. Blood (= aorta) is used only when ``phase`` is
    'native': contrast makes it brighter than its NIST composition.
    scanner_correction: also fit HU_true = a·HU_meas + b across the tissues at the fitted energy
    and apply it when it is well-determined; it is always reported in ``details``.
    The fitted energy, every tissue's HU and the residuals are kept for QC.
    """
    mineral = _check_mineral(mineral)
    hu, warnings = _tissue_dict(tissue_hu)
    if "blood" not in hu and "aorta" in hu and phase == "native":
        hu["blood"] = hu["aorta"]  # unenhanced aortic blood is the blood reference
    used = {t: hu[t] for t in PHANTOMLESS_TISSUES if t in hu}
    excluded: list[str] = []
    if phase != "native" and ("blood" in used or "aorta" in hu):
        used.pop("blood", None)
        excluded.append("blood")  # contrast makes blood brighter than its NIST composition
    if "fat" not in used:
        # Without fat the energy is barely determined (muscle/blood move < 0.2 HU/keV).
        raise InputError("phantomless calibration needs the subcutaneous-fat HU, which was not found; "
                         "use phantom or asynchronous calibration for this scan.")
    if len([t for t in used if t != "air"]) < 2:
        warnings.append("Phantomless calibration rests on fewer than two soft tissues; the fitted energy is weakly determined.")
    kev, resid, rms = fit_effective_energy(used)
    slope = physics.mineral_hu_per_mg_cm3(kev, 0.0, mineral)
    intercept = float(physics.trabecular_hu(0.0, kev, 0.0, mineral))

    # Optional linear scanner correction: least squares of model HU on measured HU.
    names = list(used)
    meas = np.array([used[t] for t in names])
    model = _model_hu(names, kev)
    corr: dict[str, Any] = {"a": 1.0, "b": 0.0, "applied": False}
    if len(names) >= 2 and np.ptp(meas) > 0:
        a, b = np.polyfit(meas, model, 1)
        corr.update(a=float(a), b=float(b))
        ok = (len(names) >= SCANNER_CORRECTION_MIN_TISSUES
              and SCANNER_CORRECTION_SLOPE_BOUNDS[0] <= a <= SCANNER_CORRECTION_SLOPE_BOUNDS[1])
        corr["well_determined"] = bool(ok)
        if scanner_correction and ok:
            # ρ = (a·HU + b − intercept)/slope  ->  line in measured HU
            slope, intercept = slope / a, (intercept - b) / a
            corr["applied"] = True
    details = {
        "phase": phase,
        "tissues_used": names,
        "tissues_excluded": excluded,
        "tissue_residual_hu": resid,
        "tissue_model_hu": {t: float(m) for t, m in zip(names, model)},
        "scanner_correction": corr,
        "marrow_fat_fraction_assumed": 0.0,
        "method": "NIST attenuation (xraylib) fit of the effective energy, Michalski et al. 2020",
        "warnings": warnings,
    }
    return Calibration("phantomless", mineral, float(slope), float(intercept), kev, dict(hu), rms, details)


# --- phantom ------------------------------------------------------------------------------
def mindways_fit(rod_hu, rod_k2hpo4_mg_cm3, rod_water_mg_cm3) -> tuple[float, float, float]:
    """Fit HU_rod − ρ_water,rod = σ·ρ_K2HPO4,rod + β; returns (σ, β, RMS residual HU)."""
    hu = np.asarray(rod_hu, float)
    rho = np.asarray(rod_k2hpo4_mg_cm3, float)
    water = np.asarray(rod_water_mg_cm3, float)
    sigma, beta = np.polyfit(rho, hu - water, 1)
    resid = hu - water - (sigma * rho + beta)
    return float(sigma), float(beta), float(np.sqrt(np.mean(resid ** 2)))


def mindways_ct_coefficients(sigma: float, beta: float) -> tuple[float, float]:
    """Mindways scan coefficients: σ_CT = σ − 0.2174, β_CT = β + 999.6 (BMD = (HU − β_CT)/σ_CT)."""
    return sigma - MINDWAYS_SIGMA_OFFSET, beta + MINDWAYS_BETA_OFFSET


def rod_model_hu(kev: float, mineral_mg_cm3, rod_water_mg_cm3=None, mineral: str = "k2hpo4"):
    """Physics HU of calibration rods: mineral in water. With ``rod_water_mg_cm3`` (Mindways
    certificate values) the water content is given; without it the mineral displaces water
    by its own volume (ESP-style rods in water-equivalent resin)."""
    rho = np.asarray(mineral_mg_cm3, float) / 1000.0
    if rod_water_mg_cm3 is None:
        water = (1.0 - rho / physics.MINERALS[mineral][1]) * physics.density_g_cm3("water")
    else:
        water = np.asarray(rod_water_mg_cm3, float) / 1000.0
    mu = water * physics.mass_attenuation_cm2_g("water", kev) + rho * physics.mass_attenuation_cm2_g(mineral, kev)
    return physics.hu_from_mu(mu, kev)


def _energy_from_rod_slope(slope: float, mineral: str, water) -> float:
    """Effective energy at which the physics rod slope (HU per mg/cm³) equals the fitted one."""
    def rod_slope(kev):
        w = None if water is None else [1000.0, 1000.0]
        return float(np.diff(rod_model_hu(kev, [0.0, 1.0], w, mineral))[0])
    res = minimize_scalar(lambda e: (rod_slope(e) - slope) ** 2, bounds=physics.ENERGY_RANGE_KEV,
                          method="bounded", options={"xatol": 0.01})
    return float(res.x)


def calibrate_phantom(rod_hu, rod_concentrations_mg_cm3, *, convention: str = "mindways",
                      mineral: str | None = None, rod_water_density_mg_cm3=None,
                      method: str = "physics") -> Calibration:
    """Calibration from phantom rods scanned with the patient (or on another day).

    rod_hu: mean HU per rod; rod_concentrations_mg_cm3: mineral per rod (same order;
    K₂HPO₄ for 'mindways', HA for 'esp').
    The convention's own line is always fitted and reported in ``details``:
    'mindways': HU − ρ_water = σ·ρ + β (ρ_water per rod from the phantom's certificate,
    ``rod_water_density_mg_cm3``; without it the classic line is fitted on HU directly and the
    physics method assumes 1000 mg/cm³ water per rod, with a warning), with the scan
    coefficients σ_CT = σ − 0.2174, β_CT = β + 999.6; 'esp': plain line HU = β + σ·ρ.
    method 'classic': BMD = (HU − β_CT)/σ_CT in the rods' mineral (QCT Pro / ESP practice;
    the marrow is then counted as water-equivalent).
    method 'physics' (default): the rods fix the scanner's effective energy (from σ) and its HU
    offset (from β); trabecular HU then go to mineral density with the NIST marrow model of
    ``spinekit.physics`` at that energy, in ``mineral`` (HA by default) -- the same model as
    the phantomless mode, but anchored on rods instead of body tissues.
    """
    convention = str(convention).lower()
    if convention not in CONVENTIONS:
        raise InputError(f"calibration convention '{convention}' is not known (choose mindways or esp).")
    if method not in ("physics", "classic"):
        raise InputError(f"phantom calibration method '{method}' is not known (choose physics or classic).")
    rod_mineral = "k2hpo4" if convention == "mindways" else "ha"
    mineral = _check_mineral(mineral or ("ha" if method == "physics" else rod_mineral))
    hu = np.asarray(rod_hu, float).ravel()
    rho = np.asarray(rod_concentrations_mg_cm3, float).ravel()
    if hu.size != rho.size:
        raise InputError(f"{hu.size} rod HU values were given for {rho.size} rod concentrations; they must match.")
    if hu.size < 2 or np.ptp(rho) <= 0:
        raise InputError("phantom calibration needs at least two rods of different concentration.")
    if not np.all(np.isfinite(hu)):
        raise InputError("a phantom rod has no valid HU (empty or missing rod mask).")
    water = None
    if rod_water_density_mg_cm3 is not None:
        water = np.asarray(rod_water_density_mg_cm3, float).ravel()
        if water.size != hu.size:
            raise InputError(f"rod water densities were given for {water.size} rods, but there are {hu.size} rods.")
    details: dict[str, Any] = {"convention": convention, "method": method, "rod_mineral": rod_mineral,
                               "rod_hu": hu.tolist(), "rod_mg_cm3": rho.tolist()}
    if convention == "mindways" and water is not None:
        sigma, beta, rms = mindways_fit(hu, rho, water)
        fitted = water + sigma * rho + beta
        sigma_ct, beta_ct = mindways_ct_coefficients(sigma, beta)
        details["rod_water_mg_cm3"] = water.tolist()
    else:
        sigma, beta = np.polyfit(rho, hu, 1)
        fitted = beta + sigma * rho
        rms = float(np.sqrt(np.mean((hu - fitted) ** 2)))
        sigma_ct, beta_ct = float(sigma), float(beta)
        if convention == "mindways":
            details["note"] = "no rod water densities given: plain line through the rods (sigma_CT = sigma, beta_CT = beta)"
    details.update(sigma=float(sigma), beta=float(beta), sigma_ct=float(sigma_ct), beta_ct=float(beta_ct),
                   rod_residual_hu=(hu - fitted).tolist())
    if sigma <= 0:
        raise InputError("the phantom rods do not brighten with concentration; check the rod order and masks.")
    rods = {f"rod{i + 1}": float(h) for i, h in enumerate(hu)}
    if method == "classic":
        if mineral != rod_mineral:
            raise InputError(f"classic {convention} calibration gives {rod_mineral.upper()} densities; "
                             f"use method 'physics' for {mineral.upper()}.")
        return Calibration("phantom", mineral, float(sigma_ct), float(beta_ct), None, rods, float(rms), details)

    # physics: energy from the rod slope, HU offset from the rods' water intercept
    water_fit = water if (convention == "mindways" and water is not None) else None
    if convention == "mindways" and water is None:
        # Mindways rods keep their water content near 1000 mg/cm³ (the certificate lists it per
        # rod); without the certificate assume exactly that rather than displacement by volume
        water_fit = np.full(hu.size, MINDWAYS_DEFAULT_WATER_MG_CM3)
        sigma, beta, rms = mindways_fit(hu, rho, water_fit)
        details["note"] = ("no rod water densities given: 1000 mg/cm3 water assumed in every rod; "
                           "give the phantom certificate values for full accuracy")
        details.setdefault("warnings", []).append(
            "Phantom calibration assumed 1000 mg/cm3 water in every rod because no certificate values were given.")
    kev = _energy_from_rod_slope(float(sigma), rod_mineral, water_fit)
    model = rod_model_hu(kev, rho, water_fit, rod_mineral)
    if water_fit is not None:
        model_line = model - water_fit  # compare like with like: the fitted line is HU − ρ_water
        offset = float(np.mean(model_line - (sigma * rho)) - beta)
    else:
        offset = float(np.mean(model - (sigma * rho)) - beta)  # HU_true = HU_meas + offset
    slope = physics.mineral_hu_per_mg_cm3(kev, 0.0, mineral)
    intercept = float(physics.trabecular_hu(0.0, kev, 0.0, mineral)) - offset
    details.update(hu_offset=offset, rod_model_hu=np.asarray(model).tolist(), marrow_fat_fraction_assumed=0.0)
    return Calibration("phantom", mineral, float(slope), intercept, kev, rods, float(rms), details)


# --- asynchronous ---------------------------------------------------------------------------
_META_KEYS = {
    "manufacturer": ("Manufacturer", "manufacturer"),
    "model": ("ManufacturerModelName", "model", "manufacturer_model_name"),
    "kvp": ("KVP", "kvp", "kVp"),
    "kernel": ("ConvolutionKernel", "kernel", "convolution_kernel"),
}


def _norm_text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        v = "\\".join(str(x) for x in v)
    return " ".join(str(v).strip().split()).lower()


def _norm_kvp(v) -> float | None:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def scanner_key(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """(manufacturer, model, kvp, kernel) from DICOM-keyword metadata, as stored in the table."""
    out: dict[str, Any] = {}
    for key, names in _META_KEYS.items():
        val = next((metadata[n] for n in names if n in metadata and metadata[n] not in (None, "")), None)
        if key == "kvp":
            out[key] = _norm_kvp(val)
        elif isinstance(val, (list, tuple)) or type(val).__name__ == "MultiValue":
            out[key] = "\\".join(str(x) for x in val)
        else:
            out[key] = None if val is None else str(val).strip()
    return out


def describe_scanner(key: Mapping[str, Any]) -> str:
    kvp = key.get("kvp")
    parts = [key.get("manufacturer") or "?", key.get("model") or "?",
             f"{kvp:g} kVp" if kvp is not None else "? kVp"]
    if key.get("kernel"):
        parts.append(f"kernel {key['kernel']}")
    return " ".join(parts)


def default_table_path() -> Path:
    """$SPINEKIT_HOME/calibration_table.json, else ~/.spinekit/calibration_table.json."""
    home = os.environ.get("SPINEKIT_HOME")
    base = Path(home) if home else Path.home() / ".spinekit"
    return base / "calibration_table.json"


@dataclass
class CalibrationEntry:
    manufacturer: str
    model: str
    kvp: float
    kernel: str | None
    slope_hu_per_mg_cm3: float      # BMD = (HU − intercept_hu) / slope (σ_CT for Mindways)
    intercept_hu: float             # (β_CT for Mindways)
    mineral: str = "k2hpo4"
    convention: str = "mindways"
    sigma: float | None = None      # raw Mindways fit coefficients, for provenance
    beta: float | None = None
    residual_hu: float | None = None
    n_rods: int | None = None
    effective_kev: float | None = None  # from the rods (method 'physics')
    method: str = ""
    created: str = ""
    source_note: str = ""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CalibrationEntry":
        slope = d.get("slope_hu_per_mg_cm3", d.get("slope"))
        intercept = d.get("intercept_hu", d.get("intercept"))
        if slope is None and d.get("sigma") is not None:  # entry with raw Mindways σ/β only
            slope, intercept = mindways_ct_coefficients(float(d["sigma"]), float(d["beta"]))
        return cls(manufacturer=str(d["manufacturer"]), model=str(d["model"]), kvp=float(d["kvp"]),
                   kernel=d.get("kernel") or None, slope_hu_per_mg_cm3=float(slope), intercept_hu=float(intercept),
                   mineral=str(d.get("mineral", "k2hpo4")).lower(), convention=str(d.get("convention", "mindways")),
                   sigma=d.get("sigma"), beta=d.get("beta"), residual_hu=d.get("residual_hu"),
                   n_rods=d.get("n_rods"), effective_kev=d.get("effective_kev"), method=str(d.get("method", "")),
                   created=str(d.get("created", "")), source_note=str(d.get("source_note", "")))

    def key(self) -> dict[str, Any]:
        return {"manufacturer": self.manufacturer, "model": self.model, "kvp": self.kvp, "kernel": self.kernel}

    def matches(self, key: Mapping[str, Any], use_kernel: bool) -> bool:
        if _norm_text(self.manufacturer) != _norm_text(key.get("manufacturer")):
            return False
        if _norm_text(self.model) != _norm_text(key.get("model")):
            return False
        kvp = key.get("kvp")
        if kvp is None or abs(self.kvp - float(kvp)) > 0.5:
            return False
        if use_kernel:
            return bool(self.kernel) and _norm_text(self.kernel) == _norm_text(key.get("kernel"))
        return True


class CalibrationTable:
    """Per-scanner calibration coefficients, stored as a JSON list of entries."""

    def __init__(self, entries: list[CalibrationEntry] | None = None, path: str | Path | None = None):
        self.entries: list[CalibrationEntry] = list(entries or [])
        self.path = Path(path) if path is not None else None

    @classmethod
    def load(cls, path: str | Path | None = None, missing_ok: bool = False) -> "CalibrationTable":
        path = Path(path) if path is not None else default_table_path()
        if not path.exists():
            if missing_ok:
                return cls([], path)
            raise InputError(f"{path}: calibration table not found.")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: calibration table is not readable JSON ({exc}).") from None
        if isinstance(raw, dict):
            raw = raw.get("entries", [])
        try:
            entries = [CalibrationEntry.from_json(d) for d in raw]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: a calibration table entry is incomplete ({exc}).") from None
        return cls(entries, path)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else (self.path or default_table_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([_jsonable(asdict(e)) for e in self.entries], indent=2) + "\n")
        self.path = path
        return path

    def add(self, entry: CalibrationEntry) -> bool:
        """Add or replace (same manufacturer/model/kVp/kernel) an entry; True when replaced."""
        key = entry.key()
        for i, e in enumerate(self.entries):
            if e.matches(key, use_kernel=True) or (not e.kernel and not entry.kernel and e.matches(key, False)):
                self.entries[i] = entry
                return True
        self.entries.append(entry)
        return False

    def lookup(self, metadata: Mapping[str, Any]) -> tuple[CalibrationEntry, str | None]:
        """Entry for a scan: exact (manufacturer, model, kVp, kernel), else (manufacturer, model,
        kVp) with a note saying so; InputError naming the scanner and the table when none fits."""
        key = scanner_key(metadata)
        if key.get("kernel"):
            for e in self.entries:
                if e.matches(key, use_kernel=True):
                    return e, None
        candidates = [e for e in self.entries if e.matches(key, use_kernel=False)]
        if candidates:
            # prefer a kernel-less (generic) entry, then the newest one
            candidates.sort(key=lambda e: (bool(e.kernel), e.created), reverse=False)
            generic = [e for e in candidates if not e.kernel]
            e = generic[0] if generic else sorted(candidates, key=lambda e: e.created)[-1]
            note = None
            if key.get("kernel") and _norm_text(e.kernel) != _norm_text(key.get("kernel")):
                note = (f"No calibration for kernel {key['kernel']} on {describe_scanner({**key, 'kernel': None})}; "
                        f"used the entry for {'any kernel' if not e.kernel else 'kernel ' + e.kernel} "
                        f"(the kernel changes coefficients little).")
            return e, note
        where = self.path if self.path is not None else "the calibration table"
        raise InputError(f"{where}: no asynchronous calibration for scanner {describe_scanner(key)}.")


def calibrate_asynchronous(metadata: Mapping[str, Any], table: "CalibrationTable | str | Path | None" = None,
                           mineral: str = "ha") -> Calibration:
    """Calibration from stored per-scanner coefficients (looked up by the scan's DICOM tags).

    The stored line is used as is; its mineral (usually K₂HPO₄ for Mindways) is reported. When
    ``mineral`` differs from the entry's, the density is converted at equal attenuation through
    the physics model at the energy where the stored slope matches the entry mineral's slope.
    """
    mineral = _check_mineral(mineral)
    if not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    key = scanner_key(metadata or {})
    if not key.get("manufacturer") or not key.get("model") or key.get("kvp") is None:
        raise InputError("the scan's metadata lacks Manufacturer, ManufacturerModelName or KVP, "
                         "so no asynchronous calibration can be looked up.")
    entry, note = table.lookup(metadata)
    slope, intercept = entry.slope_hu_per_mg_cm3, entry.intercept_hu
    details: dict[str, Any] = {"scanner": key, "entry": _jsonable(asdict(entry)),
                               "table": str(table.path) if table.path else None,
                               "fallback": note, "warnings": [note] if note else []}
    out_mineral = entry.mineral
    if mineral != entry.mineral:
        # equal-attenuation conversion: slope ratio of the two minerals at the energy that
        # reproduces the stored slope for the stored mineral
        if entry.effective_kev:
            kev = float(entry.effective_kev)
            ratio = physics.mineral_hu_per_mg_cm3(kev, 0.0, mineral) / physics.mineral_hu_per_mg_cm3(kev, 0.0, entry.mineral)
        else:
            ratio = _mineral_slope_ratio(entry.mineral, mineral, slope)
        slope = slope * ratio
        details["mineral_conversion"] = {"from": entry.mineral, "to": mineral, "slope_ratio": ratio}
        out_mineral = mineral
    return Calibration("asynchronous", out_mineral, float(slope), float(intercept), entry.effective_kev, {},
                       entry.residual_hu, details)


def _mineral_slope_ratio(src: str, dst: str, slope_src: float) -> float:
    """slope_dst / slope_src at the energy where the physics slope of ``src`` equals slope_src."""
    def f(kev):
        return (physics.mineral_hu_per_mg_cm3(kev, 0.0, src) - slope_src) ** 2
    res = minimize_scalar(f, bounds=physics.ENERGY_RANGE_KEV, method="bounded")
    kev = float(res.x)
    return physics.mineral_hu_per_mg_cm3(kev, 0.0, dst) / physics.mineral_hu_per_mg_cm3(kev, 0.0, src)


def entry_from_calibration(cal: Calibration, metadata: Mapping[str, Any], source_note: str = "") -> CalibrationEntry:
    """A table entry from a phantom calibration and the phantom scan's DICOM tags."""
    key = scanner_key(metadata)
    missing = [k for k in ("manufacturer", "model", "kvp") if key.get(k) in (None, "")]
    if missing:
        raise InputError(f"the phantom scan lacks {', '.join(missing)} (DICOM Manufacturer/ManufacturerModelName/KVP); "
                         "give them on the command line.")
    d = cal.details
    return CalibrationEntry(manufacturer=key["manufacturer"], model=key["model"], kvp=float(key["kvp"]),
                            kernel=key.get("kernel") or None, slope_hu_per_mg_cm3=cal.slope_hu_per_mg_cm3,
                            intercept_hu=cal.intercept_hu, mineral=cal.mineral, convention=d.get("convention", "esp"),
                            sigma=d.get("sigma"), beta=d.get("beta"), residual_hu=cal.residual_hu,
                            n_rods=len(d.get("rod_hu", [])), effective_kev=cal.effective_kev,
                            method=str(d.get("method", "")),
                            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            source_note=source_note)


def rod_hu_from_labels(ct_hu: np.ndarray, rod_labels: np.ndarray, erode_voxels: int = 1) -> list[float]:
    """Mean HU of each rod of a label map (label 1..N = rod 1..N on the CT grid), eroded in-plane
    against partial volume with the phantom base; a rod too small to erode is used whole."""
    from scipy import ndimage as ndi

    labels = np.asarray(rod_labels).astype(np.int64)
    if labels.shape != np.shape(ct_hu):
        raise InputError(f"the rod mask grid {labels.shape} does not match the CT grid {np.shape(ct_hu)}.")
    ids = [int(i) for i in np.unique(labels) if i > 0]
    if not ids:
        raise InputError("the rod mask file holds no labelled rods.")
    if ids != list(range(1, len(ids) + 1)):
        raise InputError(f"rod labels must be 1..N in rod order; found {ids}.")
    st = np.zeros((3, 3, 3), bool)
    st[1] = True  # in-plane 3x3
    out = []
    for i in ids:
        m = labels == i
        e = ndi.binary_erosion(m, structure=st, iterations=erode_voxels) if erode_voxels > 0 else m
        use = e if e.sum() >= 10 else m
        out.append(float(np.mean(np.asarray(ct_hu, float)[use])))
    return out


def rod_labels_from_circles(image, centres_lps_mm, radius_mm: float, shrink_mm: float = 1.5) -> np.ndarray:
    """Rod label map (rod k = label k) from circular ROIs: each rod's axis point (LPS, mm) and
    its radius; the ROI is the in-plane disc of radius − ``shrink_mm`` on every slice (rods run
    along z), which keeps the rod edge's partial volume out."""
    nz, ny, nx = image.shape
    out = np.zeros(image.shape, np.uint8)
    r = float(radius_mm) - float(shrink_mm)
    if r <= 0:
        raise InputError(f"rod radius {radius_mm} mm is too small for a measurement ROI.")
    sy, sx = image.spacing_zyx_mm[1], image.spacing_zyx_mm[2]
    for k, c in enumerate(centres_lps_mm, start=1):
        zc, yc, xc = image.physical_to_index(np.asarray(c, float)[None])[0]
        y, x = np.ogrid[:ny, :nx]
        disc = ((y - yc) * sy) ** 2 + ((x - xc) * sx) ** 2 <= r * r
        if not disc.any():
            raise InputError(f"rod {k} at {list(c)} mm lies outside the image.")
        out[:, disc] = k
    return out
