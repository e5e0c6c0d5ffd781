"""Frozen records handed between the stages and to the CLI and the dashboard.

No ORM object leaves the queue package: every read and write takes or gives these. They hold
UIDs, counts, timings and paths, never patient data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from scp_node.queue.models import DeliveryKind, DeliveryState, JobState, Level, Outcome, Stage

__all__ = [
    "ClaimedDelivery",
    "ClaimedJob",
    "DeliveryTarget",
    "DeliveryView",
    "InstanceRecord",
    "JobEventView",
    "JobView",
    "OutputObject",
    "RejectionNote",
    "SegVersion",
    "SeriesFacts",
    "SeriesInfo",
    "Supersession",
    "UnsettledStudy",
    "WorkerLease",
]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as written to the spool, to be recorded (no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str
    size_bytes: int
    calling_ae: str
    series_number: int | None = None
    series_description: str | None = None
    #: DICOM DA (YYYYMMDD).
    study_date: str | None = None
    #: BodyPartExamined (a defined term, e.g. ``ABDOMEN``).
    body_part_examined: str | None = None
    #: SliceThickness in mm.
    slice_thickness_mm: float | None = None
    #: ImageOrientationPatient (row then column direction cosines).
    orientation: tuple[float, ...] | None = None
    #: Frames in the instance (NumberOfFrames; 1 for a single-frame image, 0 for no image).
    frame_count: int = 1


@dataclass(frozen=True)
class SeriesFacts:
    """What intake recorded about one series: all that routing can judge at settle time.

    Values come from the first instance that carried them; ``None`` means unknown (the
    routing rule then lets the series through and the worker decides from the files).
    """

    series_instance_uid: str
    modality: str | None
    series_description: str | None
    body_part_examined: str | None
    slice_thickness_mm: float | None
    orientation: tuple[float, ...] | None
    #: Frames received (the most slices the series can have).
    frame_count: int


@dataclass(frozen=True)
class SeriesInfo:
    """What series selection and the job lists need to know about one series of a study."""

    series_instance_uid: str
    modality: str | None
    instance_count: int
    series_description: str | None
    series_number: int | None


@dataclass(frozen=True)
class UnsettledStudy:
    """A study with instances no job covers yet (what a completeness check needs)."""

    study_instance_uid: str
    last_received_at: datetime
    instance_count: int
    calling_aes: frozenset[str]
    #: Series Instance UID -> instances received.
    series_counts: dict[str, int]


@dataclass(frozen=True)
class DeliveryTarget:
    """Where a SEG goes: what a delivery row needs of one configured destination.

    A C-STORE destination has ``ae_title``, ``host`` and ``port``; a DICOMweb one only its
    ``url`` (the others stay empty).
    """

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    #: DICOMweb root for a STOW-RS destination; None means C-STORE.
    url: str | None = None
    #: C-STORE over TLS (the dispatcher holds the TLS context).
    tls: bool = False
    #: ``"iocm"``: send a rejection note for the SEG a new one supersedes; ``"none"``: not.
    supersede: str = "none"
    #: Ask the destination after each store whether it holds the instance.
    verify: bool = False
    #: What the destination gets of each result: ``"seg"``, ``"sr"``, ``"sc"``.
    outputs: tuple[str, ...] = ("seg",)
    #: ``"binary"`` or ``"labelmap"``: the SEG encoding it gets.
    seg_type: str = "binary"


@dataclass(frozen=True)
class OutputObject:
    """One file in the outbox a delivery sends (a SEG, an SR, one SC image)."""

    kind: DeliveryKind
    path: str
    sop_instance_uid: str


@dataclass(frozen=True)
class SegVersion:
    """One SEG a job made in a SEG series (what the worker numbers and supersedes by)."""

    job_id: int
    sop_instance_uid: str
    instance_number: int
    #: Destinations that hold it (delivery DONE) or are being sent it now (a live lease).
    held_by: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (without ``held_by``)."""
        return {
            "job_id": self.job_id,
            "sop_instance_uid": self.sop_instance_uid,
            "instance_number": self.instance_number,
        }


@dataclass(frozen=True)
class RejectionNote:
    """An IOCM rejection note in the outbox and the SEG it retracts."""

    rejects: SegVersion
    path: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Supersession:
    """What a new SEG supersedes: the previous version of its series, and per destination
    with ``supersede = "iocm"`` the note that retracts the newest earlier SEG it holds."""

    previous: SegVersion
    notes: dict[str, RejectionNote] = field(default_factory=dict)


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker now holds; ``token`` proves the lease in every later call."""

    id: int
    token: str
    study_instance_uid: str
    model: str
    attempts: int
    #: The one series a per-series job segments; None: selection chooses among the study's.
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery a dispatcher now holds; ``token`` proves the lease."""

    id: int
    job_id: int
    token: str
    destination: str
    ae_title: str
    host: str
    port: int
    #: The file to send and its SOP Instance UID.
    path: str
    sop_instance_uid: str
    study_instance_uid: str
    attempts: int
    #: DICOMweb root for a ``dicomweb`` destination; None means C-STORE.
    url: str | None = None
    kind: DeliveryKind = DeliveryKind.SEG


@dataclass(frozen=True)
class DeliveryView:
    """A delivery as shown by the CLI and the dashboard."""

    destination: str
    ae_title: str
    host: str
    port: int
    state: DeliveryState
    attempts: int
    last_error: str | None
    last_status: int | None
    delivered_at: datetime | None
    #: DICOMweb root for a ``dicomweb`` destination; None means C-STORE.
    url: str | None = None
    kind: DeliveryKind = DeliveryKind.SEG
    sop_instance_uid: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamps, enum values as strings)."""
        return {
            "kind": self.kind.value,
            "sop_instance_uid": self.sop_instance_uid,
            "destination": self.destination,
            "ae_title": self.ae_title,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "state": self.state.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "last_status": self.last_status,
            "delivered_at": _iso(self.delivered_at),
        }


@dataclass(frozen=True)
class JobView:
    """A job as shown by the CLI and the dashboard."""

    id: int
    state: JobState
    study_instance_uid: str
    study_date: str | None
    model: str
    attempts: int
    max_attempts: int
    error: str | None
    outcome: Outcome | None
    series_instance_uid: str | None
    seg_sop_instance_uid: str | None
    seg_path: str | None
    created_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None
    durations: dict[str, float] = field(default_factory=dict)
    deliveries: tuple[DeliveryView, ...] = ()
    seg_series_instance_uid: str | None = None
    seg_instance_number: int | None = None
    #: The previous SEG of the same SEG series (lower InstanceNumber) this job's replaced.
    supersedes: SegVersion | None = None
    #: The next SEG of the series, which replaced this job's.
    superseded_by: SegVersion | None = None
    #: Per segment of the SEG: what ``scp_node.output.sr.SegmentMeasurement.to_json`` gives.
    measurements: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamps, enum values as strings)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "study_instance_uid": self.study_instance_uid,
            "study_date": self.study_date,
            "model": self.model,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "error": self.error,
            "outcome": None if self.outcome is None else self.outcome.value,
            "series_instance_uid": self.series_instance_uid,
            "seg_sop_instance_uid": self.seg_sop_instance_uid,
            "seg_path": self.seg_path,
            "created_at": _iso(self.created_at),
            "claimed_at": _iso(self.claimed_at),
            "finished_at": _iso(self.finished_at),
            "durations": dict(self.durations),
            "deliveries": [d.to_json() for d in self.deliveries],
            "seg_series_instance_uid": self.seg_series_instance_uid,
            "seg_instance_number": self.seg_instance_number,
            "supersedes": None if self.supersedes is None else self.supersedes.to_json(),
            "superseded_by": None if self.superseded_by is None else self.superseded_by.to_json(),
            "measurements": [dict(m) for m in self.measurements],
        }


@dataclass(frozen=True)
class JobEventView:
    """One event of a job's story; ``id`` grows monotonically."""

    id: int
    job_id: int
    at: datetime
    stage: Stage
    #: The job's state once the event happened (a :class:`JobState` value).
    state: str
    message: str
    duration_s: float | None
    study_instance_uid: str
    data: dict[str, Any]
    level: Level = Level.INFO

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamp, enum values as strings); the one
        event shape of ``scp-node logs --json`` and the web API."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "at": self.at.isoformat(),
            "stage": self.stage.value,
            "state": self.state,
            "level": self.level.value,
            "message": self.message,
            "duration_s": self.duration_s,
            "study_instance_uid": self.study_instance_uid,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class WorkerLease:
    """A running job as seen from the job table: who holds it and since when."""

    job_id: int
    owner: str
    claimed_at: datetime
    last_event_at: datetime
