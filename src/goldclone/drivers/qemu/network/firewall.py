"""The nftables table of an owned network, and the host's IPv4 forwarding switch.

Each network has one table, ``ip goldclone_<bridge>``, that is always replaced or deleted as a
whole in one ``nft -f -`` transaction, so no half-written rule set is ever live.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from pathlib import Path

from goldclone.errors import CommandError, NetworkFailed
from goldclone.host.commands import run

TIMEOUT = 10.0
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def table_name(bridge: str) -> str:
    """Return the name of ``bridge``'s nftables table (family ``ip``)."""
    return "goldclone_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def _nat_rules(subnet: IPv4Network) -> str:
    return (
        "chain postrouting {\n"
        "  type nat hook postrouting priority srcnat; policy accept;\n"
        f"  ip saddr {subnet} ip daddr != {subnet} masquerade\n"
        "}\n"
    )


def _hostonly_rules(bridge: str) -> str:
    # The host may forward for other reasons (the nat network turns forwarding on); a host-only
    # guest must still reach nothing but the host and its peers, and nothing else may reach it.
    # Traffic within the bridge is spared: with br_netfilter loaded it passes this hook too.
    return (
        "chain forward {\n"
        "  type filter hook forward priority filter; policy accept;\n"
        f'  iifname "{bridge}" oifname != "{bridge}" drop\n'
        f'  oifname "{bridge}" iifname != "{bridge}" drop\n'
        "}\n"
    )


async def _nft(script: str) -> None:
    try:
        await run("nft", "-f", "-", stdin=script.encode(), timeout=TIMEOUT)
    except CommandError as e:
        raise NetworkFailed(f"nftables update failed: {e.message}") from e


def _replace(table: str, body: str) -> str:
    # Declaring the table first makes the delete valid even when it does not exist yet.
    return f"table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n{body}}}\n"


async def apply_nat(bridge: str, subnet: IPv4Network) -> None:
    """Masquerade traffic from ``subnet`` leaving through any other interface."""
    await _nft(_replace(table_name(bridge), _nat_rules(subnet)))


async def apply_hostonly(bridge: str) -> None:
    """Drop everything the host would forward into or out of ``bridge``."""
    await _nft(_replace(table_name(bridge), _hostonly_rules(bridge)))


async def remove(bridge: str) -> None:
    """Delete ``bridge``'s table; a table that does not exist is fine."""
    table = table_name(bridge)
    await _nft(f"table ip {table} {{}}\ndelete table ip {table}\n")


def enable_forwarding() -> None:
    """Turn on IPv4 forwarding for this network namespace.

    It is left on at teardown: other software on the host may rely on it by then.
    """
    if IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")
