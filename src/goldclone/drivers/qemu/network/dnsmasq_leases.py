"""Reading dnsmasq lease files: one ``expiry mac ip hostname clientid`` line per lease."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path


def parse(text: str) -> dict[str, str]:
    """Map each lowercase MAC in lease file ``text`` to its IPv4 address.

    Lines that are not IPv4 leases (IPv6 ``duid`` lines, a line cut short by a concurrent
    rewrite) are skipped. When a MAC appears twice, the later line wins.
    """
    leases: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[1].count(":") != 5:
            continue
        try:
            ip = IPv4Address(fields[2])
        except ValueError:
            continue
        leases[fields[1].lower()] = str(ip)
    return leases


def read(path: Path) -> dict[str, str]:
    """Map each lowercase MAC in lease file ``path`` to its address; a missing file is empty."""
    try:
        return parse(path.read_text(errors="replace"))
    except FileNotFoundError:
        return {}


def lookup(path: Path, mac: str) -> str | None:
    """Return the IPv4 address leased to ``mac`` in lease file ``path``, if there is one."""
    return read(path).get(mac.lower())
