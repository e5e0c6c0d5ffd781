"""The durable-write helper every handed-on file goes through (spool, SEG, preview)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from scp_node.durable import fsync_dir, part_path, write_bytes_durably, write_durably


def test_writes_the_file_and_leaves_no_part(tmp_path: Path) -> None:
    target = tmp_path / "a.dcm"
    assert write_bytes_durably(target, b"new bytes") == target
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"]


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a.dcm"
    target.write_bytes(b"old")
    write_durably(target, lambda handle: handle.write(b"newer"))
    assert target.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"]


def test_the_part_file_sits_beside_the_target() -> None:
    assert part_path(Path("/x/1.2.3.dcm")) == Path("/x/1.2.3.dcm.part")


def test_a_failing_writer_leaves_the_old_file_and_no_part(tmp_path: Path) -> None:
    target = tmp_path / "a.dcm"
    target.write_bytes(b"old")
    seen: list[Path] = []

    def write(handle: BinaryIO) -> None:
        handle.write(b"half of it")
        seen.extend(tmp_path.iterdir())
        raise ValueError("encoder gave up")

    with pytest.raises(ValueError, match="encoder gave up"):
        write_durably(target, write)
    assert sorted(p.name for p in seen) == ["a.dcm", "a.dcm.part"]  # it went through .part
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"]


def test_a_missing_folder_is_an_oserror_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_bytes_durably(tmp_path / "missing" / "a.dcm", b"x")
    assert list(tmp_path.iterdir()) == []


def test_file_synced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order that makes the write survive a power loss, seen on the real calls."""
    calls: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append(("replace", (Path(src).name, Path(dst).name)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "seg.dcm"
    write_bytes_durably(target, b"x" * 1000)
    assert calls == [
        ("fsync", tmp_path / "seg.dcm.part"),
        ("replace", ("seg.dcm.part", "seg.dcm")),
        ("fsync", tmp_path),
    ]


def test_fsync_dir_needs_a_directory(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
