"""DICOMweb STOW-RS client: send DICOM files to a DICOMweb service, one status per file.

The statuses are DIMSE-style so the dispatcher treats both kinds of destination alike: a file
listed in the response's ReferencedSOPSequence is stored (0x0000, or its WarningReason), one
in FailedSOPSequence carries its FailureReason. Retries are the dispatcher's job, so the HTTP
client's own retrying is switched off; the one exception is a 401 with an OAuth2 token, which
is renewed and the request sent once more (see :mod:`scp_node.dicom.webauth`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from scp_node.dicom.scu import SendResult
from scp_node.dicom.webauth import http_error_reason, renew_on_unauthorized
from scp_node.errors import DeliveryError

__all__ = ["stow_files"]

logger = logging.getLogger(__name__)

#: STOW-RS "processing failure" when the response names neither success nor failure.
_NO_ANSWER_STATUS = 0x0110


def _statuses(response: Dataset | None) -> tuple[dict[str, int], dict[str, int]]:
    """SOP Instance UID -> status for the stored and the failed instances of a response."""
    stored: dict[str, int] = {}
    failed: dict[str, int] = {}
    if response is None:
        return stored, failed
    for item in response.get("ReferencedSOPSequence", []):
        stored[str(item.ReferencedSOPInstanceUID)] = int(item.get("WarningReason", 0x0000))
    for item in response.get("FailedSOPSequence", []):
        failed[str(item.ReferencedSOPInstanceUID)] = int(item.get("FailureReason", 0xC000))
    return stored, failed


def stow_files(
    paths: Sequence[Path],
    url: str,
    *,
    timeout_s: float = 30.0,
    session: requests.Session | None = None,
) -> list[SendResult]:
    """Store ``paths`` with one STOW-RS request per study to the DICOMweb root ``url``.

    Parameters
    ----------
    paths
        DICOM files (Part 10). Files of one study go in one multipart request.
    url
        The DICOMweb root, e.g. ``http://pacs:8042/dicom-web`` (``/studies`` is appended).
    timeout_s
        Connect and read timeout of each HTTP request.
    session
        The destination's session (credentials, TLS verification; see
        :func:`~scp_node.dicom.webauth.web_session`); a plain one when None.

    Returns
    -------
    list of SendResult
        One per file, in order; ``status`` is DIMSE-style (0x0000 stored, 0xBxxx stored
        with a warning, the FailureReason otherwise).

    Raises
    ------
    DeliveryError
        The service is unreachable, timed out, or answered with an HTTP error (the status
        code and reason phrase are in the message; 401 even after an OAuth2 token was
        renewed), or the OAuth2 token endpoint refused the client.
    """
    client = DICOMwebClient(url=url, timeout=timeout_s, session=session)
    client.set_http_retry_params(retry=False)
    datasets = [dcmread(path) for path in paths]
    by_study: dict[str, list[int]] = {}
    for index, ds in enumerate(datasets):
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(index)
    results: list[SendResult | None] = [None] * len(paths)
    for study_uid, indexes in by_study.items():
        study = [datasets[i] for i in indexes]
        try:
            response = renew_on_unauthorized(
                session, partial(client.store_instances, study, study_instance_uid=study_uid)
            )
        except requests.HTTPError as exc:
            raise DeliveryError(f"STOW-RS to {url} answered {http_error_reason(exc)}") from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"STOW-RS to {url} failed: {exc}") from exc
        stored, failed = _statuses(response)
        for i in indexes:
            sop_uid = str(datasets[i].SOPInstanceUID)
            if sop_uid in stored:
                results[i] = SendResult(paths[i], sop_uid, stored[sop_uid])
            elif sop_uid in failed:
                results[i] = SendResult(
                    paths[i], sop_uid, failed[sop_uid], f"STOW-RS failure 0x{failed[sop_uid]:04X}"
                )
            else:
                results[i] = SendResult(
                    paths[i], sop_uid, _NO_ANSWER_STATUS, "STOW-RS response does not list it"
                )
    return [result for result in results if result is not None]
