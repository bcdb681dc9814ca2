"""The default CT vertebra segmentation + level naming backend ("builtin": classic image
processing, no weights, works offline).

Pipeline (all on an internal axis-aligned LPS grid of 1.5-2 mm, labels mapped back at the end):
1. check the input is a CT in HU; reduce metal streaks (spinekit.segmentation.metal, for the
   segmentation only); block-average + resample to the working grid (z up, y posterior,
   x left), whatever the input's direction cosines;
2. bone = smoothed HU above a cortical threshold; per-slice hole filling (after a small closing
   in the body zone) turns cortical rings into solid bone, so low-density bodies are found by
   their shell; trabecular-density voxels count as bone too;
3. spinal canal = soft tissue (CSF-like HU) enclosed by bone in the 8 (or 7) in-plane
   directions, near the midline; the best chain of such pockets through the slices (a dynamic
   programme: off-canal pockets and gaps neither end nor bend it), its centre median-smoothed
   over 40 mm of slices, extrapolated along the sacral curve (and cranially to the view's top
   where the chain ends more than 40 mm below it);
4. column = solid bone in a box around the canal, minus the canal; contrast blood pools too
   thick for any vertebral body (heart chambers) are removed; a long, homogeneous,
   off-midline tube in front of the bodies and not inside their cortical rings (contrast aorta;
   also searched in narrower HU bands,
   where at coarse spacing its lumen stands apart from blurred marrow) is removed with its rim,
   and so are pieces of its lumen HU hanging on the column by thin contacts (its branches);
   body = the column part anterior to the canal's anterior wall;
5. discs = deep minima of the density-weighted body profile along the body centreline, over
   slabs tilted -30..30 degrees (the L5/S1 disc), each measured within its own vertebra (an
   osteoporotic body's mid-body dip is not a disc), gaps filled where the disc spacing expects
   one (a dark band between two endplates before a mid-body dip; between the last disc and
   the view's end, a disc spacing and a body piece hold one);
   where no disc is sure (a short slab), thin dark bands between two bright endplates in a
   low-percentile HU profile (a thin disc as bright as marrow); every disc's dark band is
   carved out of the column (thin thoracic discs are filled in as bone otherwise);
6. bodies split by the disc planes; posterior elements joined to their body by a marker
   watershed over the inverted distance map (pedicles are thick, facet contacts thin);
7. names from anchors: sacrum (solid alae lateral to the lowest segment, at least twice the
   vertebra above's) -> L5, lowest
   rib-bearing vertebra with a rib-free one below -> T12 (only where the scan reaches 30 mm
   below that one's rib heads: ribs descend out of a view that ends sooner; a rib belongs to
   the vertebra between whose disc planes, tilted with the bodies, its medial end lies; the
   sacrum and L5 bear none, and bone that rises laterally is an iliac wing); both -> lumbar from the sacrum,
   thoracic from the ribs, conflicts flagged uncertain; no anchor -> a guess marked uncertain (ribs cut
   short by the scan's caudal end count for the guess, never as an anchor, and not under two
   rib-free vertebrae: that is a sacral ala or iliac wing cut by the view);
8. rib heads/necks are given back to the ribs (followed medially from the ribs outside the box;
   what is left sticks out of the body's rounded outline; the width cut reaches further out
   for the narrower upper thoracic bodies, whose transverse processes are longer), and on
   fine native grids the outlines are redrawn from native HU; metal outside the bone (rods,
   screw heads) is no vertebra, and in slices holding metal the streaks' rays are opened off.

Modules, in the order the pipeline uses them: `common` (the working grid and the way back,
shared structuring elements and bone thresholds), `canal`, `discs`, `vessels` (contrast blood),
`ribs` (rib heads, the rib-bearing vertebrae, the bodies' frames), `naming`, `outline` (labels
back on the input grid) and `pipeline` (segment_builtin, which runs them).
"""

from .pipeline import segment_builtin

__all__ = ["segment_builtin"]
