"""What the service is told about its networks, and what it records for each VM's NIC."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Final

NAT: Final = "nat"
HOSTONLY: Final = "hostonly"
BRIDGED: Final = "bridged"
NETWORK_TYPES: Final = (BRIDGED, NAT, HOSTONLY)
OWNED_TYPES: Final = (NAT, HOSTONLY)

_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


def _check_ifname(what: str, name: str) -> None:
    if not _IFNAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a valid interface name: up to 15 of A-Za-z0-9_.-, "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class NetworkConfig:
    """The bridges and subnets of the three network types.

    ``nat`` and ``hostonly`` are bridges that goldclone creates and owns; each subnet must be
    a /24 or larger, the host takes its first address and DHCP hands out ``.10`` to ``.250``.
    ``bridged`` uses an existing host bridge that goldclone never creates or removes; it is
    unavailable while ``bridged_bridge`` is ``None``. ``bridged_lease_file`` optionally names
    the lease file (dnsmasq format) of the DHCP server that already serves that bridge.
    """

    nat_bridge: str = "gcnat0"
    nat_subnet: IPv4Network = field(default_factory=lambda: IPv4Network("192.168.123.0/24"))
    hostonly_bridge: str = "gchost0"
    hostonly_subnet: IPv4Network = field(default_factory=lambda: IPv4Network("192.168.124.0/24"))
    bridged_bridge: str | None = None
    bridged_lease_file: Path | None = None

    def __post_init__(self) -> None:
        _check_ifname("nat_bridge", self.nat_bridge)
        _check_ifname("hostonly_bridge", self.hostonly_bridge)
        if self.bridged_bridge is not None:
            _check_ifname("bridged_bridge", self.bridged_bridge)
        if self.nat_bridge == self.hostonly_bridge:
            raise ValueError("nat_bridge and hostonly_bridge must differ")
        if self.bridged_bridge in (self.nat_bridge, self.hostonly_bridge):
            raise ValueError(
                "bridged_bridge must be an existing host bridge, not one goldclone owns"
            )
        for name, subnet in (
            ("nat_subnet", self.nat_subnet),
            ("hostonly_subnet", self.hostonly_subnet),
        ):
            if subnet.prefixlen > 24:
                raise ValueError(f"{name} {subnet} is too small; use a /24 or larger")
        if self.nat_subnet.overlaps(self.hostonly_subnet):
            raise ValueError("nat_subnet and hostonly_subnet must not overlap")

    def bridge(self, network_type: str) -> str | None:
        """Return the bridge of ``network_type``, or ``None`` when it is not configured."""
        return {
            NAT: self.nat_bridge,
            HOSTONLY: self.hostonly_bridge,
            BRIDGED: self.bridged_bridge,
        }.get(network_type)

    def subnet(self, network_type: str) -> IPv4Network:
        """Return the subnet of an owned network type (``nat`` or ``hostonly``)."""
        return self.nat_subnet if network_type == NAT else self.hostonly_subnet


def host_address(subnet: IPv4Network) -> IPv4Address:
    """Return the address the host takes on an owned network's bridge."""
    return subnet.network_address + 1


def dhcp_range(subnet: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    """Return the first and last address that DHCP hands out on an owned network."""
    return subnet.network_address + 10, subnet.network_address + 250


@dataclass(frozen=True)
class Attachment:
    """One VM's NIC: the tap QEMU opens, the bridge it is on and the MAC the guest gets.

    The service stores it with ``as_dict`` and rebuilds it with ``from_dict`` after a restart.
    """

    network_type: str
    bridge: str
    tap: str
    mac: str

    def as_dict(self) -> dict[str, str]:
        """Return the attachment as a JSON-friendly dict."""
        return {
            "network_type": self.network_type,
            "bridge": self.bridge,
            "tap": self.tap,
            "mac": self.mac,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> Attachment:
        """Rebuild an attachment from ``as_dict``'s output."""
        return cls(
            network_type=data["network_type"],
            bridge=data["bridge"],
            tap=data["tap"],
            mac=data["mac"],
        )
