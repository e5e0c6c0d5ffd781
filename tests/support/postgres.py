"""A real PostgreSQL server for tests: private data directory, port and socket directory.

The Debian package (``postgresql``, installed by ``make peers``) provides the binaries.
``initdb`` refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user (``runuser -u postgres``), in a directory under ``/tmp`` that user
can reach (pytest's own temp tree is private to root). The server runs with ``fsync=off``:
the tests kill node processes, never the database, so its durability is not under test.

Usage as a pytest plugin (``pytest_plugins`` in ``tests/conftest.py``): the session fixture
``postgres`` starts one server for the whole run, and ``postgres_url`` gives each test a fresh
empty database. Tests that use them are marked ``postgres`` (and with it ``slow``), so
``make test-fast`` needs no PostgreSQL server.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_for_port

__all__ = ["PostgresServer", "find_pg_bin", "postgres", "postgres_url"]


def find_pg_bin() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises
    ------
    RuntimeError
        If no PostgreSQL server binaries are installed (run ``make peers``).
    """
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError(
        "PostgreSQL server binaries not found (initdb, pg_ctl): run `make peers`, which "
        "installs the Debian package postgresql"
    )


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1 at a free port, with its socket in its own dir.

    Parameters
    ----------
    user : str
        Superuser name created by ``initdb`` (authentication: trust, loopback only).
    """

    def __init__(self, user: str = "scpnode") -> None:
        self.bin = find_pg_bin()
        self.user = user
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="scp-node-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._runas: list[str] = []
        if os.geteuid() == 0:
            # initdb: "cannot be run as root"; run the cluster as the package's system user.
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.root.chmod(0o755)
            self._runas = ["runuser", "-u", "postgres", "--"]
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._runas, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{log}"
            )

    def start(self) -> PostgresServer:
        """Create the cluster and start the server; returns once it accepts connections."""
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        wait_for_port(self.port, timeout_s=30)
        return self

    def stop(self) -> None:
        """Stop the server (immediate) and remove its directory."""
        if self.data.exists():
            subprocess.run(
                [
                    *self._runas,
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "fast",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` over TCP on loopback."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """Create a new empty database and return its SQLAlchemy URL."""
        import psycopg  # runtime dependency of scp-node; imported late to keep collection cheap

        name = f"{prefix}{next(self._names)}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's server, as a SQLAlchemy URL.

    Only for tests marked ``postgres`` (``tests/conftest.py`` marks those that name this
    fixture; a test that asks for it at run time marks itself), so that ``-m "not slow"``
    never starts a server: checked before the server is started.
    """
    if request.node.get_closest_marker("postgres") is None:
        pytest.fail(f"{request.node.nodeid} uses PostgreSQL: mark it pytest.mark.postgres")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()
