"""Metal streak reduction (spinekit.segmentation.metal) against streaks of known size.

The streaks come from the phantom's beam-hardening model (spinekit.phantom.ct.metal_streaks_hu):
a two-energy beam through titanium, ramp-filtered and back-projected with skimage, while the
reduction forward-projects the image with its own projector; the truth is the same slice without
streaks.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from spinekit.image import Image
from spinekit.phantom.ct import metal_streaks_hu
from spinekit.segmentation.metal import METAL_MIN_HU, reduce_metal_streaks, slice_streaks_hu


def _screw_pair_slice():
    """(clean HU, HU with streaks, metal mask) at 1 mm pixels: a water torso with a vertebral body
    and two screws of 3 mm radius, blurred like a scanner's image."""
    yy, xx = np.mgrid[:160, :200]
    clean = np.full(yy.shape, -1000.0, np.float32)
    clean[((yy - 80) / 70.0) ** 2 + ((xx - 100) / 90.0) ** 2 < 1] = 40.0
    clean[((yy - 70) / 18.0) ** 2 + ((xx - 100) / 22.0) ** 2 < 1] = 250.0
    metal = np.zeros(yy.shape, bool)
    for x0 in (88, 112):
        metal |= (yy - 95) ** 2 + (xx - x0) ** 2 <= 9
    streaks = metal_streaks_hu(metal[None], (1.0, 1.0, 1.0), 70.0, 1.0)[0]
    streaked = np.clip(np.where(metal, 3071.0, clean + streaks), -1024, 3071)
    clean = ndi.gaussian_filter(np.where(metal, 3071.0, clean), 0.5)
    return clean, ndi.gaussian_filter(streaked, 0.5).astype(np.float32), metal


def test_most_of_the_streaks_between_two_screws_are_taken_off():
    clean, streaked, metal = _screw_pair_slice()
    corrected = streaked - slice_streaks_hu(streaked, 1.0)
    # the torso, more than 3 mm from the metal
    around = (clean > -500) & (ndi.distance_transform_edt(~metal) > 3)
    before, after = (streaked - clean)[around], (corrected - clean)[around]
    # Measured: 425 -> 48 voxels off by more than 100 HU (the bone threshold's margin over muscle),
    # RMS 41 -> 17 HU.
    assert (np.abs(before) > 100).sum() > 300
    assert (np.abs(after) > 100).sum() < 0.2 * (np.abs(before) > 100).sum()
    assert np.sqrt((after ** 2).mean()) < 0.5 * np.sqrt((before ** 2).mean())


def test_the_ct_keeps_its_metal_and_is_untouched_where_no_slice_holds_metal():
    _, streaked, metal = _screw_pair_slice()
    volume = np.repeat(np.rint(streaked)[None], 4, axis=0).astype(np.int16)
    volume[2:] = np.rint(ndi.gaussian_filter(np.where(metal, 40.0, streaked), 0.5)).astype(np.int16)
    # an extended HU scale (metal above 3071) and padding outside the scanned circle stay as they are
    volume[0][volume[0] >= METAL_MIN_HU] += 400
    volume[:, :3, :3] = -3024
    image = Image(volume, (1.0, 1.0, 2.0))
    out = reduce_metal_streaks(image)
    assert out.array.dtype == np.int16 and out.spacing_mm == image.spacing_mm
    assert np.array_equal(out.array[2:], volume[2:])            # slices without metal
    assert np.array_equal(out.array[:2][volume[:2] >= METAL_MIN_HU], volume[:2][volume[:2] >= METAL_MIN_HU])
    assert not np.array_equal(out.array[:2], volume[:2])
    assert (out.array[0] > 3071).any() and (out.array[:, :3, :3] == -3024).all()
    assert not np.shares_memory(out.array, volume)               # the input is not changed
    # without metal the CT is returned as it is
    plain = Image(volume[2:].copy(), (1.0, 1.0, 2.0))
    assert reduce_metal_streaks(plain) is plain


def test_slices_with_a_piece_of_metal_too_large_for_an_implant_are_left_alone():
    # a hip prosthesis's stem or contrast in the bladder: 30 x 30 mm at the metal HU
    _, streaked, _ = _screw_pair_slice()
    volume = np.repeat(np.rint(streaked)[None], 2, axis=0).astype(np.int16)
    volume[1, 20:50, 60:90] = 3071
    out = reduce_metal_streaks(Image(volume, (1.0, 1.0, 1.0)))
    assert np.array_equal(out.array[1], volume[1]) and not np.array_equal(out.array[0], volume[0])


def test_the_axial_slices_are_found_from_the_direction():
    _, streaked, _ = _screw_pair_slice()
    volume = np.repeat(np.rint(streaked)[None], 2, axis=0).astype(np.int16)
    axial = reduce_metal_streaks(Image(volume, (1.0, 1.0, 2.0))).array
    # the same CT stored with the slice axis last: index axes x, y, z are the original z (superior),
    # x and y; the direction's columns say so
    direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    turned = Image(volume.transpose(1, 2, 0).copy(), (2.0, 1.0, 1.0), direction=direction)
    assert np.array_equal(reduce_metal_streaks(turned).array, axial.transpose(1, 2, 0))


def test_a_cancelled_reduction_stops_and_passes_the_cancel_on():
    from spinekit.progress import Cancelled

    _, streaked, _ = _screw_pair_slice()
    volume = np.repeat(np.rint(streaked)[None], 6, axis=0).astype(np.int16)
    seen = []

    def cancel_after_first(fraction, message):
        seen.append(message)
        raise Cancelled()

    with pytest.raises(Cancelled):
        reduce_metal_streaks(Image(volume, (1.0, 1.0, 1.0)), cancel_after_first)
    assert seen == ["metal streaks: slice 1 of 6"]
