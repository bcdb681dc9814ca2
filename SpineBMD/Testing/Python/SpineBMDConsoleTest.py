"""SpineBMD console API inside Slicer: process, edit a segment, recompute (ctest)."""

import unittest

import numpy as np

import slicer


class SpineBMDConsoleTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_recompute_after_edit(self):
        from spinekit import mrml
        from spinekit.phantom import CTPhantomConfig, generate_ct_phantom
        from SpineBMDLib.logic import SpineBMDLogic

        ph = generate_ct_phantom(CTPhantomConfig(first_level="T12", last_level="L3", spacing_mm=(1.5, 1.5, 1.5),
                                                 noise_hu=10, seed=0))
        volume = mrml.volume_node_from_image(ph.image, slicer.mrmlScene, "phantom CT")
        seg = mrml.labels_to_segmentation_node(ph.vertebrae, volume, bodies=ph.bodies)
        logic = SpineBMDLogic(slicer.mrmlScene)
        first = logic.process(volume, segmentationNode=seg, phase="native")
        # Erase the cranial half of the L1 vertebra, as a user would in Segment Editor.
        l1 = mrml.segment_mask(seg, "L1", volume)
        zs = np.nonzero(l1.any(axis=(1, 2)))[0]
        l1[zs[len(zs) // 2]:] = False
        slicer.util.updateSegmentBinaryLabelmapFromArray(l1.astype(np.uint8), seg, "L1", volume)
        second = logic.recompute(volume, seg, phase="native")
        self.assertLess(second.level("L1").body_volume_cm3, first.level("L1").body_volume_cm3)
        self.assertAlmostEqual(second.level("L2").body_volume_cm3, first.level("L2").body_volume_cm3, places=3)


def runTest():
    unittest.main(module=__name__, exit=False)


if __name__ == "__main__":
    unittest.main()
