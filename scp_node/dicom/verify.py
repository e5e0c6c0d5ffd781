"""Delivery verification: ask a destination whether it holds an instance we just stored.

A success status to a C-STORE or a STOW-RS does not prove the archive kept what we sent:
Orthanc in its default configuration (and many archives) answers success to an instance
whose SOP Instance UID it already holds and keeps the old content. With UIDs that change
whenever the content does, "the destination finds this SOP Instance UID" means it holds
this content. The question is a C-FIND at IMAGE level (Study Root) for a C-STORE
destination, a QIDO-RS instance search for a DICOMweb one.

Both functions never raise: the answer is :class:`VerifyResult` with one of three
outcomes and a reason, so the caller decides (fail the delivery, retry the question).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from enum import StrEnum

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp_node.dicom.net import Peer, association
from scp_node.dicom.query import STUDY_ROOT_FIND
from scp_node.dicom.reference import InstanceReference
from scp_node.dicom.webauth import http_error_reason, renew_on_unauthorized
from scp_node.errors import DeliveryError

__all__ = ["VerifyOutcome", "VerifyResult", "verify_dicomweb", "verify_dimse"]

logger = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
#: DICOM JSON tag of SOPInstanceUID.
_SOP_INSTANCE_UID_TAG = "00080018"


class VerifyOutcome(StrEnum):
    """What the destination said about the instance."""

    #: It answered the query and lists the instance.
    FOUND = "found"
    #: It answered the query and does not list the instance.
    NOT_FOUND = "not_found"
    #: No usable answer: unreachable, query refused, answer malformed (see the reason).
    COULD_NOT_ASK = "could_not_ask"


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of one verification and why."""

    outcome: VerifyOutcome
    reason: str

    @property
    def found(self) -> bool:
        """True when the destination holds the instance."""
        return self.outcome is VerifyOutcome.FOUND


def verify_dimse(
    peer: Peer,
    instance: InstanceReference,
    *,
    calling_ae: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> VerifyResult:
    """Ask ``peer`` by C-FIND (Study Root, IMAGE level) whether it holds ``instance``.

    The query carries the Study, Series and SOP Instance UID as unique keys. The peer must
    accept C-FIND from ``calling_ae`` (Orthanc: the AE is in its ``DicomModalities``).

    Parameters
    ----------
    peer : Peer
        The destination's AE title, host and port.
    instance : InstanceReference
        The instance that was stored.
    calling_ae : str
        Our AE title.
    timeout_s : float, optional
        Association and DIMSE timeouts.
    ssl_context : ssl.SSLContext or None, optional
        Client TLS context when the destination is reached over TLS.

    Returns
    -------
    VerifyResult
        FOUND / NOT_FOUND from the peer's matches; COULD_NOT_ASK when the association
        failed, the peer refused the query (its status is in the reason) or gave no answer.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = instance.study_instance_uid
    query.SeriesInstanceUID = instance.series_instance_uid
    query.SOPInstanceUID = instance.sop_instance_uid
    contexts = [(STUDY_ROOT_FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    matched: set[str] = set()
    try:
        with association(
            peer, contexts, calling_ae=calling_ae, timeout_s=timeout_s, ssl_context=ssl_context
        ) as assoc:
            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
                if "Status" not in status:
                    return _could_not_ask(
                        f"no C-FIND response from {peer} (timeout or abort)", instance
                    )
                code = int(status.Status)
                if code in _PENDING:
                    if identifier is not None:
                        matched.add(str(identifier.get("SOPInstanceUID", "")))
                elif code != 0x0000:
                    return _could_not_ask(
                        f"{peer} refused the C-FIND with status 0x{code:04X}", instance
                    )
    except DeliveryError as exc:
        return _could_not_ask(f"C-FIND to {peer}: {exc}", instance)
    except (OSError, RuntimeError, ValueError) as exc:  # pynetdicom on a lost association
        return _could_not_ask(f"C-FIND to {peer} failed: {exc}", instance)
    return _result(instance.sop_instance_uid in matched, f"C-FIND at {peer}", instance)


def verify_dicomweb(
    url: str,
    instance: InstanceReference,
    *,
    timeout_s: float = 30.0,
    session: requests.Session | None = None,
) -> VerifyResult:
    """Ask the DICOMweb service at ``url`` by QIDO-RS whether it holds ``instance``.

    The search is ``GET {url}/studies/{study}/series/{series}/instances?SOPInstanceUID=...``.

    Parameters
    ----------
    url : str
        The DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
    instance : InstanceReference
        The instance that was stored.
    timeout_s : float, optional
        Connect and read timeout of the request.
    session : requests.Session or None, optional
        The destination's session (credentials, TLS verification); a plain one when None.

    Returns
    -------
    VerifyResult
        FOUND / NOT_FOUND from the search result; COULD_NOT_ASK when the service is
        unreachable, answered with an HTTP error (code and reason phrase in the reason),
        with something that is not a DICOM JSON list, or its token endpoint refused us.
    """
    try:
        client = DICOMwebClient(url=url, timeout=timeout_s, session=session)
        client.set_http_retry_params(retry=False)
        found = renew_on_unauthorized(
            session,
            lambda: client.search_for_instances(
                study_instance_uid=instance.study_instance_uid,
                series_instance_uid=instance.series_instance_uid,
                search_filters={"SOPInstanceUID": instance.sop_instance_uid},
            ),
        )
    except requests.HTTPError as exc:
        return _could_not_ask(f"QIDO-RS at {url} answered {http_error_reason(exc)}", instance)
    except DeliveryError as exc:  # the OAuth2 token endpoint
        return _could_not_ask(f"QIDO-RS at {url}: {exc}", instance)
    except (requests.RequestException, ValueError) as exc:  # ValueError: bad URL, not JSON
        return _could_not_ask(f"QIDO-RS at {url} failed: {exc}", instance)
    if not isinstance(found, list):
        return _could_not_ask(f"QIDO-RS at {url} did not answer a list", instance)
    uids: set[str] = set()
    for item in found:
        values = (
            item.get(_SOP_INSTANCE_UID_TAG, {}).get("Value", []) if isinstance(item, dict) else []
        )
        uids.update(str(value) for value in values)
    return _result(instance.sop_instance_uid in uids, f"QIDO-RS at {url}", instance)


def _result(found: bool, where: str, instance: InstanceReference) -> VerifyResult:
    if found:
        result = VerifyResult(VerifyOutcome.FOUND, f"{where} lists the instance")
    else:
        result = VerifyResult(VerifyOutcome.NOT_FOUND, f"{where} does not list the instance")
    logger.info(
        "delivery verified: %s",
        result.outcome,
        extra={"sop_instance_uid": instance.sop_instance_uid, "reason": result.reason},
    )
    return result


def _could_not_ask(reason: str, instance: InstanceReference) -> VerifyResult:
    logger.warning(
        "delivery not verified",
        extra={"sop_instance_uid": instance.sop_instance_uid, "reason": reason},
    )
    return VerifyResult(VerifyOutcome.COULD_NOT_ASK, reason)
