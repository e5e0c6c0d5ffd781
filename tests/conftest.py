"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import subprocess
import sys
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
def nnunet_folder(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A real nnU-Net v2 trained-model folder built from subject A by nnU-Net's planner.

    Built once per session under the pytest temp dir, in its own process (the planner
    spawns workers and reads ``nnUNet_*`` from the environment): see
    ``tests/support/nnunet_folder.py``.
    """
    out = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.nnunet_folder", str(out), str(shared_data)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    return folder


@pytest.fixture(scope="session")
def monai_bundle(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A real MONAI bundle (Model Zoo layout) with a small UNet trained briefly on subject A.

    Built once per session in its own process (it trains with its own torch threads):
    see ``tests/support/monai_bundle.py``.
    """
    out = tmp_path_factory.mktemp("monai")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.monai_bundle", str(out), str(shared_data)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    bundle = Path(done.stdout.strip().splitlines()[-1])
    assert (bundle / "models" / "model.pt").is_file()
    return bundle


@pytest.fixture(scope="session")
def monai_reference(
    monai_bundle: Path, tmp_path_factory: pytest.TempPathFactory, shared_data: Path
) -> Path:
    """The label NIfTI of ``python -m monai.bundle run`` of that bundle on subject A."""
    from tests.support.monai_bundle import run_reference

    return run_reference(
        monai_bundle,
        shared_data / "ct-abdomen-a" / "ct.nii.gz",
        tmp_path_factory.mktemp("monai-reference"),
    )


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
