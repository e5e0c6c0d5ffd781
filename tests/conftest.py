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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the PostgreSQL server are ``postgres`` and ``slow``.

    Starting the server (initdb) takes seconds and needs the Debian package, so the quick
    loop (``-m "not slow"``) leaves them out. A test that names the ``postgres`` or
    ``postgres_url`` fixture is marked here; one that asks for it at run time (a
    parametrised backend) carries ``pytest.mark.postgres`` itself.
    """
    for item in items:
        uses_server = {"postgres", "postgres_url"} & set(getattr(item, "fixturenames", ()))
        if uses_server or item.get_closest_marker("postgres") is not None:
            item.add_marker(pytest.mark.postgres)
            item.add_marker(pytest.mark.slow)
