"""X-ray attenuation of tissues and bone mineral at an effective energy (NIST data via xraylib).

One model serves the digital phantom (truth -> HU) and the phantomless calibration
(HU -> mg/cm³); both sides use the same physics, so the phantom tests what the calibration
recovers from noisy, blurred, partial-volume images, not the physics itself.

HU = 1000 · (μ − μ_water) / (μ_water − μ_air) at the scanner's effective energy.
Trabecular bone = mineral (hydroxyapatite or K₂HPO₄, mg/cm³) in a marrow base whose fat
fraction is chosen; the mineral displaces base by its own volume.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import xraylib

# NIST compound names in xraylib, by the tissue names used across spinekit.
TISSUES: dict[str, str] = {
    "air": "Air, Dry (near sea level)",
    "water": "Water, Liquid",
    "fat": "Adipose Tissue (ICRP)",
    "muscle": "Muscle, Skeletal",
    "blood": "Blood (ICRP)",
    "soft_tissue": "Tissue, Soft (ICRP)",
    "cortical_bone": "Bone, Cortical (ICRP)",
}

# Minerals: (xraylib formula, crystal density g/cm³).
MINERALS: dict[str, tuple[str, float]] = {
    "ha": ("Ca10P6O26H2", 3.16),  # calcium hydroxyapatite
    "k2hpo4": ("K2HPO4", 2.44),  # dipotassium phosphate (Mindways rods)
}

# The base in which mineral density is expressed is water, as in clinical QCT: calibration rods
# are mineral in a water-equivalent base, and the ACR thresholds and normative tables are on that
# scale. So "marrow fat 0 %" means a water-equivalent marrow, and real red marrow (~ +30 HU) or
# marrow fat shift a measurement exactly as they shift phantom-calibrated QCT (fat: about
# -10 mg/cm³ per 10 % at 70 keV). Marrow fat is ICRP adipose tissue.
MARROW_BASE = "water"

ENERGY_RANGE_KEV = (40.0, 140.0)


def _nist(name: str) -> dict:
    return xraylib.GetCompoundDataNISTByName(TISSUES.get(name, name))


@lru_cache(maxsize=4096)
def _mass_atten_cm2_g(material: str, kev_milli: int) -> float:
    """Total mass attenuation (with coherent scattering), cm²/g; energy in 1/1000 keV steps."""
    kev = kev_milli / 1000.0
    if material in MINERALS:
        return float(xraylib.CS_Total_CP(MINERALS[material][0], kev))
    return float(xraylib.CS_Total_CP(TISSUES.get(material, material), kev))


def mass_attenuation_cm2_g(material: str, kev: float) -> float:
    return _mass_atten_cm2_g(material, int(round(float(kev) * 1000)))


def density_g_cm3(material: str) -> float:
    if material in MINERALS:
        return MINERALS[material][1]
    return float(_nist(material)["density"])


def mu_cm(material: str, kev: float, density: float | None = None) -> float:
    """Linear attenuation coefficient (1/cm) of a NIST material at its (or a given) density."""
    rho = density_g_cm3(material) if density is None else density
    return mass_attenuation_cm2_g(material, kev) * rho


def hu_from_mu(mu: float | np.ndarray, kev: float) -> float | np.ndarray:
    mu_w = mu_cm("water", kev)
    mu_a = mu_cm("air", kev)
    return 1000.0 * (np.asarray(mu) - mu_w) / (mu_w - mu_a)


def tissue_hu(name: str, kev: float) -> float:
    """CT number of a NIST tissue at an effective energy."""
    return float(hu_from_mu(mu_cm(name, kev), kev))


def marrow_mu_cm(kev: float, fat_fraction: float = 0.0) -> float:
    """Marrow as a volume mixture of fat-free marrow and fat."""
    f = float(fat_fraction)
    return (1.0 - f) * mu_cm(MARROW_BASE, kev) + f * mu_cm("fat", kev)


def trabecular_mu_cm(density_mg_cm3: float | np.ndarray, kev: float, fat_fraction: float = 0.0,
                     mineral: str = "ha") -> float | np.ndarray:
    """μ of trabecular bone: mineral at ρ mg/cm³ displacing marrow by its own volume."""
    rho_g = np.asarray(density_mg_cm3, dtype=float) / 1000.0
    vol_frac = rho_g / MINERALS[mineral][1]
    return (1.0 - vol_frac) * marrow_mu_cm(kev, fat_fraction) + rho_g * mass_attenuation_cm2_g(mineral, kev)


def trabecular_hu(density_mg_cm3: float | np.ndarray, kev: float, fat_fraction: float = 0.0,
                  mineral: str = "ha") -> float | np.ndarray:
    """CT number of trabecular bone of a given mineral density."""
    return hu_from_mu(trabecular_mu_cm(density_mg_cm3, kev, fat_fraction, mineral), kev)


def mineral_hu_per_mg_cm3(kev: float, fat_fraction: float = 0.0, mineral: str = "ha") -> float:
    """Slope dHU/dρ (HU per mg/cm³) of the trabecular model; it is linear in ρ."""
    return float(trabecular_hu(1.0, kev, fat_fraction, mineral) - trabecular_hu(0.0, kev, fat_fraction, mineral))


def density_from_hu(hu: float | np.ndarray, kev: float, fat_fraction: float = 0.0,
                    mineral: str = "ha") -> float | np.ndarray:
    """Inverse of trabecular_hu: mineral density (mg/cm³) from a CT number."""
    base = trabecular_hu(0.0, kev, fat_fraction, mineral)
    return (np.asarray(hu, dtype=float) - base) / mineral_hu_per_mg_cm3(kev, fat_fraction, mineral)
