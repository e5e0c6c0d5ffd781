"""Prometheus metrics of one node process.

:class:`NodeMetrics` owns a private :class:`~prometheus_client.CollectorRegistry` (no global
registry) and is passed to whoever counts: the C-STORE handler (instances and bytes), the
dispatcher (delivery attempts and failures, objects sent by kind). What the job table
already knows (jobs by state, queue depth, busy workers, stage latencies) is read from it
when ``/metrics`` is scraped (:meth:`NodeMetrics.refresh`), so those figures cover every
process sharing the database, not only this one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from scp_node.queue.models import JobState
from scp_node.queue.views import JobViews

__all__ = ["EVENT_STAGES", "NodeMetrics"]

#: Job event stage -> the ``stage`` label of ``scp_node_stage_seconds``.
EVENT_STAGES = {
    "settled": "settle_wait",
    "claim": "queue_wait",
    "select": "select",
    "load": "load",
    "inference": "inference",
    "seg": "seg_build",
    "deliver": "delivery",
    "done": "total",
}

#: Seconds: from sub-second stages up to an hour-long settle or delivery backlog.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class NodeMetrics:
    """The node's metric objects in their own registry.

    Parameters
    ----------
    registry : CollectorRegistry or None
        Where to register; a fresh one if None.
    gpu_memory : callable or None
        Returns the bytes of GPU memory torch holds now, or None when not on CUDA.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        gpu_memory: Callable[[], int | None] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._gpu_memory = gpu_memory
        self._lock = threading.Lock()
        self._last_event_id = 0
        r = self.registry
        self.instances_received = Counter(
            "scp_node_instances_received",
            "Instances stored and acknowledged with 0x0000.",
            registry=r,
        )
        self.instances_refused = Counter(
            "scp_node_instances_refused",
            "C-STORE requests answered with a non-success status, by status.",
            ["status"],
            registry=r,
        )
        self.bytes_received = Counter(
            "scp_node_received_bytes", "Bytes of instances stored.", registry=r
        )
        self.delivery_attempts = Counter(
            "scp_node_delivery_attempts",
            "SEG delivery attempts by this process, by destination.",
            ["destination"],
            registry=r,
        )
        self.delivery_failures = Counter(
            "scp_node_delivery_failures",
            "SEG delivery attempts that failed or were refused, by destination.",
            ["destination"],
            registry=r,
        )
        self.objects_sent = Counter(
            "scp_node_objects_sent",
            "Objects a destination accepted (and held, where verified), by this process, by "
            "kind: seg, sr, sc, kos (rejection note).",
            ["kind"],
            registry=r,
        )
        self.jobs = Gauge(
            "scp_node_jobs", "Jobs in the job table, by state.", ["state"], registry=r
        )
        self.queue_depth = Gauge(
            "scp_node_queue_depth", "Jobs waiting for a worker (queued).", registry=r
        )
        self.worker_busy = Gauge(
            "scp_node_worker_busy", "Jobs a worker is running now (all workers).", registry=r
        )
        self.stage_seconds = Histogram(
            "scp_node_stage_seconds",
            "Time per job stage (settle_wait, queue_wait, select, load, inference, seg_build, "
            "delivery per attempt that landed, total), from the job events.",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.gpu_memory_bytes = Gauge(
            "scp_node_gpu_memory_bytes", "GPU memory held by torch (CUDA only).", registry=r
        )

    def record_received(self, size_bytes: int) -> None:
        """Count one stored instance of ``size_bytes``."""
        self.instances_received.inc()
        self.bytes_received.inc(size_bytes)

    def record_refused(self, status: int) -> None:
        """Count one C-STORE answered with the non-success ``status``."""
        self.instances_refused.labels(status=f"0x{status:04X}").inc()

    def record_delivery(self, destination: str, *, ok: bool) -> None:
        """Count one delivery attempt to ``destination``, and a failure unless ``ok``."""
        self.delivery_attempts.labels(destination=destination).inc()
        if not ok:
            self.delivery_failures.labels(destination=destination).inc()

    def record_sent(self, kind: str) -> None:
        """Count one object of ``kind`` (a ``DeliveryKind`` value) that landed."""
        self.objects_sent.labels(kind=kind).inc()

    def refresh(self, jobs: JobViews) -> None:
        """Bring the job-table figures up to date: states, queue, busy, stage latencies.

        Stage latencies are observed once per job event that carries a duration, in event
        id order, so each histogram counts every event exactly once per process.

        Raises
        ------
        NodeError
            The database cannot be read.
        """
        with self._lock:
            counts = jobs.counts()
            for state, count in counts.items():
                self.jobs.labels(state=state).set(count)
            self.queue_depth.set(counts.get(JobState.QUEUED.value, 0))
            self.worker_busy.set(counts.get(JobState.RUNNING.value, 0))
            while True:
                events = jobs.events_after(self._last_event_id, limit=1000)
                for event in events:
                    self._last_event_id = event.id
                    stage = EVENT_STAGES.get(event.stage)
                    if stage is not None and event.duration_s is not None:
                        self.stage_seconds.labels(stage=stage).observe(event.duration_s)
                if len(events) < 1000:
                    break
            if self._gpu_memory is not None:
                used = self._gpu_memory()
                if used is not None:
                    self.gpu_memory_bytes.set(used)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
