"""pynetdicom event handlers. Each takes its dependencies as arguments and never raises:
a failure becomes the specific DIMSE status and a log line with the traceback."""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from scp_node.dicom.status import Status
from scp_node.dicom.validate import InstanceRejectedError, check_instance
from scp_node.queue.group_commit import GroupCommit
from scp_node.queue.intake import Intake
from scp_node.spool import Spool

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)


class InFlight:
    """Counts C-STORE handlers running now, so a stop can wait for them to finish."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *_exc: object) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no handler runs; False if some still did after ``timeout_s``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=timeout_s)


class StoreCounts:
    """Connections and C-STOREs one SCP handled (for the health page)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.instances = 0
        self.refused = 0
        #: False once the SCP stops.
        self.serving = True

    def add(self, *, connections: int = 0, instances: int = 0, refused: int = 0) -> None:
        """Count what happened (thread-safe)."""
        with self._lock:
            self.connections += connections
            self.instances += instances
            self.refused += refused


class StoreMetrics(Protocol):
    """What ``handle_store`` counts (:class:`~scp_node.metrics.NodeMetrics`, or a relay to
    the main process's from a receiver process)."""

    def record_received(self, size_bytes: int) -> None: ...

    def record_refused(self, status: int) -> None: ...


@dataclass(frozen=True)
class StoreContext:
    """What ``handle_store`` needs: where to write, where to record, the disk floor.

    Rows go through one :class:`~scp_node.queue.group_commit.GroupCommit` on ``intake``
    shared by every association of the SCP.
    """

    spool: Spool
    intake: Intake
    min_free_bytes: int
    in_flight: InFlight = field(default_factory=InFlight)
    #: Counts instances, bytes and refusals when given.
    metrics: StoreMetrics | None = None
    counts: StoreCounts = field(default_factory=StoreCounts)
    commit: GroupCommit = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "commit", GroupCommit(self.intake))


def handle_echo(event: Event) -> int:
    """C-ECHO: always success while the node runs."""
    logger.info("echo", extra={"calling_ae": event.assoc.requestor.ae_title})
    return int(Status.SUCCESS)


def handle_rejected(event: Event) -> None:
    """EVT_REJECTED: log who was turned away (AE titles and address are not PHI)."""
    requestor = event.assoc.requestor
    logger.warning(
        "association rejected",
        extra={"calling_ae": requestor.ae_title, "peer": f"{requestor.address}:{requestor.port}"},
    )


def handle_store(event: Event, ctx: StoreContext) -> int:
    """C-STORE: durable file, committed row, then success.

    The bytes are written exactly as received (``event.encoded_dataset()``); they are
    parsed (never decoded) to learn the UIDs and to check the pixel data is intact.
    """
    with ctx.in_flight:
        status = _store(event, ctx)
    if status == int(Status.SUCCESS):
        ctx.counts.add(instances=1)
    else:
        ctx.counts.add(refused=1)
        if ctx.metrics is not None:
            ctx.metrics.record_refused(status)
    return status


def _store(event: Event, ctx: StoreContext) -> int:
    request = cast("C_STORE", event.request)
    sop_uid_cmd = str(request.AffectedSOPInstanceUID or "")
    calling_ae = str(event.assoc.requestor.ae_title)
    log_ids = {"sop_instance_uid": sop_uid_cmd, "calling_ae": calling_ae}
    try:
        if ctx.spool.free_bytes() < ctx.min_free_bytes:
            logger.error("refused: free disk under storage.min_free_bytes", extra=log_ids)
            return int(Status.OUT_OF_RESOURCES)

        data = event.encoded_dataset()
        details = {
            "calling_ae": calling_ae,
            "affected_sop_instance_uid": sop_uid_cmd,
            "affected_sop_class_uid": str(request.AffectedSOPClassUID or ""),
            "transfer_syntax_uid": str(event.context.transfer_syntax),
        }
        try:
            header = check_instance(data, sop_uid_cmd)
        except InstanceRejectedError as exc:
            where = ctx.spool.quarantine(data, exc.reason, details)
            logger.warning(
                "instance refused and quarantined",
                extra={**log_ids, "quarantine": where.name, "status": f"0x{exc.status:04X}"},
            )
            return int(exc.status)

        try:
            path = ctx.spool.store(
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid,
                data,
                sync_dir=False,  # the group commit fsyncs it, once for the whole group
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The disk filled up between the free-space check and the write.
            logger.error("refused: no space left on the spool's disk", extra=log_ids)
            return int(Status.OUT_OF_RESOURCES)
        ctx.commit.record(
            header.record(
                sop_class_uid=details["affected_sop_class_uid"],
                transfer_syntax_uid=details["transfer_syntax_uid"],
                path=str(path),
                size_bytes=len(data),
                calling_ae=calling_ae,
            )
        )
        if ctx.metrics is not None:
            ctx.metrics.record_received(len(data))
        logger.debug(
            "stored",
            extra={
                **log_ids,
                "study_instance_uid": header.study_instance_uid,
                "series_instance_uid": header.series_instance_uid,
            },
        )
        return int(Status.SUCCESS)
    except Exception:
        logger.exception("store failed", extra=log_ids)
        return int(Status.PROCESSING_FAILURE)
