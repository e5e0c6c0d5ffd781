"""Several Storage SCP processes behind one port (``node.receivers``).

pynetdicom holds the GIL for most of a C-STORE (PDU decoding, parsing, the ORM), so one
process receives about one core's worth however many associations are open. Here the main
process owns the listening socket and hands each accepted connection (its file descriptor,
over a Unix socket) to the next of ``node.receivers`` spawned processes in turn; each runs
its own pynetdicom AE on the connections it is given, TLS and allow-lists included. The main
process keeps the settle sweep, the workers and the dispatcher, restarts a receiver that
dies, and gathers the receivers' instance counters into its ``/metrics``.

Why an acceptor rather than SO_REUSEPORT (tried first): with SO_REUSEPORT the receivers
hold the port themselves, so after a kill -9 of the main process they kept accepting (in
the kernel's backlog) until they had died too, and a restarted node's first sender was
reset; and the kernel spreads connections by a hash of the addresses, so two of four
senders often landed on one receiver while another idled. With the acceptor the port
closes with the main process and connections go round-robin.

A receiver acknowledges an instance only once its file and row are durable, as the
in-process SCP does, so a receiver killed mid-association loses nothing it acknowledged;
the sender resends the rest. A receiver dies with the main process (Linux: the kernel sends
it SIGKILL when the thread that started it ends).
"""

from __future__ import annotations

import contextlib
import ctypes
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
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import FrameType

from scp_node.dicom.handlers import StoreContext, StoreMetrics
from scp_node.dicom.scp import ReceiverStatus, StorageServer, build_storage_ae
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
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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

    def __init__(self, events: Queue[tuple[str, int, int] | None], index: int) -> None:
        self._events = events
        self._index = index

    def record_received(self, size_bytes: int) -> None:
        self._events.put_nowait(("received", size_bytes, self._index))

    def record_refused(self, status: int) -> None:
        self._events.put_nowait(("refused", status, self._index))


def run_receiver(
    config: ReceiverConfig,
    index: int,
    ready: Connection,
    events: Queue[tuple[str, int, int] | None],
    handoff: Connection,
) -> None:
    """A receiver process's body: serve the connections that arrive on ``handoff`` until
    SIGTERM/SIGINT or the main process dies.

    Sends ``("ready", pid)`` or ``("error", reason)`` on ``ready`` once it can serve or
    could not; exits with status 3 in the second case.
    """
    from scp_node.logs import configure_logging

    _die_with_parent()
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

    # A crash of this process loses no committed row; a power cut may lose the last ones,
    # which the next start restores from the spool (see scp_node.spool).
    engine = make_engine(config.database_url, synchronous="NORMAL")
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
                metrics=_MetricsRelay(events, index),
            ),
            ssl_context=server_context_from_settings(config.tls),
            allowed_source_ips=config.allowed_source_ips,
            handoff=True,
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
    threading.Thread(
        target=_serve_handed, args=(server, handoff, stop), name="handoff", daemon=True
    ).start()
    stop.wait()
    server.stop(config.grace_s)
    engine.dispose()
    events.close()
    events.join_thread()


def _serve_handed(server: StorageServer, handoff: Connection, stop: threading.Event) -> None:
    """Serve each connection the main process hands over, until it closes its end."""
    while True:
        try:
            fd = reduction.recv_handle(handoff)
        except (EOFError, OSError):
            stop.set()  # the main process is gone or stopping
            return
        conn = socket.socket(fileno=fd)
        try:
            server.take(conn)
        except Exception:
            logger.exception("could not serve a connection")
            conn.close()


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux);
    elsewhere the parent-sentinel thread stops it gracefully instead."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the main process died before the request above took effect


def _stop_when_gone(sentinel: int, stop: threading.Event) -> None:
    multiprocessing.connection.wait([sentinel])
    logger.warning("main process gone: receiver stopping")
    stop.set()


def listen(host: str, port: int) -> socket.socket:
    """The node's listening socket on ``host:port``.

    Raises
    ------
    BindError
        The port is in use or the address is not one of this host's.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _kind, _proto, _name, address = infos[0]
        return socket.create_server(address[:2], family=family, backlog=128)
    except OSError as exc:
        raise BindError(f"storage SCP: cannot listen on {host}:{port}: {exc}") from exc


@dataclass
class _Counts:
    """What one receiver index handled, across its restarts."""

    restarts: int = 0
    connections: int = 0
    instances: int = 0
    refused: int = 0


@dataclass
class _Slot:
    index: int
    process: BaseProcess
    #: The main process's end of the Unix socket connections are handed over on.
    handoff: Connection
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
        self._events: Queue[tuple[str, int, int] | None] = self._mp.Queue()
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        #: Set once every receiver has stopped: the watcher thread, which started the
        #: restarted ones, must outlive them (their death signal fires when it ends).
        self._released = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._next = 0
        #: Receivers restarted after they died (for the tests and the health page).
        self.restarts = 0
        self._counts = [_Counts() for _ in range(count)]

    @property
    def pids(self) -> list[int]:
        """Process ids of the receivers running now."""
        with self._lock:
            return [s.process.pid for s in self._slots if s.process.pid and s.process.is_alive()]

    def status(self) -> list[ReceiverStatus]:
        """Each receiver as the health page shows it, in index order."""
        with self._lock:
            slots = sorted(self._slots, key=lambda slot: slot.index)
            return [
                ReceiverStatus(
                    index=slot.index,
                    pid=slot.process.pid,
                    alive=slot.process.is_alive() and not self._stopping.is_set(),
                    restarts=self._counts[slot.index].restarts,
                    connections=self._counts[slot.index].connections,
                    instances=self._counts[slot.index].instances,
                    refused=self._counts[slot.index].refused,
                )
                for slot in slots
            ]

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
        self._listener = listen(self._config.host, self._config.port)
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
            self._listener.close()
            for slot, _conn in pending:
                slot.process.kill()
                slot.process.join()
            raise
        self._slots = [slot for slot, _conn in pending]
        self._threads = [
            _thread(self._watch, "receivers"),
            _thread(self._relay_metrics, "receiver-metrics"),
            _thread(self._accept, "acceptor"),
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
        ours, theirs = self._mp.Pipe(duplex=True)  # a Unix socket pair: it carries fds
        process = self._mp.Process(
            target=run_receiver,
            args=(self._config, index, send_end, self._events, theirs),
            name=f"receiver-{index}",
            daemon=False,
        )
        process.start()
        send_end.close()
        theirs.close()
        return _Slot(index, process, ours), receive_end

    def _accept(self) -> None:
        """Hand each new connection to the next live receiver, round-robin."""
        assert self._listener is not None
        self._listener.settimeout(0.5)  # to notice a stop
        while not self._stopping.is_set():
            try:
                conn, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("accept failed")
                continue
            with conn:
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        with self._lock:
            slots = list(self._slots)
        for _ in range(len(slots)):
            slot = slots[self._next % len(slots)]
            self._next += 1
            if not slot.process.is_alive():
                continue
            try:
                reduction.send_handle(slot.handoff, conn.fileno(), slot.process.pid or 0)
                with self._lock:
                    self._counts[slot.index].connections += 1
                return
            except OSError:
                continue  # it died meanwhile: the next one takes it
        logger.error("no receiver alive: connection closed")

    def _watch(self) -> None:
        """Restart receivers that die (kill -9, a crash) until the pool stops."""
        try:
            self._restart_dead()
        finally:
            self._released.wait()

    def _restart_dead(self) -> None:
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
                slot.handoff.close()
                new, conn = self._spawn(slot.index)
                conn.close()  # its "ready" is not awaited: the others keep receiving
                with self._lock:
                    self._slots[self._slots.index(slot)] = new
                    self.restarts += 1
                    self._counts[slot.index].restarts += 1
                logger.info(
                    "receiver restarted", extra={"receiver": new.index, "pid": new.process.pid}
                )

    def _relay_metrics(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            kind, value, index = item
            with self._lock:
                if kind == "received":
                    self._counts[index].instances += 1
                else:
                    self._counts[index].refused += 1
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
        if self._listener is not None:
            self._listener.close()  # new associations are refused from now on
        for thread in self._threads:
            if thread.name == "acceptor":
                thread.join(timeout=5.0)
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
            slot.handoff.close()
        self._released.set()
        self._events.put(None)
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._events.close()
        logger.info("storage SCP stopped", extra={"receivers": self._count})


def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
