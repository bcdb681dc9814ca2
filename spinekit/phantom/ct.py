"""Digital thoracolumbar spine CT phantom with known truth.

The phantom is drawn analytically in millimetres (world = LPS, x patient-left, y posterior,
z superior); each vertebra is computed only inside its own bounding box, soft tissue slice by
slice. Labels (vertebrae, bodies, tissues) are sampled at voxel centres. The HU are volume
averages around the bone: inside the boxes of the vertebrae and the sacrum the whole scene is
redrawn with ``pv_factors(spacing)`` sub-samples per voxel and axis (<= 0.5 mm, at most 6) and the
HU (not the labels) are averaged, so the 1 mm cortex and endplates stay a continuous, partial-volume
rim at 2-3 mm spacing, as in real CT; elsewhere (soft tissue, ribs and pelvis away from the spine)
the HU are sampled at voxel centres. HU come from ``spinekit.physics`` (the same NIST model the
phantomless calibration inverts), so a calibration that recovers the truth here is tested on
noise, blur and partial volume, not on a different physics.

Tissue ids of ``CTPhantom.tissues`` (``TISSUE_IDS``, also in ``truth["tissue_ids"]``):
 1 subcutaneous fat, 2 visceral/retroperitoneal fat, 3 paraspinal muscle, 4 psoas, 5 aorta (and
 common iliac arteries), 6 IVC (and iliac veins), 7 intervertebral disc, 8 spinal canal (CSF),
 9 rib, 10 sacrum / pelvis, 11 metal, 12 calibration rod, 13 air outside the body,
 14 abdominal / chest wall muscle, 15 viscera and mediastinum (soft tissue), 16 lung,
 17 vertebra (bone of the rendered levels), 18 calibration phantom base (water-equivalent),
 19 liver, 20 kidney, 21 heart, 22 portal vein, 23 basivertebral vein (inside the body label; only
 with basivertebral_vein=True; HU as the IVC).

HU (documented numbers): air, fat, muscle, blood, cortical bone, water from NIST (physics);
disc 80, CSF 10, lung -850, metal 3071 (the usual int16 CT ceiling; titanium's true HU is far
above it). Optional beam-hardening streaks of the screws (``metal_artifacts``, see
``metal_streaks_hu``) in the slices that hold metal. Contrast: native aorta =
IVC = heart = portal vein = NIST blood; arterial aorta 300, IVC 90, heart 250, portal vein 120;
portal-venous aorta 160, IVC 150, heart 150, portal vein 180. Viscera 40 / 60 / 100, liver
55 / 70 / 110, kidney 30 / 150 / 170 (native / arterial / portal-venous). Muscle and fat are not
enhanced. Trabecular bone enhancement is applied in density space so that Toelly's equations
(native = -2.287 + 0.964*arterial; native = -4.517 + 0.978*portal-venous) applied to the
apparent density recover the true density.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .. import physics
from ..errors import InputError
from ..image import Image, write_image
from ..outputs import staged
from ..levels import VERSE_IDS
from ..progress import Progress, report
from ._bone import (FRACTURE_TYPES, GENANT_LOSS, paint_canal, paint_disc, paint_pelvis, paint_rib, paint_sacrum,
                    paint_spinal_rods, paint_vertebra)
from ._grid import TISSUE_IDS, Grid, Materials, box_corners, cortex_iterations
from ._soft import OUTLINE_OFFSET_MM, outline, paint_soft_tissue
from ._spine import SPINE_LEVELS, build_curve, level_dims

T = TISSUE_IDS

PHASES = ("native", "arterial", "portal-venous")
# Enhanced HU by phase: (aorta, IVC, heart, portal vein); None = NIST blood (native).
VESSEL_HU = {"native": (None, None, None, None), "arterial": (300.0, 90.0, 250.0, 120.0),
             "portal-venous": (160.0, 150.0, 150.0, 180.0)}
ORGAN_HU = {  # viscera, liver, kidney
    "native": (40.0, 55.0, 30.0), "arterial": (60.0, 70.0, 150.0), "portal-venous": (100.0, 110.0, 170.0)}
# Toelly 2017: native = a + b * contrast (mg/cm3).
TOELLY = {"arterial": (-2.287, 0.964), "portal-venous": (-4.517, 0.978)}
DISC_HU, CSF_HU, LUNG_HU, METAL_HU = 80.0, 10.0, -850.0, 3071.0
HU_RANGE = (-1024, 3071)
# Mindways-like rods: (name, water-equivalent density mg/cm3, K2HPO4 mg/cm3). Illustrative values.
RODS = (("A", 1012.0, 0.0), ("B", 1045.0, 50.0), ("C", 1020.0, 100.0), ("D", 1035.0, 200.0))
ROD_RADIUS_MM = 6.5
# A scoliotic curve spans at least this much of the column (about T4-T12) by default. Drawn over
# a 4-level view alone, a 20 mm curve bent with a radius of about 25 mm: neighbouring vertebrae
# leaned up to 54 deg apart and their bodies interpenetrated (39 % of 288 random views over 15 deg).
# Over 250 mm the largest is 11.5 deg, the apical wedging of a moderate curve (Cobb angle up to
# about 30 deg).
SCOLIOSIS_MIN_SPAN_MM = 250.0
MAX_VOXELS = 1.0e9  # ~ 7 GB while rendering; larger volumes are a mistake, not a phantom


@dataclass
class CTPhantomConfig:
    """What to render. Sizes in mm, densities in mg/cm3 of hydroxyapatite, angles in degrees.

    kyphosis_deg / lordosis_deg: change of the centreline's sagittal angle over T1-T12 and over
    the T12/L1-L5/S1 discs (the sacrum is 20 deg steeper than L5/S1). densities_mg_cm3 may name
    any subset of the levels; the rest get ``default_density_mg_cm3``. fractures: {level: (type,
    Genant grade)} with type wedge | biconcave | crush; the height loss is the middle of the grade's
    band (22.5 / 32.5 / 50 %). shape_zyx: with it the volume is centred on the rendered vertebrae
    and levels cut by its faces are reported with complete = False (levels entirely outside are
    left out of the truth).
    """

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
    # The scoliotic curve spans the rendered range, at least this long about its middle. 0: the
    # rendered range only, which bends a short view far tighter than anatomy (a stress geometry).
    scoliosis_span_mm: float = SCOLIOSIS_MIN_SPAN_MM
    contrast_phase: str = "native"  # native | arterial | portal-venous
    fractures: dict[str, tuple[str, int]] = field(default_factory=dict)  # {"L1": ("wedge", 2)}
    metal_level: str | None = None  # pedicle screws in that level; a range ("L3-L4"): joined by rods
    # Beam-hardening streaks from the (titanium) screws: 0 none, 1 = a two-energy beam with no
    # metal-artifact reduction (see metal_streaks_hu); scanners' corrections leave a fraction.
    metal_artifacts: float = 0.0
    calibration_rods: bool = False  # Mindways-like K2HPO4 rods under the patient
    seed: int = 0
    basivertebral_vein: bool = False  # venous channel (blood HU) at the posterior body centre


@dataclass
class CTPhantom:
    """The rendered phantom. All images share one grid: LPS, identity direction; the z index grows
    superiorly, y posteriorly, x to the patient's left.

    truth (JSON-serialisable): "levels" {name: verse_id, density_mg_cm3, apparent_density_mg_cm3
    (what a native-calibrated reading gives in the contrast phase), true_trabecular_hu (noise-free
    HU of the trabecular bone), height_{anterior,middle,posterior}_mm (15/50/85 % of AP depth),
    height_normal_mm (mean), height_posterior_normal_mm (unfractured Hp),
    height_ratio_{wedge,biconcave,crush} (Ha/Hp, Hm/Hp, Hp/unfractured Hp), genant_grade,
    fracture_type, body_width_mm, body_depth_mm, body_volume_cm3 (of the body label),
    body_volume_analytic_cm3, complete, centroid_lps_mm (of the body label),
    centroid_analytic_lps_mm, center_lps_mm and axis_{lateral,posterior,superior} (the body
    frame; heights are measured along axis_superior), metal, basivertebral_vein, ribs},
    "levels_rendered", "sacrum", "scanner" (incl. pv_subsamples_zyx), "tissue_hu", "contrast_phase",
    "marrow_fat_fraction", "rods" [{name, k2hpo4_mg_cm3, water_density_mg_cm3, center_lps_mm, radius_mm, hu_true}],
    "tissue_ids", "curve", "config".
    """

    image: Image  # int16 HU
    vertebrae: Image  # uint8 VerSe ids, whole vertebrae (+ sacrum 26)
    bodies: Image  # uint8 VerSe ids, vertebral bodies only (cortex included)
    tissues: Image  # uint8 TISSUE_IDS
    truth: dict
    config: CTPhantomConfig

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """ct.nii.gz, vertebrae.nii.gz, bodies.nii.gz, tissues.nii.gz, truth.json (atomic)."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: the phantom output folder is an existing file.")
        out.mkdir(parents=True, exist_ok=True)
        items = {"ct": self.image, "vertebrae": self.vertebrae, "bodies": self.bodies, "tissues": self.tissues}
        final = {key: out / f"{key}.nii.gz" for key in items}
        final["truth"] = out / "truth.json"
        with staged(final) as tmp:
            for key, img in items.items():
                write_image(img, tmp[key])
            tmp["truth"].write_text(json.dumps(self.truth, indent=2))
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


def metal_levels(spec: str | None) -> list[str]:
    """Levels with pedicle screws: none, one ("L3") or a range ("L3-L4", joined by rods)."""
    if not spec:
        return []
    parts = str(spec).strip().upper().replace(":", "-").split("-")
    if len(parts) > 2:
        raise InputError(f"metal level '{spec}' must be one level or a range such as L3-L4.")
    return level_range(parts[0], parts[-1])


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
        raise InputError(
            f"fracture {name}={spec!r} must be a (type, Genant grade) pair such as ('wedge', 2).") from None


def _validate(cfg: CTPhantomConfig) -> list[str]:
    levels = level_range(cfg.first_level, cfg.last_level)
    if len(cfg.spacing_mm) != 3 or min(cfg.spacing_mm) <= 0:
        raise InputError(f"phantom spacing {cfg.spacing_mm} must be three positive numbers (x, y, z) in mm.")
    if cfg.shape_zyx is not None and (len(cfg.shape_zyx) != 3 or min(cfg.shape_zyx) < 8):
        raise InputError(f"phantom shape {cfg.shape_zyx} must be three sizes (z, y, x) of at least 8 voxels.")
    if cfg.shape_zyx is not None and float(np.prod(cfg.shape_zyx)) > MAX_VOXELS:
        raise InputError(f"phantom shape {cfg.shape_zyx} has more than {MAX_VOXELS:.0e} voxels.")
    if cfg.contrast_phase not in PHASES:
        raise InputError(f"contrast phase '{cfg.contrast_phase}' is not one of {', '.join(PHASES)}.")
    if not 0.0 <= cfg.marrow_fat_fraction <= 1.0:
        raise InputError(f"marrow fat fraction {cfg.marrow_fat_fraction} must lie between 0 and 1.")
    if not physics.ENERGY_RANGE_KEV[0] <= cfg.effective_kev <= physics.ENERGY_RANGE_KEV[1]:
        lo, hi = physics.ENERGY_RANGE_KEV
        raise InputError(f"effective energy {cfg.effective_kev} keV is outside {lo:g}-{hi:g} keV.")
    if cfg.noise_hu < 0 or cfg.blur_fwhm_mm < 0:
        raise InputError("phantom noise and blur must not be negative.")
    if not 0.0 <= cfg.scoliosis_span_mm <= 1000.0:
        raise InputError(f"scoliosis span {cfg.scoliosis_span_mm} mm is outside 0-1000 mm.")
    if cfg.metal_artifacts < 0:
        raise InputError(f"metal artifact strength {cfg.metal_artifacts} must not be negative.")
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
    if cfg.metal_level is not None and not set(metal_levels(cfg.metal_level)) <= set(levels):
        raise InputError(f"metal level '{cfg.metal_level}' is not among the rendered levels {levels[0]}-{levels[-1]}.")
    return levels


# --- the generator ---------------------------------------------------------------------------
def _normalise(cfg: CTPhantomConfig, overrides: dict) -> CTPhantomConfig:
    known = {f.name for f in fields(CTPhantomConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise InputError(f"unknown phantom option '{bad[0]}' (known: {', '.join(sorted(known))}).")
    cfg = replace(cfg, **overrides)
    try:
        spacing = tuple(float(s) for s in cfg.spacing_mm)
        shape = tuple(int(n) for n in cfg.shape_zyx) if cfg.shape_zyx is not None else None
    except (TypeError, ValueError):
        raise InputError(f"phantom spacing {cfg.spacing_mm!r} / shape {cfg.shape_zyx!r} must be numbers.") from None
    return replace(
        cfg,
        first_level=str(cfg.first_level).strip().upper(), last_level=str(cfg.last_level).strip().upper(),
        spacing_mm=spacing, shape_zyx=shape,
        fractures={k.strip().upper(): _fracture_spec(k, v) for k, v in (cfg.fractures or {}).items()},
        metal_level=cfg.metal_level.strip().upper() if cfg.metal_level else None,
        densities_mg_cm3={k.strip().upper(): float(v) for k, v in (cfg.densities_mg_cm3 or {}).items()} or None,
        contrast_phase=str(cfg.contrast_phase).strip().lower(),
    )


def generate_ct_phantom(config: CTPhantomConfig | None = None, progress: Progress | None = None,
                        **overrides: Any) -> CTPhantom:
    """Build a thoracolumbar CT phantom and its truth.

    config: a CTPhantomConfig (defaults when None); keyword overrides replace its fields, e.g.
    ``generate_ct_phantom(spacing_mm=(2, 2, 2), fractures={"L1": ("wedge", 2)})``.
    progress: optional ``progress(fraction, message)`` callback.
    Raises InputError (one sentence) for an invalid configuration.
    """
    cfg = _normalise(config or CTPhantomConfig(), overrides)
    levels = _validate(cfg)
    report(progress, 0.0, "phantom: geometry")
    kev, phase, fat = cfg.effective_kev, cfg.contrast_phase, cfg.marrow_fat_fraction
    sacrum = cfg.include_sacrum and levels[-1] == "L5"
    dims = {n: level_dims(n) for n in SPINE_LEVELS}

    # Centreline over the whole column; scoliosis spans the rendered range, at least
    # scoliosis_span_mm about its middle (a short view shows part of a curve).
    probe = build_curve(cfg.kyphosis_deg, cfg.lordosis_deg, 0.0, (0.0, 1.0))
    s0 = probe.level_top_s[levels[0]]
    s1 = probe.level_top_s[levels[-1]] + dims[levels[-1]].body_height_mm
    if s1 - s0 < cfg.scoliosis_span_mm:
        s_mid = 0.5 * (s0 + s1)
        s0, s1 = s_mid - 0.5 * cfg.scoliosis_span_mm, s_mid + 0.5 * cfg.scoliosis_span_mm
    curve = build_curve(cfg.kyphosis_deg, cfg.lordosis_deg, cfg.scoliosis_mm, (s0, s1))
    s_center = {n: curve.level_top_s[n] + dims[n].body_height_mm / 2 for n in SPINE_LEVELS}
    frames = {n: curve.frame(s_center[n]) for n in SPINE_LEVELS}
    zc = {n: float(frames[n].origin[2]) for n in SPINE_LEVELS}
    grid = _make_grid(cfg, curve, levels, dims, zc, sacrum)

    # Noise-free HU per material: tissues first; bone/rod materials are added while painting.
    blood_hu = physics.tissue_hu("blood", kev)
    aorta_hu, ivc_hu, heart_hu, portal_hu = (blood_hu if h is None else h for h in VESSEL_HU[phase])
    viscera_hu, liver_hu, kidney_hu = ORGAN_HU[phase]
    fat_hu, muscle_hu = physics.tissue_hu("fat", kev), physics.tissue_hu("muscle", kev)
    cortical_hu, water_hu, air_hu = (physics.tissue_hu(n, kev) for n in ("cortical_bone", "water", "air"))
    tissue_hu = {
        T["air"]: air_hu, T["subcutaneous_fat"]: fat_hu, T["visceral_fat"]: fat_hu,
        T["paraspinal_muscle"]: muscle_hu, T["psoas"]: muscle_hu, T["wall_muscle"]: muscle_hu,
        T["aorta"]: aorta_hu, T["ivc"]: ivc_hu, T["heart"]: heart_hu, T["portal_vein"]: portal_hu,
        T["basivertebral_vein"]: ivc_hu,
        T["disc"]: DISC_HU, T["canal"]: CSF_HU,
        T["lung"]: LUNG_HU, T["viscera"]: viscera_hu, T["liver"]: liver_hu, T["kidney"]: kidney_hu,
        T["calibration_base"]: water_hu, T["metal"]: METAL_HU,
    }
    M = Materials(tissue_hu)
    dens = {n: (cfg.densities_mg_cm3 or {}).get(n, default_density_mg_cm3(n)) for n in levels}
    apparent = {n: apparent_density_mg_cm3(dens[n], phase) for n in levels}
    trab_hu = {n: float(physics.trabecular_hu(apparent[n], kev, fat)) for n in levels}
    scene = _Scene(cfg=cfg, M=M, curve=curve, levels=levels, dims=dims, zc=zc, frames=frames, sacrum=sacrum,
                   trab_hu=trab_hu, cortical_hu=cortical_hu,
                   sac_hu=float(physics.trabecular_hu(apparent_density_mg_cm3(0.9 * dens[levels[-1]], phase),
                                                      kev, fat)),
                   ilium_hu=float(physics.trabecular_hu(apparent_density_mg_cm3(150.0, phase), kev, fat)))
    mat, vertebrae, bodies, geo, sacrum_present, rods_truth = _paint(scene, grid, progress, truth=True)
    report(progress, 0.55, "phantom: partial volume")
    hu_patches = _partial_volume(scene, grid, geo, mat)

    report(progress, 0.6, "phantom: truth")
    edge_ids = set()
    for face in (vertebrae[0], vertebrae[-1], vertebrae[:, 0], vertebrae[:, -1], vertebrae[:, :, 0],
                 vertebrae[:, :, -1]):
        edge_ids.update(np.unique(face).tolist())
    geom = dict(spacing_mm=tuple(grid.spacing), origin_mm=tuple(grid.origin), direction=np.eye(3))
    probe_img = Image(np.zeros((1, 1, 1), np.uint8), **geom)
    level_truth: dict[str, dict] = {}
    screwed = metal_levels(cfg.metal_level)
    for n in levels:
        vid, fr, d = VERSE_IDS[n], frames[n], dims[n]
        sl = geo[n]["bbox"]
        if sl is None or not np.any(vertebrae[sl] == vid):
            continue  # level entirely outside the field of view
        bmask = bodies[sl] == vid
        nvox = int(bmask.sum())
        centroid = (probe_img.index_to_physical(np.argwhere(bmask).mean(axis=0) + [s.start for s in sl]).tolist()
                    if nvox else None)
        ha, hm, hp = geo[n]["heights"]
        frac = cfg.fractures.get(n)
        level_truth[n] = {
            "verse_id": vid,
            "density_mg_cm3": dens[n],
            "apparent_density_mg_cm3": apparent[n],
            "true_trabecular_hu": trab_hu[n],
            "height_anterior_mm": ha, "height_middle_mm": hm, "height_posterior_mm": hp,
            "height_normal_mm": d.body_height_mm,  # mean height of the unfractured body
            "height_posterior_normal_mm": geo[n]["normal_heights"][2],
            "height_ratio_wedge": ha / hp, "height_ratio_biconcave": hm / hp,
            "height_ratio_crush": hp / geo[n]["normal_heights"][2],
            "genant_grade": int(frac[1]) if frac else 0,
            "fracture_type": frac[0] if frac else None,
            "body_width_mm": d.body_width_mm, "body_depth_mm": d.body_depth_mm,
            "body_volume_cm3": nvox * float(np.prod(grid.spacing)) / 1000.0,
            "body_volume_analytic_cm3": geo[n]["volume_mm3"] / 1000.0,
            "complete": vid not in edge_ids,
            "centroid_lps_mm": centroid,
            "centroid_analytic_lps_mm": geo[n]["centroid_world"].tolist(),
            "center_lps_mm": fr.origin.tolist(),
            "axis_lateral": fr.lateral.tolist(), "axis_posterior": fr.posterior.tolist(),
            "axis_superior": fr.superior.tolist(),
            "metal": n in screwed,
            "basivertebral_vein": bool(cfg.basivertebral_vein),
            "ribs": bool(cfg.include_ribs and n.startswith("T")),
        }

    report(progress, 0.65, "phantom: scanner blur and noise")
    image_arr = _scanner(mat, M.hu, grid, cfg, progress, hu_patches)
    tissues = M.tissue[mat]
    del mat

    truth = {
        "levels": level_truth,
        "levels_rendered": levels,
        "sacrum": sacrum_present,
        "scanner": {
            "effective_kev": kev, "noise_hu": cfg.noise_hu, "blur_fwhm_mm": cfg.blur_fwhm_mm,
            "spacing_mm": list(grid.spacing), "seed": cfg.seed,
            "slice_thickness_mm": cfg.slice_thickness_mm or float(grid.spacing[2]),
            "pv_subsamples_zyx": list(pv_factors(grid.spacing)),  # HU averaged over these around the bone
            "metal_artifacts": cfg.metal_artifacts,
        },
        "tissue_hu": {
            "air": air_hu, "fat": fat_hu, "muscle": muscle_hu, "blood": blood_hu, "aorta": aorta_hu,
            "ivc": ivc_hu, "heart": heart_hu, "portal_vein": portal_hu, "cortical_bone": cortical_hu,
            "water": water_hu, "disc": DISC_HU,
            "csf": CSF_HU, "lung": LUNG_HU, "viscera": viscera_hu, "liver": liver_hu, "kidney": kidney_hu,
            "metal": METAL_HU,
        },
        "contrast_phase": phase,
        "marrow_fat_fraction": fat,
        "rods": rods_truth,
        "tissue_ids": dict(TISSUE_IDS),
        "curve": {"kyphosis_deg": cfg.kyphosis_deg, "lordosis_deg": cfg.lordosis_deg,
                  "scoliosis_mm": cfg.scoliosis_mm, "scoliosis_span_mm": cfg.scoliosis_span_mm,
                  "sacral_slope_deg": curve.sacrum_tilt_deg},
        "config": _config_json(cfg),
    }
    report(progress, 1.0, "phantom: done")
    return CTPhantom(
        image=Image(image_arr, metadata={"Modality": "CT", "phantom": True}, **geom),
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


# --- painting and partial volume ------------------------------------------------------------
PV_SUBVOXEL_MM = 0.5  # sub-sample size for partial-volume rendering (the cortex is 1 mm thick)
PV_MAX_FACTOR = 6  # per axis; caps the cost at very coarse spacing (3 mm -> 0.5 mm)
PV_CHUNK_SAMPLES = 3_000_000  # sub-samples rendered at once (bounds the float temporaries)


@dataclass
class _Scene:
    """Everything the painters need besides the grid, so the same scene can be drawn on the voxel
    grid and on finer sub-sample grids."""

    cfg: CTPhantomConfig
    M: Materials
    curve: Any
    levels: list
    dims: dict
    zc: dict
    frames: dict
    sacrum: bool
    trab_hu: dict
    cortical_hu: float
    sac_hu: float
    ilium_hu: float


def _paint(scene: _Scene, grid: Grid, progress=None, truth: bool = False):
    """Material ids of the whole scene sampled at the centres of `grid`, plus the labels.
    truth=False (sub-sample grids) skips the rods and the analytic truth integrals."""
    cfg, M = scene.cfg, scene.M
    mat = np.full(grid.shape, T["air"], dtype=np.uint8)
    report(progress, 0.05, "phantom: soft tissue")
    paint_soft_tissue(mat, grid, scene.curve, scene.levels, scene.dims, scene.zc, progress)
    rods_truth = _paint_rods(mat, M, grid, cfg.effective_kev) if (truth and cfg.calibration_rods) else []
    vertebrae = np.zeros(grid.shape, np.uint8)
    bodies = np.zeros(grid.shape, np.uint8)
    levels, dims, frames, curve = scene.levels, scene.dims, scene.frames, scene.curve
    # Discs and canal first so the bone of every level overwrites them.
    report(progress, 0.3, "phantom: discs and canal")
    for upper, lower in zip(levels[:-1], levels[1:]):
        paint_disc(mat, grid, curve, dims, upper, lower)
    if scene.sacrum:
        paint_disc(mat, grid, curve, dims, "L5", None)
    for n in levels:
        paint_canal(mat, grid, frames[n], dims[n])
    if cfg.include_ribs:
        report(progress, 0.4, "phantom: ribs")
        for n in levels:
            if n.startswith("T"):
                for side in (-1.0, 1.0):
                    paint_rib(mat, M, grid, curve, frames[n], dims[n], n, side, scene.zc, scene.cortical_hu,
                              scene.trab_hu[n])
    sacrum_present = False
    if scene.sacrum:
        report(progress, 0.45, "phantom: sacrum and pelvis")
        sacrum_present = paint_sacrum(mat, M, vertebrae, grid, curve, scene.cortical_hu, scene.sac_hu)
        paint_pelvis(mat, M, grid, curve.point(curve.sacrum_top_s), scene.cortical_hu, scene.ilium_hu)
    report(progress, 0.5, "phantom: vertebrae")
    geo = {}
    metal = metal_levels(cfg.metal_level)
    body_above = None
    for k, n in enumerate(levels):
        above = dims[levels[k - 1]] if k > 0 else None
        geo[n] = paint_vertebra(mat, M, vertebrae, bodies, grid, frames[n], dims[n], above, VERSE_IDS[n],
                                cfg.fractures.get(n), scene.trab_hu[n], scene.cortical_hu,
                                metal=(n in metal),
                                vein_material=T["basivertebral_vein"] if cfg.basivertebral_vein else None,
                                truth=truth, body_above=body_above)
        body_above = geo[n].pop("body_depth", None)
    if len(metal) > 1:
        paint_spinal_rods(mat, grid, frames, dims, metal)
    return mat, vertebrae, bodies, geo, sacrum_present, rods_truth


def pv_factors(spacing_mm) -> tuple[int, int, int]:
    """Sub-samples per voxel along (z, y, x): sub-sample size <= PV_SUBVOXEL_MM, capped."""
    return tuple(int(min(PV_MAX_FACTOR, max(1, np.ceil(float(s) / PV_SUBVOXEL_MM - 1e-6))))
                 for s in reversed(tuple(spacing_mm)))


def _partial_volume(scene: _Scene, grid: Grid, geo: dict, mat: np.ndarray) -> list:
    """Volume-averaged noise-free HU around the bone: [(z0, y-slice, x-slice, float32 (nz, ny, nx))].

    The scene is redrawn on a grid of k sub-samples per voxel and axis (centred in the voxel) and
    the HU (not the labels) are averaged per voxel, so a 1 mm cortex or endplate reads as a thin
    continuous rim of intermediate HU at 2-3 mm spacing, as partial volume does in real CT. Only
    the boxes of the vertebrae (posterior elements, rib heads, discs, canal and the tissue around
    them included) and of the sacrum are supersampled, in z slabs; the rest stays point sampled."""
    kz, ky, kx = pv_factors(grid.spacing)
    if kz * ky * kx == 1:
        return []
    boxes = [g["bbox"] for g in geo.values() if g["bbox"] is not None]
    if scene.sacrum:
        boxes += [b for b in [_sacrum_bbox(grid, scene.curve)] if b is not None]
    if not boxes:
        return []
    z_lo, z_hi = min(b[0].start for b in boxes), max(b[0].stop for b in boxes)
    # Rows of each slab: bounded by the sub-sample budget over the widest xy box.
    area = max((b[1].stop - b[1].start) * (b[2].stop - b[2].start) for b in boxes) * kz * ky * kx
    step = max(1, int(PV_CHUNK_SAMPLES // max(area, 1)))
    sub = np.array([kx, ky, kz], float)
    patches = []
    for z0 in range(z_lo, z_hi, step):
        z1 = min(z_hi, z0 + step)
        hit = [b for b in boxes if b[0].start < z1 and b[0].stop > z0]
        if not hit:
            continue
        ys = slice(min(b[1].start for b in hit), max(b[1].stop for b in hit))
        xs = slice(min(b[2].start for b in hit), max(b[2].stop for b in hit))
        lo = np.array([xs.start, ys.start, z0], float)
        n_c = (z1 - z0, ys.stop - ys.start, xs.stop - xs.start)
        # Sub-sample centres of voxel i: i + (j + 0.5) / k - 0.5, j = 0..k-1 (voxel units). A halo
        # of `pad` sub-samples lets eroded shells (cortex()) see the surfaces just outside the slab.
        fine_sp = grid.spacing / sub
        pad = cortex_iterations(fine_sp) + 1
        fine = Grid((n_c[0] * kz + 2 * pad, n_c[1] * ky + 2 * pad, n_c[2] * kx + 2 * pad),
                    grid.origin + (lo + (0.5 / sub - 0.5)) * grid.spacing - pad * fine_sp, fine_sp)
        fmat = _paint(scene, fine)[0][pad:-pad, pad:-pad, pad:-pad]
        hu = scene.M.hu[fmat.astype(np.intp)]
        hu = hu.reshape(n_c[0], kz, n_c[1], ky, n_c[2], kx).mean(axis=(1, 3, 5), dtype=np.float32)
        # Outside the boxes themselves keep the voxel-centre HU, so the result does not depend on
        # how the slabs are cut.
        inbox = np.zeros(n_c, bool)
        for b in hit:
            inbox[max(b[0].start - z0, 0):b[0].stop - z0, b[1].start - ys.start:b[1].stop - ys.start,
                  b[2].start - xs.start:b[2].stop - xs.start] = True
        point = scene.M.hu[mat[z0:z1, ys, xs].astype(np.intp)]
        patches.append((z0, ys, xs, np.where(inbox, hu, point).astype(np.float32)))
    return patches


def _sacrum_bbox(grid: Grid, curve):
    # Same box as paint_sacrum (plus the iliac wings' medial part, which meet it).
    fr = curve.sacrum_frame(curve.sacrum_top_s + 14.0)
    return grid.bbox(box_corners(fr, (-60, 60), (-45, 30), (-86.0 - 5, 14.0 + 5)))


# --- field of view ---------------------------------------------------------------------------
def _make_grid(cfg, curve, levels, dims, zc, sacrum) -> Grid:
    """Derived FOV: the levels (+12 mm), the sacrum (95 mm below S1) and the body outline.
    With shape_zyx the volume is centred on the rendered vertebrae (which may then be cut)."""
    sp = np.array(cfg.spacing_mm, float)
    last = levels[-1]
    top = curve.point(curve.level_top_s[levels[0]])[2] + 12.0
    bottom_levels = curve.point(curve.level_top_s[last] + dims[last].body_height_mm)[2] - 12.0
    bottom = curve.point(curve.sacrum_top_s)[2] - 95.0 if sacrum else bottom_levels
    s_idx = np.linspace(curve.level_top_s[levels[0]], curve.level_top_s[last] + dims[last].body_height_mm, 50)
    pts = np.array([curve.point(s) for s in s_idx])
    a, b, _ = outline(np.arange(bottom, top, 2.0), zc, float(curve.point(curve.sacrum_top_s)[2]))
    lo = np.array([pts[:, 0].min() - a.max() - 15, pts[:, 1].min() - OUTLINE_OFFSET_MM - b.max() - 15, bottom])
    hi = np.array([pts[:, 0].max() + a.max() + 15,
                   pts[:, 1].max() - OUTLINE_OFFSET_MM + b.max() + (55 if cfg.calibration_rods else 15), top])
    if cfg.shape_zyx is None:
        n = np.ceil((hi - lo) / sp).astype(int) + 1
        if float(np.prod(n.astype(float))) > MAX_VOXELS:
            spacing = tuple(float(v) for v in sp)
            raise InputError(f"phantom spacing {spacing} mm is too fine for levels {levels[0]}-{last} "
                             f"({'x'.join(map(str, n))} voxels); use a coarser spacing or give shape_zyx.")
        origin = lo
    else:
        n = np.array(cfg.shape_zyx[::-1])
        centre = (lo + hi) / 2
        centre[2] = (top + bottom_levels) / 2
        origin = centre - (n - 1) / 2 * sp
    # Snap the origin to the spacing so phantoms of different sizes share voxel positions.
    origin = np.round(origin / sp) * sp
    return Grid((int(n[2]), int(n[1]), int(n[0])), origin, sp)


# --- calibration phantom ---------------------------------------------------------------------
def _paint_rods(mat, M, grid, kev) -> list[dict]:
    """Water-equivalent block with K2HPO4 rods under the patient (posterior = table side)."""
    X = grid.axis(0)[None, :]
    Y = grid.axis(1)[:, None]
    body = np.any(mat != T["air"], axis=0)
    rows, cols = np.any(body, axis=1), np.any(body, axis=0)
    y_top = float(grid.axis(1)[rows].max()) + 3.0 if rows.any() else float(grid.axis(1)[-1]) - 35.0
    x0 = float(grid.axis(0)[cols].mean()) if cols.any() else 0.0
    base = (np.abs(X - x0) <= 150) & (Y >= y_top) & (Y <= y_top + 32)
    mat[:, base] = T["calibration_base"]
    mu_w, mu_a = physics.mu_cm("water", kev), physics.mu_cm("air", kev)
    out = []
    zmid = float(grid.axis(2).mean())
    for i, (name, rho_w, rho_k) in enumerate(RODS):
        cx, cy = x0 + (i - (len(RODS) - 1) / 2) * 45.0, y_top + 16.0
        m = (X - cx) ** 2 + (Y - cy) ** 2 <= ROD_RADIUS_MM ** 2
        # Mixture rule: water-equivalent base + K2HPO4, both as partial densities (g/cm3).
        mu = rho_w / 1000 * physics.mass_attenuation_cm2_g("water", kev) \
            + rho_k / 1000 * physics.mass_attenuation_cm2_g("k2hpo4", kev)
        rod_hu = float(1000.0 * (mu - mu_w) / (mu_w - mu_a))
        mat[:, m] = M(T["calibration_rod"], rod_hu)
        out.append({"name": name, "k2hpo4_mg_cm3": rho_k, "water_density_mg_cm3": rho_w,
                    "center_lps_mm": [cx, cy, zmid], "radius_mm": ROD_RADIUS_MM, "hu_true": rod_hu})
    return out


# --- scanner ---------------------------------------------------------------------------------
def scanner_kernel_sum_sq(spacing_mm, blur_fwhm_mm: float, slice_thickness_mm: float | None = None) -> float:
    """Sum of squared weights of the scanner blur kernel (white-noise variance -> blurred variance)."""
    sig_zyx = _sigmas_vox(spacing_mm, blur_fwhm_mm, slice_thickness_mm)
    if max(sig_zyx) == 0:
        return 1.0
    delta = np.zeros((1 if sig_zyx[0] == 0 else 41, 41, 41), np.float64)
    delta[delta.shape[0] // 2, 20, 20] = 1.0
    k = ndimage.gaussian_filter(delta, sig_zyx, mode="constant")
    return float(np.sum(k ** 2))


def _sigmas_vox(spacing_mm, blur_fwhm_mm, slice_thickness_mm):
    fwhm2sig = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sx, sy, sz = (float(s) for s in spacing_mm)
    thick = slice_thickness_mm
    sig_z = thick * fwhm2sig / sz if thick is not None and thick > sz + 1e-6 else 0.0
    return (sig_z, blur_fwhm_mm * fwhm2sig / sy, blur_fwhm_mm * fwhm2sig / sx)


STREAK_PIXEL_MM = 1.0  # streaks are computed at >= this in-plane pixel (they are smooth; radon is slow)
STREAK_ANGLES = 180
STREAK_SPREAD_KEV = 20.0  # the two-energy beam: effective keV -/+ this, equal weights
METAL = ("Ti", 4.506)  # pedicle screws: titanium, g/cm3


def metal_streaks_hu(metal: np.ndarray, spacing_mm, kev: float, strength: float = 1.0) -> dict[int, np.ndarray]:
    """Beam-hardening streaks of metal, {z: float32 (ny, nx) HU to add}, by filtered back-projection.

    Each ray through L mm of metal is measured with a two-energy beam (kev -/+ STREAK_SPREAD_KEV):
    -ln(mean(exp(-mu_E L))) falls short of the linear mean(mu_E) L the reconstruction assumes
    (the softer half is used up first). That error, ramp-filtered and back-projected, gives the
    dark bands along and between the screws and the bright streaks beside them that CT shows
    without metal-artifact reduction; `strength` scales it (scanners' corrections leave a part).
    Water's own beam hardening is taken as corrected, as scanners do. Computed per axial slice at
    a pixel of at least STREAK_PIXEL_MM and interpolated back (square pixels: the mean in-plane
    spacing); nothing is added on the metal itself."""
    from skimage.transform import iradon, radon

    zs = [int(z) for z in np.flatnonzero(metal.reshape(metal.shape[0], -1).any(axis=1))]
    if not zs or strength <= 0:
        return {}
    energies = (kev - STREAK_SPREAD_KEV, kev + STREAK_SPREAD_KEV)
    mu_mm = np.array([physics.mu_cm(METAL[0], e, density=METAL[1]) / 10.0 for e in energies])
    hu_per_mu_mm = 1000.0 / (physics.mu_cm("water", kev) / 10.0)
    pixel_mm = float(np.mean(spacing_mm[:2]))
    step = max(1, int(np.ceil(STREAK_PIXEL_MM / pixel_mm - 1e-6)))
    coarse_mm = pixel_mm * step
    ny, nx = metal.shape[1:]
    cy, cx = -(-ny // step), -(-nx // step)
    side = max(cy, cx)
    oy, ox = (side - cy) // 2, (side - cx) // 2
    theta = np.linspace(0.0, 180.0, STREAK_ANGLES, endpoint=False)
    out = {}
    for z in zs:
        m = np.zeros((cy * step, cx * step), np.float32)
        m[:ny, :nx] = metal[z]
        sq = np.zeros((side, side), np.float32)
        sq[oy:oy + cy, ox:ox + cx] = m.reshape(cy, step, cx, step).mean(axis=(1, 3))  # metal fraction
        path_mm = radon(sq, theta, circle=False) * coarse_mm
        measured = -np.log(np.mean(np.exp(-mu_mm[:, None, None] * path_mm[None]), axis=0))
        error = measured - mu_mm.mean() * path_mm          # line-integral units (dimensionless)
        # radon sums pixel values, so the image whose projections are `error` is error / pixel.
        err = iradon(error / coarse_mm, theta, circle=False, output_size=side, filter_name="ramp")
        err = err[oy:oy + cy, ox:ox + cx] * (hu_per_mu_mm * strength)
        if step > 1:
            err = ndimage.zoom(err, step, order=1, mode="nearest")[:ny, :nx]
        # (none on the metal itself: its true HU, ~10000, stays above the ceiling)
        out[z] = np.where(metal[z], 0.0, err).astype(np.float32)
    return out


def _scanner(mat: np.ndarray, lut: np.ndarray, grid: Grid, cfg: CTPhantomConfig, progress,
             hu_patches=()) -> np.ndarray:
    """Noise-free HU (material lookup), white noise, in-plane Gaussian blur (FWHM) and slice-profile
    blur (FWHM = slice thickness when thicker than the spacing), rounded to int16.

    The white noise is added before the blur and scaled so that the blurred noise has SD = noise_hu:
    its texture is then correlated like the system blur. Slice by slice, so no float volume is kept
    unless a slice-profile blur is needed."""
    sig_z, sig_y, sig_x = _sigmas_vox(grid.spacing, cfg.blur_fwhm_mm, cfg.slice_thickness_mm)
    white_sd = np.float32(cfg.noise_hu / np.sqrt(scanner_kernel_sum_sq(grid.spacing, cfg.blur_fwhm_mm,
                                                                       cfg.slice_thickness_mm)))
    rng = np.random.default_rng(cfg.seed)
    nz = mat.shape[0]
    streaks = (metal_streaks_hu(mat == T["metal"], grid.spacing, cfg.effective_kev, cfg.metal_artifacts)
               if cfg.metal_artifacts else {})
    lo, hi = HU_RANGE
    out = np.empty(mat.shape, np.int16)
    full = np.empty(mat.shape, np.float32) if sig_z > 0 else None
    h = np.empty(mat.shape[1:], np.float32)
    noise = np.empty(mat.shape[1:], np.float32)
    blurred = np.empty(mat.shape[1:], np.float32)
    for z in range(nz):
        np.take(lut, mat[z].astype(np.intp), out=h)  # intp indices: much faster than uint8 here
        for z0, ys, xs, patch in hu_patches:  # volume-averaged HU near the bone
            if z0 <= z < z0 + patch.shape[0]:
                h[ys, xs] = patch[z - z0]
        if z in streaks:
            h += streaks[z]
        if cfg.noise_hu > 0:
            rng.standard_normal(out=noise, dtype=np.float32)
            noise *= white_sd
            h += noise
        if sig_y > 0 or sig_x > 0:
            ndimage.gaussian_filter(h, (sig_y, sig_x), mode="nearest", output=blurred)
        else:
            blurred[...] = h
        if full is not None:
            full[z] = blurred
        else:
            np.clip(blurred, lo, hi, out=blurred)
            np.rint(blurred, out=blurred)
            out[z] = blurred
        if progress is not None and z % 64 == 0:
            report(progress, 0.65 + 0.3 * z / nz, "phantom: scanner blur and noise")
    if full is not None:
        ndimage.gaussian_filter1d(full, sig_z, axis=0, mode="nearest", output=full)
        np.clip(full, lo, hi, out=full)
        np.rint(full, out=full)
        out[...] = full
    return out
