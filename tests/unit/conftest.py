"""The job table on real SQLite files and a real PostgreSQL server, with an injected clock
(no sleeping, no mocks): fixtures shared by the ``test_queue_*`` files."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from scp_node.app import Database, build_queue
from scp_node.queue import (
    ClaimedJob,
    DeliveryTarget,
    InstanceRecord,
    RetryPolicy,
    make_engine,
    upgrade,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = STUDY + ".1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PACS = DeliveryTarget(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
ARCHIVE = DeliveryTarget(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=4243)
POLICY = RetryPolicy(
    max_attempts=3, initial_backoff_s=10, max_backoff_s=100, multiplier=2, give_up_after_s=3600
)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


#: Every piece of the job table on one engine and clock, as ``app.open_database`` builds them.
Table = Database


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same contract on both backends: a SQLite file, and a fresh real PostgreSQL database
    (server from ``tests/support/postgres.py``)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'var' / 'node.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def table(engine: Engine, clock: FakeClock) -> Table:
    return build_queue(engine, POLICY, clock)


InstanceFactory = Callable[..., InstanceRecord]


@pytest.fixture
def instance_factory(tmp_path: Path) -> InstanceFactory:
    counter = iter(range(1, 1_000_000))

    def make(
        study: str = STUDY, series: str = SERIES, sop: str | None = None, **kw: object
    ) -> InstanceRecord:
        sop = sop or f"{series}.{next(counter)}"
        fields: dict[str, object] = {
            "study_instance_uid": study,
            "series_instance_uid": series,
            "sop_instance_uid": sop,
            "sop_class_uid": CT,
            "transfer_syntax_uid": EXPLICIT_LE,
            "modality": "CT",
            "path": str(tmp_path / "spool" / f"{sop}.dcm"),
            "size_bytes": 1000,
            "calling_ae": "MODALITY",
            "series_number": 2,
            "series_description": "Abdomen",
            "study_date": "20250301",
        }
        fields.update(kw)
        return InstanceRecord(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def job_factory(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> Callable[..., int]:
    def make(study: str = STUDY, model: str = "ct-abdomen", n: int = 2) -> int:
        for _ in range(n):
            table.intake.record_instance(instance_factory(study=study, series=study + ".1"))
        clock.advance(11)
        (job_id,) = table.settling.settle(10, [model])
        return job_id

    return make


def claim(table: Table, owner: str = "w1", lease_s: float = 60) -> ClaimedJob:
    """Claim the next job, which must exist."""
    claimed = table.work.claim(owner, lease_s)
    assert claimed is not None
    return claimed
