"""SQLAlchemy 2.0 mapped classes of the job table.

No PHI is stored: only UIDs, the study date (DICOM DA), technical attributes and file paths.
Every timestamp column is :class:`UTCDateTime`, which stores UTC and always gives back a
timezone-aware UTC :class:`~datetime.datetime`, also on SQLite (which has no time zones).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "TERMINAL_STATES",
    "Base",
    "Delivery",
    "DeliveryKind",
    "DeliveryState",
    "Instance",
    "Job",
    "JobEvent",
    "JobState",
    "Level",
    "Outcome",
    "Series",
    "Stage",
    "Study",
    "UTCDateTime",
]

#: Deterministic constraint names, so later Alembic migrations can address them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_UID = 64  # DICOM UI value representation: at most 64 characters


#: Keys of a job's ``durations``, in the order a job goes through them: receive (first to
#: last instance), settle_wait, queue_wait, the worker's stages (select, load, inference,
#: seg), delivery, and total (last instance to done).
STAGE_ORDER = (
    "receive",
    "settle_wait",
    "queue_wait",
    "select",
    "load",
    "inference",
    "seg",
    "delivery",
    "total",
)


class JobState(StrEnum):
    """Life cycle of a job; stored as its string value."""

    #: Waiting to be claimed by a worker (possibly not before ``not_before``).
    QUEUED = "queued"
    #: Claimed by a worker that holds a live lease and runs inference.
    RUNNING = "running"
    #: Inference produced a SEG; deliveries to the destinations are pending.
    DELIVERING = "delivering"
    #: Finished: SEG delivered everywhere, or nothing to deliver.
    DONE = "done"
    #: Failed for good: attempts exhausted, non-retryable error or delivery gave up.
    FAILED = "failed"
    #: Cancelled by an administrator.
    CANCELLED = "cancelled"


#: States a job never leaves on its own (only an admin retry moves it again).
TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class DeliveryState(StrEnum):
    """Life cycle of one delivery of one object to one destination."""

    #: Waiting for (another) attempt at ``next_attempt_at`` (and, for a rejection note,
    #: for the delivery it depends on to be DONE).
    PENDING = "pending"
    #: The destination accepted the object (and held it, where ``verify`` is on).
    DONE = "done"
    #: Gave up (too old), cancelled, superseded before delivery, or a rejection note whose
    #: superseding SEG was never delivered.
    FAILED = "failed"


class DeliveryKind(StrEnum):
    """What a delivery sends; stored as its string value in ``deliveries.kind``."""

    #: The job's SEG (BINARY, or the LABELMAP one for a destination that wants it).
    SEG = "seg"
    #: The TID 1500 measurement report (SR) of the job's SEG.
    SR = "sr"
    #: One Secondary Capture image of the overlay series.
    SC = "sc"
    #: An IHE IOCM rejection note (KOS) retracting the SEG the job's SEG superseded.
    KOS = "kos"


class Stage(StrEnum):
    """What a job event records; stored as its string value in ``job_events.stage``.

    The worker's stages (select, load, inference, seg) are also keys of ``Job.durations``.
    """

    #: An instance was stored (log lines only; a job exists only once its study settled).
    RECEIVE = "receive"
    #: The study became quiet (or known complete) and a job was queued.
    SETTLED = "settled"
    #: A worker claimed the job (leased it).
    CLAIM = "claim"
    #: The worker chose the series to run on.
    SELECT = "select"
    #: The worker read the series into a volume.
    LOAD = "load"
    #: The model ran (with a duration), or inference finished and delivery began (without).
    INFERENCE = "inference"
    #: The worker built and wrote the SEG.
    SEG = "seg"
    #: An attempt failed (retried with backoff or final).
    FAIL = "fail"
    #: A lease expired: the job was requeued (or failed, with no attempts left).
    REQUEUE = "requeue"
    #: A delivery to one destination was claimed, succeeded, failed or had its lease expire.
    DELIVER = "deliver"
    #: The job finished.
    DONE = "done"
    #: An administrator retried the job.
    RETRY = "retry"
    #: An administrator cancelled the job.
    CANCEL = "cancel"
    #: A new SEG superseded an earlier one of the same SEG series (on both jobs), an older
    #: pending delivery was dropped for it, or a rejection note was delivered.
    SUPERSEDE = "supersede"


class Outcome(StrEnum):
    """What inference found; stored as its string value in ``jobs.outcome``."""

    #: A SEG was built (and goes to the destinations).
    SEG = "seg"
    #: The model found none of its labels: no SEG.
    NO_FINDINGS = "no_findings"
    #: No series of the study satisfies the model's selection rules.
    NO_MATCHING_SERIES = "no_matching_series"


class Level(StrEnum):
    """How much an event matters to an operator; stored in ``job_events.level``."""

    #: The job moved on as it should.
    INFO = "info"
    #: Something went wrong that the node retries or an administrator caused (cancel).
    WARNING = "warning"
    #: The job or one of its deliveries failed for good.
    ERROR = "error"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and returned timezone-aware UTC on every backend.

    Naive datetimes are refused on the way in: they are a bug, not a convention.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; SQLite gets the naive UTC value since it cannot keep an offset."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Give back an aware UTC datetime whatever the backend returned."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _state_enum(enum_cls: type[StrEnum], length: int = 16) -> Enum:
    # Stored as the plain value in a VARCHAR (no native enum) so PostgreSQL and SQLite agree
    # and new states need no ALTER TYPE.
    return Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    """Declarative base with the shared metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Study(Base):
    """A study as received: one row per Study Instance UID."""

    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_last_received_at", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(_UID), unique=True)
    #: DICOM DA (YYYYMMDD); not PHI on its own.
    study_date: Mapped[str | None] = mapped_column(String(8))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: The ``last_received_at`` already covered by created jobs.
    settled_through: Mapped[datetime | None]


class Series(Base):
    """A series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(_UID), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Routing facts from the first instance that had them (see ``SeriesFacts``).
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float)
    #: ImageOrientationPatient as six backslash-separated numbers.
    orientation: Mapped[str | None] = mapped_column(String(128))
    #: Frames received across the series' instances.
    frame_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """One stored SOP instance and where its file lies in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UID), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(_UID))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(_UID))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]


class Job(Base):
    """One inference of one model on one study, and its delivery."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_not_before", "state", "not_before"),
        Index("ix_jobs_state_lease_expires_at", "state", "lease_expires_at"),
        Index("ix_jobs_study_id_model_state", "study_id", "model", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(_state_enum(JobState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    not_before: Mapped[datetime]
    created_at: Mapped[datetime]
    claimed_at: Mapped[datetime | None]
    #: First claim ever (``claimed_at`` is the latest).
    started_at: Mapped[datetime | None]
    #: When the job last entered DELIVERING (for the delivery duration).
    delivering_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: The series inference chose.
    series_instance_uid: Mapped[str | None] = mapped_column(String(_UID))
    seg_path: Mapped[str | None] = mapped_column(Text)
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(String(_UID))
    #: The SEG's series: one per (source series, model, model version), shared by every
    #: version of the result; its InstanceNumber grows with each new version.
    seg_series_instance_uid: Mapped[str | None] = mapped_column(String(_UID), index=True)
    seg_instance_number: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[Outcome | None] = mapped_column(_state_enum(Outcome, length=32))
    #: Stage name -> seconds.
    durations: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Per segment of the SEG: number, label, voxels, volume_ml, mean, standard_deviation,
    #: unit (see ``scp_node.output.sr.SegmentMeasurement``); None without a SEG.
    measurements: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)


class JobEvent(Base):
    """One line of a job's story; ``id`` is monotonic so followers resume after it."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    at: Mapped[datetime]
    stage: Mapped[Stage] = mapped_column(_state_enum(Stage, length=32))
    #: The job's state once the event happened (a :class:`JobState` value).
    state: Mapped[str] = mapped_column(String(16))
    level: Mapped[Level] = mapped_column(_state_enum(Level), default=Level.INFO)
    message: Mapped[str] = mapped_column(Text, default="")
    duration_s: Mapped[float | None] = mapped_column(Float)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Delivery(Base):
    """Delivery of one object of a job (its SEG, SR, an SC image, or a rejection note) to one
    destination."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    #: DICOMweb root of a ``kind = "dicomweb"`` destination (then ae_title/host/port are
    #: empty); None for C-STORE destinations.
    url: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[DeliveryKind] = mapped_column(_state_enum(DeliveryKind), default=DeliveryKind.SEG)
    #: The file sent and its SOP Instance UID.
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UID))
    #: A rejection note waits for the delivery of the SEG that supersedes (same job and
    #: destination) to be DONE, and fails when that one fails for good.
    depends_on_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id"))
    state: Mapped[DeliveryState] = mapped_column(_state_enum(DeliveryState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_attempt_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime]
    last_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
