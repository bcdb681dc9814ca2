"""Spine geometry of the digital phantom: per-level sizes and the curved centreline.

Everything is in millimetres, world = LPS (x patient-left, y posterior, z superior).
The centreline is built once for the whole canonical T1..L5 + sacrum column (so a level's shape
and tilt do not depend on which range is rendered); the scoliosis offset is applied over the
range the caller gives (the rendered range, widened to a realistic curve's length).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..levels import LUMBAR, THORACIC

SPINE_LEVELS: tuple[str, ...] = THORACIC + LUMBAR  # T1..L5, cranial -> caudal


@dataclass(frozen=True)
class LevelDims:
    """Adult average sizes (mm) of one vertebra; angles in degrees."""

    name: str
    body_height_mm: float
    body_width_mm: float  # left-right
    body_depth_mm: float  # antero-posterior
    disc_below_mm: float  # disc between this body and the next caudal one
    canal_width_mm: float
    canal_depth_mm: float
    pedicle_width_mm: float
    pedicle_height_mm: float
    lamina_mm: float
    tp_tip_mm: float  # transverse process tip, distance from the midline
    tp_half_ap_mm: float
    tp_half_height_mm: float
    tp_posterior_deg: float  # thoracic transverse processes point backwards
    sp_length_mm: float
    sp_down_deg: float  # spinous process slope (thoracic ones point caudally)
    sp_half_height_mm: float
    sp_half_width_mm: float
    natural_wedge: float = 1.0  # physiological Ha/Hp of a normal body (kyphotic < 1 < lordotic)


def level_dims(name: str) -> LevelDims:
    """Sizes interpolated between typical T1 / T12 and L1 / L5 values (adult, both sexes)."""
    i = SPINE_LEVELS.index(name)
    if i < 12:  # thoracic: bodies grow caudally, ~28x18x15 (T1) to ~40x30x24 mm (T12)
        t = i / 11.0
        # Thoracic spinous processes are steepest mid-thoracic (~T5-T9).
        sp_down = float(np.interp(i, [0, 4, 8, 9, 10, 11], [30, 45, 45, 35, 25, 15]))
        return LevelDims(
            name, 15.0 + 9.0 * t, 28.0 + 12.0 * t, 18.0 + 12.0 * t, 4.0 + 2.5 * t,
            15.0 + 3.0 * t, 14.0 + 1.0 * t, 6.0 + 2.0 * t, 11.0 + 4.0 * t, 5.0,
            38.0 - 10.0 * t, 4.0, 5.0, 30.0 - 15.0 * t,
            30.0, sp_down, 4.5, 3.0, 0.93 if i < 10 else 0.95,
        )
    t = (i - 12) / 4.0  # lumbar: ~44x33x26 (L1) to ~52x36x27 mm (L5); discs 8-10 mm
    return LevelDims(
        name, 26.0 + 1.0 * t, 44.0 + 8.0 * t, 33.0 + 3.0 * t, 8.0 + 2.0 * t if i < 16 else 9.0,
        20.0 + 3.0 * t, 15.0, 8.0 + 4.0 * t, 15.0, 6.0,
        36.0 + 10.0 * np.sin(np.pi * t), 2.5, 6.0, 5.0,
        28.0, 5.0, 9.0, 3.5, (0.97, 1.0, 1.03, 1.06, 1.12)[i - 12],
    )


@dataclass
class Frame:
    """Local vertebral frame: origin (LPS mm) and unit axes lateral (left), posterior, superior."""

    origin: np.ndarray
    lateral: np.ndarray
    posterior: np.ndarray
    superior: np.ndarray

    def to_local(self, x, y, z):
        """World coordinates (broadcastable arrays) -> local (u lateral, v posterior, w superior)."""
        dx, dy, dz = x - self.origin[0], y - self.origin[1], z - self.origin[2]
        u = dx * self.lateral[0] + dy * self.lateral[1] + dz * self.lateral[2]
        v = dx * self.posterior[0] + dy * self.posterior[1] + dz * self.posterior[2]
        w = dx * self.superior[0] + dy * self.superior[1] + dz * self.superior[2]
        return u, v, w

    def to_world(self, u, v, w) -> np.ndarray:
        return self.origin + np.multiply.outer(u, self.lateral) + np.multiply.outer(v, self.posterior) \
            + np.multiply.outer(w, self.superior)


def frame_from_tangent(origin: np.ndarray, superior: np.ndarray) -> Frame:
    t = np.asarray(superior, float)
    t = t / np.linalg.norm(t)
    ex = np.array([1.0, 0.0, 0.0])
    lat = ex - ex.dot(t) * t
    lat /= np.linalg.norm(lat)
    post = np.cross(t, lat)  # z x x = y: posterior for an upright spine
    return Frame(np.asarray(origin, float), lat, post, t)


@dataclass
class SpineCurve:
    """Arc-length sampled centreline of the vertebral bodies (s grows caudally from T1 top)."""

    s: np.ndarray
    xyz: np.ndarray  # (N, 3) LPS mm
    level_top_s: dict  # name -> s of the superior endplate
    sacrum_top_s: float
    sacrum_tilt_deg: float  # angle of the sacral axis from vertical (sacral slope)
    alpha_sacrum_rad: float

    def point(self, s: float) -> np.ndarray:
        return np.array([np.interp(s, self.s, self.xyz[:, k]) for k in range(3)])

    def tangent_up(self, s: float, ds: float = 1.0) -> np.ndarray:
        d = self.point(s - ds) - self.point(s + ds)
        return d / np.linalg.norm(d)

    def frame(self, s: float) -> Frame:
        return frame_from_tangent(self.point(s), self.tangent_up(s))

    def sacrum_frame(self, s_center: float) -> Frame:
        """Straight sacral axis tilted by the sacral slope (its own frame, not the curve's)."""
        a = self.alpha_sacrum_rad
        return frame_from_tangent(self.point(s_center), np.array([0.0, np.sin(a), np.cos(a)]))


def build_curve(kyphosis_deg: float, lordosis_deg: float, scoliosis_mm: float,
                scoliosis_range_s: tuple[float, float]) -> SpineCurve:
    """Centreline with uniform curvature in each region.

    alpha(s) is the sagittal angle of the caudal direction (alpha > 0: going down moves anterior).
    Thoracic kyphosis turns alpha by +kyphosis_deg from T1 top to the T12/L1 disc, lumbar
    lordosis by -lordosis_deg from there to the L5/S1 disc; the sacral axis is 20 deg steeper.
    """
    tops, s = {}, 0.0
    for name in SPINE_LEVELS:
        d = level_dims(name)
        tops[name] = s
        s += d.body_height_mm + d.disc_below_mm
    sacrum_top = s
    t12 = level_dims("T12")
    s_tl = tops["T12"] + t12.body_height_mm + 0.5 * t12.disc_below_mm
    l5 = level_dims("L5")
    s_ls = tops["L5"] + l5.body_height_mm + 0.5 * l5.disc_below_mm
    a_tl = np.radians(0.25 * (kyphosis_deg + lordosis_deg))
    k, lo = np.radians(kyphosis_deg), np.radians(lordosis_deg)
    a_sac = a_tl - lo - np.radians(20.0)

    ss = np.arange(-60.0, sacrum_top + 160.0, 0.25)
    alpha = np.where(
        ss <= s_tl,
        a_tl - k + k * np.clip(ss / s_tl, 0, 1),
        a_tl - lo * np.clip((ss - s_tl) / (s_ls - s_tl), 0, 1),
    )
    alpha = np.where(ss >= sacrum_top, a_sac, alpha)
    ds = np.gradient(ss)
    y = -np.cumsum(np.sin(alpha) * ds)
    z = -np.cumsum(np.cos(alpha) * ds)
    s0, s1 = scoliosis_range_s
    ph = np.clip((ss - s0) / max(s1 - s0, 1e-6), 0.0, 1.0)
    x = scoliosis_mm * np.sin(np.pi * ph) ** 2  # zero slope at both ends of its range
    # Put the body centre of L1 at y = 0, z = 0 (world origin is arbitrary otherwise).
    l1c = tops["L1"] + 0.5 * level_dims("L1").body_height_mm
    y -= np.interp(l1c, ss, y)
    z -= np.interp(l1c, ss, z)
    xyz = np.stack([x, y, z], axis=1)
    return SpineCurve(ss, xyz, tops, sacrum_top, float(np.degrees(-a_sac)), float(a_sac))
