"""Writing results so that nothing good is ever overwritten by a partial result.

``staged(targets)`` hands out temporary paths beside the final ones; only when every file has
been written are they renamed into place (a rename within one folder is atomic). On any error
the temporary files are removed and the earlier results stay as they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _temp_name(path: Path) -> Path:
    # keep the suffix (.nii.gz) so writers that choose the format by extension still work
    return path.with_name(".tmp-" + path.name)


@contextmanager
def staged(targets: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Yield {key: temporary path}; on success move each onto targets[key]."""
    tmp = {k: _temp_name(Path(p)) for k, p in targets.items()}
    for p in tmp.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    for k, p in targets.items():
        tmp[k].replace(p)
