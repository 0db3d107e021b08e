"""Where a guest on the ``nat`` network may send packets beyond its host.

A *destination* is an IPv4 network with an optional port (``10.0.5.7/32:3142``; TCP and UDP
alike). The host's policy is the private ranges of ``PRIVATE``, plus the operator's
``egress_deny``, minus the operator's ``egress_allow``: an allowed destination beats a denied
one, so ``egress_deny = ["0.0.0.0/0"]`` with a short ``egress_allow`` lets guests reach only
that list. A request may narrow this for its VM, never widen it (``refusal``).

Guests send no IPv6 at all (their NIC's rules drop it), so the policy has no IPv6 part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Final, Literal

_DESTINATION = re.compile(r"(?P<network>[0-9./]+)(?::(?P<port>[0-9]{1,5}))?")


@dataclass(frozen=True, order=True)
class Destination:
    """An IPv4 network, and a port on it when ``port`` is set (TCP and UDP)."""

    network: IPv4Network
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.network}:{self.port}" if self.port is not None else str(self.network)

    def covers(self, other: Destination) -> bool:
        """Whether every packet to ``other`` is also one to this destination."""
        return other.network.subnet_of(self.network) and self.port in (None, other.port)


def destination(text: str) -> Destination:
    """Read ``NETWORK[:PORT]`` (``NETWORK`` an IPv4 address or CIDR); ``ValueError`` with a
    reason that does not repeat the text."""
    found = _DESTINATION.fullmatch(text.strip())
    if found is None:
        raise ValueError("must be an IPv4 address or network with an optional port, such as "
                         "203.0.113.0/24 or 10.0.5.7:3142 (guests have no IPv6)")  # fmt: skip
    try:
        network = IPv4Network(found["network"], strict=False)
    except ValueError:
        raise ValueError("must be an IPv4 address or network such as 203.0.113.0/24") from None
    port = int(found["port"]) if found["port"] is not None else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("has a port outside 1-65535")
    return Destination(network, port)


PRIVATE: Final = tuple(
    Destination(IPv4Network(n))
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, where clouds serve instance metadata
        "172.16.0.0/12",  # RFC 1918
        "192.168.0.0/16",  # RFC 1918
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
)
"""What a guest on ``nat`` cannot reach unless the operator allows it."""


@dataclass(frozen=True)
class EgressPolicy:
    """A host's egress: ``PRIVATE`` and ``deny`` are refused unless ``allow`` covers them."""

    allow: tuple[Destination, ...] = ()
    deny: tuple[Destination, ...] = ()

    @property
    def refused(self) -> tuple[Destination, ...]:
        return PRIVATE + self.deny

    def refusal(self, wanted: Destination) -> str | None:
        """Why a request may not ask for ``wanted`` on this host, or ``None`` if it may: all
        of it must be allowed here, so it may overlap a refused range only where one allowed
        destination covers it."""
        if any(entry.covers(wanted) for entry in self.allow):
            return None
        for entry in self.refused:
            if wanted.network.overlaps(entry.network) and entry.port in (None, wanted.port):
                return f"{wanted} reaches {entry.network}, which this host does not allow"
        return None


@dataclass(frozen=True)
class Reach:
    """What one VM may reach besides DHCP, DNS and the host's allowed ports: the other VMs of
    its ``group`` (none without one), and beyond the host on ``nat`` the ``egress`` list,
    within the host's policy (``None``: all the host's policy allows; ``()``: nothing)."""

    group: str | None = None
    egress: tuple[Destination, ...] | None = None

    def record(self) -> dict[str, str]:
        """As strings for a driver's runtime record; ``from_record`` reads them back."""
        egress = "" if self.egress is None else ",".join(map(str, self.egress)) or "none"
        return {"group": self.group or "", "egress": egress}

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Reach:
        egress = record.get("egress", "")
        return cls(
            record.get("group") or None,
            None if not egress else () if egress == "none" else
            tuple(destination(d) for d in egress.split(",")),
        )  # fmt: skip


NO_EGRESS_RULES: Final = EgressPolicy()
"""The private ranges refused, and nothing else allowed or refused."""
DEFAULT_REACH: Final = Reach()
"""No group, and the host's egress policy."""


def reach_of(
    tenant: str, network_group: str | None, egress: Literal["none"] | list[str] | None
) -> Reach:
    """The driver's ``Reach`` for a VM of ``tenant`` with ``network_group`` and ``egress``."""
    group = tenant_group(tenant, network_group)
    if egress is None:
        return Reach(group)
    destinations = () if egress == "none" else tuple(destination(d) for d in egress)
    return Reach(group, destinations)


def tenant_group(tenant: str, network_group: str | None) -> str | None:
    """A ``network_group`` as the driver and placement know it: one tenant's, so that two
    tenants that choose one name never reach each other."""
    return None if network_group is None else f"{tenant}/{network_group}"
