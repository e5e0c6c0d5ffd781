"""Event-driven waits for the two threads of each association the Storage SCP accepts.

pynetdicom 3 runs an association in two threads that poll: the DUL thread (socket and PDUs)
and the association thread (DIMSE messages, our handlers) each sleep 1 ms whenever they
find nothing to do. An idle association thus costs ~9% of a core (measured: 89 CPU ms per
second), a receiver with four associations over a third of one, and every hand-over
between the two threads (a C-STORE request complete, its response to send) waits for the
other's sleep to end.

:func:`wake_on_events` (an ``EVT_CONN_OPEN`` handler) makes those waits of one association
end as soon as there is something to do: the DUL thread waits in ``select`` on its socket
and on a pipe, the association thread on a :class:`threading.Event`, and the queues
between the two threads signal them on every ``put``. A wait still ends after
:data:`IDLE_WAIT_S` at the latest, so whatever no queue signals (timers, a kill flag, a
closed socket) is seen as before, only later. pynetdicom's own code is not changed: its
modules get a ``time`` whose ``sleep`` waits this way when called from those two loops of
an association given wake-ups, and sleeps as before anywhere else.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import sys
import threading
import time
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

if TYPE_CHECKING:
    from pynetdicom.events import Event

__all__ = ["IDLE_WAIT_S", "wake_on_events"]

#: Longest wait of a loop with nothing signalled (pynetdicom's own: 1 ms).
IDLE_WAIT_S = 0.05

_DUL_LOOP = DULServiceProvider.run_reactor.__code__
_ASSOCIATION_LOOP = Association._run_reactor.__code__
_install_lock = threading.Lock()
#: The attribute of both threads of an association that holds its :class:`_Wakeups`.
_WAKEUPS = "_scp_node_wakeups"


class _Wakeups:
    """The wake-up channels of one association: a pipe for its DUL thread (which waits in
    ``select`` beside its socket), an event for its association thread."""

    def __init__(self, dul: DULServiceProvider) -> None:
        self.dul = dul
        # Socket objects, not raw descriptors: once closed they refuse every use, so a
        # late wake-up can never write into a descriptor number reused by another file.
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.association = threading.Event()

    def wake_dul(self) -> None:
        if threading.current_thread() is self.dul:
            return  # the DUL thread itself: it looks at its queues before it waits
        # Full: a wake-up is pending anyway; closed: the association has ended.
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")

    def wake_association(self) -> None:
        self.association.set()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    def wait_dul(self, sock: Any) -> None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes wait in the TLS layer, where select cannot see them
        try:
            ready, _, _ = select.select([sock, self.reader], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            time.sleep(0.001)  # the socket closed under us: pynetdicom's own pace
            return
        if self.reader in ready:
            try:
                while self.reader.recv(4096):
                    pass
            except OSError:
                pass  # drained

    def wait_association(self) -> None:
        # Cleared after the wait: the reactor looks at its queues next, so a put between
        # the wait and the clear is still seen; a later put sets the event again.
        self.association.wait(IDLE_WAIT_S)
        self.association.clear()


class _SignallingQueue(queue.Queue[Any]):
    """A queue that calls ``signal`` after each ``put``."""

    def __init__(self, signal: Any, items: queue.Queue[Any]) -> None:
        super().__init__()
        self._signal = signal
        while True:  # whatever was queued before the swap
            try:
                self.put_nowait(items.get_nowait())
            except queue.Empty:
                break

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class _WakingTime:
    """pynetdicom's ``time`` module with a ``sleep`` that waits for wake-ups in the two
    reactor loops of an association given them."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1).f_code
        thread = threading.current_thread()
        wakeups: _Wakeups | None = getattr(thread, _WAKEUPS, None)
        if wakeups is not None:
            if caller is _DUL_LOOP and isinstance(thread, DULServiceProvider):
                sock = getattr(thread.socket, "socket", None)
                if sock is not None:
                    wakeups.wait_dul(sock)
                    return
            elif caller is _ASSOCIATION_LOOP:
                wakeups.wait_association()
                return
        self._real.sleep(seconds)


def _install() -> None:
    with _install_lock:
        for module in (pynetdicom.dul, pynetdicom.association):
            if not isinstance(getattr(module, "time", None), _WakingTime):
                setattr(module, "time", _WakingTime(time))  # noqa: B010 (mypy: no stubs)


def wake_on_events(event: Event) -> None:
    """EVT_CONN_OPEN: let this association's two threads wait for work instead of polling.

    Bound before the association starts (pynetdicom triggers ``EVT_CONN_OPEN`` first).
    """
    _install()
    assoc = event.assoc
    dul = assoc.dul
    wakeups = _Wakeups(dul)

    def wake_both() -> None:
        wakeups.wake_association()
        wakeups.wake_dul()

    # What the association thread sends goes through to_provider_queue (and a transport
    # error through event_queue); what it waits for arrives in msg_queue and to_user_queue.
    dul.to_provider_queue = _SignallingQueue(wakeups.wake_dul, dul.to_provider_queue)
    dul.event_queue = _SignallingQueue(wakeups.wake_dul, dul.event_queue)
    dul.to_user_queue = _SignallingQueue(wake_both, dul.to_user_queue)
    assoc.dimse.msg_queue = _SignallingQueue(wakeups.wake_association, assoc.dimse.msg_queue)
    for thread in (assoc, dul):
        setattr(thread, _WAKEUPS, wakeups)
    # The socket pair goes with the DUL thread's object (it selects on it while it runs).
    weakref.finalize(dul, wakeups.close)
