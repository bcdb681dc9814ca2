"""Digital thoracolumbar spine CT phantom with known truth.

The phantom is drawn analytically in millimetres (world = LPS, x patient-left, y posterior,
z superior) and sampled at voxel centres; each vertebra is computed only inside its own bounding
box, soft tissue slice by slice. HU come from ``spinekit.physics`` (the same NIST model the
phantomless calibration inverts), so a calibration that recovers the truth here is tested on
noise, blur and partial volume, not on a different physics.

Tissue ids of ``CTPhantom.tissues`` (``TISSUE_IDS``):
 1 subcutaneous fat, 2 visceral/retroperitoneal fat, 3 paraspinal muscle, 4 psoas, 5 aorta (and
 common iliac arteries), 6 IVC (and iliac veins), 7 intervertebral disc, 8 spinal canal (CSF),
 9 rib, 10 sacrum / pelvis, 11 metal, 12 calibration rod, 13 air outside the body,
 14 abdominal / chest wall muscle, 15 viscera and mediastinum (soft tissue), 16 lung,
 17 vertebra (bone of the rendered levels), 18 calibration phantom base (water-equivalent).

Contrast (documented numbers, HU): native aorta = IVC = NIST blood; arterial aorta 300, IVC 90;
portal-venous aorta 160, IVC 150. Viscera 40 native, +20 arterial, +60 portal-venous. Muscle and
fat are not enhanced. Trabecular bone enhancement is applied in density space so that Toelly's
equations (native = -2.287 + 0.964*arterial; native = -4.517 + 0.978*portal-venous) applied to the
apparent density recover the true density exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .. import physics
from ..errors import InputError
from ..image import Image, write_image
from ..levels import VERSE_IDS
from ..progress import Progress, report
from ._spine import SPINE_LEVELS, Frame, LevelDims, build_curve, level_dims

TISSUE_IDS: dict[str, int] = {
    "subcutaneous_fat": 1, "visceral_fat": 2, "paraspinal_muscle": 3, "psoas": 4, "aorta": 5,
    "ivc": 6, "disc": 7, "canal": 8, "rib": 9, "sacrum_pelvis": 10, "metal": 11,
    "calibration_rod": 12, "air": 13, "wall_muscle": 14, "viscera": 15, "lung": 16,
    "vertebra": 17, "calibration_base": 18,
}
T = TISSUE_IDS

PHASES = ("native", "arterial", "portal-venous")
# Vessel and organ HU by phase (see module docstring); None = NIST blood.
VESSEL_HU = {"native": (None, None), "arterial": (300.0, 90.0), "portal-venous": (160.0, 150.0)}
VISCERA_HU = {"native": 40.0, "arterial": 60.0, "portal-venous": 100.0}
# Toelly 2017: native = a + b * contrast (mg/cm3).
TOELLY = {"arterial": (-2.287, 0.964), "portal-venous": (-4.517, 0.978)}
DISC_HU, CSF_HU, LUNG_HU, METAL_HU = 80.0, 10.0, -850.0, 3071.0
CORTEX_MM, ENDPLATE_MM = 1.0, 1.0
FRACTURE_TYPES = ("wedge", "biconcave", "crush")
# Height loss at the middle of each Genant band (grade 3 band is open: >40 %, use 50 %).
GENANT_LOSS = {1: 0.225, 2: 0.325, 3: 0.50}
# Mindways-like rods: (name, water-equivalent density mg/cm3, K2HPO4 mg/cm3). Illustrative values.
RODS = (("A", 1012.0, 0.0), ("B", 1045.0, 50.0), ("C", 1020.0, 100.0), ("D", 1035.0, 200.0))
ROD_RADIUS_MM = 6.5


@dataclass
class CTPhantomConfig:
    first_level: str = "T11"
    last_level: str = "L5"  # any contiguous range within T1..L5 (cranial..caudal)
    include_sacrum: bool = True  # sacrum + iliac wings when last_level == "L5"
    include_ribs: bool = True  # ribs on T1-T12 (T11/T12 short floating ribs)
    shape_zyx: tuple[int, int, int] | None = None  # None -> FOV derived from the levels
    spacing_mm: tuple[float, float, float] = (0.8, 0.8, 1.0)  # ITK order (x, y, z)
    slice_thickness_mm: float | None = None  # None = spacing z; larger -> z blur (FWHM)
    densities_mg_cm3: dict[str, float] | None = None  # trabecular HA per level
    marrow_fat_fraction: float = 0.0
    effective_kev: float = 70.0
    noise_hu: float = 10.0  # SD of the blur-correlated Gaussian noise
    blur_fwhm_mm: float = 1.0  # in-plane system blur
    lordosis_deg: float = 30.0
    kyphosis_deg: float = 20.0
    scoliosis_mm: float = 0.0  # lateral offset at the middle of the range (+ = to the left)
    contrast_phase: str = "native"  # native | arterial | portal-venous
    fractures: dict[str, tuple[str, int]] = field(default_factory=dict)  # {"L1": ("wedge", 2)}
    metal_level: str | None = None  # pedicle screws in that level
    calibration_rods: bool = False  # Mindways-like K2HPO4 rods under the patient
    seed: int = 0


@dataclass
class CTPhantom:
    image: Image  # int16 HU
    vertebrae: Image  # uint8 VerSe ids, whole vertebrae (+ sacrum 26)
    bodies: Image  # uint8 VerSe ids, vertebral bodies only (cortex included)
    tissues: Image  # uint8 TISSUE_IDS
    truth: dict
    config: CTPhantomConfig

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """ct.nii.gz, vertebrae.nii.gz, bodies.nii.gz, tissues.nii.gz, truth.json (atomic)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        items = {"ct": self.image, "vertebrae": self.vertebrae, "bodies": self.bodies, "tissues": self.tissues}
        final: dict[str, Path] = {}
        tmp: dict[str, Path] = {}
        try:
            for key, img in items.items():
                tmp[key] = write_image(img, out / f".{key}.tmp.nii.gz")
                final[key] = out / f"{key}.nii.gz"
            fd, name = tempfile.mkstemp(prefix=".truth.", suffix=".tmp", dir=out)
            with os.fdopen(fd, "w") as fh:
                json.dump(self.truth, fh, indent=2)
            os.chmod(name, 0o644)
            tmp["truth"] = Path(name)
            final["truth"] = out / "truth.json"
            for key in tmp:
                os.replace(tmp[key], final[key])
        finally:
            for p in tmp.values():
                if p.exists():
                    p.unlink()
        return final


# --- helpers ---------------------------------------------------------------------------------
def level_range(first: str, last: str) -> list[str]:
    """Levels from first to last (cranial..caudal) within T1..L5."""
    names = [n.strip().upper() for n in (first, last)]
    for n, given in zip(names, (first, last)):
        if n not in SPINE_LEVELS:
            raise InputError(f"phantom level '{given}' is not a level between T1 and L5.")
    i, j = SPINE_LEVELS.index(names[0]), SPINE_LEVELS.index(names[1])
    if i > j:
        raise InputError(f"phantom level range {first}-{last} must run cranial to caudal (e.g. T11-L5).")
    return list(SPINE_LEVELS[i:j + 1])


def default_density_mg_cm3(name: str) -> float:
    """Healthy adult trabecular HA: ~160 (T1) falling linearly to ~125 mg/cm3 (L5)."""
    return float(160.0 - 35.0 * SPINE_LEVELS.index(name) / (len(SPINE_LEVELS) - 1))


def apparent_density_mg_cm3(true_mg_cm3: float, phase: str) -> float:
    """Density a native-calibrated measurement reads in a contrast phase (inverse Toelly)."""
    if phase == "native":
        return float(true_mg_cm3)
    a, b = TOELLY[phase]
    return float((true_mg_cm3 - a) / b)


def _fracture_spec(name: str, spec) -> tuple[str, int]:
    try:
        kind, grade = spec
        return str(kind).strip().lower(), int(grade)
    except (TypeError, ValueError):
        raise InputError(f"fracture {name}={spec!r} must be a (type, Genant grade) pair such as ('wedge', 2).") from None


def _validate(cfg: CTPhantomConfig) -> list[str]:
    levels = level_range(cfg.first_level, cfg.last_level)
    if len(cfg.spacing_mm) != 3 or min(cfg.spacing_mm) <= 0:
        raise InputError(f"phantom spacing {cfg.spacing_mm} must be three positive numbers (x, y, z) in mm.")
    if cfg.shape_zyx is not None and (len(cfg.shape_zyx) != 3 or min(cfg.shape_zyx) < 8):
        raise InputError(f"phantom shape {cfg.shape_zyx} must be three sizes (z, y, x) of at least 8 voxels.")
    if cfg.contrast_phase not in PHASES:
        raise InputError(f"contrast phase '{cfg.contrast_phase}' is not one of {', '.join(PHASES)}.")
    if not 0.0 <= cfg.marrow_fat_fraction <= 1.0:
        raise InputError(f"marrow fat fraction {cfg.marrow_fat_fraction} must lie between 0 and 1.")
    if not physics.ENERGY_RANGE_KEV[0] <= cfg.effective_kev <= physics.ENERGY_RANGE_KEV[1]:
        lo, hi = physics.ENERGY_RANGE_KEV
        raise InputError(f"effective energy {cfg.effective_kev} keV is outside {lo:g}-{hi:g} keV.")
    if cfg.noise_hu < 0 or cfg.blur_fwhm_mm < 0:
        raise InputError("phantom noise and blur must not be negative.")
    if cfg.slice_thickness_mm is not None and cfg.slice_thickness_mm <= 0:
        raise InputError(f"slice thickness {cfg.slice_thickness_mm} mm must be positive.")
    for name, dens in (cfg.densities_mg_cm3 or {}).items():
        if name.upper() not in SPINE_LEVELS:
            raise InputError(f"density given for '{name}', which is not a level between T1 and L5.")
        if not 0.0 <= float(dens) <= 1500.0:
            raise InputError(f"density {dens} mg/cm3 for {name} is outside 0-1500 mg/cm3.")
    for name, spec in cfg.fractures.items():
        if name.upper() not in levels:
            raise InputError(f"fracture level '{name}' is not among the rendered levels {levels[0]}-{levels[-1]}.")
        if spec[0] not in FRACTURE_TYPES:
            raise InputError(f"fracture type '{spec[0]}' for {name} must be one of {', '.join(FRACTURE_TYPES)}.")
        if int(spec[1]) not in GENANT_LOSS:
            raise InputError(f"fracture grade {spec[1]} for {name} must be a Genant grade 1, 2 or 3.")
    if cfg.metal_level is not None and cfg.metal_level.upper() not in levels:
        raise InputError(f"metal level '{cfg.metal_level}' is not among the rendered levels {levels[0]}-{levels[-1]}.")
    return levels


@dataclass
class _Grid:
    shape: tuple[int, int, int]  # z, y, x
    origin: np.ndarray  # x, y, z
    spacing: np.ndarray  # x, y, z

    def axis(self, k: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        n = self.shape[2 - k]
        hi = n if hi is None else hi
        return (self.origin[k] + np.arange(lo, hi) * self.spacing[k]).astype(np.float32)

    def bbox(self, pts_world: np.ndarray, margin_mm: float = 1.0):
        """Index slices (z, y, x) covering the points, clipped; None if outside."""
        idx = (np.asarray(pts_world) - self.origin) / self.spacing
        lo = np.floor(idx.min(axis=0) - margin_mm / self.spacing).astype(int)
        hi = np.ceil(idx.max(axis=0) + margin_mm / self.spacing).astype(int) + 1
        n = np.array(self.shape[::-1])
        lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def coords(self, sl):
        """Broadcastable world x (1,1,nx), y (1,ny,1), z (nz,1,1) of a bbox."""
        x = self.axis(0, sl[2].start, sl[2].stop)[None, None, :]
        y = self.axis(1, sl[1].start, sl[1].stop)[None, :, None]
        z = self.axis(2, sl[0].start, sl[0].stop)[:, None, None]
        return x, y, z


def _box_corners(frame: Frame, u: tuple, v: tuple, w: tuple) -> np.ndarray:
    uu, vv, ww = np.meshgrid(u, v, w, indexing="ij")
    return frame.to_world(uu.ravel(), vv.ravel(), ww.ravel())


def _local(grid: _Grid, frame: Frame, sl):
    x, y, z = grid.coords(sl)
    f32 = lambda a: [float(c) for c in a]  # noqa: E731 (python floats keep arrays float32)
    o, la, po, su = f32(frame.origin), f32(frame.lateral), f32(frame.posterior), f32(frame.superior)
    dx, dy, dz = x - o[0], y - o[1], z - o[2]
    u = dx * la[0] + dy * la[1] + dz * la[2]
    v = dx * po[0] + dy * po[1] + dz * po[2]
    w = dx * su[0] + dy * su[1] + dz * su[2]
    return u, v, w


def _cortex(mask: np.ndarray, spacing_zyx: np.ndarray, thickness_mm: float = 1.2) -> np.ndarray:
    """Outer shell of a bone mask (about one cortical thickness, at least one voxel)."""
    it = max(1, int(round(thickness_mm / float(np.min(spacing_zyx)))))
    inner = ndimage.binary_erosion(mask, iterations=it)
    return mask & ~inner


def _heights(dims: LevelDims, fracture: tuple[str, int] | None):
    """Height profile H(u, v, r2) of the body (mm) and its truth (anterior, middle, posterior)."""
    hn = dims.body_height_mm
    b = dims.body_depth_mm / 2.0
    if fracture is None:
        return (lambda u, v, r2: np.float32(hn)), (hn, hn, hn)
    kind, grade = fracture[0], int(fracture[1])
    loss = GENANT_LOSS[grade]
    if kind == "wedge":  # anterior collapse; linear in depth, Ha at 15 %, Hp at 85 % of depth
        ha = hn * (1 - loss)

        def h(u, v, r2):
            f = np.clip((v + b) / (2 * b), 0.0, 1.0)
            return (hn + (ha - hn) * (0.85 - f) / 0.70).astype(np.float32)

        return h, (ha, hn + (ha - hn) * 0.35 / 0.70, hn)
    if kind == "biconcave":  # central endplate depression reaching 60 % of the radius
        hm = hn * (1 - loss)

        def h(u, v, r2):
            return (hn - (hn - hm) * np.clip(1.0 - r2 / 0.36, 0.0, 1.0)).astype(np.float32)

        return h, (hn, hm, hn)
    hc = hn * (1 - loss)  # crush: uniform collapse
    return (lambda u, v, r2: np.float32(hc)), (hc, hc, hc)


# --- the generator ---------------------------------------------------------------------------
def generate_ct_phantom(config: CTPhantomConfig | None = None, progress: Progress | None = None,
                        **overrides: Any) -> CTPhantom:
    """Build a thoracolumbar CT phantom and its truth (see module docstring for the model)."""
    cfg = config or CTPhantomConfig()
    known = {f.name for f in fields(CTPhantomConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise InputError(f"unknown phantom option '{bad[0]}' (known: {', '.join(sorted(known))}).")
    cfg = replace(cfg, **overrides)
    cfg = replace(
        cfg,
        first_level=cfg.first_level.strip().upper(), last_level=cfg.last_level.strip().upper(),
        spacing_mm=tuple(float(s) for s in cfg.spacing_mm),
        fractures={k.strip().upper(): _fracture_spec(k, v) for k, v in cfg.fractures.items()},
        metal_level=cfg.metal_level.strip().upper() if cfg.metal_level else None,
        densities_mg_cm3={k.strip().upper(): float(v) for k, v in (cfg.densities_mg_cm3 or {}).items()} or None,
        shape_zyx=tuple(int(n) for n in cfg.shape_zyx) if cfg.shape_zyx is not None else None,
    )
    levels = _validate(cfg)
    report(progress, 0.0, "phantom: geometry")
    kev = cfg.effective_kev
    sacrum = cfg.include_sacrum and levels[-1] == "L5"
    dims = {n: level_dims(n) for n in SPINE_LEVELS}

    # Centreline over the whole column; scoliosis over the rendered range only.
    probe = build_curve(cfg.kyphosis_deg, cfg.lordosis_deg, 0.0, (0.0, 1.0))
    s0 = probe.level_top_s[levels[0]]
    s1 = probe.level_top_s[levels[-1]] + dims[levels[-1]].body_height_mm
    curve = build_curve(cfg.kyphosis_deg, cfg.lordosis_deg, cfg.scoliosis_mm, (s0, s1))
    s_center = {n: curve.level_top_s[n] + dims[n].body_height_mm / 2 for n in SPINE_LEVELS}
    frames = {n: curve.frame(s_center[n]) for n in SPINE_LEVELS}
    zc = {n: float(frames[n].origin[2]) for n in SPINE_LEVELS}
    sac_top_pt = curve.point(curve.sacrum_top_s)

    grid = _make_grid(cfg, curve, levels, dims, sacrum)
    nz, ny, nx = grid.shape
    sp_zyx = grid.spacing[::-1]

    tissues = np.full(grid.shape, T["air"], dtype=np.uint8)
    report(progress, 0.05, "phantom: soft tissue")
    _paint_soft_tissue(tissues, grid, curve, levels, dims, zc, sacrum, cfg, progress)

    # Noise-free HU of every tissue id; bone and rods are written explicitly afterwards.
    aorta_hu, ivc_hu = VESSEL_HU[cfg.contrast_phase]
    blood_hu = physics.tissue_hu("blood", kev)
    aorta_hu = blood_hu if aorta_hu is None else aorta_hu
    ivc_hu = blood_hu if ivc_hu is None else ivc_hu
    fat_hu, muscle_hu = physics.tissue_hu("fat", kev), physics.tissue_hu("muscle", kev)
    cortical_hu = physics.tissue_hu("cortical_bone", kev)
    water_hu = physics.tissue_hu("water", kev)
    lut = np.zeros(256, np.float32)
    lut[[T["air"]]] = physics.tissue_hu("air", kev)
    lut[[T["subcutaneous_fat"], T["visceral_fat"]]] = fat_hu
    lut[[T["paraspinal_muscle"], T["psoas"], T["wall_muscle"]]] = muscle_hu
    lut[T["aorta"]], lut[T["ivc"]] = aorta_hu, ivc_hu
    lut[T["disc"]], lut[T["canal"]], lut[T["lung"]] = DISC_HU, CSF_HU, LUNG_HU
    lut[T["viscera"]], lut[T["calibration_base"]] = VISCERA_HU[cfg.contrast_phase], water_hu
    lut[T["metal"]] = METAL_HU
    hu = lut[tissues]

    # Rods of the calibration phantom.
    rods_truth = []
    if cfg.calibration_rods:
        rods_truth = _paint_rods(tissues, hu, grid, kev)

    vertebrae = np.zeros(grid.shape, np.uint8)
    bodies = np.zeros(grid.shape, np.uint8)

    # Discs and canal first so the bone of every level overwrites them.
    report(progress, 0.3, "phantom: discs and canal")
    pairs = list(zip(levels[:-1], levels[1:]))
    for upper, lower in pairs:
        _paint_disc(tissues, hu, grid, curve, dims, upper, lower, s_center)
    if sacrum:
        _paint_disc(tissues, hu, grid, curve, dims, "L5", None, s_center)
    for n in levels:
        _paint_canal(tissues, hu, grid, frames[n], dims[n])

    # Density truth.
    dens = {n: (cfg.densities_mg_cm3 or {}).get(n, default_density_mg_cm3(n)) for n in levels}
    apparent = {n: apparent_density_mg_cm3(dens[n], cfg.contrast_phase) for n in levels}
    trab_hu = {n: float(physics.trabecular_hu(apparent[n], kev, cfg.marrow_fat_fraction)) for n in levels}

    if cfg.include_ribs:
        report(progress, 0.4, "phantom: ribs")
        for n in levels:
            if n.startswith("T"):
                for side in (-1.0, 1.0):
                    _paint_rib(tissues, hu, grid, curve, frames[n], dims[n], n, side, zc,
                               cortical_hu, float(physics.trabecular_hu(apparent[n], kev, cfg.marrow_fat_fraction)))
    if sacrum:
        report(progress, 0.45, "phantom: sacrum and pelvis")
        d_sac = apparent_density_mg_cm3(0.9 * dens["L5"], cfg.contrast_phase)
        _paint_sacrum(tissues, hu, vertebrae, grid, curve, sac_top_pt, cortical_hu,
                      float(physics.trabecular_hu(d_sac, kev, cfg.marrow_fat_fraction)))
        _paint_pelvis(tissues, hu, grid, sac_top_pt, cortical_hu,
                      float(physics.trabecular_hu(apparent_density_mg_cm3(150.0, cfg.contrast_phase), kev,
                                                  cfg.marrow_fat_fraction)))

    report(progress, 0.5, "phantom: vertebrae")
    height_truth = {}
    for k, n in enumerate(levels):
        above = dims[levels[k - 1]] if k > 0 else None
        height_truth[n] = _paint_vertebra(
            tissues, hu, vertebrae, bodies, grid, frames[n], dims[n], above, VERSE_IDS[n],
            cfg.fractures.get(n), trab_hu[n], cortical_hu, metal=(n == cfg.metal_level))

    # Truth that needs the masks.
    report(progress, 0.6, "phantom: truth")
    edge_ids = set()
    for face in (vertebrae[0], vertebrae[-1], vertebrae[:, 0], vertebrae[:, -1], vertebrae[:, :, 0], vertebrae[:, :, -1]):
        edge_ids.update(np.unique(face).tolist())
    image_geom = Image(np.zeros((1, 1, 1), np.int16), spacing_mm=tuple(grid.spacing), origin_mm=tuple(grid.origin))
    level_truth: dict[str, dict] = {}
    for n in levels:
        vid = VERSE_IDS[n]
        fr = frames[n]
        sl = grid.bbox(_box_corners(fr, (-60, 60), (-40, 90), (-60, 60)), 2.0)
        if sl is None:
            continue
        bmask = bodies[sl] == vid
        nvox = int(bmask.sum())
        if nvox == 0 and not np.any(vertebrae[sl] == vid):
            continue  # level entirely outside the field of view
        idx = np.argwhere(bmask).mean(axis=0) + [s.start for s in sl] if nvox else None
        ha, hm, hp = height_truth[n]["heights"]
        frac = cfg.fractures.get(n)
        hn = dims[n].body_height_mm
        level_truth[n] = {
            "verse_id": vid,
            "density_mg_cm3": dens[n],
            "apparent_density_mg_cm3": apparent[n],
            "true_trabecular_hu": trab_hu[n],
            "height_anterior_mm": ha, "height_middle_mm": hm, "height_posterior_mm": hp,
            "height_normal_mm": hn,
            "height_ratio_wedge": ha / hp, "height_ratio_biconcave": hm / hp, "height_ratio_crush": hp / hn,
            "genant_grade": int(frac[1]) if frac else 0,
            "fracture_type": frac[0] if frac else None,
            "body_width_mm": dims[n].body_width_mm, "body_depth_mm": dims[n].body_depth_mm,
            "body_volume_cm3": nvox * float(np.prod(grid.spacing)) / 1000.0,
            "body_volume_analytic_cm3": height_truth[n]["volume_mm3"] / 1000.0,
            "complete": vid not in edge_ids,
            "centroid_lps_mm": image_geom.index_to_physical(idx).tolist() if idx is not None else None,
            "centroid_analytic_lps_mm": height_truth[n]["centroid_world"].tolist(),
            "center_lps_mm": fr.origin.tolist(),
            "axis_superior": fr.superior.tolist(), "axis_posterior": fr.posterior.tolist(),
            "axis_lateral": fr.lateral.tolist(),
            "metal": n == cfg.metal_level,
            "ribs": bool(cfg.include_ribs and n.startswith("T")),
        }

    # Scanner: blur (in-plane + slice profile) and blur-correlated noise, then int16.
    report(progress, 0.65, "phantom: scanner blur and noise")
    image_arr = _scanner(hu, grid, cfg, progress)
    del hu

    truth = {
        "levels": level_truth,
        "levels_rendered": levels,
        "sacrum": bool(sacrum and np.any(vertebrae == VERSE_IDS["sacrum"])),
        "scanner": {
            "effective_kev": kev, "noise_hu": cfg.noise_hu, "blur_fwhm_mm": cfg.blur_fwhm_mm,
            "spacing_mm": list(grid.spacing), "slice_thickness_mm": cfg.slice_thickness_mm or float(grid.spacing[2]),
            "seed": cfg.seed,
        },
        "tissue_hu": {
            "air": float(lut[T["air"]]), "fat": fat_hu, "muscle": muscle_hu, "blood": blood_hu,
            "aorta": aorta_hu, "ivc": ivc_hu, "cortical_bone": cortical_hu, "disc": DISC_HU, "csf": CSF_HU,
            "lung": LUNG_HU, "viscera": VISCERA_HU[cfg.contrast_phase], "metal": METAL_HU, "water": water_hu,
        },
        "contrast_phase": cfg.contrast_phase,
        "marrow_fat_fraction": cfg.marrow_fat_fraction,
        "rods": rods_truth,
        "tissue_ids": dict(TISSUE_IDS),
        "curve": {"kyphosis_deg": cfg.kyphosis_deg, "lordosis_deg": cfg.lordosis_deg,
                  "scoliosis_mm": cfg.scoliosis_mm, "sacral_slope_deg": curve.sacrum_tilt_deg},
        "config": _config_json(cfg),
    }
    geom = dict(spacing_mm=tuple(grid.spacing), origin_mm=tuple(grid.origin), direction=np.eye(3))
    meta = {"Modality": "CT", "KVP": None, "phantom": True}
    report(progress, 1.0, "phantom: done")
    return CTPhantom(
        image=Image(image_arr, metadata=meta, **geom),
        vertebrae=Image(vertebrae, **geom),
        bodies=Image(bodies, **geom),
        tissues=Image(tissues, **geom),
        truth=truth,
        config=cfg,
    )


def _config_json(cfg: CTPhantomConfig) -> dict:
    d = asdict(cfg)
    d["fractures"] = {k: list(v) for k, v in cfg.fractures.items()}
    d["spacing_mm"] = list(cfg.spacing_mm)
    d["shape_zyx"] = list(cfg.shape_zyx) if cfg.shape_zyx else None
    return d


# --- field of view ---------------------------------------------------------------------------
def _outline(z: np.ndarray, zc: dict, sac_z: float):
    """Body outline semi-axes (LR, AP) in mm and subcutaneous fat thickness by height z."""
    anchors = [(sac_z - 60, 170, 115, 22), (sac_z, 165, 118, 22), (zc["L3"], 160, 120, 20),
               (zc["T12"], 155, 115, 18), (zc["T8"], 145, 105, 15), (zc["T1"], 130, 95, 12)]
    zs = np.array([a[0] for a in anchors])
    o = np.argsort(zs)
    a = np.interp(z, zs[o], np.array([x[1] for x in anchors])[o])
    b = np.interp(z, zs[o], np.array([x[2] for x in anchors])[o])
    f = np.interp(z, zs[o], np.array([x[3] for x in anchors])[o])
    return a, b, f


OUTLINE_OFFSET_MM = 20.0  # outline centre lies this far anterior of the body centre line
WALL_MUSCLE_MM = 12.0


def _make_grid(cfg, curve, levels, dims, sacrum) -> _Grid:
    sp = np.array(cfg.spacing_mm, float)
    top = curve.point(curve.level_top_s[levels[0]])[2] + 12.0
    last = levels[-1]
    bottom = curve.point(curve.level_top_s[last] + dims[last].body_height_mm)[2] - 12.0
    if sacrum:
        bottom = curve.point(curve.sacrum_top_s)[2] - 95.0
    zs = np.arange(bottom, top, 2.0)
    s_idx = np.linspace(curve.level_top_s[levels[0]], curve.level_top_s[last] + dims[last].body_height_mm, 50)
    ys = np.array([curve.point(s)[1] for s in s_idx])
    xs = np.array([curve.point(s)[0] for s in s_idx])
    zc = {n: float(curve.point(curve.level_top_s[n] + dims[n].body_height_mm / 2)[2]) for n in SPINE_LEVELS}
    a, b, _ = _outline(zs, zc, float(curve.point(curve.sacrum_top_s)[2]))
    x_lo, x_hi = xs.min() - a.max() - 15, xs.max() + a.max() + 15
    y_lo = ys.min() - OUTLINE_OFFSET_MM - b.max() - 15
    y_hi = ys.max() - OUTLINE_OFFSET_MM + b.max() + (55 if cfg.calibration_rods else 15)
    lo = np.array([x_lo, y_lo, bottom])
    hi = np.array([x_hi, y_hi, top])
    if cfg.shape_zyx is None:
        n = np.ceil((hi - lo) / sp).astype(int) + 1
        origin = lo
    else:
        n = np.array(cfg.shape_zyx[::-1])
        centre = (lo + hi) / 2
        if not sacrum:
            pass
        else:  # centre z on the vertebrae, not on the sacrum
            centre[2] = (top + curve.point(curve.level_top_s[last] + dims[last].body_height_mm)[2]) / 2
        origin = centre - (n - 1) / 2 * sp
    # Snap the origin to the grid spacing so repeated runs share coordinates exactly.
    origin = np.round(origin / sp) * sp
    return _Grid((int(n[2]), int(n[1]), int(n[0])), origin, sp)


# --- soft tissue (slice by slice) ------------------------------------------------------------
def _paint_soft_tissue(tissues, grid, curve, levels, dims, zc, sacrum, cfg, progress):
    nz = grid.shape[0]
    zw = grid.axis(2)
    # Body centre line as a function of z over the rendered levels (clamped beyond them).
    s_lo = curve.level_top_s[levels[0]] + dims[levels[0]].body_height_mm / 2
    s_hi = curve.level_top_s[levels[-1]] + dims[levels[-1]].body_height_mm / 2
    ss = np.linspace(s_lo, s_hi, 200)
    pts = np.array([curve.point(s) for s in ss])
    order = np.argsort(pts[:, 2])
    xs = np.interp(zw, pts[order, 2], pts[order, 0])
    ys = np.interp(zw, pts[order, 2], pts[order, 1])
    zlev = np.array([zc[n] for n in SPINE_LEVELS])
    o = np.argsort(zlev)

    def by_z(attr):
        vals = np.array([getattr(dims[n], attr) for n in SPINE_LEVELS])
        return np.interp(zw, zlev[o], vals[o])

    W, D = by_z("body_width_mm"), by_z("body_depth_mm")
    CW, CD = by_z("canal_width_mm"), by_z("canal_depth_mm")
    sac_z = float(curve.point(curve.sacrum_top_s)[2])
    A, B, F = _outline(zw, zc, sac_z)
    X = grid.axis(0)[None, :]
    Y = grid.axis(1)[:, None]
    z_l1_top = zc["L1"] + dims["L1"].body_height_mm / 2
    z_psoas_end = sac_z - 60.0
    z_bif = zc["L4"]
    z_ivc_conf = zc["L5"]
    z_dia0 = zc["T12"] + 10.0  # posterior recess of the diaphragm; domes ~50 mm higher anteriorly
    lung_top = zc["T1"] + 40.0

    def ell(cx, cy, a, b):
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2

    for k in range(nz):
        z = float(zw[k])
        xs_, ys_ = float(xs[k]), float(ys[k])
        a, b, f = float(A[k]), float(B[k]), float(F[k])
        w, d, cw = float(W[k]), float(D[k]), float(CW[k])
        cx, cy = xs_, ys_ - OUTLINE_OFFSET_MM
        t = tissues[k]
        t[ell(cx, cy, a, b) <= 1] = T["subcutaneous_fat"]
        t[ell(cx, cy, a - f, b - f) <= 1] = T["wall_muscle"]
        ai, bi = a - f - WALL_MUSCLE_MM, b - f - WALL_MUSCLE_MM
        inner = ell(cx, cy, ai, bi) <= 1
        t[inner] = T["viscera"]
        # Behind the vertebral bodies the inner compartment is the posterior wall (muscle).
        back = inner & (Y > ys_ + d / 2)
        t[back] = T["wall_muscle"]
        inner &= ~back
        # Diaphragm: height rises anteriorly (fraction of AP depth from the posterior wall).
        z_dia = z_dia0 + 50.0 * np.clip((cy + bi - Y) / (2 * bi), 0.0, 1.0)  # (ny, 1)
        below = z < z_dia
        ring = inner & (ell(cx, cy, ai - 12, bi - 12) > 1) & below
        t[ring] = T["visceral_fat"]
        t[inner & (ell(xs_, ys_ - d / 2 - 15, w / 2 + 45, d / 2 + 15) <= 1)] = T["visceral_fat"]
        if z < lung_top:
            lung = (ell(cx, cy, ai - 5, bi - 5) <= 1) & ~below
            lung &= ~((np.abs(X - xs_ - 10) < 50) & (Y < ys_ + d / 2))  # mediastinum / heart
            lung &= ~((np.abs(X - xs_) < w / 2 + 12) & (Y > ys_ - d / 2 - 5))  # paravertebral
            t[lung] = T["lung"]
        # Erector spinae + multifidus behind the laminae, under the fat.
        pa, pb = 0.45 * w + 3, 0.8 * d + 4
        pcy = ys_ + d / 2 + 8 + pb
        in1 = ell(cx, cy, a - f, b - f) <= 1
        for side in (-1, 1):
            t[in1 & (ell(xs_ + side * (cw / 2 + pa - 2), pcy, pa, pb) <= 1)] = T["paraspinal_muscle"]
        if z_psoas_end < z < z_l1_top:
            r = float(np.interp(z, [zc["L5"], z_l1_top], [22.0, 4.0]))
            for side in (-1, 1):
                t[ell(xs_ + side * (w / 2 + 0.9 * r), ys_, r, r) <= 1] = T["psoas"]
        # Aorta: left-lateral of the thoracic bodies, left-anterior in the abdomen; bifurcates at L4.
        if z > z_psoas_end:
            r = 11.0
            if z > z_bif:
                ab = float(np.clip((zc["T10"] - z) / (zc["T10"] - zc["T12"]), 0, 1))
                ax = xs_ + (1 - ab) * (w / 2 + 0.6 * r) + ab * 0.25 * w
                ay = ys_ + (1 - ab) * (-0.2 * d) + ab * (-d / 2 - r - 1)
                t[ell(ax, ay, r, r) <= 1] = T["aorta"]
            else:
                dz = z_bif - z
                for side in (-1, 1):
                    t[ell(xs_ + side * (8 + 0.5 * dz), ys_ - d / 2 - 8 - 0.2 * dz, 6.0, 6.0) <= 1] = T["aorta"]
            if zc["T10"] > z > z_ivc_conf:
                t[ell(xs_ - (0.3 * w + 14), ys_ - d / 2 - 10, 13.0, 9.0) <= 1] = T["ivc"]
            elif z <= z_ivc_conf:
                dz = z_ivc_conf - z
                for side in (-1, 1):
                    t[ell(xs_ + side * (14 + 0.5 * dz), ys_ - d / 2 - 6, 7.0, 7.0) <= 1] = T["ivc"]
        if progress is not None and k % 64 == 0:
            report(progress, 0.05 + 0.2 * k / nz, "phantom: soft tissue")


def _paint_rods(tissues, hu, grid, kev) -> list[dict]:
    """Water-equivalent block with K2HPO4 rods under the patient (posterior = table side)."""
    X = grid.axis(0)[None, :]
    Y = grid.axis(1)[:, None]
    body = np.any(tissues != T["air"], axis=0)
    ys = grid.axis(1)[np.any(body, axis=1)]
    y_top = float(ys.max()) + 3.0 if ys.size else float(grid.axis(1)[-1]) - 35
    x0 = float(np.mean(grid.axis(0)[np.any(body, axis=0)])) if ys.size else 0.0
    base = (np.abs(X - x0) <= 150) & (Y >= y_top) & (Y <= y_top + 32)
    tissues[:, base] = T["calibration_base"]
    hu[:, base] = physics.tissue_hu("water", kev)
    mu_w = physics.mu_cm("water", kev)
    mu_a = physics.mu_cm("air", kev)
    out = []
    n = len(RODS)
    zmid = float(grid.axis(2).mean())
    for i, (name, rho_w, rho_k) in enumerate(RODS):
        cx = x0 + (i - (n - 1) / 2) * 45.0
        cy = y_top + 16.0
        m = (X - cx) ** 2 + (Y - cy) ** 2 <= ROD_RADIUS_MM ** 2
        mu = rho_w / 1000 * physics.mass_attenuation_cm2_g("water", kev) \
            + rho_k / 1000 * physics.mass_attenuation_cm2_g("k2hpo4", kev)
        rod_hu = float(1000.0 * (mu - mu_w) / (mu_w - mu_a))
        tissues[:, m] = T["calibration_rod"]
        hu[:, m] = rod_hu
        out.append({"name": name, "k2hpo4_mg_cm3": rho_k, "water_density_mg_cm3": rho_w,
                    "center_lps_mm": [cx, cy, zmid], "radius_mm": ROD_RADIUS_MM, "hu_true": rod_hu})
    return out


# --- discs and canal -------------------------------------------------------------------------
def _paint_disc(tissues, hu, grid, curve, dims, upper, lower, s_center):
    du = dims[upper]
    s_a = curve.level_top_s[upper] + du.body_height_mm  # inferior endplate of the upper body
    gap = du.disc_below_mm
    fr = curve.frame(s_a + gap / 2)
    if lower is None:  # L5/S1
        a, b = du.body_width_mm / 2 * 0.97, du.body_depth_mm / 2 * 0.97
    else:
        dl = dims[lower]
        a = (du.body_width_mm + dl.body_width_mm) / 4 * 0.97
        b = (du.body_depth_mm + dl.body_depth_mm) / 4 * 0.97
    hw = gap / 2 + 4.0
    sl = grid.bbox(_box_corners(fr, (-a, a), (-b, b), (-hw, hw)))
    if sl is None:
        return
    u, v, w = _local(grid, fr, sl)
    m = ((u / a) ** 2 + (v / b) ** 2 <= 1) & (np.abs(w) <= hw)
    tissues[sl][m] = T["disc"]
    hu[sl][m] = DISC_HU


def _canal_geom(d: LevelDims):
    b = d.body_depth_mm / 2
    return b + d.canal_depth_mm / 2, d.canal_width_mm / 2, d.canal_depth_mm / 2  # vc, semi-axes


def _paint_canal(tissues, hu, grid, fr, d):
    vc, ca, cb = _canal_geom(d)
    hw = d.body_height_mm / 2 + d.disc_below_mm / 2 + 3.0
    sl = grid.bbox(_box_corners(fr, (-ca, ca), (vc - cb, vc + cb), (-hw, hw)))
    if sl is None:
        return
    u, v, w = _local(grid, fr, sl)
    m = ((u / ca) ** 2 + ((v - vc) / cb) ** 2 <= 1) & (np.abs(w) <= hw)
    tissues[sl][m] = T["canal"]
    hu[sl][m] = CSF_HU


# --- vertebra --------------------------------------------------------------------------------
def _paint_vertebra(tissues, hu, vertebrae, bodies, grid, fr, d, above, vid, fracture, trab_hu,
                    cortical_hu, metal=False) -> dict:
    a, b, H = d.body_width_mm / 2, d.body_depth_mm / 2, d.body_height_mm
    vc, ca, cb = _canal_geom(d)
    lam = d.lamina_mm
    u0 = ca + d.pedicle_width_mm / 2  # pedicle axis distance from the midline
    w_ped = 0.15 * H
    disc_above = above.disc_below_mm if above is not None else 5.0
    sp_v0 = vc + cb + lam - 2.0
    sp_dv = d.sp_length_mm * np.cos(np.radians(d.sp_down_deg))
    sp_dw = d.sp_length_mm * np.sin(np.radians(d.sp_down_deg))
    umax = max(a, d.tp_tip_mm) + 3
    tp_dv = (d.tp_tip_mm - u0) * np.tan(np.radians(d.tp_posterior_deg))
    vmax = max(sp_v0 + sp_dv, vc + tp_dv) + d.sp_half_height_mm + 3
    wlo = -(H / 2 + d.disc_below_mm / 2 + 4) - sp_dw
    whi = H / 2 + disc_above / 2 + 4
    sl = grid.bbox(_box_corners(fr, (-umax, umax), (-b - 3, vmax), (wlo, whi)))
    hfun, heights = _heights(d, fracture)
    # Analytic body volume: integral of H over the elliptic cross-section (fine 2D grid).
    gu, gv = np.meshgrid(np.linspace(-a, a, 401), np.linspace(-b, b, 401), indexing="ij")
    r2g = (gu / a) ** 2 + (gv / b) ** 2
    hg = np.broadcast_to(hfun(gu, gv, r2g), gu.shape)
    inside = r2g <= 1
    volume = float(np.sum(hg[inside]) * (gu[1, 0] - gu[0, 0]) * (gv[0, 1] - gv[0, 0]))
    # Endplates collapse symmetrically about w = 0, so the centroid only moves along v.
    v_centroid = float(np.sum((hg * gv)[inside]) / np.sum(hg[inside]))
    out = {"heights": heights, "volume_mm3": volume, "centroid_world": fr.to_world(0.0, v_centroid, 0.0)}
    if sl is None:
        return out
    u, v, w = _local(grid, fr, sl)
    au = np.abs(u)
    r2 = (u / a) ** 2 + (v / b) ** 2
    Hh = hfun(u, v, r2) / 2
    body = (r2 <= 1) & (np.abs(w) <= Hh)
    shell = (((u / (a - CORTEX_MM)) ** 2 + (v / (b - CORTEX_MM)) ** 2) > 1) | (np.abs(w) > Hh - ENDPLATE_MM)
    canal = (u / ca) ** 2 + ((v - vc) / cb) ** 2 <= 1
    ped = (((au - u0) / (d.pedicle_width_mm / 2)) ** 2 + ((w - w_ped) / (d.pedicle_height_mm / 2)) ** 2 <= 1) \
        & (v >= b - 4) & (v <= vc + 0.25 * cb)
    lamina = ((u / (ca + lam)) ** 2 + ((v - vc) / (cb + lam)) ** 2 <= 1) & ~canal & (v >= vc) \
        & (np.abs(w + 0.05 * H) <= 0.45 * H)
    ap_r2 = ((au - u0) / (d.pedicle_width_mm / 2 + 1)) ** 2
    sup_ap = (ap_r2 + ((v - vc) / 3.5) ** 2 <= 1) & (w >= w_ped) & (w <= H / 2 + disc_above / 2 + 2)
    inf_ap = (ap_r2 + ((v - vc - 8) / 3.5) ** 2 <= 1) & (w <= w_ped) & (w >= -(H / 2 + d.disc_below_mm / 2 + 2))
    tp_v = vc + (au - u0) * np.float32(np.tan(np.radians(d.tp_posterior_deg)))
    tp = (((v - tp_v) / d.tp_half_ap_mm) ** 2 + ((w - w_ped) / d.tp_half_height_mm) ** 2 <= 1) \
        & (au >= u0) & (au <= d.tp_tip_mm)
    sp_w = -0.05 * H - (v - sp_v0) * np.float32(np.tan(np.radians(d.sp_down_deg)))
    sp = (v >= sp_v0) & (v <= sp_v0 + sp_dv) & (np.abs(w - sp_w) <= d.sp_half_height_mm) \
        & (au <= d.sp_half_width_mm)
    pe = (ped | lamina | sup_ap | inf_ap | tp | sp) & ~body & ~canal
    sp_zyx = grid.spacing[::-1]
    pe_cortex = _cortex(pe, sp_zyx)
    vert = body | pe
    t_s, h_s, v_s, b_s = tissues[sl], hu[sl], vertebrae[sl], bodies[sl]
    t_s[vert] = T["vertebra"]
    v_s[vert] = vid
    b_s[body] = vid
    h_s[pe] = trab_hu
    h_s[pe_cortex] = cortical_hu
    h_s[body] = trab_hu
    h_s[body & shell] = cortical_hu
    if metal:  # two pedicle screws (6.5 mm), entry at the lamina, tip in the anterior body
        for side in (-1.0, 1.0):
            p0 = np.array([side * u0, vc + cb + lam * 0.5, w_ped])
            p1 = np.array([side * 5.0, -b + 6.0, w_ped])
            dvec = p1 - p0
            L2 = float(dvec @ dvec)
            tt = np.clip(((u - p0[0]) * dvec[0] + (v - p0[1]) * dvec[1] + (w - p0[2]) * dvec[2]) / L2, 0, 1)
            dist2 = (u - p0[0] - tt * dvec[0]) ** 2 + (v - p0[1] - tt * dvec[1]) ** 2 + (w - p0[2] - tt * dvec[2]) ** 2
            m = dist2 <= 3.25 ** 2
            t_s[m] = T["metal"]
            h_s[m] = METAL_HU
            v_s[m] = vid
    return out


# --- ribs, sacrum, pelvis --------------------------------------------------------------------
def _paint_rib(tissues, hu, grid, curve, fr, d, name, side, zc, cortical_hu, marrow_hu):
    """A flat-elliptic tube following the chest wall from the transverse-process tip forward and down."""
    i = SPINE_LEVELS.index(name)
    vc, _, _ = _canal_geom(d)
    u0 = d.canal_width_mm / 2 + d.pedicle_width_mm / 2
    tip = d.tp_tip_mm
    tp_v = vc + (tip - u0) * np.tan(np.radians(d.tp_posterior_deg))
    p_tip = fr.to_world(side * tip, tp_v, 0.15 * d.body_height_mm)
    z0 = float(p_tip[2])
    sac_z = float(curve.point(curve.sacrum_top_s)[2])
    A, B, F = (float(x[0]) for x in _outline(np.array([z0]), zc, sac_z))
    x_e = float(fr.origin[0])
    y_c = float(fr.origin[1]) - OUTLINE_OFFSET_MM
    inset = F + WALL_MUSCLE_MM + 4.0
    y_post = float(p_tip[1]) + 8.0
    y_ant = y_c - (B - inset)
    Br = (y_post - y_ant) / 2
    y_e = y_post - Br
    Ar = A - inset
    th0 = float(np.arcsin(np.clip(tip / Ar, 0, 0.99)))
    th_end = {10: 0.55 * np.pi, 11: 0.35 * np.pi}.get(i, 0.85 * np.pi)  # T11/T12 floating ribs
    drop = 25.0 + 20.0 * i / 11.0  # lower ribs slope more
    hh, tr = 5.5, 3.0  # half height, half thickness (mm)
    xa = x_e + side * np.array([tip - 8, Ar + tr + 2])
    pts = np.array([[xa.min(), y_ant - 8, z0 - drop - 8], [xa.max(), y_post + 8, z0 + 8]])
    sl = grid.bbox(pts)
    if sl is None:
        return
    X = grid.axis(0, sl[2].start, sl[2].stop)[None, :]
    Y = grid.axis(1, sl[1].start, sl[1].stop)[:, None]
    dx = (X - x_e) * side
    dy = Y - y_e
    th = np.arctan2(dx / Ar, dy / Br)
    rho = np.sqrt((dx / Ar) ** 2 + (dy / Br) ** 2)
    R = np.sqrt((Ar * np.sin(th)) ** 2 + (Br * np.cos(th)) ** 2)
    dr = (rho - 1.0) * R
    cand = (np.abs(dr) <= tr) & (th >= th0) & (th <= th_end)
    iy, ix = np.nonzero(cand)
    if iy.size == 0:
        return
    zc_r = z0 - drop * (th[iy, ix] - th0) / (np.pi - th0)
    drc = dr[iy, ix]
    Z = grid.axis(2, sl[0].start, sl[0].stop)[:, None]
    e = ((Z - zc_r[None]) / hh) ** 2 + (drc[None] / tr) ** 2
    inside = e <= 1
    core = ((Z - zc_r[None]) / (hh - 1.2)) ** 2 + (drc[None] / (tr - 1.2)) ** 2 <= 1
    zz, cc = np.nonzero(inside)
    gz, gy, gx = zz + sl[0].start, iy[cc] + sl[1].start, ix[cc] + sl[2].start
    tissues[gz, gy, gx] = T["rib"]
    hu[gz, gy, gx] = np.where(core[zz, cc], marrow_hu, cortical_hu)


def _paint_sacrum(tissues, hu, vertebrae, grid, curve, sac_top_pt, cortical_hu, trab_hu):
    """Tapering, anteriorly concave block along the tilted sacral axis; sacral canal inside."""
    L, h1 = 100.0, 14.0
    fr = curve.sacrum_frame(curve.sacrum_top_s + h1)
    sl = grid.bbox(_box_corners(fr, (-55, 55), (-45, 30), (h1 - L, h1)))
    if sl is None:
        return
    u, v, w = _local(grid, fr, sl)
    frac = np.clip((h1 - w) / L, 0.0, 1.0)
    a_s = 50.0 - 36.0 * frac
    b_s = 18.0 - 8.0 * frac
    v_cen = -0.003 * (w - h1) ** 2
    sac = ((u / a_s) ** 2 + ((v - v_cen) / b_s) ** 2 <= 1) & (w <= h1) & (w >= h1 - L)
    canal = ((u / (11.0 - 5.0 * frac)) ** 2 + ((v - v_cen - 0.55 * b_s) / (5.0 - 2.0 * frac)) ** 2 <= 1) & sac
    bone = sac & ~canal
    ctx = _cortex(bone, grid.spacing[::-1])
    t_s, h_s, v_s = tissues[sl], hu[sl], vertebrae[sl]
    t_s[canal] = T["canal"]
    h_s[canal] = CSF_HU
    t_s[bone] = T["sacrum_pelvis"]
    v_s[bone] = VERSE_IDS["sacrum"]
    h_s[bone] = trab_hu
    h_s[ctx] = cortical_hu


def _paint_pelvis(tissues, hu, grid, sac_top_pt, cortical_hu, trab_hu):
    """Iliac wings: an 8 mm elliptic shell lateral to the sacrum, crest ~40 mm above S1."""
    xs, ys, zs = (float(c) for c in sac_top_pt)
    cy, A, Bw, th = ys - 60.0, 120.0, 75.0, 4.0
    pts = np.array([[xs - A - 10, cy - 20, zs - 90], [xs + A + 10, ys + 30, zs + 40]])
    sl = grid.bbox(pts)
    if sl is None:
        return
    X = grid.axis(0, sl[2].start, sl[2].stop)[None, :]
    Y = grid.axis(1, sl[1].start, sl[1].stop)[:, None]
    dx, dy = X - xs, Y - cy
    rho = np.sqrt((dx / A) ** 2 + (dy / Bw) ** 2)
    ang = np.arctan2(dx / A, dy / Bw)
    R = np.sqrt((A * np.sin(ang)) ** 2 + (Bw * np.cos(ang)) ** 2)
    shell2d = (np.abs((rho - 1) * R) <= th) & (np.abs(dx) >= 48) & (Y >= cy - 15) & (Y <= ys + 30)
    m = np.broadcast_to(shell2d, (sl[0].stop - sl[0].start,) + shell2d.shape).copy()
    ctx = _cortex(m, grid.spacing[::-1])
    t_s, h_s = tissues[sl], hu[sl]
    keep = m & (t_s != T["sacrum_pelvis"])
    t_s[keep] = T["sacrum_pelvis"]
    h_s[keep] = trab_hu
    h_s[keep & ctx] = cortical_hu


# --- scanner ---------------------------------------------------------------------------------
def _scanner(hu: np.ndarray, grid: _Grid, cfg: CTPhantomConfig, progress) -> np.ndarray:
    """In-plane Gaussian blur (FWHM), slice-profile blur, blur-correlated noise, int16."""
    fwhm2sig = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sx, sy, sz = grid.spacing
    sig_xy = (cfg.blur_fwhm_mm * fwhm2sig / sy, cfg.blur_fwhm_mm * fwhm2sig / sx)
    thick = cfg.slice_thickness_mm
    sig_z = thick * fwhm2sig / sz if thick is not None and thick > sz + 1e-6 else 0.0
    # White noise is added before the blur and scaled so the blurred noise has SD = noise_hu.
    delta = np.zeros((1 if sig_z == 0 else 31, 31, 31), np.float32)
    delta[delta.shape[0] // 2, 15, 15] = 1.0
    k = ndimage.gaussian_filter(delta, (sig_z, *sig_xy), mode="constant") if max(sig_z, *sig_xy) > 0 else delta
    white_sd = cfg.noise_hu / float(np.sqrt(np.sum(k.astype(np.float64) ** 2)))
    rng = np.random.default_rng(cfg.seed)
    nz = hu.shape[0]
    for z in range(nz):
        sl = hu[z]
        if cfg.noise_hu > 0:
            sl += rng.standard_normal(sl.shape, dtype=np.float32) * np.float32(white_sd)
        if max(sig_xy) > 0:
            hu[z] = ndimage.gaussian_filter(sl, sig_xy, mode="nearest")
        if progress is not None and z % 64 == 0:
            report(progress, 0.65 + 0.3 * z / nz, "phantom: scanner blur and noise")
    if sig_z > 0:
        hu = ndimage.gaussian_filter1d(hu, sig_z, axis=0, mode="nearest")
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16)
