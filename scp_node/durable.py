"""Durable file writes: a crash or power loss leaves the old file or the new one, never a torn one.

Every file the node hands on (spooled instances, quarantined bytes, SEGs, previews) is written
the same way: to ``<name>.part`` beside the target, fsynced, renamed over the target, and then
the directory is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["PART_SUFFIX", "fsync_dir", "part_path", "write_bytes_durably", "write_durably"]

#: Ends the name of a file being written (see :func:`part_path`).
PART_SUFFIX = ".part"


def part_path(path: Path) -> Path:
    """The temporary file a durable write of ``path`` goes through (``<name>.part``)."""
    return path.with_name(path.name + PART_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a power loss.

    Raises
    ------
    OSError
        The directory cannot be opened or synced.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(
    path: Path, write: Callable[[BinaryIO], object], *, sync_dir: bool = True
) -> Path:
    """Write ``path`` atomically and durably with ``write(handle)``.

    ``write`` gets a binary file open on ``<name>.part`` in the same directory; the file is
    then flushed, fsynced, renamed over ``path`` and the directory fsynced. The parent
    directory must exist. With ``sync_dir=False`` the caller fsyncs the directory itself
    (once for several files: see :mod:`scp_node.queue.group_commit`) before it relies on
    the rename.

    Parameters
    ----------
    path : Path
        The file to create or replace.
    write : callable
        Writes the content to the handle it is given; its return value is ignored.
    sync_dir : bool
        Fsync the parent directory after the rename.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OSError
        The file cannot be written (a missing parent directory included); ``path`` is left
        as it was and no ``.part`` file remains.
    Exception
        Whatever ``write`` raises, with the same guarantee.
    """
    part = part_path(path)
    try:
        with part.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def write_bytes_durably(path: Path, data: bytes, *, sync_dir: bool = True) -> Path:
    """:func:`write_durably` for bytes already in memory.

    Raises
    ------
    OSError
        The file cannot be written; ``path`` is left as it was.
    """
    return write_durably(path, lambda handle: handle.write(data), sync_dir=sync_dir)
