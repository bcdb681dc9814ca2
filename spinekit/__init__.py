"""SpineKit core: opportunistic spine health from routine imaging.

Slicer-free. The data flow is read -> segment -> bodies -> ROI -> reference tissues ->
calibrate -> measure -> interpret -> report; every step is a plain function.
"""

__version__ = "0.1.0"

from .errors import InputError  # noqa: F401
from .image import Image, read_image, write_image  # noqa: F401
