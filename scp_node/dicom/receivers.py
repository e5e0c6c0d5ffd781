"""Several Storage SCP processes on one port (``node.receivers``).

pynetdicom holds the GIL for most of a C-STORE (PDU decoding, parsing, the ORM), so one
process receives about one core's worth however many associations are open. Each receiver
here is a spawned process with its own AE, listening with ``SO_REUSEPORT`` on the node's
port: the kernel hands each new connection to one of them (by a hash of the addresses, so
a few senders may share one receiver while another idles). The main process keeps the
settle sweep, the workers and the dispatcher, restarts a receiver that dies, and gathers the
receivers' instance counters into its ``/metrics``.

A receiver acknowledges an instance only once its file and row are durable, as the
in-process SCP does, so a receiver killed mid-association loses nothing it acknowledged;
the sender resends the rest. A receiver whose main process dies stops by itself (it
finishes the C-STOREs in flight first), so a restarted node never shares its port with
orphans.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import FrameType

from scp_node.dicom.handlers import StoreContext, StoreMetrics
from scp_node.dicom.scp import StorageServer, build_storage_ae
from scp_node.dicom.tls import server_context_from_settings
from scp_node.errors import BindError
from scp_node.queue.db import make_engine
from scp_node.queue.intake import Intake
from scp_node.settings import Settings, TlsSection
from scp_node.spool import Spool

__all__ = ["ReceiverConfig", "ReceiverPool"]

logger = logging.getLogger(__name__)

#: A receiver that dies sooner than this after its start is restarted only after a pause,
#: so a receiver that cannot run (a broken database, say) does not spin.
_QUICK_DEATH_S = 5.0
_RESTART_PAUSE_S = 2.0


@dataclass(frozen=True)
class ReceiverConfig:
    """What a receiver process needs, from ``Settings`` (picklable: it crosses ``spawn``)."""

    ae_title: str
    host: str
    port: int
    allowed_calling_ae: tuple[str, ...]
    allowed_source_ips: tuple[str, ...]
    max_pdu_bytes: int
    network_timeout_s: float
    spool_dir: Path
    min_free_bytes: int
    database_url: str
    tls: TlsSection
    log_level: str
    log_dir: Path | None
    log_max_bytes: int
    log_backups: int
    #: Seconds a stopping receiver waits for the C-STOREs in flight.
    grace_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ReceiverConfig:
        """The receivers' part of ``settings``."""
        node = settings.node
        return cls(
            ae_title=node.ae_title,
            host=node.host,
            port=node.port,
            allowed_calling_ae=tuple(node.allowed_calling_ae),
            allowed_source_ips=tuple(node.allowed_source_ips),
            max_pdu_bytes=node.max_pdu_bytes,
            network_timeout_s=node.network_timeout_s,
            spool_dir=settings.storage.spool_dir,
            min_free_bytes=settings.storage.min_free_bytes,
            database_url=settings.database.url,
            tls=settings.tls,
            log_level=settings.log.level,
            log_dir=settings.log.dir,
            log_max_bytes=settings.log.max_bytes,
            log_backups=settings.log.backups,
        )


class _MetricsRelay:
    """A receiver's :class:`StoreMetrics`: counts go to the main process's metrics."""

    def __init__(self, events: Queue[tuple[str, int] | None]) -> None:
        self._events = events

    def record_received(self, size_bytes: int) -> None:
        self._events.put_nowait(("received", size_bytes))

    def record_refused(self, status: int) -> None:
        self._events.put_nowait(("refused", status))


def run_receiver(
    config: ReceiverConfig, index: int, ready: Connection, events: Queue[tuple[str, int] | None]
) -> None:
    """A receiver process's body: listen until SIGTERM/SIGINT or the main process dies.

    Sends ``("ready", pid)`` or ``("error", reason)`` on ``ready`` once it listens or
    could not; exits with status 3 in the second case.
    """
    from scp_node.logs import configure_logging

    configure_logging(
        config.log_level,
        config.log_dir,
        max_bytes=config.log_max_bytes,
        backups=config.log_backups,
        file_name=f"receiver-{index}.log",
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_stop_when_gone, args=(parent.sentinel, stop), name="parent", daemon=True
        ).start()

    engine = make_engine(config.database_url)
    try:
        server = StorageServer(
            build_storage_ae(
                config.ae_title,
                allowed_calling_ae=config.allowed_calling_ae,
                max_pdu_bytes=config.max_pdu_bytes,
                network_timeout_s=config.network_timeout_s,
            ),
            config.host,
            config.port,
            StoreContext(
                Spool(config.spool_dir),
                Intake(engine),
                config.min_free_bytes,
                metrics=_MetricsRelay(events),
            ),
            ssl_context=server_context_from_settings(config.tls),
            allowed_source_ips=config.allowed_source_ips,
            reuse_port=True,
        )
    except Exception as exc:
        logger.exception("receiver did not start", extra={"receiver": index})
        # A restarted receiver's main process does not wait for the answer: its exit code tells.
        with contextlib.suppress(OSError):
            ready.send(("error", f"{type(exc).__name__}: {exc}"))
        engine.dispose()
        raise SystemExit(3) from exc
    with contextlib.suppress(OSError):  # nobody waits for a restarted receiver's "ready"
        ready.send(("ready", os.getpid()))
        ready.close()
    logger.info("receiver ready", extra={"receiver": index, "pid": os.getpid()})
    stop.wait()
    server.stop(config.grace_s)
    engine.dispose()
    events.close()
    events.join_thread()


def _stop_when_gone(sentinel: int, stop: threading.Event) -> None:
    multiprocessing.connection.wait([sentinel])
    logger.warning("main process gone: receiver stopping")
    stop.set()


def check_port_free(host: str, port: int) -> None:
    """Fail start-up when something already listens on ``host:port``.

    SO_REUSEPORT would otherwise let the receivers share the port with another node of the
    same user (a second ``scp-node serve`` on one configuration) without a word.

    Raises
    ------
    BindError
        The port is in use or the address is not one of this host's.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _name, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise BindError(f"storage SCP: cannot listen on {host}:{port}: {exc}") from exc


@dataclass
class _Slot:
    index: int
    process: BaseProcess
    started: float = field(default_factory=time.monotonic)


class ReceiverPool:
    """``count`` receiver processes on ``config.port``, restarted when they die.

    Parameters
    ----------
    config : ReceiverConfig
        Shared by every receiver.
    count : int
        Processes to run (>= 1).
    metrics : StoreMetrics or None
        Gets every receiver's instance and refusal counts.
    """

    def __init__(
        self, config: ReceiverConfig, count: int, metrics: StoreMetrics | None = None
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._config = config
        self._count = count
        self._metrics = metrics
        self._mp = multiprocessing.get_context("spawn")
        self._events: Queue[tuple[str, int] | None] = self._mp.Queue()
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Receivers restarted after they died (for the tests and the health page).
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the receivers running now."""
        with self._lock:
            return [s.process.pid for s in self._slots if s.process.pid and s.process.is_alive()]

    def start(self, timeout_s: float = 120.0) -> ReceiverPool:
        """Start every receiver and return once each listens.

        Raises
        ------
        BindError
            The port is taken, or a receiver could not listen (the others are stopped).
        ConfigError
            The ``[tls]`` files do not load.
        """
        server_context_from_settings(self._config.tls)  # a bad certificate fails here, once
        check_port_free(self._config.host, self._config.port)
        pending = [self._spawn(i) for i in range(self._count)]
        deadline = time.monotonic() + timeout_s
        try:
            for slot, conn in pending:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise BindError(f"receiver {slot.index} did not start in {timeout_s:g} s")
                try:
                    kind, value = conn.recv()
                except EOFError:
                    kind, value = "error", f"exit code {slot.process.exitcode}"
                conn.close()
                if kind != "ready":
                    raise BindError(f"storage SCP receiver {slot.index} did not start: {value}")
        except BaseException:
            self._stopping.set()
            for slot, _conn in pending:
                slot.process.kill()
                slot.process.join()
            raise
        self._slots = [slot for slot, _conn in pending]
        self._threads = [
            _thread(self._watch, "receivers"),
            _thread(self._relay_metrics, "receiver-metrics"),
        ]
        logger.info(
            "storage SCP listening",
            extra={
                "ae_title": self._config.ae_title,
                "host": self._config.host,
                "port": self._config.port,
                "tls": self._config.tls.enabled,
                "receivers": self._count,
            },
        )
        return self

    def _spawn(self, index: int) -> tuple[_Slot, Connection]:
        receive_end, send_end = self._mp.Pipe(duplex=False)
        process = self._mp.Process(
            target=run_receiver,
            args=(self._config, index, send_end, self._events),
            name=f"receiver-{index}",
            daemon=False,
        )
        process.start()
        send_end.close()
        return _Slot(index, process), receive_end

    def _watch(self) -> None:
        """Restart receivers that die (kill -9, a crash) until the pool stops."""
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {s.process.sentinel: s for s in self._slots}
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            for sentinel in ready:
                slot = sentinels[sentinel]  # type: ignore[index]
                slot.process.join()
                if self._stopping.is_set():
                    return
                lived_s = time.monotonic() - slot.started
                logger.error(
                    "receiver died; restarting it",
                    extra={
                        "receiver": slot.index,
                        "pid": slot.process.pid,
                        "exit_code": slot.process.exitcode,
                    },
                )
                if lived_s < _QUICK_DEATH_S and self._stopping.wait(_RESTART_PAUSE_S):
                    return
                new, conn = self._spawn(slot.index)
                conn.close()  # its "ready" is not awaited: the others keep receiving
                with self._lock:
                    self._slots[self._slots.index(slot)] = new
                    self.restarts += 1
                logger.info(
                    "receiver restarted", extra={"receiver": new.index, "pid": new.process.pid}
                )

    def _relay_metrics(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            kind, value = item
            if self._metrics is None:
                continue
            if kind == "received":
                self._metrics.record_received(value)
            else:
                self._metrics.record_refused(value)

    def stop(self) -> None:
        """Stop every receiver: each closes its socket and lets its C-STOREs in flight
        finish (up to ``config.grace_s``) before it aborts its associations; one still
        running 10 s after that is killed."""
        self._stopping.set()
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            if slot.process.is_alive():
                slot.process.terminate()
        deadline = time.monotonic() + self._config.grace_s + 10.0
        for slot in slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                logger.error("receiver did not stop; killing it", extra={"receiver": slot.index})
                slot.process.kill()
                slot.process.join()
        self._events.put(None)
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._events.close()
        logger.info("storage SCP stopped", extra={"receivers": self._count})


def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
