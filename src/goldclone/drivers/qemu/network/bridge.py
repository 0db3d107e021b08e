"""Bridges, taps and the kernel's link-layer tables, through ``ip`` and ``bridge``.

Existence is asked of ``ip``, never of ``/sys/class/net``: sysfs shows the interfaces of the
namespace that mounted it, which is not ours under ``unshare --net``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from goldclone.errors import CommandError, NetworkFailed
from goldclone.host.commands import run

TIMEOUT = 10.0


async def _run(*argv: str) -> str:
    try:
        _, out, _ = await run(*argv, timeout=TIMEOUT)
    except CommandError as e:
        raise NetworkFailed(f"network set-up failed: {e.message}") from e
    return out


async def _json(*argv: str) -> list[dict[str, Any]]:
    out = await _run(*argv)
    data: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return data


@dataclass(frozen=True)
class Link:
    """What ``ip`` says of a link: its kind (``"bridge"``, ``"tun"``, ``""`` for plain), its
    alias (where goldclone records who owns it) and its index, which a link made again under
    the same name does not keep."""

    kind: str
    alias: str
    index: int


async def link(name: str) -> Link | None:
    """Return link ``name``, or ``None`` if there is none."""
    code, out, _ = await run(
        "ip", "-j", "-d", "link", "show", "dev", name, timeout=TIMEOUT, check=False
    )
    links: list[dict[str, Any]] = json.loads(out) if code == 0 and out.strip() else []
    if not links:
        return None
    found = links[0]
    return Link(
        kind=str(found.get("linkinfo", {}).get("info_kind", "")),
        alias=str(found.get("ifalias", "")),
        index=int(found.get("ifindex", 0)),
    )


async def link_kind(name: str) -> str | None:
    """Return the kind of link ``name``, or ``None`` if there is none."""
    found = await link(name)
    return found.kind if found is not None else None


async def set_alias(name: str, alias: str) -> None:
    await _run("ip", "link", "set", "dev", name, "alias", alias)


async def attach(tap: str, bridge: str) -> None:
    """Put the existing ``tap``, up, on ``bridge``."""
    await _run("ip", "link", "set", tap, "master", bridge, "up")


async def link_exists(name: str) -> bool:
    """Return whether a link called ``name`` exists."""
    return await link_kind(name) is not None


async def ensure_bridge(name: str, address: IPv4Interface) -> None:
    """Make ``name`` an up bridge holding ``address``, creating it when missing.

    Forwarding delay and STP are off, so a new port forwards at once.
    """
    kind = await link_kind(name)
    if kind is None:
        await _run(
            "ip", "link", "add", name, "type", "bridge", "forward_delay", "0", "stp_state", "0"
        )
    elif kind != "bridge":
        raise NetworkFailed(f"{name} exists but is not a bridge ({kind or 'plain link'})")
    current = await addresses(name)
    if current != [str(address)]:
        if current:  # an adopted bridge from an older configuration
            await _run("ip", "-4", "addr", "flush", "dev", name)
        await _run("ip", "addr", "add", str(address), "dev", name)
    await _run("ip", "link", "set", name, "up")


async def delete_link(name: str) -> None:
    """Delete link ``name``; a link that is already gone is fine."""
    code, _, err = await run("ip", "link", "del", "dev", name, timeout=TIMEOUT, check=False)
    if code != 0 and await link_exists(name):
        raise NetworkFailed(f"could not delete {name}: {err.strip()}")


async def add_tap(tap: str, bridge: str, alias: str) -> None:
    """Create tap ``tap`` labelled ``alias`` and put it, up, on ``bridge``; nothing is left if
    that fails."""
    await _run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    try:
        await _run("ip", "link", "set", tap, "master", bridge, "alias", alias, "up")
    except BaseException:
        await delete_link(tap)
        raise


async def ports(bridge: str) -> list[str]:
    """Return the names of the links enslaved to ``bridge``."""
    return [
        str(link["ifname"]) for link in await _json("ip", "-j", "link", "show", "master", bridge)
    ]


async def addresses(name: str) -> list[str]:
    """Return link ``name``'s IPv4 addresses as ``ADDRESS/PREFIX`` strings."""
    links = await _json("ip", "-j", "-4", "addr", "show", "dev", name)
    return [f"{a['local']}/{a['prefixlen']}" for link in links for a in link.get("addr_info", [])]


async def macs_in_use() -> set[str]:
    """Return the MACs the host has seen: its bridges' forwarding tables and its neighbours."""
    fdb = await _json("bridge", "-j", "fdb", "show")
    neigh = await _json("ip", "-j", "neigh", "show")
    macs = {str(e["mac"]) for e in fdb if "mac" in e}
    macs |= {str(e["lladdr"]) for e in neigh if "lladdr" in e}
    return {m.lower() for m in macs}


async def neighbour_ip(bridge: str, mac: str) -> str | None:
    """Return the IPv4 address the kernel's neighbour table holds for ``mac`` on ``bridge``."""
    for entry in await _json("ip", "-j", "-4", "neigh", "show", "dev", bridge):
        lladdr = str(entry.get("lladdr", "")).lower()
        if lladdr == mac.lower() and "FAILED" not in entry.get("state", []):
            return str(entry["dst"])
    return None
