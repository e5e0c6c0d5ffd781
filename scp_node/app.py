"""Composition root: Settings -> engine, queue pieces, predictor, servers and loops.

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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import FrameType
from typing import Any

import requests
from sqlalchemy import Engine

from scp_node import __version__
from scp_node.dicom.handlers import StoreContext
from scp_node.dicom.receivers import ReceiverConfig, ReceiverPool
from scp_node.dicom.scp import StorageServer, build_storage_ae
from scp_node.dicom.selection import route_study
from scp_node.dicom.tls import client_context_from_settings, server_context_from_settings
from scp_node.dicom.webauth import web_session
from scp_node.dispatch import Dispatcher
from scp_node.errors import ModelError
from scp_node.inference.device import torch_device
from scp_node.inference.pool import LoadedModel, ModelPool
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec, load_model_spec
from scp_node.inference.runtime import load_runtime
from scp_node.inference.runtime.volume import VolumePredictor
from scp_node.inference.verify import VariantSelection, select_variant, selection_summary
from scp_node.inference.verify_volume import select_volume_variant
from scp_node.metrics import NodeMetrics
from scp_node.queue.admin import JobAdmin
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.deliveries import Deliveries
from scp_node.queue.intake import Intake
from scp_node.queue.records import DeliveryTarget, SeriesFacts
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.settling import Router, Settling
from scp_node.queue.tx import Clock, utcnow
from scp_node.queue.views import JobViews
from scp_node.queue.work import WorkQueue
from scp_node.settings import Destination, RetrySection, Settings
from scp_node.settle import CompletenessGate, Settler
from scp_node.spool import Spool, recover_unrecorded
from scp_node.web.app import create_app
from scp_node.web.health import NodeRuntime
from scp_node.web.server import WebServer
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
    """The migrated engine and the job table's pieces, one per user; each stage gets only
    its own."""

    engine: Engine
    intake: Intake
    settling: Settling
    work: WorkQueue
    deliveries: Deliveries
    admin: JobAdmin
    views: JobViews


def retry_policy(section: RetrySection) -> RetryPolicy:
    """The queue's retry policy from the ``[retry]`` section."""
    return RetryPolicy(
        max_attempts=section.max_attempts,
        initial_backoff_s=section.initial_backoff_s,
        max_backoff_s=section.max_backoff_s,
        multiplier=section.multiplier,
        give_up_after_s=section.give_up_after_s,
    )


def delivery_target(destination: Destination) -> DeliveryTarget:
    """What a delivery row keeps of a ``[[destinations]]`` entry (a DICOMweb destination
    has no AE title, host or port, only its URL)."""
    return DeliveryTarget(
        name=destination.name,
        ae_title=destination.ae_title or "",
        host=destination.host or "",
        port=destination.port or 0,
        url=destination.url,
        tls=destination.tls,
        supersede=destination.supersede,
        verify=destination.verify,
        outputs=tuple(destination.outputs),
        seg_type=destination.seg_type,
    )


def build_queue(engine: Engine, policy: RetryPolicy, clock: Clock = utcnow) -> Database:
    """Every piece of the job table on ``engine`` (already migrated), sharing ``clock``."""
    return Database(
        engine=engine,
        intake=Intake(engine, clock),
        settling=Settling(engine, policy, clock),
        work=WorkQueue(engine, policy, clock),
        deliveries=Deliveries(engine, policy, clock),
        admin=JobAdmin(engine, policy, clock),
        views=JobViews(engine),
    )


def open_database(settings: Settings, *, migrate: bool = True) -> Database:
    """Engine for ``database.url`` (migrated to the latest schema) and the queue pieces."""
    engine = make_engine(settings.database.url)
    if migrate:
        upgrade(engine)
    return build_queue(engine, retry_policy(settings.retry))


def _owner(stage: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{stage}"


def _settler(settling: Settling, settings: Settings, wake_work: threading.Event) -> Settler:
    """The settle stage, with the completeness gate when configured and a source is known."""
    gate = (
        CompletenessGate(
            settings.sources,
            calling_ae=settings.node.ae_title,
            quiet_s=settings.settle.quiet_s,
            max_wait_s=settings.settle.max_wait_s,
            query_interval_s=settings.settle.query_interval_s,
        )
        if settings.settle.completeness_check and settings.sources
        else None
    )
    return Settler(
        settling,
        model_routes(settings),
        settings.settle.quiet_s,
        gate=gate,
        wake_work=wake_work,
        per_series=_per_series_models(settings),
        series_quiet_s=settings.settle.series_quiet_s,
    )


def _per_series_models(settings: Settings) -> frozenset[str]:
    """The served models whose cards say ``[series] per_series = true`` (an unreadable card
    is logged by :func:`model_routes`)."""
    names = set()
    for name in settings.worker.models:
        try:
            if load_model_spec(settings.worker.models_dir, name).series.per_series:
                names.add(name)
        except ModelError:
            continue
    return frozenset(names)


def model_routes(settings: Settings) -> dict[str, Router | None]:
    """Each served model's settle-time router, from its card's ``[series]`` rules.

    A model whose card cannot be read gets no router: its studies still become jobs, which
    wait for a worker that serves it (and its being down shows on that worker's health).
    """
    routes: dict[str, Router | None] = {}
    for name in settings.worker.models:
        try:
            spec = load_model_spec(settings.worker.models_dir, name)
        except ModelError as exc:
            logger.error(
                "model card unreadable: no routing rules", extra={"model": name, "error": str(exc)}
            )
            routes[name] = None
            continue
        routes[name] = _router(spec)
    return routes


def _router(spec: ModelSpec) -> Router:
    rules = spec.series.rules()

    def route(series: Sequence[SeriesFacts]) -> str | None:
        return route_study(series, rules)

    return route


def _load_predictor(settings: Settings, runtime: NodeRuntime) -> Callable[[ModelSpec], LoadedModel]:
    """Loader of the worker's model pool: one predictor per model on the configured device."""

    def load(spec: ModelSpec) -> LoadedModel:
        if spec.kind == "volume" and spec.verify.file is not None:
            # Exported and int8 variants of the 3-D network, verified on its reference patch.
            verified, selection = _select_volume(spec, settings)
            runtime.device = str(verified.device)
            runtime.variants[spec.name] = selection_summary(selection)
            runtime.model_notes = (
                *(n for n in runtime.model_notes if not n.startswith(f"{spec.name}: ")),
                *(f"{spec.name}: {note}" for note in selection.notes),
            )
            logger.info(
                "model loaded",
                extra={"model": spec.name, "device": verified.device, "variant": verified.variant},
            )
            return verified
        if spec.kind == "volume":
            # One network, no variants: nothing to choose between or verify against.
            volume = load_runtime(spec, settings.worker.device, threads=settings.worker.threads)
            runtime.device = str(volume.device)
            runtime.variants[spec.name] = f"{spec.name} volume runtime ({spec.format})"
            logger.info(
                "model loaded",
                extra={"model": spec.name, "model_version": spec.version, "device": volume.device},
            )
            return volume
        # Every variant the worker may run is verified on the card's reference case first.
        predictor, selection = select_variant(
            spec,
            lambda: Predictor(settings.worker.device, threads=settings.worker.threads),
            requested=settings.worker.variant or None,
            cache_dir=settings.worker.variant_cache_dir,
        )
        runtime.device = str(predictor.device)
        runtime.variants[spec.name] = selection_summary(selection)
        runtime.model_notes = (
            *(n for n in runtime.model_notes if not n.startswith(f"{spec.name}: ")),
            *(f"{spec.name}: {note}" for note in selection.notes),
        )
        logger.info(
            "model loaded",
            extra={
                "model": spec.name,
                "model_version": spec.version,
                "device": predictor.device,
                "variant": predictor.variant,
            },
        )
        return predictor

    return load


def _select_volume(spec: ModelSpec, settings: Settings) -> tuple[VolumePredictor, VariantSelection]:
    worker = settings.worker

    def make(variant: str) -> VolumePredictor:
        volume = load_runtime(spec, worker.device, threads=worker.threads, variant=variant)
        assert isinstance(volume, VolumePredictor)
        return volume

    return select_volume_variant(
        spec, make, requested=worker.variant or None, cache_dir=worker.variant_cache_dir
    )


def _verify_at_start(pool: ModelPool, max_loaded: int) -> None:
    """Load (and so verify) the first models the pool can hold, so a variant this machine
    computes wrongly is reported at start-up, not at the first study; a model that fails
    is marked down by the pool and the others run on."""
    for name in pool.served[:max_loaded]:
        try:
            pool.get(name)
        except ModelError:
            logger.exception("model not loaded at start-up", extra={"model": name})


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (the main thread then shuts the stages down)."""

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("stop requested", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice``. On Linux a nice value belongs to a thread
    (and is inherited by the threads and processes it starts), not to the whole process."""
    if nice:
        os.setpriority(
            os.PRIO_PROCESS,
            threading.get_native_id(),
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + nice,
        )


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

    Raises
    ------
    ConfigError
        With the dispatch stage: a DICOMweb destination's secret cannot be read.
    """
    stop = stop or threading.Event()
    # Secrets are read before anything starts: one that is missing stops start-up at once.
    web_sessions = _web_sessions(settings) if Stage.DISPATCH in stages else {}
    if install_signals:
        _stop_on_signals(stop)

    db = open_database(settings)
    runtime = NodeRuntime(
        starting=True,
        stages=frozenset(str(s) for s in stages),
        spool_dir=settings.storage.spool_dir,
        min_free_bytes=settings.storage.min_free_bytes,
    )
    metrics = NodeMetrics(gpu_memory=lambda: _gpu_memory(runtime.device))
    threads: list[threading.Thread] = []
    # Stages in one process wake each other instead of waiting for their next poll.
    wake_work, wake_dispatch = threading.Event(), threading.Event()
    server: StorageServer | ReceiverPool | None = None
    logger.info("node starting", extra={"version": __version__, "stages": ",".join(sorted(stages))})
    # The dashboard binds first: a port already in use stops start-up before any stage runs.
    web = _start_web(settings, db, runtime, metrics) if settings.web.enabled else None

    intake_engine: Engine | None = None
    if Stage.RECEIVE in stages:
        # Rows a power cut took (the intake commits with synchronous=NORMAL) come back from
        # the spool before anything is received or settled.
        recover_unrecorded(Spool(settings.storage.spool_dir), db.intake)
    if Stage.RECEIVE in stages and settings.node.receivers > 1:
        server = ReceiverPool(
            ReceiverConfig.from_settings(settings), settings.node.receivers, metrics
        ).start()
    elif Stage.RECEIVE in stages:
        spool = Spool(settings.storage.spool_dir)
        intake_engine = make_engine(settings.database.url, synchronous="NORMAL")
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
            StoreContext(
                spool, Intake(intake_engine), settings.storage.min_free_bytes, metrics=metrics
            ),
            ssl_context=server_context_from_settings(settings.tls),
            allowed_source_ips=settings.node.allowed_source_ips,
        )
    # The receivers show on /healthz from the moment they accept, not only once the
    # worker's models are verified (a sender may already be sending).
    if isinstance(server, ReceiverPool):
        runtime.receivers = server.status
    elif server is not None:
        in_process = server
        runtime.receivers = lambda: [in_process.status()]
    if Stage.WORK in stages:
        # Receiving keeps priority over inference: the threads started from here on (the
        # worker and its torch threads, settle, dispatch) inherit this thread's lower
        # priority; the receivers, started above, keep theirs.
        _lower_priority(settings.worker.nice)
        pool = ModelPool(
            settings.worker.models_dir,
            settings.worker.models,
            _load_predictor(settings, runtime),
            max_loaded=settings.worker.max_loaded_models,
        )
        runtime.models = pool.status
        # Weights load on a model's first job; the device is known now.
        runtime.device = str(torch_device(settings.worker.device, settings.worker.threads))
        _verify_at_start(pool, settings.worker.max_loaded_models)
        worker = Worker(
            db.work,
            pool,
            WorkerConfig(
                owner=_owner("work"),
                outbox_dir=settings.worker.outbox_dir,
                destinations=tuple(delivery_target(d) for d in settings.destinations),
                lease_s=settings.worker.lease_s,
                heartbeat_s=settings.worker.heartbeat_s,
                software_version=__version__,
                prepare=True,
                # One in-process receiver shares the GIL with the worker (see read_ahead).
                read_ahead=not (Stage.RECEIVE in stages and settings.node.receivers <= 1),
            ),
            wake_dispatch=wake_dispatch,
        )
        threads.append(
            _start_thread(lambda: worker.run(stop, settings.worker.poll_s, wake_work), "worker")
        )
    if Stage.DISPATCH in stages:
        dispatcher = Dispatcher(
            db.deliveries,
            owner=_owner("dispatch"),
            calling_ae=settings.node.ae_title,
            lease_s=settings.worker.lease_s,
            metrics=metrics,
            verify_destinations=[d.name for d in settings.destinations if d.verify],
            web_sessions=web_sessions,
            **_dispatch_tls(settings),
        )
        threads.append(
            _start_thread(
                lambda: dispatcher.run(stop, settings.worker.poll_s, wake_dispatch), "dispatch"
            )
        )
    settler = _settler(db.settling, settings, wake_work)
    threads.append(_start_thread(lambda: settler.run(stop, settings.settle.poll_s), "settle"))
    runtime.threads = {thread.name: thread for thread in threads}
    if server is not None:
        runtime.receiving = lambda: not stop.is_set()
    runtime.starting = False
    logger.info("node ready")

    while not stop.wait(0.5):
        pass
    wake_work.set()
    wake_dispatch.set()
    if server is not None:
        server.stop()
    if web is not None:
        web.stop()
    for thread in threads:
        thread.join(timeout=30.0)
    if intake_engine is not None:
        intake_engine.dispose()
    db.engine.dispose()
    logger.info("node stopped")


def _dispatch_tls(settings: Settings) -> dict[str, Any]:
    """The Dispatcher's TLS arguments: a client context when some destination wants TLS."""
    names = [d.name for d in settings.destinations if d.tls]
    if not names:
        return {}
    return {"ssl_context": client_context_from_settings(settings.tls), "tls_destinations": names}


def _web_sessions(settings: Settings) -> dict[str, requests.Session]:
    """One HTTP session (credentials, TLS) per DICOMweb destination.

    Raises
    ------
    ConfigError
        A destination's secret cannot be read from its environment variable or file.
    """
    return {
        d.name: web_session(d, settings.tls, os.environ)
        for d in settings.destinations
        if d.kind == "dicomweb"
    }


def _gpu_memory(device: str | None) -> int | None:
    """Bytes of CUDA memory torch holds, when this process infers on CUDA."""
    if device is None or not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.memory_allocated())


def _start_web(
    settings: Settings, db: Database, runtime: NodeRuntime, metrics: NodeMetrics
) -> WebServer:
    """Start the dashboard in this process.

    Raises
    ------
    BindError
        ``web.host``/``web.port`` cannot be bound: start-up stops with that one line.
    """
    stop = threading.Event()
    app = create_app(db.views, db.admin, settings.web, runtime, metrics, stop=stop)
    return WebServer(app, settings.web.host, settings.web.port, stop).start()


def run_web(
    settings: Settings, *, stop: threading.Event | None = None, install_signals: bool = True
) -> None:
    """Run only the dashboard, ``/metrics`` and ``/healthz`` until SIGTERM/SIGINT or ``stop``.

    Raises
    ------
    BindError
        ``web.host``/``web.port`` cannot be bound.
    """
    stop = stop or threading.Event()
    if install_signals:
        _stop_on_signals(stop)
    db = open_database(settings)
    runtime = NodeRuntime(
        spool_dir=settings.storage.spool_dir, min_free_bytes=settings.storage.min_free_bytes
    )
    web = _start_web(settings, db, runtime, NodeMetrics())
    while not stop.wait(0.5):
        pass
    web.stop()
    db.engine.dispose()
