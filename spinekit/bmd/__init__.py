"""Volumetric BMD: trabecular ROI, reference tissues, calibration, contrast phase, interpretation.

Kept light on purpose (no heavy imports here): import the submodules you need, e.g.
``from spinekit.bmd.calibration import calibrate_phantomless``.
"""

CALIBRATION_MODES = ("phantomless", "asynchronous", "phantom")
MINERALS = ("ha", "k2hpo4")
