"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest

# A real PostgreSQL server (session fixture `postgres`, per-test database `postgres_url`).
pytest_plugins = ["tests.support.postgres"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: real CT/MR images and labels (read its README)."""
    assert SHARED_DATA.is_dir(), f"shared data missing at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def ct_b_files(shared_data: Path) -> list[Path]:
    """Subject B: 20 real CT slices, JPEG 2000 lossless, 512x512."""
    files = sorted((shared_data / "ct-abdomen-b" / "dicom").glob("*.dcm"))
    assert len(files) == 20
    return files
