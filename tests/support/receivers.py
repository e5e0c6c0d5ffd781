"""Finding a node's receiver processes and the one that holds a given connection (Linux
``/proc``), for the tests of ``node.receivers``."""

from __future__ import annotations

import os
from pathlib import Path


def receiver_pids(node_pid: int) -> list[int]:
    """The node's spawned receiver processes (not multiprocessing's resource tracker)."""
    # Each thread has its own list: a restarted receiver is the child of the watcher thread.
    children: list[str] = []
    for task in Path(f"/proc/{node_pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:
            continue  # the thread ended after the listing (it had no receiver to show)
    pids = []
    for child in map(int, children):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(child)
    return sorted(pids)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _established_inodes(local_port: int, remote_port: int) -> set[str]:
    """Inodes of ESTABLISHED loopback TCP sockets from ``remote_port`` to ``local_port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if (
                state == "01"
                and int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                found.add(inode)
    return found


def holder_of(pids: list[int], node_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the accepted connection from ``client_port``."""
    wanted = _established_inodes(node_port, client_port)
    for pid in pids:
        if _socket_inodes(pid) & wanted:
            return pid
    return None
