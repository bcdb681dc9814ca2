"""Digital phantoms with known truth: a thoracolumbar spine CT (``generate_ct_phantom``)."""

from .ct import TISSUE_IDS, CTPhantom, CTPhantomConfig, generate_ct_phantom  # noqa: F401
from .preview import render_previews  # noqa: F401  (matplotlib is imported only when called)

__all__ = ["CTPhantomConfig", "CTPhantom", "generate_ct_phantom", "TISSUE_IDS", "render_previews"]
