"""Networks, losses and the model-weight registry (``spinekit.models.registry``).

torch / MONAI are optional: importing this package does not import them.
"""

from .registry import (  # noqa: F401
    ModelEntry,
    ModelVersion,
    default_cache_dir,
    find_weights,
    load_registry,
    load_state_dict,
    read_sha256sum,
    sha256_file,
    verify_weights,
)
