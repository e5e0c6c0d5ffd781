"""Node health: what ``/healthz`` answers and what the health page shows."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from scp_node.dicom.scp import ReceiverStatus
from scp_node.errors import NodeError
from scp_node.queue.records import WorkerLease
from scp_node.queue.tx import utcnow
from scp_node.queue.views import JobViews

__all__ = [
    "Check",
    "HealthReport",
    "NodeRuntime",
    "ReceiverStatus",
    "WorkerLease",
    "check_health",
]


@dataclass
class NodeRuntime:
    """What this process runs, as the web server sees it (filled in by ``app.run_node``).

    Attributes
    ----------
    stages : frozenset of str
        Stages this process runs (``receive``, ``work``, ``dispatch``); empty for
        ``scp-node web``.
    spool_dir : Path
        The spool, whose file system's free space is checked.
    min_free_bytes : int
        Below this the node refuses instances, and ``/healthz`` fails.
    device : str or None
        The inference device of this process's worker, if it runs one.
    threads : dict of str to Thread
        The stage threads of this process; each must be alive.
    receiving : callable or None
        True while the Storage SCP listens (None when this process does not receive).
    models : callable or None
        Model name -> ``"loaded"``, ``"ready"`` or ``"down: <reason>"`` for this process's
        worker (None when it runs none); a model down fails the check ``model <name>``.
    variants : dict of str to str
        Model name -> the variant its worker runs and how it was chosen (start-up
        verification), for each model loaded so far.
    model_notes : tuple of str
        One line per variant rejected on this machine, e.g. ``"ct-abdomen: variant
        pruned-int8-ort rejected on this machine: Dice 0.68 < 0.99 (liver)"``.
    starting : bool
        True from the moment the dashboard binds until every stage runs: the check
        ``start-up`` fails meanwhile, so ``/healthz`` never says ok for a node whose
        receivers, models or stages are not up yet.
    receivers : callable or None
        Each Storage SCP process (alive, pid, restarts, connections and instances
        handled); a receiver not alive fails the check ``receiver <index>``. None when this
        process does not receive.
    """

    stages: frozenset[str] = frozenset()
    spool_dir: Path = Path("var/spool")
    min_free_bytes: int = 0
    device: str | None = None
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    receiving: Callable[[], bool] | None = None
    models: Callable[[], Mapping[str, str]] | None = None
    variants: dict[str, str] = field(default_factory=dict)
    model_notes: tuple[str, ...] = ()
    starting: bool = False
    receivers: Callable[[], Sequence[ReceiverStatus]] | None = None

    @property
    def model(self) -> str | None:
        """The variants in use, one clause per loaded model; None before any is loaded."""
        return "; ".join(self.variants.values()) or None


@dataclass(frozen=True)
class Check:
    """One health check: its name, whether it passed, and a line for humans."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """Everything the health page shows; ``ok`` is what ``/healthz`` answers."""

    checks: tuple[Check, ...]
    counts: Mapping[str, int]
    disk_free_bytes: int | None
    device: str | None
    stages: frozenset[str]
    workers: tuple[WorkerLease, ...]
    #: Model name -> its state in this process's worker (see ``NodeRuntime.models``).
    models: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    model_notes: tuple[str, ...] = ()
    receivers: tuple[ReceiverStatus, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (the body of ``/healthz``)."""
        return {
            "status": "ok" if self.ok else "fail",
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
            "jobs": dict(self.counts),
            "disk_free_bytes": self.disk_free_bytes,
            "device": self.device,
            "stages": sorted(self.stages),
            "models": dict(self.models),
            "model": {"variant": self.model, "rejected": list(self.model_notes)},
            "receivers": [asdict(r) for r in self.receivers],
        }


def check_health(jobs: JobViews, runtime: NodeRuntime) -> HealthReport:
    """Check the database, the spool's free disk and this process's stage threads.

    Parameters
    ----------
    jobs : JobViews
        The job table's read side.
    runtime : NodeRuntime
        What this process runs.

    Returns
    -------
    HealthReport
        Never raises: a failing dependency becomes a failed check.
    """
    checks: list[Check] = [
        Check("start-up", not runtime.starting, "starting" if runtime.starting else "done")
    ]
    counts: dict[str, int] = {}
    workers: tuple[WorkerLease, ...] = ()
    try:
        counts = jobs.counts()
        workers = tuple(jobs.running_leases())
        checks.append(Check("database", True, "reachable"))
    except NodeError as exc:
        checks.append(Check("database", False, str(exc)))
    free: int | None = None
    try:
        target = runtime.spool_dir if runtime.spool_dir.exists() else runtime.spool_dir.parent
        free = shutil.disk_usage(target if target.exists() else Path(".")).free
        checks.append(
            Check(
                "disk",
                free >= runtime.min_free_bytes,
                f"{free / 1e9:.1f} GB free (minimum {runtime.min_free_bytes / 1e9:.1f} GB)",
            )
        )
    except OSError as exc:
        checks.append(Check("disk", False, f"cannot stat the spool: {exc}"))
    for name, thread in sorted(runtime.threads.items()):
        alive = thread.is_alive()
        checks.append(Check(name, alive, "running" if alive else "stopped"))
    if runtime.receiving is not None:
        listening = runtime.receiving()
        checks.append(Check("receive", listening, "listening" if listening else "not listening"))
    receivers = tuple(runtime.receivers()) if runtime.receivers is not None else ()
    for receiver in receivers:
        checks.append(
            Check(
                f"receiver {receiver.index}",
                receiver.alive,
                f"pid {receiver.pid}, {'running' if receiver.alive else 'down'}, "
                f"{receiver.restarts} restarts",
            )
        )
    models = dict(runtime.models()) if runtime.models is not None else {}
    for name, state in models.items():
        up = not state.startswith("down")
        checks.append(Check(f"model {name}", up, state))
    return HealthReport(
        checks=tuple(checks),
        models=models,
        counts=counts,
        disk_free_bytes=free,
        device=runtime.device,
        stages=runtime.stages,
        workers=workers,
        model=runtime.model,
        model_notes=runtime.model_notes,
        receivers=receivers,
    )


def age(at: datetime, now: datetime | None = None) -> str:
    """``at`` as a short age, e.g. ``"42s"``, ``"5m"``, ``"3h"``, ``"2d"``."""
    seconds = max(0.0, ((now or utcnow()) - at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
