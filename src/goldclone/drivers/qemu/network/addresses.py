"""New MACs and addresses for guests: at random among those no one holds."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from goldclone.drivers.qemu.network import bridge, dnsmasq_leases
from goldclone.errors import NetworkFailed
from goldclone.settings import dhcp_range


async def new_mac(taken: Iterable[str], lease_files: Iterable[Path]) -> str:
    """A MAC that is not in ``taken``, on any of the host's links, or in any lease."""
    used = set(taken) | await bridge.macs_in_use()
    for lease_file in lease_files:
        used |= dnsmasq_leases.read(lease_file).keys()
    while (mac := _random_mac()) in used:
        pass
    return mac


def new_ip(network_type: str, subnet: IPv4Network, taken: set[IPv4Address]) -> IPv4Address:
    """A free address of ``subnet``'s DHCP range, at random, so that an address freed a moment
    ago (still in a neighbour's ARP cache) is seldom the next one."""
    first, last = dhcp_range(subnet)
    free = [n for n in range(int(first), int(last) + 1) if IPv4Address(n) not in taken]
    if not free:
        raise NetworkFailed(f"the {network_type} network has no free address left")
    return IPv4Address(secrets.choice(free))


def _random_mac() -> str:
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)
