"""Shared pytest fixtures.

``shared_data``: the real CT test data in ``../shared/data`` (next to the repository, never
inside it). Tests that use it skip cleanly in a fresh clone where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data_path(*parts: str) -> Path:
    """Path inside ../shared/data, or pytest.skip when it (or the named file) is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not available: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder (real CTs with TotalSegmentator references); skips if absent."""
    return shared_data_path()
