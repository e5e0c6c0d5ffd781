"""Composition root: Settings -> engine, stores, predictor, servers and loops.

Nothing imports this module except the CLI; every other module gets its dependencies passed
in. ``run_node`` runs any subset of the stages in one process: all of them for
``scp-node serve``, one each for ``receive``, ``work`` and ``dispatch``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from types import FrameType

from sqlalchemy import Engine

from scp_node import __version__
from scp_node.dicom.handlers import StoreContext
from scp_node.dicom.scp import StorageServer, build_storage_ae
from scp_node.dispatch import Dispatcher
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import load_model_spec
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.store import JobStore
from scp_node.settings import Settings
from scp_node.spool import Spool
from scp_node.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)


class Stage(StrEnum):
    """The parts of the node that can run in a process."""

    RECEIVE = "receive"  # Storage SCP + settle sweep
    WORK = "work"  # inference worker
    DISPATCH = "dispatch"  # SEG delivery


ALL_STAGES = frozenset(Stage)


@dataclass(frozen=True)
class Database:
    """The migrated engine and the job store on it."""

    engine: Engine
    jobs: JobStore


def open_database(settings: Settings, *, migrate: bool = True) -> Database:
    """Engine for ``database.url`` (migrated to the latest schema) and a JobStore on it."""
    engine = make_engine(settings.database.url)
    if migrate:
        upgrade(engine)
    return Database(engine, JobStore(engine, RetryPolicy.from_settings(settings.retry)))


def _owner(stage: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{stage}"


def _sweep(
    jobs: JobStore, settings: Settings, stop: threading.Event, wake_work: threading.Event
) -> None:
    """Turn quiet studies into jobs and requeue jobs whose worker stopped heartbeating."""
    while not stop.is_set():
        try:
            created = jobs.settle(settings.settle.quiet_s, [settings.worker.model])
            if created or jobs.requeue_expired():
                wake_work.set()
        except Exception:
            logger.exception("settle sweep failed")
        stop.wait(settings.settle.poll_s)


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def run_node(
    settings: Settings,
    stages: Collection[Stage] = ALL_STAGES,
    *,
    stop: threading.Event | None = None,
    install_signals: bool = True,
) -> None:
    """Run ``stages`` until SIGTERM/SIGINT (or ``stop`` is set).

    On stop the SCP closes its socket and finishes the instance in flight; the worker and
    the dispatcher finish or abandon their current item, which stays resumable (its lease
    expires and it is requeued).
    """
    stop = stop or threading.Event()
    if install_signals:

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("stop requested", extra={"signal": signal.Signals(signum).name})
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    db = open_database(settings)
    threads: list[threading.Thread] = []
    # Stages in one process wake each other instead of waiting for their next poll.
    wake_work, wake_dispatch = threading.Event(), threading.Event()
    server: StorageServer | None = None
    logger.info("node starting", extra={"version": __version__, "stages": ",".join(sorted(stages))})

    if Stage.WORK in stages:
        spec = load_model_spec(settings.worker.models_dir, settings.worker.model)
        predictor = Predictor(settings.worker.device, threads=settings.worker.threads)
        predictor.load(spec)
        worker = Worker(
            db.jobs,
            spec,
            predictor,
            WorkerConfig(
                owner=_owner("work"),
                outbox_dir=settings.worker.outbox_dir,
                destinations=tuple(settings.destinations),
                lease_s=settings.worker.lease_s,
                heartbeat_s=settings.worker.heartbeat_s,
                software_version=__version__,
            ),
            wake_dispatch=wake_dispatch,
        )
        logger.info(
            "model loaded",
            extra={"model": spec.name, "model_version": spec.version, "device": predictor.device},
        )
        threads.append(
            _start_thread(lambda: worker.run(stop, settings.worker.poll_s, wake_work), "worker")
        )
    if Stage.DISPATCH in stages:
        dispatcher = Dispatcher(
            db.jobs,
            owner=_owner("dispatch"),
            calling_ae=settings.node.ae_title,
            lease_s=settings.worker.lease_s,
        )
        threads.append(
            _start_thread(
                lambda: dispatcher.run(stop, settings.worker.poll_s, wake_dispatch), "dispatch"
            )
        )
    if Stage.RECEIVE in stages:
        spool = Spool(settings.storage.spool_dir)
        ae = build_storage_ae(
            settings.node.ae_title,
            allowed_calling_ae=settings.node.allowed_calling_ae,
            max_pdu_bytes=settings.node.max_pdu_bytes,
            network_timeout_s=settings.node.network_timeout_s,
        )
        server = StorageServer(
            ae,
            settings.node.host,
            settings.node.port,
            StoreContext(spool, db.jobs, settings.storage.min_free_bytes),
        )
    threads.append(_start_thread(lambda: _sweep(db.jobs, settings, stop, wake_work), "settle"))
    logger.info("node ready")

    while not stop.wait(0.5):
        pass
    wake_work.set()
    wake_dispatch.set()
    if server is not None:
        server.stop()
    for thread in threads:
        thread.join(timeout=30.0)
    db.engine.dispose()
    logger.info("node stopped")
