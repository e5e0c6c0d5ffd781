"""C-FIND SCU: ask a PACS how many instances each series of a study has."""

from __future__ import annotations

import logging
import ssl

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp_node.dicom.net import Peer, association
from scp_node.errors import DeliveryError

logger = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model - FIND.
STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")


def series_instance_counts(
    peer: Peer,
    study_instance_uid: str,
    *,
    calling_ae: str,
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, int]:
    """Series Instance UID -> NumberOfSeriesRelatedInstances, as ``peer`` reports them.

    With ``ssl_context`` (see :func:`scp_node.dicom.tls.client_context`) the query runs
    over TLS.

    Raises
    ------
    DeliveryError
        The association failed, the peer refused the query, or it answered without counts.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = ""
    query.NumberOfSeriesRelatedInstances = ""
    contexts = [(STUDY_ROOT_FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    counts: dict[str, int] = {}
    with association(
        peer, contexts, calling_ae=calling_ae, timeout_s=timeout_s, ssl_context=ssl_context
    ) as assoc:
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            if "Status" not in status:
                raise DeliveryError(f"no C-FIND response from {peer}")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                series_uid = str(identifier.get("SeriesInstanceUID", ""))
                number = identifier.get("NumberOfSeriesRelatedInstances")
                if not series_uid or number in (None, ""):
                    raise DeliveryError(f"{peer} answered C-FIND without instance counts")
                counts[series_uid] = int(number)
            elif code != 0x0000:
                raise DeliveryError(f"{peer} refused C-FIND with status 0x{code:04X}")
    return counts
