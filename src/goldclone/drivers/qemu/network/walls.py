"""The rules of a service's networks (``firewall``), kept in step with the guests attached to
them, and what they dropped."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address

from goldclone.drivers.qemu.network import firewall
from goldclone.drivers.qemu.network.attachment import Attachment
from goldclone.settings import BRIDGED, NetworkConfig


class Walls:
    """``attached`` (by tap) and ``bridge_of`` are the networks' own, read as they change."""

    def __init__(
        self,
        config: NetworkConfig,
        label: str,
        attached: Mapping[str, Attachment],
        bridge_of: Callable[[str], str],
    ) -> None:
        self._config = config
        self._label = label
        self._attached = attached
        self._bridge_of = bridge_of
        self._locks: dict[str, asyncio.Lock] = {}
        """Held while a network's rules change, so that a full rewrite from ``attached``
        and one guest's change are never interleaved."""
        self._bridged_written = False
        self._drops = firewall.Drops()

    def wall(self, network_type: str) -> firewall.Wall:
        """The rules of ``network_type``'s network (see ``firewall``)."""
        name = self._bridge_of(network_type)
        suffix = ""
        if network_type == BRIDGED:  # not ours alone: another service may use the same bridge
            suffix = "_" + hashlib.sha256(self._label.encode()).hexdigest()[:8]
        return firewall.Wall(
            name,
            network_type,
            firewall.table_name(name, suffix),
            self._config.guest_host_ports,
            self._config.egress,
        )

    def _guards(self, bridge_name: str) -> list[firewall.Guard]:
        return [_guard(a) for a in self._attached.values() if a.bridge == bridge_name]

    def _lock(self, wall: firewall.Wall) -> asyncio.Lock:
        return self._locks.setdefault(wall.bridge, asyncio.Lock())

    async def rewrite(self, network_type: str) -> None:
        """Write ``network_type``'s rules whole, from the guests attached to it."""
        wall = self.wall(network_type)
        async with self._lock(wall):
            subnet = self._config.subnet(network_type) if wall.owned else None
            await firewall.apply(wall, subnet, self._guards(wall.bridge))

    async def put(self, attachment: Attachment, replacing: Attachment | None = None) -> None:
        """Put ``attachment``'s rules in place of those of ``replacing``."""
        wall = self.wall(attachment.network_type)
        if attachment.network_type == BRIDGED and not self._bridged_written:
            await self.rewrite(BRIDGED)
            self._bridged_written = True
            return
        async with self._lock(wall):
            old = _guard(replacing) if replacing is not None else None
            await firewall.guard(wall, _guard(attachment), self._guards(wall.bridge), old)

    async def drop(self, attachment: Attachment) -> None:
        """Take ``attachment``'s rules out."""
        wall = self.wall(attachment.network_type)
        if attachment.network_type == BRIDGED and not self._bridged_written:
            return
        async with self._lock(wall):
            await firewall.unguard(wall, _guard(attachment), self._guards(wall.bridge))

    async def remove_bridged(self) -> None:
        """Remove this service's rules on the host's bridge, if it has one."""
        if self._config.bridged_bridge is not None:
            await firewall.remove(self.wall(BRIDGED))
            self._bridged_written = False

    def dropped(self, tap: str) -> dict[str, int] | None:
        """What the rules of the guest on ``tap`` dropped of what it sent, by reason, as of the
        last ``count``; ``None`` when it has no rules here."""
        known = self._attached.get(tap)
        if known is None:
            return None
        zeros = dict.fromkeys(firewall.own_reasons(self.wall(known.network_type), _guard(known)), 0)
        return zeros | self._drops.by_tap.get(tap, {})

    def dropped_by_reason(self) -> dict[str, int]:
        """What the rules of every network in use dropped, by reason, as of the last
        ``count``."""
        return dict(self._drops.by_reason)

    async def count(self, owned_up: Iterable[str]) -> None:
        """Read what the rules of the owned networks ``owned_up`` and of the bridged one have
        dropped so far, so that reading a VM's costs no ``nft``."""
        drops = firewall.Drops()
        for network_type in sorted(owned_up) + ([BRIDGED] if self._bridged_written else []):
            await firewall.count(self.wall(network_type), drops)
        self._drops = drops


def _guard(attachment: Attachment) -> firewall.Guard:
    reach = attachment.reach
    return firewall.Guard(
        attachment.tap,
        attachment.mac,
        IPv4Address(attachment.ip) if attachment.ip else None,
        reach.group,
        reach.egress,
    )
