"""Digital phantoms with known truth (CT spine phantom; more modalities later)."""

from .ct import TISSUE_IDS, CTPhantom, CTPhantomConfig, generate_ct_phantom  # noqa: F401

__all__ = ["CTPhantomConfig", "CTPhantom", "generate_ct_phantom", "TISSUE_IDS"]
