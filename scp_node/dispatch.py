"""Dispatch: send each finished SEG, SR (and each IOCM rejection note, once the SEG that
supersedes lies at the destination) to every destination by C-STORE (or DICOMweb STOW-RS for
``kind = "dicomweb"`` destinations), retrying with backoff until it lands or the give-up age
is reached.

What a resend guarantees: the SOP Instance UID of a SEG is derived from its input (source
series, model, version and the set of source instances), so a resend or a re-run on
unchanged input offers the PACS the same instance again, never a second copy; a changed
input is a new instance in the same SEG series. A PACS that answers success without keeping
the object (Orthanc keeps the first instance of a UID) is caught only on destinations with
``verify = true``: there the store counts once the PACS lists the instance.

A DICOMweb destination's HTTP session (its credentials and TLS verification) is built once
by the caller and reused for every delivery to it, so an OAuth2 token is fetched only when
it is about to expire."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

import requests
from pydicom import dcmread

from scp_node.dicom.reference import InstanceReference
from scp_node.dicom.scu import Peer, SendResult, send_files
from scp_node.dicom.stow import stow_files
from scp_node.dicom.verify import VerifyOutcome, VerifyResult, verify_dicomweb, verify_dimse
from scp_node.errors import DeliveryError, SopClassRefusedError
from scp_node.metrics import NodeMetrics
from scp_node.queue.deliveries import Deliveries
from scp_node.queue.records import ClaimedDelivery
from scp_node.stage_loop import run_stage

logger = logging.getLogger(__name__)


class Dispatcher:
    """Claims deliveries from the job table and sends them."""

    def __init__(
        self,
        deliveries: Deliveries,
        *,
        owner: str,
        calling_ae: str,
        lease_s: float = 120.0,
        timeout_s: float = 30.0,
        metrics: NodeMetrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tls_destinations: Collection[str] = (),
        verify_destinations: Collection[str] = (),
        web_sessions: Mapping[str, requests.Session] | None = None,
    ) -> None:
        self.deliveries = deliveries
        self.owner = owner
        self.calling_ae = calling_ae
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.metrics = metrics
        #: Client TLS context for the destinations named in ``tls_destinations``.
        self.ssl_context = ssl_context
        self.tls_destinations = frozenset(tls_destinations)
        if self.tls_destinations and ssl_context is None:
            raise ValueError("tls_destinations need an ssl_context")
        #: Destinations asked after each store whether they hold the instance.
        self.verify_destinations = frozenset(verify_destinations)
        #: HTTP session by DICOMweb destination name (see ``webauth.web_session``); a
        #: destination without one is sent to anonymously with the default CAs.
        self.web_sessions = dict(web_sessions or {})

    def run(
        self, stop: threading.Event, poll_s: float = 1.0, wake: threading.Event | None = None
    ) -> None:
        """Deliver until ``stop`` is set; when idle, wait ``poll_s`` or until ``wake``."""
        run_stage("dispatch", self.run_once, stop, poll_s, wake)

    def run_once(self) -> bool:
        """Claim and attempt one delivery; False when none is due."""
        delivery = self.deliveries.claim(self.owner, self.lease_s)
        if delivery is None:
            return False
        self._deliver(delivery)
        return True

    def _deliver(self, delivery: ClaimedDelivery) -> None:
        ids = {
            "job_id": delivery.job_id,
            "destination": delivery.destination,
            "sop_instance_uid": delivery.sop_instance_uid,
            "kind": delivery.kind.value,
            "attempt": delivery.attempts,
        }
        try:
            result = self._send(delivery)
        except (DeliveryError, OSError) as exc:
            if self.metrics is not None:
                self.metrics.record_delivery(delivery.destination, ok=False)
            # A SOP class the destination does not take fails this delivery (only this one)
            # at once: retrying for a day would not change its configuration.
            state = self.deliveries.failed(
                delivery.id, delivery.token, str(exc), final=isinstance(exc, SopClassRefusedError)
            )
            logger.warning("delivery failed", extra={**ids, "error": str(exc), "state": str(state)})
            return
        if result.ok and delivery.destination in self.verify_destinations:
            check = self._verify(delivery)
            if not check.found:
                if self.metrics is not None:
                    self.metrics.record_delivery(delivery.destination, ok=False)
                error = f"stored but not verified: {check.reason}"
                state = self.deliveries.failed(delivery.id, delivery.token, error)
                logger.warning(
                    "delivery not verified", extra={**ids, "error": error, "state": str(state)}
                )
                return
        if self.metrics is not None:
            self.metrics.record_delivery(delivery.destination, ok=result.ok)
        if result.ok:
            self.deliveries.succeeded(delivery.id, delivery.token)
            if self.metrics is not None:
                self.metrics.record_sent(delivery.kind.value)
            logger.info("delivered", extra={**ids, "status": result.status})
            return
        error = result.error or f"refused with status 0x{result.status or 0:04X}"
        state = self.deliveries.failed(delivery.id, delivery.token, error, result.status)
        logger.warning("delivery refused", extra={**ids, "error": error, "state": str(state)})

    def _send(self, delivery: ClaimedDelivery) -> SendResult:
        """C-STORE to a DIMSE destination, or STOW-RS when the delivery has a DICOMweb URL."""
        if delivery.url is not None:
            (result,) = stow_files(
                [Path(delivery.path)],
                delivery.url,
                timeout_s=self.timeout_s,
                session=self.web_sessions.get(delivery.destination),
            )
            return result
        peer = Peer(delivery.ae_title, delivery.host, delivery.port)
        tls = self.ssl_context if delivery.destination in self.tls_destinations else None
        (result,) = send_files(
            [Path(delivery.path)],
            peer,
            calling_ae=self.calling_ae,
            timeout_s=self.timeout_s,
            ssl_context=tls,
        )
        return result

    def _verify(self, delivery: ClaimedDelivery) -> VerifyResult:
        """Ask the destination whether it holds what was just stored (never raises)."""
        try:
            header = dcmread(delivery.path, stop_before_pixels=True)
            instance = InstanceReference.from_dataset(header)
        except (OSError, ValueError) as exc:
            return VerifyResult(VerifyOutcome.COULD_NOT_ASK, f"cannot read {delivery.path}: {exc}")
        if delivery.url is not None:
            return verify_dicomweb(
                delivery.url,
                instance,
                timeout_s=self.timeout_s,
                session=self.web_sessions.get(delivery.destination),
            )
        peer = Peer(delivery.ae_title, delivery.host, delivery.port)
        tls = self.ssl_context if delivery.destination in self.tls_destinations else None
        return verify_dimse(
            peer, instance, calling_ae=self.calling_ae, timeout_s=self.timeout_s, ssl_context=tls
        )
