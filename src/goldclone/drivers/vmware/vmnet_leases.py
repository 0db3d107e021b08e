"""Reading the lease files of VMware's vmnet-dhcpd, which writes ISC dhcpd's format::

    lease 192.168.150.130 {
        starts 2 2026/11/26 18:25:40;
        ends 2 2026/11/26 18:55:40;
        hardware ethernet 00:50:56:2a:0b:1c;
    }

Times are UTC. A newer lease for a MAC comes later in the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

_LEASE = re.compile(r"^\s*lease\s+(\S+)\s*\{(.*?)\}", re.MULTILINE | re.DOTALL)
_MAC = re.compile(r"hardware\s+ethernet\s+([0-9A-Fa-f:]+)\s*;")
_ENDS = re.compile(r"\bends\s+(?:\d\s+)?(\d{4}/\d{1,2}/\d{1,2}\s+\d{1,2}:\d{2}:\d{2})\s*;")


def normal_mac(mac: str) -> str:
    """``mac`` in lower case with two digits a byte (dhcpd may write ``0:c:29:...``)."""
    return ":".join(part.zfill(2) for part in mac.lower().split(":"))


def parse(text: str, now: datetime | None = None) -> dict[str, str]:
    """Map each MAC with a lease in force at ``now`` (default: now) to its IPv4 address."""
    now = now or datetime.now(UTC)
    found: dict[str, str] = {}
    for match in _LEASE.finditer(text):
        mac, address = _MAC.search(match[2]), _ipv4(match[1])
        if mac is None or address is None or _expired(match[2], now):
            continue
        found[normal_mac(mac[1])] = str(address)
    return found


def _ipv4(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def _expired(body: str, now: datetime) -> bool:
    """Whether the lease ``body`` ended before ``now``; ``ends never`` never does."""
    ends = _ENDS.search(body)
    if ends is None:
        return False
    try:
        return datetime.strptime(ends[1], "%Y/%m/%d %H:%M:%S").replace(tzinfo=UTC) <= now
    except ValueError:
        return False


def read(files: Iterable[Path]) -> dict[str, str]:
    """The leases in force in all of ``files``; missing or unreadable files count as empty."""
    found: dict[str, str] = {}
    for path in files:
        try:
            found.update(parse(path.read_text(errors="replace")))
        except OSError:
            continue
    return found


def lookup(files: Iterable[Path], mac: str) -> str | None:
    """The IPv4 address leased to ``mac`` in any of ``files``, if any."""
    return read(files).get(normal_mac(mac))
