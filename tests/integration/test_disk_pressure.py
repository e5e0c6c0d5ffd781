"""Disk pressure on a real ``scp-node receive``: free space under ``storage.min_free_bytes``
-> 0xA700 for new instances, the accepted ones untouched, and service again once space returns.

The spool lies on its own small tmpfs (mounted for the test; this needs root, which the test
container has) and a ballast file eats its free space. Where mounting is not permitted the
spool stays on the temp directory's file system and the floor is set just under its current
free space, so the same ballast drives it across.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from scp_node.dicom.scu import Peer, send_files
from scp_node.dicom.status import Status
from tests.support.cluster import NodeProc
from tests.support.config import write_config
from tests.support.net import free_port
from tests.support.seeded import instance_rows

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A directory on a 32 MiB tmpfs (True) or, where mount is refused, on tmp_path (False)."""
    mount = tmp_path / "spoolfs"
    mount.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount)],
            capture_output=True,
        ).returncode
        == 0
    )
    yield mount, mounted
    if mounted:
        subprocess.run(["umount", str(mount)], check=False)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size)


@pytest.mark.slow  # a receive process and three associations: ~7 s
def test_low_disk_refuses_with_a700_keeps_accepted_and_recovers(
    tmp_path: Path, small_fs: tuple[Path, bool], ct_b_files: list[Path]
) -> None:
    fs, mounted = small_fs
    spool = fs / "spool"
    min_free = 8 * MIB if mounted else shutil.disk_usage(fs).free - 64 * MIB
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        free_port(),
        storage={"spool_dir": str(spool), "min_free_bytes": min_free},
        settle={"quiet_s": 600.0, "poll_s": 1.0},
    )
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProc("receive", config, tmp_path, "receive", port=port).start()
    peer = Peer("SCPNODE", "127.0.0.1", port)
    before, during = ct_b_files[:4], ct_b_files[4:8]
    try:
        assert [r.status for r in send_files(before, peer)] == [0x0000] * len(before)
        snapshot = {p: p.read_bytes() for p in spool.rglob("*.dcm")}
        assert len(snapshot) == len(before)

        ballast = fs / "ballast"
        _fill(ballast, shutil.disk_usage(fs).free - min_free + MIB)
        assert shutil.disk_usage(fs).free < min_free
        refused = send_files(during, peer)
        assert [r.status for r in refused] == [int(Status.OUT_OF_RESOURCES)] * len(during)
        assert {p: p.read_bytes() for p in spool.rglob("*.dcm")} == snapshot
        assert not list(spool.rglob("*.part"))
        assert instance_rows(db_url) == len(before)

        ballast.unlink()
        assert [r.status for r in send_files(during, peer)] == [0x0000] * len(during)
    finally:
        assert node.stop() == 0

    assert instance_rows(db_url) == len(before) + len(during)
    for source in before + during:
        src = dcmread(source)
        (stored,) = spool.rglob(f"{src.SOPInstanceUID}.dcm")
        copy = dcmread(stored)
        assert copy.PixelData == src.PixelData  # stored as received, byte for byte
    for path, data in snapshot.items():
        assert path.read_bytes() == data
    assert "free disk under storage.min_free_bytes" in (tmp_path / "receive.out").read_text()
