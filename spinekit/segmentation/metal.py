"""Metal streak reduction for segmentation: normalized metal-artifact reduction (NMAR) on the image.

Pedicle screws and rods darken the rays through them (beam hardening, photon starvation); filtered
back-projection spreads that error into dark bands between the screws and bright streaks beside
them, which lift psoas and canal above the bone threshold. Here, per axial slice that holds metal,
the image is forward-projected along the rays that pass near the metal (the metal trace), the trace
is bridged by interpolation in each projection, and the back-projected difference (the streaks) is
taken off the image:

- *normalized* interpolation (Meyer et al., Med Phys 2010): the projections are divided by those of
  a prior (air 0, soft tissue water, bone as imaged) before the linear bridging and multiplied back
  after, so a pedicle's bone on the trace is not smeared into streaks of its own;
- the metal itself keeps its HU and the correction is computed at a pixel of at least
  MAR_PIXEL_MM with MAR_ANGLES parallel projections over 180 deg;
- only the rays near the metal are projected (a few percent of the sinogram), so a slice costs a
  fraction of a second.

This works on reconstructed images, not raw data, so it reduces the streaks rather than removing
them, and it is meant for segmentation only: the HU it returns are never measured as BMD.
Slices whose bright objects are too large for implants (a hip prosthesis, contrast in the bladder)
are left alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from ..image import Image
from ..progress import Progress, report
from .base import superior_axis

METAL_MIN_HU = 3000.0      # metal: at the 12-bit ceiling (3071). Dense cortical bone reaches ~2400 HU
#                            at 50 keV (xraylib), a thin spinal cortex far less; contrast less still
MAR_MAX_PIECE_MM2 = 400.0  # an in-plane piece of metal larger than this is not a screw or rod (hip
#                            prosthesis, excreted contrast): its slice is left as it is
MAR_PIXEL_MM = 1.0         # the streaks are smooth at this scale; finer pixels cost time only
MAR_ANGLES = 180
MAR_TRACE_BINS = 2         # detector bins added on each side of the metal's own projection
MAR_AIR_HU = -700.0        # prior: air below this (after 1-pixel smoothing; the dark bands between
#                            screws reach -400 HU and below in soft tissue), bone above MAR_BONE_HU,
MAR_BONE_HU = 300.0        # water between
MAR_THREADS = 4            # slices corrected at once (at most the CPUs)
MAR_REACH_MM = 80.0        # streaks are taken off this far from the metal (the column box: <= 70 mm)


def metal_slices(hu: np.ndarray, spacing_yx_mm) -> np.ndarray:
    """Indices (axis 0) of the slices that hold metal pieces small enough for implants, when no piece
    in them is too large (those slices are not corrected)."""
    metal = hu >= METAL_MIN_HU
    has = np.flatnonzero(metal.reshape(metal.shape[0], -1).any(axis=1))
    max_px = MAR_MAX_PIECE_MM2 / float(spacing_yx_mm[0] * spacing_yx_mm[1])
    keep = []
    for z in has:
        lab, n = ndi.label(metal[z])
        if np.bincount(lab.ravel(), minlength=n + 1)[1:].max() <= max_px:
            keep.append(int(z))
    return np.array(keep, int)


def reduce_metal_streaks(image: Image, progress: Optional[Progress] = None) -> Image:
    """The CT with the metal streaks of screws and rods reduced in each axial slice that holds them
    (NMAR, see the module docstring); the image itself when no slice does. The metal keeps its HU."""
    axis = superior_axis(image)[0]
    hu = np.moveaxis(image.array, axis, 0)
    spacing_yx_mm = [s for a, s in enumerate(image.spacing_zyx_mm) if a != axis]
    zs = metal_slices(hu, spacing_yx_mm)
    if not zs.size:
        return image
    out = hu.copy()
    pixel_mm = float(np.mean(spacing_yx_mm))
    # Slices are independent, and numpy does most of the work with the GIL released.
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, MAR_THREADS))) as pool:
        futures = [pool.submit(lambda z: slice_streaks_hu(hu[z].astype(np.float32), pixel_mm), z) for z in zs]
        try:
            for i, (z, future) in enumerate(zip(zs, futures)):
                corrected = hu[z] - np.rint(future.result())
                if np.issubdtype(hu.dtype, np.integer):   # (the scan's own scale: no clip at 3071)
                    info = np.iinfo(hu.dtype)
                    corrected = np.clip(corrected, info.min, info.max)
                out[z] = corrected.astype(hu.dtype)
                report(progress, (i + 1) / zs.size, f"metal streaks: slice {i + 1} of {zs.size}")
        except BaseException:   # (a cancelled run: the slices not started are dropped)
            for future in futures:
                future.cancel()
            raise
    return Image(np.moveaxis(out, 0, axis), image.spacing_mm, image.origin_mm, image.direction,
                 metadata=image.metadata)


def _line_integrals(images: np.ndarray, centre_yx, theta_rad: np.ndarray, angle_idx: np.ndarray,
                    s: np.ndarray, box) -> np.ndarray:
    """Sums of each image in `images` (k, ny, nx) along parallel rays, one pixel per step, bilinear,
    zero outside: ray (angle index, detector offset s, in pixels from `centre_yx`) runs along
    (sin, cos) in (x, y) through the point s (cos, -sin) from the centre. Only the part of each ray
    inside `box` ((y0, x0, y1, x1), holding the images' non-zero pixels) is sampled. Returns
    (k, rays)."""
    k, ny, nx = images.shape
    cos = np.cos(theta_rad[angle_idx]).astype(np.float32)[:, None]
    sin = np.sin(theta_rad[angle_idx]).astype(np.float32)[:, None]
    s = s.astype(np.float32)[:, None]
    y0, x0, y1, x1 = box
    half = np.ceil(0.5 * float(np.hypot(y1 - y0, x1 - x0)) + 1.0)
    # t along each ray from where it passes nearest the box's centre, +-half a diagonal
    by, bx = 0.5 * (y0 + y1) - centre_yx[0], 0.5 * (x0 + x1) - centre_yx[1]
    t = (sin * bx + cos * by) + np.arange(-half, half + 1, dtype=np.float32)[None]
    x = (centre_yx[1] + cos * s + sin * t).ravel()
    y = (centre_yx[0] - sin * s + cos * t).ravel()
    n_rays = t.shape[0]
    del t
    # Bilinear weights computed once for all images; a one-pixel border of zeros stands for outside.
    padded = np.zeros((k, ny + 2, nx + 2), np.float32)
    padded[:, 1:-1, 1:-1] = images
    x = np.clip(x + 1.0, 0.0, nx + 0.999)
    y = np.clip(y + 1.0, 0.0, ny + 0.999)
    ix, iy = x.astype(np.int32), y.astype(np.int32)
    fx, fy = x - ix, y - iy
    flat = padded.reshape(k, -1)
    i00 = iy * (nx + 2) + ix
    out = np.empty((k, n_rays), np.float32)
    for j in range(k):
        f = flat[j]
        v = ((f[i00] * (1 - fx) + f[i00 + 1] * fx) * (1 - fy)
             + (f[i00 + nx + 2] * (1 - fx) + f[i00 + nx + 3] * fx) * fy)
        out[j] = v.reshape(n_rays, -1).sum(axis=1)
    return out


def _ramp_filtered(proj: np.ndarray) -> np.ndarray:
    """Each projection (column) convolved with the ramp filter of filtered back-projection, in its
    spatial-domain form (Kak & Slaney ch. 3, eq. 61), zero-padded to a power of two."""
    n = proj.shape[0]
    size = max(64, int(2 ** np.ceil(np.log2(2 * n))))
    k = np.concatenate((np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)))
    kernel = np.zeros(size)
    kernel[0] = 0.25
    kernel[1::2] = -1.0 / (np.pi * k) ** 2
    ramp = 2.0 * np.real(np.fft.fft(kernel))
    return np.real(np.fft.ifft(np.fft.fft(proj, size, axis=0) * ramp[:, None], axis=0))[:n]


def slice_streaks_hu(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """The metal streaks of one axial slice (float HU, same shape) by NMAR, within MAR_REACH_MM of
    the metal; 0 on the metal and its blurred rim, and farther out."""
    # (the blurred rim around the metal is partly metal)
    metal = ndi.binary_dilation(hu >= METAL_MIN_HU)
    step = max(1, int(np.ceil(MAR_PIXEL_MM / pixel_mm - 1e-6)))
    ny, nx = hu.shape
    cy, cx = -(-ny // step), -(-nx // step)

    def coarse(a: np.ndarray) -> np.ndarray:
        """`a` block-averaged to the working pixel (step x step native pixels)."""
        m = np.zeros((cy * step, cx * step), np.float32)
        m[:ny, :nx] = a
        return m.reshape(cy, step, cx, step).mean(axis=(1, 3))

    # Attenuation relative to water (air 0, water 1), nothing outside the patient. The metal is
    # replaced by the median of the voxels around it, so that the difference back-projected below
    # holds the streaks, not the metal's own outline.
    hu_s = ndi.gaussian_filter(hu, 1.0)
    inside = hu_s > MAR_AIR_HU
    u = np.where(inside, (hu + 1000.0) / 1000.0, 0.0)
    ring = ndi.binary_dilation(metal, iterations=2) & ~metal
    u_filled = np.where(metal, np.median(u[ring]) if ring.any() else 1.0, u)
    prior = np.where(inside, np.where(hu_s > MAR_BONE_HU, u_filled, 1.0), 0.0)
    u_c, prior_c = coarse(u_filled), coarse(prior)
    ys, xs = np.nonzero(u_c > 0)
    box = (ys.min(), xs.min(), ys.max(), xs.max())

    theta = np.deg2rad(np.linspace(0.0, 180.0, MAR_ANGLES, endpoint=False))
    my, mx = np.nonzero(coarse(metal.astype(np.float32)) > 0)
    centre = (float(my.mean()), float(mx.mean()))
    # Detector bins (one working pixel apart) wide enough for every ray through the patient.
    corners = np.array([[box[0], box[1]], [box[0], box[3]], [box[2], box[1]], [box[2], box[3]]], float)
    half_bins = int(np.ceil(np.hypot(*(corners - centre).T).max())) + 2
    n_bins = 2 * half_bins + 1
    # The trace: bins within MAR_TRACE_BINS of a metal pixel's projection.
    s_metal = np.rint(np.cos(theta)[None] * (mx - centre[1])[:, None]
                      - np.sin(theta)[None] * (my - centre[0])[:, None]).astype(int) + half_bins
    trace = np.zeros((n_bins, MAR_ANGLES), bool)
    angles = np.broadcast_to(np.arange(MAR_ANGLES), s_metal.shape)
    for d in range(-MAR_TRACE_BINS, MAR_TRACE_BINS + 1):
        trace[np.clip(s_metal + d, 0, n_bins - 1), angles] = True
    # Each trace bin is bridged between the nearest bins off the trace on either side.
    idx = np.broadcast_to(np.arange(n_bins)[:, None], trace.shape)
    lo = np.maximum.accumulate(np.where(trace, -1, idx), axis=0)
    hi = np.minimum.accumulate(np.where(trace, n_bins, idx)[::-1], axis=0)[::-1]
    tb, ta = np.nonzero(trace & (lo >= 0) & (hi < n_bins))
    lo, hi = lo[tb, ta], hi[tb, ta]
    need = trace.copy()
    need[lo, ta] = True
    need[hi, ta] = True
    nb, na = np.nonzero(need)
    proj = np.zeros(trace.shape, np.float32)
    proj_prior = np.ones(trace.shape, np.float32)
    sums = _line_integrals(np.stack([u_c, prior_c]), centre, theta, na, nb - half_bins, box)
    proj[nb, na] = sums[0]
    proj_prior[nb, na] = np.maximum(sums[1], 1.0)
    norm = proj / proj_prior
    w = (tb - lo) / (hi - lo)
    bridged = ((1.0 - w) * norm[lo, ta] + w * norm[hi, ta]) * proj_prior[tb, ta]
    diff = np.zeros(trace.shape, np.float32)
    diff[tb, ta] = proj[tb, ta] - bridged

    # Filtered back-projection of the difference at the working pixels near the metal, then
    # interpolated to the native pixels.
    filtered = _ramp_filtered(diff)
    reach = int(np.ceil(MAR_REACH_MM / (pixel_mm * step)))
    rows = np.arange(max(my.min() - reach, 0), min(my.max() + reach + 1, cy))
    cols = np.arange(max(mx.min() - reach, 0), min(mx.max() + reach + 1, cx))
    bins = np.arange(n_bins, dtype=float) - half_bins
    acc = np.zeros((rows.size, cols.size))
    for a, th in enumerate(theta):
        s = np.cos(th) * (cols - centre[1])[None, :] - np.sin(th) * (rows - centre[0])[:, None]
        acc += np.interp(s, bins, filtered[:, a], left=0.0, right=0.0)
    acc *= np.pi / (2 * MAR_ANGLES) * 1000.0
    # native pixel centres in working-pixel units, within the reconstructed rows and columns
    ny0, ny1 = rows[0] * step, min((rows[-1] + 1) * step, ny)
    nx0, nx1 = cols[0] * step, min((cols[-1] + 1) * step, nx)
    yi = (np.arange(ny0, ny1) + 0.5) / step - 0.5 - rows[0]
    xi = (np.arange(nx0, nx1) + 0.5) / step - 0.5 - cols[0]
    streaks = np.zeros(hu.shape)
    streaks[ny0:ny1, nx0:nx1] = ndi.map_coordinates(acc, np.meshgrid(yi, xi, indexing="ij"), order=1, mode="nearest")
    streaks[metal] = 0.0
    return streaks
