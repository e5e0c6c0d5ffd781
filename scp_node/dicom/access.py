"""Who may associate: a source-address allow-list checked when an association is requested."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pynetdicom import evt

if TYPE_CHECKING:
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)

__all__ = ["SourceAllowList", "handle_requested"]

# A-ASSOCIATE-RJ: rejected permanent, by the DUL service user, no reason given.
_REJECT_PERMANENT, _SOURCE_USER, _NO_REASON = 0x01, 0x01, 0x01


class SourceAllowList:
    """Networks a peer's address must lie in; empty allows every address.

    Parameters
    ----------
    networks : sequence of str
        CIDRs (``10.0.0.0/8``) or single addresses (``127.0.0.1``), IPv4 or IPv6.

    Raises
    ------
    ValueError
        An entry is not an address or network; the message names it.
    """

    def __init__(self, networks: Sequence[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, address: str) -> bool:
        """True when ``address`` is in one of the networks (or the list is empty)."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def handle_requested(event: Event, allow: SourceAllowList) -> None:
    """EVT_REQUESTED: reject (A-ASSOCIATE-RJ) a peer whose address is not allowed.

    Never raises: a failure to reject aborts the association instead.
    """
    assoc = event.assoc
    address = str(assoc.requestor.address)
    if allow.allows(address):
        return
    logger.warning(
        "association rejected: source address not allowed",
        extra={
            "calling_ae": str(assoc.requestor.ae_title),
            "peer": f"{address}:{assoc.requestor.port}",
        },
    )
    try:
        assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_USER, _NO_REASON)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()
    except Exception:
        logger.exception("could not reject the association; aborting it")
        assoc.abort()
